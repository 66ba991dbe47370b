"""COCO captioning on the Karpathy split (spec/pipeline.md §1.4, §3.3) from COCO/dataset_coco.json.

Train (Karpathy train + restval) has one row per (image, caption); val and test have one row per image with
all its captions, stripped, as references.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from vlpet_cli.data.tasks.base import Record, RecordRef, Task, get_field, read_json
from vlpet_cli.errors import DataError, VlpetError

KARPATHY_FILE = "dataset_coco.json"
SPLIT_RENAME = {"train": "train", "restval": "train", "val": "val", "test": "test"}


class CocoTask(Task):
    """COCO captions: the prompt 'caption: ' alone -> the caption; token-averaged loss."""

    name = "coco"
    folder = "COCO"
    default_prompt = "caption: "
    splits: ClassVar[dict[str, str]] = {"train": "karpathy_train", "val": "karpathy_val", "test": "karpathy_test"}
    input_max_length = 40
    target_max_length = 40
    loss_reduction = "token"

    def feature_source(self, split_name: str) -> str:
        """COCO train2014/val2014 images live under COCO/."""
        return "COCO"

    def split_path(self, data_root: Path, name: str) -> Path:
        """Every split comes from the one Karpathy file."""
        return Path(data_root) / self.folder / KARPATHY_FILE

    def missing_file_fix(self) -> str:
        return "check --data-root: it must contain COCO/dataset_coco.json (Karpathy's split file)"

    def read_split(self, data_root: Path, name: str, for_eval: bool) -> list[Record]:
        """Rows of one Karpathy split: per caption for train, per image for val/test."""
        karpathy = name.removeprefix("karpathy_")
        if karpathy not in ("train", "val", "test"):
            raise VlpetError(f"coco: unknown split {name!r}. Fix: use karpathy_train, karpathy_val or "
                             f"karpathy_test (or train/val/test).")
        path = self.split_path(data_root, name)
        data = read_json(path, "COCO Karpathy split file", self.missing_file_fix())
        images = data.get("images") if isinstance(data, dict) else None
        if not isinstance(images, list):
            raise DataError(f"{path}: expected an object with an 'images' list. "
                            f"Fix: use Karpathy's dataset_coco.json.")
        source = self.feature_source(name)
        records = []
        for i, img in enumerate(images):
            ref = RecordRef(path, i, img, "filename")
            split = get_field(img, "split", (str,), ref)
            if split not in SPLIT_RENAME:
                raise ref.error(f"field 'split' is {split!r}; expected one of {', '.join(SPLIT_RENAME)}")
            if SPLIT_RENAME[split] != karpathy:
                continue
            filename = get_field(img, "filename", (str,), ref)
            cocoid = get_field(img, "cocoid", (int, str), ref, required=False)
            img_id = filename.rsplit(".", 1)[0]
            sentences = get_field(img, "sentences", (list,), ref)
            if not sentences:
                raise ref.error("field 'sentences' is empty; every image needs its captions")
            refs = []
            for k, s in enumerate(sentences):
                raw = s.get("raw") if isinstance(s, dict) else None
                if not isinstance(raw, str):
                    raise ref.error(f"sentences[{k}] has no string field 'raw'")
                refs.append(raw.strip())
            extra = {"cocoid": cocoid, "references": refs}
            if karpathy == "train":
                records.extend(Record(str(path), i, img_id, "", (img_id,), source, cap, extra) for cap in refs)
            else:
                records.append(Record(str(path), i, img_id, "", (img_id,), source, None, extra))
        return records

    def target(self, record: Record, rng: Any, train: bool) -> tuple[str, float] | None:
        """The row's caption (train rows); eval rows have references instead of one target."""
        return None if record.label is None else (record.label, 1.0)

    def eval_info(self, record: Record) -> dict:
        """Image id, cocoid and all reference captions."""
        extra = record.extra or {}
        return {"img_id": record.id, "cocoid": extra.get("cocoid"), "references": extra.get("references", [])}
