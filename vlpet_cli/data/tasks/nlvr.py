"""NLVR2 (spec/pipeline.md §1.3, §3.3): a sentence about an image pair, target "true"/"false"."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from vlpet_cli.data.tasks.base import Record, RecordRef, Task, get_field, read_record_list


class NlvrTask(Task):
    """NLVR2: 'nlvr: ' + sentence (no truncation) over two images -> 'true' or 'false'."""

    name = "nlvr"
    folder = "nlvr"
    default_prompt = "nlvr: "
    splits: ClassVar[dict[str, str]] = {"train": "train", "val": "valid", "test": "test"}
    input_max_length = None
    target_max_length = None
    loss_reduction = "example"
    n_images = 2

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
            identifier = get_field(r, "identifier", (str,), ref)
            img0 = get_field(r, "img0", (str,), ref)
            img1 = get_field(r, "img1", (str,), ref)
            sent = get_field(r, "sent", (str,), ref)
            label = r.get("label")
            if label is None and not for_eval:
                raise ref.error("field 'label' is missing")
            if label is not None and (label not in (0, 1) or isinstance(label, float)):
                raise ref.error(f"field 'label' should be 0 or 1, found {label!r:.60}")
            uid = get_field(r, "uid", (str,), ref, required=False)
            records.append(Record(str(path), i, identifier, sent, (img0, img1), source,
                                  None if label is None else int(label), {"uid": uid}))
        return records

    def target(self, record: Record, rng: Any, train: bool) -> tuple[str, float] | None:
        """'true' for label 1, 'false' for label 0, weight 1."""
        if record.label is None:
            return None
        return ("true" if record.label == 1 else "false"), 1.0

    def eval_info(self, record: Record) -> dict:
        """identifier (for consistency groups), both image ids and the label."""
        return {"identifier": record.id, "img0": record.image_ids[0], "img1": record.image_ids[1],
                "sent": record.text, "label": record.label, "uid": (record.extra or {}).get("uid")}
