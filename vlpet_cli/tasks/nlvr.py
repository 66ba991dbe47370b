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
from vlpet_cli.tasks.base import Record, ScoreChoices, Task
from vlpet_cli.tasks.records import RecordModel, RecordRef, parse_record, read_record_list, warn_empty

CHOICES = ("true", "false")


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


def load_predictions(path: Path) -> dict[str, bool]:
    """NLVR2 predictions: CSV "identifier,True|False" lines (the reference's nlvr_submit.csv) or JSON."""
    from vlpet_cli.metrics.accuracy import parse_bool

    path = Path(path)
    rows: list[tuple[str, Any, int | str]] = []
    if path.suffix.lower() == ".csv":
        text = files.read_text(path)
        for line_no, row in enumerate(csv.reader(io.StringIO(text, newline="")), start=1):
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
        data = files.read_json(path, allow_jsonl=True)
        if isinstance(data, dict):
            rows = [(str(k), v, repr(k)) for k, v in data.items()]
        else:
            for i, rec in enumerate(files.records(data, path, "prediction")):
                value = files.field(rec, ("prediction", "answer", "label"), path, i)
                rows.append((str(files.field(rec, ("identifier",), path, i)), value, i))
    out: dict[str, bool] = {}
    for ident, value, where in rows:
        try:
            files.put(out, ident, parse_bool(value), path)
        except ValueError as exc:
            raise DataError(f"{path}: {where} (identifier {ident!r}): {exc}") from None
    return out


def load_labels(path: Path) -> dict[str, bool]:
    """NLVR2 labels: JSON list or JSON lines of {"identifier", "label"} (0/1, bool or "True"/"False")."""
    from vlpet_cli.metrics.accuracy import parse_bool

    path = Path(path)
    out: dict[str, bool] = {}
    for i, rec in enumerate(files.records(files.read_json(path, allow_jsonl=True), path, "NLVR2 example")):
        ident = str(files.field(rec, ("identifier",), path, i))
        try:
            files.put(out, ident, parse_bool(files.field(rec, ("label",), path, i)), path)
        except ValueError as exc:
            raise DataError(f"{path}: record {i} (identifier {ident!r}): label {exc}") from None
    return out


class NlvrTask(Task):
    """NLVR2: 'nlvr: ' + sentence (no truncation) over two images -> 'true' or 'false'."""

    name = "nlvr"
    aliases = ("nlvr2",)
    folder = "nlvr"
    default_prompt = "nlvr: "
    splits: ClassVar[dict[str, str]] = {"train": "train", "val": "valid", "test": "test"}
    input_max_length = None
    target_max_length = None
    loss_reduction = "example"
    n_images = 2
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

    def missing_file_fix(self) -> str:
        return "check --data-root: it must contain nlvr/{train,valid,test}.json (VL-T5's NLVR2 files)"

    def read_split(self, data_root: Path, name: str, for_eval: bool) -> list[Record]:
        """Read nlvr/<name>.json; each record names two images (img0, img1) and a 0/1 label."""
        path = self.split_path(data_root, name)
        raw = read_record_list(path, "NLVR2 split file", self.missing_file_fix())
        source = self.feature_source(name)
        records = []
        for i, r in enumerate(raw):
            ref = RecordRef(path, i, r, "identifier")
            rec = parse_record(NlvrRecord, r, ref)
            if rec.label is None and not for_eval:
                raise ref.error("field 'label' is missing")
            records.append(Record(str(path), i, rec.identifier, rec.sent, (rec.img0, rec.img1), source,
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

    def score_files(self, predictions: Path, annotations: Path, *, split: str | None, metrics: list[str],
                    explicit: bool, vqa_variant: str, allow_missing: bool | None, tokenizer: str) -> dict:
        """NLVR2 accuracy and consistency x100 (the metrics asked for, and n)."""
        from vlpet_cli.metrics.accuracy import nlvr_scores

        preds = load_predictions(predictions)
        labels = load_labels(annotations)
        ids = files.check_ids(preds, labels, predictions, annotations, bool(allow_missing))
        result = dict(nlvr_scores(preds, {i: labels[i] for i in ids}))
        return {k: v for k, v in result.items() if k in metrics or k == "n"}
