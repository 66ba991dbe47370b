"""Scoring a predictions file against an annotation file (`vlpet eval --predictions`): what every task shares.

Files are read by the one reader (`records.read_json`); each task's own readers (in its module) build on these
helpers, and every problem is a DataError naming the file, the record or id, and the fix.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vlpet_cli.errors import DataError
from vlpet_cli.metrics import preview_ids
from vlpet_cli.tasks.records import read_records


def put(table: dict[str, Any], key: str, value: Any, path: Path) -> None:
    """Insert a value, refusing a second entry for the same id."""
    if key in table:
        raise DataError(f"{path}: id {key!r} appears more than once. Fix: keep one entry per id.")
    table[key] = value


def as_text(value: Any, path: Path, key: str, what: str) -> str:
    """Require a string value."""
    if not isinstance(value, str):
        raise DataError(f"{path}: {what} for id {key!r} is {value!r}, not a string. Fix: write it as a string.")
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
            f"{preview_ids(extra)}. Fix: check that both files are for the same task and split."
        )
    if not allow_missing:
        have = set(pred_ids)
        missing = [i for i in reference if i not in have]
        if missing:
            raise DataError(
                f"{predictions}: no prediction for {len(missing)} of {len(ref_ids)} ids in {annotations}: "
                f"{preview_ids(missing)}. Fix: predict the whole split, or score only the predicted ids with "
                "allow_missing=True (--allow-missing)."
            )
    if not pred_ids:
        raise DataError(f"{predictions}: no predictions in the file. Fix: check --predictions.")
    return pred_ids


def load_qa_predictions(path: Path) -> dict[str, str]:
    """VQA/GQA predictions: [{"question_id"|"questionId", "answer"|"prediction"}] -> {str(qid): answer}."""
    path = Path(path)
    out: dict[str, str] = {}
    for ref in read_records(path, "predictions file", "check --predictions"):
        key = str(ref.field("question_id", "questionId"))
        put(out, key, as_text(ref.field("answer", "prediction"), path, key, "answer"), path)
    return out


def shown_fields(path: Path, id_keys: tuple[str, ...], text_keys: tuple[str, ...],
                 image_keys: tuple[str, ...]) -> dict[str, tuple[str, tuple[str, ...]]]:
    """{id: (text, image ids)} of an annotation file, for the results page of `vlpet eval --predictions --html`:
    the first of `text_keys` and every one of `image_keys` a record holds (nothing where it holds none). Reads a
    list of records, JSON lines, {"annotations": [...]} or {id: record}; anything else gives {}."""
    from vlpet_cli.tasks.records import read_json

    data = read_json(Path(path), "annotation file", "check --annotations")
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        data = data["annotations"]
    pairs = (list(data.items()) if isinstance(data, dict) else
             [(next((r[k] for k in id_keys if k in r), None), r) for r in data if isinstance(r, dict)]
             if isinstance(data, list) else [])
    out: dict[str, tuple[str, tuple[str, ...]]] = {}
    for key, raw in pairs:
        if key is None or not isinstance(raw, dict):
            continue
        text = next((raw[k] for k in text_keys if isinstance(raw.get(k), str)), "")
        images = tuple(str(raw[k]) for k in image_keys if isinstance(raw.get(k), (str, int)))
        out.setdefault(str(key), (text, images))
    return out
