"""Score a predictions file against an annotation file, without a model (`vlpet score`).

Formats read:
  vqa   predictions [{"question_id", "answer"}]; annotations: official VQA v2 {"annotations": [{"question_id",
        "answers": [{"answer"}...], "answer_type", "question_type"}]} or a list of such records
  gqa   predictions [{"questionId", "prediction"}]; annotations: a list of {"question_id", "label": {ans: score}}
        (reference format) or an official GQA questions dict {qid: {"answer": ...}}
  nlvr  predictions: CSV lines "identifier,True|False" or JSON ({identifier: bool} or a list of records);
        annotations: a JSON list (or JSON lines) of {"identifier", "label": 0|1|"True"|"False"}
  coco  predictions [{"image_id", "caption"}]; annotations: COCO captions {"annotations": [{"image_id",
        "caption"}]} or Karpathy dataset_coco.json with a split (image id = cocoid or the filename stem)
Results use lower-case metric names; accuracies and caption metrics are x100.
"""

from __future__ import annotations

import csv
import json
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from vlpet_cli.errors import DataError, VlpetError
from vlpet_cli.metrics import DEFAULT_METRICS, TASKS, VALID_METRICS, preview_ids

_TASK_ALIASES = {"nlvr2": "nlvr", "caption": "coco", "captions": "coco", "coco_caption": "coco"}
_METRIC_ALIASES = {"rouge": "rougel", "accuracy": "acc", "vqaacc": "vqa"}
_KARPATHY_SPLITS = ("train", "restval", "val", "test")
_COCO_STEM = re.compile(r"^COCO_[A-Za-z]+\d{4}_0*(\d+)(?:\.jpg)?$")


# --------------------------------------------------------------------------------------------- names


def resolve_task(task: str) -> str:
    """Canonical task name (vqa, gqa, nlvr, coco); an unknown name is an error listing the valid ones."""
    name = _TASK_ALIASES.get(task.strip().lower(), task.strip().lower())
    if name not in TASKS:
        raise VlpetError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    return name


def resolve_metrics(task: str, metrics: Iterable[str] | None = None) -> list[str]:
    """Expand and check metric names for a task ("bleu" -> bleu1..bleu4); None gives the task's defaults."""
    task = resolve_task(task)
    if metrics is None:
        return list(DEFAULT_METRICS[task])
    chosen: list[str] = []
    for raw in metrics:
        name = re.sub(r"[\s_\-]", "", str(raw).lower())
        name = _METRIC_ALIASES.get(name, name)
        if name not in VALID_METRICS[task]:
            raise VlpetError(
                f"metric {raw!r} does not apply to task {task!r}; valid: {', '.join(VALID_METRICS[task])}"
            )
        for expanded in [f"bleu{i}" for i in range(1, 5)] if name == "bleu" else [name]:
            if expanded not in chosen:
                chosen.append(expanded)
    if not chosen:
        raise VlpetError(f"no metric given for task {task!r}; valid: {', '.join(VALID_METRICS[task])}")
    return chosen


# --------------------------------------------------------------------------------------------- reading


def read_json(path: Path, allow_jsonl: bool = False) -> Any:
    """Load a JSON file (or JSON lines when allowed); a missing or malformed file is a DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    text = path.read_text(encoding="utf-8")
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


def _records(data: Any, path: Path, what: str) -> list[dict[str, Any]]:
    """Require a JSON list of objects."""
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a JSON list of {what} objects, got {type(data).__name__}")
    return data


def _field(record: dict[str, Any], names: Sequence[str], path: Path, index: int | str) -> Any:
    """The first of `names` present in a record; absent is a DataError naming the file, record and field."""
    for name in names:
        if name in record:
            return record[name]
    wanted = " or ".join(repr(n) for n in names)
    raise DataError(
        f"{path}: record {index} has no {wanted} field (keys: {', '.join(map(str, record)) or 'none'})"
    )


def _put(table: dict[str, Any], key: str, value: Any, path: Path) -> None:
    """Insert a value, refusing a second entry for the same id."""
    if key in table:
        raise DataError(f"{path}: id {key!r} appears more than once; keep one prediction per id")
    table[key] = value


def _as_text(value: Any, path: Path, key: str, field: str) -> str:
    """Require a string value."""
    if not isinstance(value, str):
        raise DataError(f"{path}: {field} for id {key!r} is {value!r}, not a string")
    return value


def load_qa_predictions(path: Path) -> dict[str, str]:
    """VQA/GQA predictions: [{"question_id"|"questionId", "answer"|"prediction"}] -> {str(qid): answer}."""
    path = Path(path)
    out: dict[str, str] = {}
    for i, rec in enumerate(_records(read_json(path), path, "prediction")):
        key = str(_field(rec, ("question_id", "questionId"), path, i))
        answer = _field(rec, ("answer", "prediction"), path, i)
        _put(out, key, _as_text(answer, path, key, "answer"), path)
    return out


def load_vqa_annotations(path: Path) -> tuple[dict[str, dict[str, Any]], bool]:
    """Official VQA v2 annotations (or a list of records with "answers") -> ({str(qid): record}, is_pool).

    The official file covers a whole COCO split (a pool: a Karpathy test subset is scored against it).
    """
    path = Path(path)
    data = read_json(path)
    pooled = isinstance(data, dict)
    if pooled:
        if "annotations" not in data:
            raise DataError(
                f"{path}: not a VQA annotation file: no 'annotations' field; use the official VQA v2 "
                "v2_mscoco_*_annotations.json"
            )
        data = data["annotations"]
    out: dict[str, dict[str, Any]] = {}
    for i, rec in enumerate(_records(data, path, "annotation")):
        key = str(_field(rec, ("question_id",), path, i))
        answers = _field(rec, ("answers",), path, i)
        if not isinstance(answers, list) or not answers:
            raise DataError(f"{path}: record {i} (question {key}): 'answers' must be a non-empty list")
        _put(out, key, rec, path)
    return out, pooled


def load_gqa_labels(path: Path) -> dict[str, dict[str, float]]:
    """GQA labels: reference records [{"question_id", "label"}] or official {qid: {"answer"}} -> {qid: label}."""
    path = Path(path)
    data = read_json(path)
    if isinstance(data, dict):
        items = [(str(k), v) for k, v in data.items()]
        if not all(isinstance(v, dict) for _, v in items):
            raise DataError(
                f"{path}: expected an official GQA questions file {{question_id: {{'answer': ...}}}}"
            )
    else:
        items = [
            (str(_field(r, ("question_id", "questionId"), path, i)), r)
            for i, r in enumerate(_records(data, path, "question"))
        ]
    out: dict[str, dict[str, float]] = {}
    for key, rec in items:
        if isinstance(rec.get("label"), dict):
            label = {str(a): float(s) for a, s in rec["label"].items()}
        elif isinstance(rec.get("answer"), str):
            label = {rec["answer"]: 1.0}
        else:
            raise DataError(
                f"{path}: question {key!r} has no 'label' dict or 'answer' string; use the reference "
                "testdev.json records or the official GQA *_balanced_questions.json"
            )
        _put(out, key, label, path)
    return out


def load_nlvr_predictions(path: Path) -> dict[str, bool]:
    """NLVR2 predictions: CSV "identifier,True|False" lines (the reference's nlvr_submit.csv) or JSON."""
    from vlpet_cli.metrics.accuracy import parse_bool

    path = Path(path)
    rows: list[tuple[str, Any, int | str]] = []
    if path.suffix.lower() == ".csv":
        if not path.is_file():
            raise DataError(f"{path}: file not found")
        with path.open(newline="", encoding="utf-8") as handle:
            for line_no, row in enumerate(csv.reader(handle), start=1):
                if not row or not "".join(row).strip():
                    continue
                if line_no == 1 and row[0].strip().lower() == "identifier":
                    continue  # header line
                if len(row) < 2:
                    raise DataError(
                        f"{path}: line {line_no} is {','.join(row)!r}; expected identifier,True|False"
                    )
                rows.append((row[0].strip(), row[1], f"line {line_no}"))
    else:
        data = read_json(path, allow_jsonl=True)
        if isinstance(data, dict):
            rows = [(str(k), v, repr(k)) for k, v in data.items()]
        else:
            for i, rec in enumerate(_records(data, path, "prediction")):
                value = _field(rec, ("prediction", "answer", "label"), path, i)
                rows.append((str(_field(rec, ("identifier",), path, i)), value, i))
    out: dict[str, bool] = {}
    for ident, value, where in rows:
        try:
            _put(out, ident, parse_bool(value), path)
        except ValueError as exc:
            raise DataError(f"{path}: {where} (identifier {ident!r}): {exc}") from None
    return out


def load_nlvr_labels(path: Path) -> dict[str, bool]:
    """NLVR2 labels: JSON list or JSON lines of {"identifier", "label"} (0/1, bool or "True"/"False")."""
    from vlpet_cli.metrics.accuracy import parse_bool

    path = Path(path)
    out: dict[str, bool] = {}
    for i, rec in enumerate(_records(read_json(path, allow_jsonl=True), path, "NLVR2 example")):
        ident = str(_field(rec, ("identifier",), path, i))
        try:
            _put(out, ident, parse_bool(_field(rec, ("label",), path, i)), path)
        except ValueError as exc:
            raise DataError(f"{path}: record {i} (identifier {ident!r}): label {exc}") from None
    return out


def image_key(value: Any) -> str:
    """Canonical COCO image id: 391895, "391895" and "COCO_val2014_000000391895" all give "391895"."""
    text = str(value).strip()
    if text.isdigit():
        return str(int(text))
    match = _COCO_STEM.match(text)
    return str(int(match.group(1))) if match else text


def load_caption_predictions(path: Path) -> dict[str, str]:
    """COCO results [{"image_id", "caption"}] (or {image_id: caption}) -> {image key: caption}."""
    path = Path(path)
    data = read_json(path)
    pairs = (
        list(data.items())
        if isinstance(data, dict)
        else [
            (_field(r, ("image_id", "img_id"), path, i), _field(r, ("caption",), path, i))
            for i, r in enumerate(_records(data, path, "caption result"))
        ]
    )
    out: dict[str, str] = {}
    for raw_id, caption in pairs:
        key = image_key(raw_id)
        _put(out, key, _as_text(caption, path, key, "caption"), path)
    return out


def load_caption_references(path: Path, split: str | None = None) -> tuple[dict[str, list[str]], bool]:
    """References per image key from COCO captions JSON or Karpathy dataset_coco.json -> (refs, is_pool)."""
    path = Path(path)
    data = read_json(path)
    if (
        isinstance(data, dict)
        and isinstance(data.get("images"), list)
        and any(isinstance(im, dict) and "sentences" in im for im in data["images"])
    ):
        return _karpathy_references(data["images"], path, split), False
    if isinstance(data, dict) and "annotations" in data:
        if split is not None:
            raise VlpetError(
                f"{path} is a COCO captions annotation file, which has no splits; drop the split "
                "or pass Karpathy's dataset_coco.json"
            )
        refs: dict[str, list[str]] = {}
        for i, rec in enumerate(_records(data["annotations"], path, "caption annotation")):
            key = image_key(_field(rec, ("image_id",), path, i))
            caption = _as_text(_field(rec, ("caption",), path, i), path, key, "caption")
            refs.setdefault(key, []).append(caption)
        return refs, True
    raise DataError(
        f"{path}: not a caption annotation file: expected an 'annotations' field (COCO captions_*.json) or "
        "'images' with 'sentences' (Karpathy dataset_coco.json)"
    )


def _karpathy_references(images: list[Any], path: Path, split: str | None) -> dict[str, list[str]]:
    """Raw, stripped sentences per cocoid for one Karpathy split (train includes restval, as in the reference)."""
    if split is None or split not in _KARPATHY_SPLITS:
        raise VlpetError(
            f"{path} is Karpathy's dataset_coco.json: choose the split that was predicted "
            f"({', '.join(_KARPATHY_SPLITS)}), e.g. split='test'"
        )
    wanted = {"train", "restval"} if split == "train" else {split}
    refs: dict[str, list[str]] = {}
    for i, image in enumerate(_records(images, path, "image")):
        if _field(image, ("split",), path, i) not in wanted:
            continue
        key = image_key(_field(image, ("cocoid",), path, i))
        sentences = _field(image, ("sentences",), path, i)
        raws = [s.get("raw") for s in sentences if isinstance(s, dict)]
        if not raws or not all(isinstance(r, str) for r in raws):
            raise DataError(f"{path}: image {i} (cocoid {key}) has sentences without a 'raw' string")
        refs[key] = [r.strip() for r in raws]
    if not refs:
        raise DataError(f"{path}: no images in split {split!r}")
    return refs


# --------------------------------------------------------------------------------------------- scoring


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


def _score_vqa(
    predictions: Path, annotations: Path, variant: str, allow_missing: bool | None
) -> dict[str, Any]:
    """VQA accuracy x100 with per answer type and per question type breakdowns."""
    from vlpet_cli.metrics.vqa import vqa_accuracy

    preds = load_qa_predictions(predictions)
    records, pooled = load_vqa_annotations(annotations)
    ids = check_ids(
        preds, records, predictions, annotations, pooled if allow_missing is None else allow_missing
    )
    result = vqa_accuracy({i: preds[i] for i in ids}, records, variant=variant)  # type: ignore[arg-type]
    return {
        "vqa": result["overall"],
        "per_answer_type": result["per_answer_type"],
        "per_question_type": result["per_question_type"],
        "n": result["n"],
    }


def _score_gqa(predictions: Path, annotations: Path, allow_missing: bool | None) -> dict[str, Any]:
    """GQA exact-match accuracy x100."""
    from vlpet_cli.metrics.accuracy import gqa_accuracy

    preds = load_qa_predictions(predictions)
    labels = load_gqa_labels(annotations)
    ids = check_ids(preds, labels, predictions, annotations, bool(allow_missing))
    return {"acc": gqa_accuracy({i: preds[i] for i in ids}, labels), "n": len(ids)}


def _score_nlvr(predictions: Path, annotations: Path, allow_missing: bool | None) -> dict[str, Any]:
    """NLVR2 accuracy and consistency x100."""
    from vlpet_cli.metrics.accuracy import nlvr_scores

    preds = load_nlvr_predictions(predictions)
    labels = load_nlvr_labels(annotations)
    ids = check_ids(preds, labels, predictions, annotations, bool(allow_missing))
    return dict(nlvr_scores(preds, {i: labels[i] for i in ids}))


def _score_coco(
    predictions: Path,
    annotations: Path,
    split: str | None,
    metrics: list[str],
    allow_missing: bool | None,
    tokenizer: str,
    explicit: bool,
) -> dict[str, Any]:
    """Caption metrics x100 from pycocoevalcap's scorers."""
    from vlpet_cli.metrics.caption import caption_scores, java_available

    if "meteor" in metrics and not explicit and not java_available():
        warnings.warn(
            "Java is not on PATH: METEOR is left out (install Java to get it)", UserWarning, stacklevel=3
        )
        metrics = [m for m in metrics if m != "meteor"]
    preds = load_caption_predictions(predictions)
    refs, pooled = load_caption_references(annotations, split)
    ids = check_ids(preds, refs, predictions, annotations, pooled if allow_missing is None else allow_missing)
    scorers = {"bleu" if m.startswith("bleu") else "rouge" if m == "rougel" else m for m in metrics}
    raw = caption_scores(
        {i: preds[i] for i in ids},
        {i: refs[i] for i in ids},
        metrics=[s for s in ("bleu", "meteor", "rouge", "cider", "spice") if s in scorers],
        tokenizer=tokenizer,
    )
    out: dict[str, Any] = {m: 100.0 * raw[m] for m in metrics}
    out.update(tokenizer=raw["tokenizer"], n=raw["n"])
    return out


def score_predictions_file(
    task: str,
    predictions: Path,
    annotations: Path,
    split: str | None = None,
    metrics: list[str] | None = None,
    vqa_variant: str = "reference",
    allow_missing: bool | None = None,
    tokenizer: str = "auto",
) -> dict[str, Any]:
    """Score a predictions file for a task against an annotation file; metric names lower-case, values x100.

    allow_missing=None lets annotation files that cover a whole pool (official VQA v2 annotations, COCO
    captions_*.json) hold ids without a prediction; split-sized files must be predicted completely.
    """
    task = resolve_task(task)
    chosen = resolve_metrics(task, metrics)
    predictions, annotations = Path(predictions), Path(annotations)
    if split is not None and task != "coco":
        raise VlpetError(
            f"split applies only to coco with Karpathy's dataset_coco.json, not to task {task!r}"
        )
    if task == "vqa":
        return _score_vqa(predictions, annotations, vqa_variant, allow_missing)
    if task == "gqa":
        return _score_gqa(predictions, annotations, allow_missing)
    if task == "nlvr":
        result = _score_nlvr(predictions, annotations, allow_missing)
        return {k: v for k, v in result.items() if k in chosen or k == "n"}
    return _score_coco(predictions, annotations, split, chosen, allow_missing, tokenizer, metrics is not None)
