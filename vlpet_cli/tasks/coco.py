"""COCO captioning on the Karpathy split (spec/pipeline.md §1.4, §3.3, §5.3) from COCO/dataset_coco.json.

Train (Karpathy train + restval) has one row per (image, caption); val and test have one row per image with
all its captions, stripped, as references. Scored with pycocoevalcap's scorers; without Java, METEOR is left
out of the default metrics with one warning (every evaluation path goes through
`metrics.caption.computable_metrics`).
"""

from __future__ import annotations

import json
import re
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import field_validator

from vlpet_cli.errors import DataError, VlpetError
from vlpet_cli.metrics.caption import CAPTION_METRICS, cider_per_caption, scaled_caption_scores
from vlpet_cli.tasks import files
from vlpet_cli.tasks.base import FileScoring, Generate, Record, Review, Task
from vlpet_cli.tasks.records import RecordModel, parse_record, read_json, record_refs, warn_empty

KARPATHY_FILE = "dataset_coco.json"
SPLIT_RENAME = {"train": "train", "restval": "train", "val": "val", "test": "test"}
KARPATHY_SPLITS = tuple(SPLIT_RENAME)
_COCO_STEM = re.compile(r"^COCO_[A-Za-z]+\d{4}_0*(\d+)(?:\.jpg)?$")


SPLIT_FILES_FIX = "check --data-root: it must contain COCO/dataset_coco.json (Karpathy's split file)"

class KarpathySplit(RecordModel):
    """The split of one image of dataset_coco.json, read first so that other splits' images are skipped."""

    split: str

    @field_validator("split")
    @classmethod
    def _known(cls, split: str) -> str:
        if split not in SPLIT_RENAME:
            raise ValueError(f"field 'split' is {split!r}; expected one of {', '.join(SPLIT_RENAME)}")
        return split


class KarpathyImage(RecordModel):
    """One image of Karpathy's dataset_coco.json: its file name, COCO id and raw captions."""

    split: Literal["train", "restval", "val", "test"]
    filename: str
    cocoid: int | str | None = None
    sentences: list[Any]

    @field_validator("sentences")
    @classmethod
    def _captions(cls, sentences: list[Any]) -> list[str]:
        if not sentences:
            raise ValueError("field 'sentences' is empty; every image needs its captions")
        refs = []
        for k, s in enumerate(sentences):
            raw = s.get("raw") if isinstance(s, dict) else None
            if not isinstance(raw, str):
                raise ValueError(f"sentences[{k}] has no string field 'raw'")
            refs.append(raw.strip())
        return refs


def image_key(value: Any) -> str:
    """Canonical COCO image id: 391895, "391895" and "COCO_val2014_000000391895" all give "391895"."""
    text = str(value).strip()
    if text.isdigit():
        return str(int(text))
    match = _COCO_STEM.match(text)
    return str(int(match.group(1))) if match else text


def load_predictions(path: Path) -> dict[str, str]:
    """COCO results [{"image_id", "caption"}] (or {image_id: caption}) -> {image key: caption}."""
    path = Path(path)
    data = read_json(path, "predictions file", "check --predictions")
    pairs = (list(data.items()) if isinstance(data, dict) else
             [(ref.field("image_id", "img_id"), ref.field("caption"))
              for ref in record_refs(data, path, "caption results file")])
    out: dict[str, str] = {}
    for raw_id, text in pairs:
        key = image_key(raw_id)
        files.put(out, key, files.as_text(text, path, key, "caption"), path)
    return out


def load_references(path: Path, split: str | None = None) -> tuple[dict[str, list[str]], bool]:
    """References per image key from COCO captions JSON or Karpathy dataset_coco.json -> (refs, is_pool).

    Only Karpathy's file has splits (and needs one); a COCO captions file is a pool and takes none.
    """
    path = Path(path)
    data = read_json(path, "caption annotation file", "check --annotations")
    if (
        isinstance(data, dict)
        and isinstance(data.get("images"), list)
        and any(isinstance(im, dict) and "sentences" in im for im in data["images"])
    ):
        return _karpathy_references(data["images"], path, split), False
    if isinstance(data, dict) and "annotations" in data:
        if split is not None:
            raise VlpetError(
                f"{path}: a COCO captions annotation file, which has no splits. Fix: drop the split "
                "(--split) or pass Karpathy's dataset_coco.json."
            )
        refs: dict[str, list[str]] = {}
        for ref in record_refs(data["annotations"], path, "caption annotation file"):
            key = image_key(ref.field("image_id"))
            refs.setdefault(key, []).append(files.as_text(ref.field("caption"), path, key, "caption"))
        return refs, True
    raise DataError(
        f"{path}: not a caption annotation file: expected an 'annotations' field (COCO captions_*.json) or "
        "'images' with 'sentences' (Karpathy dataset_coco.json). Fix: pass one of those files."
    )


def _karpathy_references(images: list[Any], path: Path, split: str | None) -> dict[str, list[str]]:
    """Raw, stripped sentences per cocoid for one Karpathy split (train includes restval, as in the reference)."""
    if split is None or split not in KARPATHY_SPLITS:
        raise VlpetError(
            f"{path}: Karpathy's dataset_coco.json holds several splits. Fix: choose the split that was predicted "
            f"({', '.join(KARPATHY_SPLITS)}), e.g. --split test (split='test')."
        )
    wanted = {"train", "restval"} if split == "train" else {split}
    refs: dict[str, list[str]] = {}
    for ref in record_refs(images, path, "Karpathy split file", "filename"):
        if parse_record(KarpathySplit, ref.raw, ref).split not in wanted:
            continue
        rec = parse_record(KarpathyImage, ref.raw, ref)
        refs[image_key(ref.field("cocoid"))] = rec.sentences
    if not refs:
        raise DataError(f"{path}: no images in split {split!r}. Fix: choose a split the file holds.")
    return refs


class CocoTask(Task):
    """COCO captions: the prompt 'caption: ' alone -> the caption; token-averaged loss."""

    split_files_fix = SPLIT_FILES_FIX
    name = "coco"
    hub_task = "image-to-text"
    aliases = ("caption", "captions", "coco_caption")
    folder = "COCO"
    default_prompt = "caption: "
    splits: ClassVar[dict[str, str]] = {"train": "karpathy_train", "val": "karpathy_val", "test": "karpathy_test"}
    input_max_length = 40
    target_max_length = 40
    loss_reduction = "token"
    batch_ratio = Fraction(50, 60)
    decoding = Generate(num_beams=5, max_length=20)  # the reference's evaluation; 40 only truncates targets
    valid_metrics = CAPTION_METRICS
    default_metrics = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rougel", "cider")
    primary_metric = "cider"
    validation_metrics = ("cider",)  # captions: CIDEr only during training, as spec §8 advises
    label = "COCO CIDEr"
    split_option = True

    def feature_source(self, split_name: str) -> str:
        """COCO train2014/val2014 images live under COCO/."""
        return "COCO"

    def split_path(self, data_root: Path, name: str) -> Path:
        """Every split comes from the one Karpathy file."""
        return Path(data_root) / self.folder / KARPATHY_FILE

    def read_split(self, data_root: Path, name: str, for_eval: bool) -> list[Record]:
        """Rows of one Karpathy split: per caption for train, per image for val/test."""
        karpathy = name.removeprefix("karpathy_")
        if karpathy not in ("train", "val", "test"):
            raise VlpetError(f"coco: unknown split {name!r}. Fix: use karpathy_train, karpathy_val or "
                             f"karpathy_test (or train/val/test).")
        path = self.split_path(data_root, name)
        data = read_json(path, "COCO Karpathy split file", SPLIT_FILES_FIX)
        images = data.get("images") if isinstance(data, dict) else None
        if not isinstance(images, list):
            raise DataError(f"{path}: expected an object with an 'images' list. "
                            f"Fix: use Karpathy's dataset_coco.json.")
        source = self.feature_source(name)
        records: list[Record] = []
        empty: list[str] = []  # images of this split with an empty caption
        n_images = 0
        for ref in record_refs(images, path, "Karpathy split file", "filename"):
            i = ref.index
            if SPLIT_RENAME[parse_record(KarpathySplit, ref.raw, ref).split] != karpathy:
                continue
            rec = parse_record(KarpathyImage, ref.raw, ref)
            img_id = rec.filename.rsplit(".", 1)[0]
            n_images += 1
            if not all(rec.sentences):
                empty.append(img_id)
            extra = {"cocoid": rec.cocoid, "references": rec.sentences}
            if karpathy == "train":
                records.extend(Record(str(path), i, img_id, "", (img_id,), source, cap, extra)
                               for cap in rec.sentences)
            else:
                records.append(Record(str(path), i, img_id, "", (img_id,), source, None, extra))
        warn_empty(path, f"caption in split {name}", empty, n_images, unit="images")
        return records

    def target(self, record: Record, rng: Any, train: bool) -> tuple[str, float] | None:
        """The row's caption (train rows); eval rows have references instead of one target."""
        return None if record.label is None else (record.label, 1.0)

    def eval_info(self, record: Record) -> dict:
        """Image id, cocoid and all reference captions."""
        extra = record.extra or {}
        return {"img_id": record.id, "cocoid": extra.get("cocoid"), "references": extra.get("references", [])}

    @classmethod
    def file_images(cls, data: Any, path: Path) -> dict[str, str | None] | None:
        """Karpathy's dataset_coco.json ({"images": [{"filepath", "filename"}]}): stem -> relative path."""
        if not (isinstance(data, dict) and isinstance(data.get("images"), list)):
            return None
        out: dict[str, str | None] = {}
        for ref in record_refs(data["images"], path, "Karpathy split file"):
            if not isinstance(ref.raw, dict) or not ref.raw.get("filename"):
                raise ref.error("no 'filename'", "use Karpathy's records with 'filepath' and 'filename'")
            rel = Path(str(ref.raw.get("filepath") or "")) / str(ref.raw["filename"])
            out.setdefault(Path(str(ref.raw["filename"])).stem, rel.as_posix())
        return out

    # ---- scoring and files ------------------------------------------------------------------------------
    def score(self, predictions: list[dict], metrics: list[str] | None = None,
              vqa_variant: str = "reference") -> dict:
        """Caption metrics x100 (pycocoevalcap's scorers) of one caption per image against its references."""
        wanted = self.resolve_metrics(metrics)
        result = scaled_caption_scores({p["img_id"]: p["prediction"] for p in predictions},
                                       {p["img_id"]: p["references"] for p in predictions}, wanted,
                                       explicit=metrics is not None)
        return {k: v for k, v in result.items() if k in wanted}

    def submission(self, predictions: list[dict]) -> tuple[str, str]:
        """The COCO results format: [{"image_id", "caption"}], image_id the cocoid where known."""
        return "json", json.dumps([{"image_id": p.get("cocoid") or p["img_id"], "caption": p["prediction"]}
                                   for p in predictions])

    def score_files(self, job: FileScoring) -> dict:
        """Caption metrics x100 of COCO results against captions_*.json (a pool) or a Karpathy split."""
        wanted = self.resolve_metrics(job.metrics)
        preds = load_predictions(job.predictions)
        refs, pooled = load_references(job.annotations, job.split)
        ids = files.check_ids(preds, refs, job.predictions, job.annotations, job.allowed_missing(pooled))
        return scaled_caption_scores({i: preds[i] for i in ids}, {i: refs[i] for i in ids}, wanted,
                                     explicit=job.metrics is not None, tokenizer=job.tokenizer)

    # ---- looking at results -------------------------------------------------------------------------------
    def file_predictions(self, job: FileScoring) -> list[dict]:
        """Captions with their image's references, keyed by the image (its COCO id)."""
        preds = load_predictions(job.predictions)
        refs, pooled = load_references(job.annotations, job.split)
        ids = files.check_ids(preds, refs, job.predictions, job.annotations, job.allowed_missing(pooled))
        return [{"img_id": i, "cocoid": i, "references": refs[i], "prediction": preds[i]} for i in ids]

    def record_scores(self, predictions: list[dict], vqa_variant: str = "reference") -> list[float]:
        """Each caption's own CIDEr x100 against its image's references (their mean is the task's CIDEr)."""
        scores = cider_per_caption({i: p["prediction"] for i, p in enumerate(predictions)},
                                   {i: p["references"] for i, p in enumerate(predictions)})
        return [scores[i] for i in range(len(predictions))]

    def review(self, prediction: dict) -> Review:
        """The prompt, the image's reference captions and the image."""
        return Review(self.prompt.strip(), tuple(prediction.get("references") or ()), (str(prediction["img_id"]),))
