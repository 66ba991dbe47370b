"""NLVR2 (spec/pipeline.md §1.3, §3.3, §5.2): a sentence about an image pair, target "true"/"false",
decoded by scoring the two answers; accuracy and consistency; the CSV submission and prediction files."""

from __future__ import annotations

import csv
import io
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar

from pydantic import field_validator

from vlpet_cli.errors import DataError
from vlpet_cli.tasks import files
from vlpet_cli.tasks.base import FileScoring, Inputs, Record, Review, ScoreChoices, Task
from vlpet_cli.tasks.records import (
    RecordModel,
    parse_records,
    read_json,
    read_text,
    record_refs,
    warn_empty,
)

CHOICES = ("true", "false")


SPLIT_FILES_FIX = "check --data-root: it must contain nlvr/{train,valid,test}.json (VL-T5's NLVR2 files)"

class NlvrRecord(RecordModel):
    """One record of nlvr/<split>.json (VL-T5's format): two images, a sentence and a 0/1 label."""

    identifier: str
    img0: str
    img1: str
    sent: str
    label: Any = None
    uid: str | None = None

    @field_validator("label")
    @classmethod
    def _zero_or_one(cls, label: Any) -> int | None:
        if label is not None and (label not in (0, 1) or isinstance(label, float)):
            raise ValueError(f"field 'label' should be 0 or 1, found {label!r:.60}")
        return None if label is None else int(label)


def _bools(path: Path, rows: list[tuple[str, Any, str]], what: str) -> dict[str, bool]:
    """{identifier: bool} of (identifier, value, where) rows; a value that is not a boolean names its row."""
    from vlpet_cli.metrics.accuracy import parse_bool

    out: dict[str, bool] = {}
    for ident, value, where in rows:
        try:
            files.put(out, ident, parse_bool(value), path)
        except ValueError as exc:
            raise DataError(f"{path}: {where} (identifier {ident!r}): {what}{exc}. Fix: write True or False (or "
                            f"1 or 0).") from None
    return out


def load_predictions(path: Path) -> dict[str, bool]:
    """NLVR2 predictions: CSV "identifier,True|False" lines (the reference's nlvr_submit.csv) or JSON."""
    path = Path(path)
    rows: list[tuple[str, Any, str]] = []
    if path.suffix.lower() == ".csv":
        text = read_text(path, "predictions file", "check --predictions")
        for line_no, row in enumerate(csv.reader(io.StringIO(text, newline="")), start=1):
            if not row or not "".join(row).strip():
                continue
            if line_no == 1 and row[0].strip().lower() == "identifier":
                continue  # header line
            if len(row) < 2:
                raise DataError(f"{path}: line {line_no} is {','.join(row)!r}. Fix: write one "
                                f"identifier,True|False a line.")
            rows.append((row[0].strip(), row[1], f"line {line_no}"))
        return _bools(path, rows, "")
    data = read_json(path, "predictions file", "check --predictions")
    if isinstance(data, dict):
        return _bools(path, [(str(k), v, f"id {k!r}") for k, v in data.items()], "")
    for ref in record_refs(data, path, "predictions file"):
        rows.append((str(ref.field("identifier")), ref.field("prediction", "answer", "label"), ref.who()))
    return _bools(path, rows, "")


def load_labels(path: Path) -> dict[str, bool]:
    """NLVR2 labels: JSON list or JSON lines of {"identifier", "label"} (0/1, bool or "True"/"False")."""
    path = Path(path)
    refs = record_refs(read_json(path, "NLVR2 annotation file", "check --annotations"), path, "NLVR2 annotation file")
    return _bools(path, [(str(ref.field("identifier")), ref.field("label"), ref.who()) for ref in refs], "label ")


class NlvrTask(Task):
    """NLVR2: 'nlvr: ' + sentence (no truncation) over two images -> 'true' or 'false'."""

    split_files_fix = SPLIT_FILES_FIX
    name = "nlvr"
    aliases = ("nlvr2",)
    folder = "nlvr"
    default_prompt = "nlvr: "
    splits: ClassVar[dict[str, str]] = {"train": "train", "val": "valid", "test": "test"}
    input_max_length = None
    target_max_length = None
    loss_reduction = "example"
    inputs = Inputs(images=2, text="statement")
    batch_ratio = Fraction(20, 60)
    decoding = ScoreChoices(CHOICES)
    valid_metrics = ("acc", "consistency")
    default_metrics = ("acc", "consistency")
    primary_metric = "acc"
    label = "NLVR2 accuracy"
    image_fields = ("img0", "img1")

    def feature_source(self, split_name: str) -> str:
        """All NLVR2 images (train, dev, test-P) live under nlvr/."""
        return "nlvr"

    def read_split(self, data_root: Path, name: str, for_eval: bool) -> list[Record]:
        """Read nlvr/<name>.json; each record names two images (img0, img1) and a 0/1 label."""
        path = self.split_path(data_root, name)
        source = self.feature_source(name)
        records = []
        for ref, rec in parse_records(path, NlvrRecord, "NLVR2 split file", SPLIT_FILES_FIX, "identifier"):
            if rec.label is None and not for_eval:
                raise ref.error("field 'label' is missing")
            records.append(Record(str(path), ref.index, rec.identifier, rec.sent, (rec.img0, rec.img1), source,
                                  rec.label, {"uid": rec.uid}))
        warn_empty(path, "sentence", [r.id for r in records if not r.text.strip()], len(records))
        return records

    def target(self, record: Record, rng: Any, train: bool) -> tuple[str, float] | None:
        """'true' for label 1, 'false' for label 0, weight 1."""
        if record.label is None:
            return None
        return (CHOICES[0] if record.label == 1 else CHOICES[1]), 1.0

    def eval_info(self, record: Record) -> dict:
        """identifier (for consistency groups), both image ids and the label."""
        return {"identifier": record.id, "img0": record.image_ids[0], "img1": record.image_ids[1],
                "sent": record.text, "label": record.label, "uid": (record.extra or {}).get("uid")}

    # ---- scoring and files ------------------------------------------------------------------------------
    def score(self, predictions: list[dict], metrics: list[str] | None = None,
              vqa_variant: str = "reference") -> dict:
        """Accuracy and consistency (all statements about one image pair right), x100."""
        from vlpet_cli.metrics.accuracy import nlvr_scores

        self.resolve_metrics(metrics)
        result = nlvr_scores({p["identifier"]: p["prediction"] == CHOICES[0] for p in predictions},
                             {p["identifier"]: bool(p["label"]) for p in predictions})
        return {k: result[k] for k in ("acc", "consistency")}

    def submission(self, predictions: list[dict]) -> tuple[str, str]:
        """The reference's nlvr_submit.csv: lines "identifier,True|False"."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        for p in predictions:
            writer.writerow([p["identifier"], "True" if p["prediction"] == CHOICES[0] else "False"])
        return "csv", buf.getvalue()

    def score_files(self, job: FileScoring) -> dict:
        """NLVR2 accuracy and consistency x100 (the metrics asked for, and n)."""
        from vlpet_cli.metrics.accuracy import nlvr_scores

        metrics = self.resolve_metrics(job.metrics)
        preds = load_predictions(job.predictions)
        labels = load_labels(job.annotations)
        ids = files.check_ids(preds, labels, job.predictions, job.annotations, job.allowed_missing(False))
        result = dict(nlvr_scores(preds, {i: labels[i] for i in ids}))
        return {k: v for k, v in result.items() if k in metrics or k == "n"}

    # ---- looking at results -------------------------------------------------------------------------------
    def file_predictions(self, job: FileScoring) -> list[dict]:
        """Predictions ('true'/'false') with their labels, statements and image pairs (img0/img1, else NLVR2's
        names from the identifier: 'dev-850-0-1' -> 'dev-850-0-img0', 'dev-850-0-img1')."""
        preds = load_predictions(job.predictions)
        labels = load_labels(job.annotations)
        ids = files.check_ids(preds, labels, job.predictions, job.annotations, job.allowed_missing(False))
        shown = files.shown_fields(job.annotations, ("identifier",), ("sent", "sentence"), ("img0", "img1"))
        out = []
        for i in ids:
            text, images = shown.get(i, ("", ()))
            if len(images) != 2:
                stem = i.rsplit("-", 1)[0]
                images = (f"{stem}-img0", f"{stem}-img1")
            out.append({"identifier": i, "img0": images[0], "img1": images[1], "sent": text,
                        "label": int(labels[i]), "prediction": CHOICES[0] if preds[i] else CHOICES[1]})
        return out

    def record_scores(self, predictions: list[dict], vqa_variant: str = "reference") -> list[float]:
        """100 where the statement was judged right ('true' for label 1, 'false' for 0), else 0."""
        return [100.0 if (p["prediction"] == CHOICES[0]) == bool(p["label"]) else 0.0 for p in predictions]

    def review(self, prediction: dict) -> Review:
        """The statement, its true/false answer and the image pair."""
        return Review(prediction.get("sent") or "", (CHOICES[0] if prediction["label"] else CHOICES[1],),
                      (str(prediction["img0"]), str(prediction["img1"])))
