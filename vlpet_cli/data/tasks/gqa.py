"""GQA (spec/pipeline.md §1.2, §3.3): balanced train+valid for training, testdev for validation and test.

The reference has no separate GQA test phase: its reported GQA number is the testdev accuracy logged during
validation. vlpet keeps that: the 'test' split is testdev too. train/valid images are Visual Genome ids and
read features from VG/; testdev/submit images read GQA/.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from vlpet_cli.data.tasks.base import (
    Record,
    RecordRef,
    Task,
    get_field,
    read_label,
    read_record_list,
    sample_answer,
)

SPLIT_SOURCES = {"train": "VG", "valid": "VG", "testdev": "GQA", "submit": "GQA"}


class GqaTask(Task):
    """GQA: 'gpa: ' (the reference's typo) + question -> answer sampled ∝ score, weight 1."""

    name = "gqa"
    folder = "GQA"
    default_prompt = "gpa: "
    splits: ClassVar[dict[str, str]] = {"train": "train,valid", "val": "testdev", "test": "testdev"}
    input_max_length = 20
    target_max_length = None
    loss_reduction = "example"

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
            qid = get_field(r, "question_id", (str, int), ref)
            img_id = get_field(r, "img_id", (str, int), ref)
            sent = get_field(r, "sent", (str,), ref)
            label = read_label(r, ref, required=not for_eval)
            records.append(Record(str(path), i, str(qid), sent, (str(img_id),), source, label))
        return records

    def target(self, record: Record, rng: Any, train: bool) -> tuple[str, float] | None:
        """Answer sampled ∝ score (train) or the best answer (eval); weight 1 (no score weighting)."""
        chosen = sample_answer(record.label, rng, train)
        return None if chosen is None else (chosen[0], 1.0)

    def eval_info(self, record: Record) -> dict:
        """question_id (a string), image and soft label (accuracy = label.get(pred, 0))."""
        return {"question_id": record.id, "img_id": record.image_ids[0], "sent": record.text,
                "label": record.label}
