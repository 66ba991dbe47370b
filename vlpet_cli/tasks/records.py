"""Annotation records as pydantic models, the one reader of JSON and JSON-lines files, and the messages that
name the file, the record (or line), the field and the fix.

Each task declares the records of its split files as a `RecordModel`; `parse_record` validates one raw record
and turns the first problem into one DataError such as
"vqa/karpathy_train.json: record 1 (question_id=6): field 'label' should be an object, found list ['x'].
Fix: correct the record or regenerate the file." Validators raise ValueError with the whole problem text.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

from vlpet_cli.errors import DataError
from vlpet_cli.metrics import preview_ids

_TYPE_WORDS = {"int_type": "an integer", "string_type": "a string", "float_type": "a number",
               "dict_type": "an object", "list_type": "a list", "bool_type": "a boolean"}


class RecordModel(BaseModel):
    """Base of annotation record models: strict types (no bool for int, no int for str), other keys ignored."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


M = TypeVar("M", bound=RecordModel)


def id_text(raw: Any, key: str) -> str:
    """'key=value' for messages, or '' when the record has no usable id."""
    if isinstance(raw, dict) and isinstance(raw.get(key), (str, int)) and not isinstance(raw.get(key), bool):
        return f"{key}={raw[key]}"
    return ""


class RecordRef:
    """Points at a raw record in a file so that validation errors can name it (id text built on error)."""

    __slots__ = ("id_key", "index", "path", "raw", "unit")

    def __init__(self, path: Path, index: int, raw: Any = None, id_key: str = "", unit: str = "record") -> None:
        self.path, self.index, self.raw, self.id_key, self.unit = path, index, raw, id_key, unit

    def error(self, problem: str, fix: str = "correct the record or regenerate the file") -> DataError:
        """A DataError naming the file, the record index (or line of a .jsonl file) and id, problem and fix."""
        return DataError(f"{self.path}: {self.who()}: {problem}. Fix: {fix}.")

    def who(self) -> str:
        """'record 3 (question_id=5)' or 'line 4': the record, for messages."""
        rid = id_text(self.raw, self.id_key) if self.id_key else ""
        return f"{self.unit} {self.index}" + (f" ({rid})" if rid else "")

    def field(self, *names: str) -> Any:
        """The value of the first of `names` the record has; none of them (or a record that is not an object) is
        a DataError naming the record and the field."""
        if not isinstance(self.raw, dict):
            raise self.error(f"expected an object, found {type(self.raw).__name__}")
        for name in names:
            if name in self.raw:
                return self.raw[name]
        keys = ", ".join(map(str, self.raw)) or "none"
        raise self.error(f"field {' or '.join(repr(n) for n in names)} is missing (keys: {keys})")


def _field_path(loc: tuple) -> tuple[str, int]:
    """A field's name for messages, nested fields of list items included ('descs[0].desc'), and how many
    parts of the location it used (the rest names union members, e.g. 'int')."""
    text, used = str(loc[0]), 1
    while used < len(loc) and isinstance(loc[used], int):
        text += f"[{loc[used]}]"
        used += 1
        if used < len(loc) and isinstance(loc[used], str):
            text += f".{loc[used]}"
            used += 1
    return text, used


def problem_text(exc: ValidationError, raw: Any) -> str:
    """The first problem of a validation error in words: missing field, wrong type (with the value) or rule."""
    errors = exc.errors()
    first = errors[0]
    if not first["loc"]:
        return f"expected an object, found {type(raw).__name__}"
    field, used = _field_path(first["loc"])
    if first["type"] == "value_error":
        return str(first["msg"]).removeprefix("Value error, ")
    value = first.get("input")
    if first["type"] == "missing" or value is None:
        return f"field '{field}' is missing"
    wants = [_TYPE_WORDS.get(e["type"], e["type"]) for e in errors if e["loc"][:used] == first["loc"][:used]]
    return f"field '{field}' should be {' or '.join(dict.fromkeys(wants))}, found {type(value).__name__} {value!r:.60}"


def parse_record(model: type[M], raw: Any, ref: RecordRef) -> M:
    """Validate one raw record against its model; the first problem becomes a DataError naming the record."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ref.error(problem_text(exc, raw)) from None


def _soft_label(label: dict[str, Any]) -> dict[str, float]:
    """An LXMERT-style soft label {answer: score >= 0}, scores as floats."""
    out = {}
    for answer, score in label.items():
        if type(score) not in (int, float) or score < 0:
            raise ValueError(f"field 'label' maps {answer!r} to {score!r}; scores must be numbers >= 0")
        out[answer] = float(score)
    return out


SoftLabel = Annotated[dict[str, Any], AfterValidator(_soft_label)]


def answer_list(value: Any, field: str = "answers") -> list[str]:
    """Answers given as strings or as official {"answer": ...} objects, as a list of strings (ValueError if not)."""
    if not isinstance(value, list):
        raise ValueError(f"field '{field}' should be a list of answers, found {type(value).__name__}")
    out = []
    for k, a in enumerate(value):
        if isinstance(a, dict) and isinstance(a.get("answer"), str):
            out.append(a["answer"])
        elif isinstance(a, str):
            out.append(a)
        else:
            raise ValueError(f"field '{field}' item {k} should be a string or an object with 'answer', "
                             f"found {a!r:.60}")
    return out


Answers = Annotated[Any, AfterValidator(answer_list)]


REPAIR = "repair or re-download the file"


def read_text(path: Path, what: str = "file", fix: str = "check the path") -> str:
    """The text of a UTF-8 file (line ends as \\n); a missing, unreadable or non-UTF-8 file is a DataError naming
    the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path}. Fix: {fix}.")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}). "
                        f"Fix: save the file as UTF-8 (JSON files are UTF-8).") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc}). Fix: check the file and its "
                        f"permissions.") from None


class JsonLines(list):
    """The values of a JSON-lines file, in order, with the line number of each in `lines` (for messages)."""

    def __init__(self, numbered: list[tuple[int, Any]]) -> None:
        super().__init__(value for _, value in numbered)
        self.lines = [n for n, _ in numbered]


def read_json(path: Path, what: str = "file", fix: str = "check the path", lines: bool = False) -> Any:
    """The one reader of the JSON files vlpet is given: a .json file's document, or the values of a JSON-lines
    file (.jsonl, `lines`, or a .json file holding one value per line, as NLVR2's own files do) as `JsonLines`.
    Every problem is one DataError naming the file, the line, and the fix (`fix` for a missing file)."""
    path = Path(path)
    text = read_text(path, what, fix)
    if not lines and path.suffix != ".jsonl":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg != "Extra data":  # "Extra data": a first value parsed, then another: JSON lines
                raise DataError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}). "
                                f"Fix: {REPAIR}.") from None
    numbered = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                numbered.append((lineno, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {lineno}: not valid JSON (column {exc.colno}: {exc.msg}). "
                                f"Fix: repair the line or re-download the file.") from None
    return JsonLines(numbered)


def record_refs(data: Any, path: Path, what: str, id_key: str = "") -> Iterator[RecordRef]:
    """The records of a JSON list (or JSON lines), each as a RecordRef naming its record index (or line), made as
    they are iterated; a file that is not a list is a DataError at once."""
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, found {type(data).__name__}. "
                        f"Fix: use the {what} in its documented format (spec/pipeline.md §1).")
    lines = getattr(data, "lines", None)
    if lines is not None:
        return (RecordRef(path, n, raw, id_key, unit="line") for n, raw in zip(lines, data))
    return (RecordRef(path, i, raw, id_key) for i, raw in enumerate(data))


def read_records(path: Path, what: str, fix: str, id_key: str = "", lines: bool = False) -> Iterator[RecordRef]:
    """The records of a JSON list or JSON-lines file (`read_json`), each a RecordRef for messages."""
    return record_refs(read_json(path, what, fix, lines), Path(path), what, id_key)


def parse_records(path: Path, model: type[M], what: str, fix: str,
                  id_key: str = "") -> Iterator[tuple[RecordRef, M]]:
    """Every record of a JSON list or JSON-lines file (`read_records`) validated against its model, one at a time."""
    return ((ref, parse_record(model, ref.raw, ref)) for ref in read_records(path, what, fix, id_key))


def warn_empty(path: Path, what: str, ids: Sequence[Any], total: int, unit: str = "records") -> None:
    """One warning for a file whose records have an empty `what` (a question, a caption): the count and the
    first ids. Such records are kept (the reference keeps them), but they are usually a broken export."""
    if ids:
        warnings.warn(f"{path}: {len(ids)} of {total} {unit} have an empty {what} (first: {preview_ids(ids)}); "
                      f"they are used as they are: fix or remove them if that is not intended", UserWarning,
                      stacklevel=2)
