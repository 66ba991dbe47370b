"""Reading predictions and annotation files for `vlpet eval --predictions`: the helpers every task shares.

Each task's own readers (in its module) build on these; every problem is a DataError naming the file, the
record or id, and what to change.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from vlpet_cli.errors import DataError
from vlpet_cli.metrics import preview_ids


def read_text(path: Path) -> str:
    """The text of a UTF-8 file; a missing, unreadable or non-UTF-8 file is a DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                        f"save the file as UTF-8 (JSON files are UTF-8)") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc}); check the file and its permissions") from None


def read_json(path: Path, allow_jsonl: bool = False) -> Any:
    """Load a JSON file (or JSON lines when allowed); a missing or malformed file is a DataError naming it."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        if allow_jsonl:
            lines = [line for line in text.splitlines() if line.strip()]
            try:
                return [json.loads(line) for line in lines]
            except json.JSONDecodeError:
                pass
        raise DataError(
            f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None


def records(data: Any, path: Path, what: str) -> list[dict[str, Any]]:
    """Require a JSON list of objects."""
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a JSON list of {what} objects, got {type(data).__name__}")
    return data


def field(record: dict[str, Any], names: Sequence[str], path: Path, index: int | str) -> Any:
    """The first of `names` present in a record; absent is a DataError naming the file, record and field."""
    for name in names:
        if name in record:
            return record[name]
    wanted = " or ".join(repr(n) for n in names)
    raise DataError(
        f"{path}: record {index} has no {wanted} field (keys: {', '.join(map(str, record)) or 'none'})"
    )


def put(table: dict[str, Any], key: str, value: Any, path: Path) -> None:
    """Insert a value, refusing a second entry for the same id."""
    if key in table:
        raise DataError(f"{path}: id {key!r} appears more than once; keep one prediction per id")
    table[key] = value


def as_text(value: Any, path: Path, key: str, what: str) -> str:
    """Require a string value."""
    if not isinstance(value, str):
        raise DataError(f"{path}: {what} for id {key!r} is {value!r}, not a string")
    return value


def check_ids(
    predicted: Iterable[str],
    reference: Iterable[str],
    predictions: Path,
    annotations: Path,
    allow_missing: bool,
) -> list[str]:
    """The ids to score: every prediction must be annotated, and (unless allowed) every annotation predicted."""
    ref_ids = set(reference)
    pred_ids = list(predicted)
    extra = [i for i in pred_ids if i not in ref_ids]
    if extra:
        raise DataError(
            f"{predictions}: {len(extra)} of {len(pred_ids)} predicted ids are not in {annotations}: "
            f"{preview_ids(extra)}; check that both files are for the same task and split"
        )
    if not allow_missing:
        have = set(pred_ids)
        missing = [i for i in reference if i not in have]
        if missing:
            raise DataError(
                f"{predictions}: no prediction for {len(missing)} of {len(ref_ids)} ids in {annotations}: "
                f"{preview_ids(missing)}; predict the whole split, or score only the predicted ids with "
                "allow_missing=True (--allow-missing)"
            )
    if not pred_ids:
        raise DataError(f"{predictions}: no predictions in the file")
    return pred_ids


def load_qa_predictions(path: Path) -> dict[str, str]:
    """VQA/GQA predictions: [{"question_id"|"questionId", "answer"|"prediction"}] -> {str(qid): answer}."""
    path = Path(path)
    out: dict[str, str] = {}
    for i, rec in enumerate(records(read_json(path), path, "prediction")):
        key = str(field(rec, ("question_id", "questionId"), path, i))
        answer = field(rec, ("answer", "prediction"), path, i)
        put(out, key, as_text(answer, path, key, "answer"), path)
    return out
