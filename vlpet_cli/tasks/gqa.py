"""GQA (spec/pipeline.md §1.2, §3.3, §5.2): balanced train+valid for training, testdev for validation and test.

The reference has no separate GQA test phase: its reported GQA number is the testdev accuracy logged during
validation. vlpet keeps that: the 'test' split is testdev too. train/valid images are Visual Genome ids and
read features from VG/; testdev/submit images read GQA/.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar

from vlpet_cli.errors import DataError
from vlpet_cli.tasks import files
from vlpet_cli.tasks.base import Generate, Record, Task, sample_answer
from vlpet_cli.tasks.records import (
    RecordModel,
    RecordRef,
    SoftLabel,
    parse_record,
    read_record_list,
    warn_empty,
)

SPLIT_SOURCES = {"train": "VG", "valid": "VG", "testdev": "GQA", "submit": "GQA"}


class GqaRecord(RecordModel):
    """One record of GQA/<split>.json (LXMERT's balanced GQA format); question ids are strings."""

    question_id: str | int
    img_id: str | int
    sent: str
    label: SoftLabel | None = None


def load_labels(path: Path) -> dict[str, dict[str, float]]:
    """GQA labels: reference records [{"question_id", "label"}] or official {qid: {"answer"}} -> {qid: label}."""
    path = Path(path)
    data = files.read_json(path)
    if isinstance(data, dict):
        items = [(str(k), v) for k, v in data.items()]
        if not all(isinstance(v, dict) for _, v in items):
            raise DataError(
                f"{path}: expected an official GQA questions file {{question_id: {{'answer': ...}}}}"
            )
    else:
        items = [
            (str(files.field(r, ("question_id", "questionId"), path, i)), r)
            for i, r in enumerate(files.records(data, path, "question"))
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
        files.put(out, key, label, path)
    return out


class GqaTask(Task):
    """GQA: 'gpa: ' (the reference's typo) + question -> answer sampled ∝ score, weight 1."""

    name = "gqa"
    folder = "GQA"
    default_prompt = "gpa: "
    splits: ClassVar[dict[str, str]] = {"train": "train,valid", "val": "testdev", "test": "testdev"}
    input_max_length = 20
    target_max_length = None
    loss_reduction = "example"
    batch_ratio = Fraction(100, 60)
    decoding = Generate(num_beams=1, max_length=20)
    valid_metrics = ("acc",)
    default_metrics = ("acc",)
    primary_metric = "acc"
    label = "GQA accuracy"
    image_fields = ("img_id",)

    def feature_source(self, split_name: str) -> str:
        """VG for train/valid (Visual Genome images); GQA for testdev/submit and other test files."""
        if split_name in SPLIT_SOURCES:
            return SPLIT_SOURCES[split_name]
        return "GQA" if ("testdev" in split_name or "submit" in split_name) else "VG"

    def missing_file_fix(self) -> str:
        return "check --data-root: it must contain GQA/{train,valid,testdev}.json (LXMERT's balanced GQA files)"

    def read_split(self, data_root: Path, name: str, for_eval: bool) -> list[Record]:
        """Read GQA/<name>.json; question ids are strings."""
        path = self.split_path(data_root, name)
        raw = read_record_list(path, "GQA split file", self.missing_file_fix())
        source = self.feature_source(name)
        records = []
        for i, r in enumerate(raw):
            ref = RecordRef(path, i, r, "question_id")
            rec = parse_record(GqaRecord, r, ref)
            if rec.label is None and not for_eval:
                raise ref.error("field 'label' is missing")
            records.append(Record(str(path), i, str(rec.question_id), rec.sent, (str(rec.img_id),), source,
                                  rec.label))
        warn_empty(path, "question", [r.id for r in records if not r.text.strip()], len(records))
        return records

    def target(self, record: Record, rng: Any, train: bool) -> tuple[str, float] | None:
        """Answer sampled ∝ score (train) or the best answer (eval); weight 1 (no score weighting)."""
        chosen = sample_answer(record.label, rng, train)
        return None if chosen is None else (chosen[0], 1.0)

    def eval_info(self, record: Record) -> dict:
        """question_id (a string), image and soft label (accuracy = label.get(pred, 0))."""
        return {"question_id": record.id, "img_id": record.image_ids[0], "sent": record.text,
                "label": record.label}

    # ---- scoring and files ------------------------------------------------------------------------------
    def score(self, predictions: list[dict], metrics: list[str] | None = None,
              vqa_variant: str = "reference") -> dict:
        """Exact-match accuracy against the soft label (label.get(prediction, 0)), x100."""
        from vlpet_cli.metrics.accuracy import gqa_accuracy

        self.resolve_metrics(metrics)
        return {"acc": gqa_accuracy({p["question_id"]: p["prediction"] for p in predictions},
                                    {p["question_id"]: p["label"] or {} for p in predictions})}

    def submission(self, predictions: list[dict]) -> tuple[str, str]:
        """The GQA evaluation server's format: [{"questionId", "prediction"}]."""
        return "json", json.dumps([{"questionId": str(p["question_id"]), "prediction": p["prediction"]}
                                   for p in predictions])

    def score_files(self, predictions: Path, annotations: Path, *, split: str | None, metrics: list[str],
                    explicit: bool, vqa_variant: str, allow_missing: bool | None, tokenizer: str) -> dict:
        """GQA exact-match accuracy x100 of [{"questionId", "prediction"}] against the labels."""
        from vlpet_cli.metrics.accuracy import gqa_accuracy

        preds = files.load_qa_predictions(predictions)
        labels = load_labels(annotations)
        ids = files.check_ids(preds, labels, predictions, annotations, bool(allow_missing))
        return {"acc": gqa_accuracy({i: preds[i] for i in ids}, labels), "n": len(ids)}
