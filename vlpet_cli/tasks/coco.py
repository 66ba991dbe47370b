"""COCO captioning on the Karpathy split (spec/pipeline.md §1.4, §3.3, §5.3) from COCO/dataset_coco.json.

Train (Karpathy train + restval) has one row per (image, caption); val and test have one row per image with
all its captions, stripped, as references. Scored with pycocoevalcap's scorers; without Java, METEOR is left
out of the default metrics with one warning (every evaluation path goes through `caption_metrics`).
"""

from __future__ import annotations

import json
import re
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import field_validator

from vlpet_cli.errors import DataError, VlpetError
from vlpet_cli.tasks import files
from vlpet_cli.tasks.base import Generate, Record, Task
from vlpet_cli.tasks.records import RecordModel, RecordRef, parse_record, read_json, warn_empty

KARPATHY_FILE = "dataset_coco.json"
SPLIT_RENAME = {"train": "train", "restval": "train", "val": "val", "test": "test"}
KARPATHY_SPLITS = tuple(SPLIT_RENAME)
_COCO_STEM = re.compile(r"^COCO_[A-Za-z]+\d{4}_0*(\d+)(?:\.jpg)?$")


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


def caption_metrics(metrics: list[str], explicit: bool) -> list[str]:
    """The caption metrics to compute: without Java, METEOR is dropped from defaults with one warning
    (asked for by name, it stays, and the scorer says that it needs Java)."""
    from vlpet_cli.metrics import caption

    if "meteor" in metrics and not explicit and not caption.java_available():
        warnings.warn("Java is not on PATH: METEOR is left out (install Java to get it)", UserWarning,
                      stacklevel=3)
        return [m for m in metrics if m != "meteor"]
    return metrics


def _scorers(metrics: list[str]) -> list[str]:
    """pycocoevalcap scorer names for metric names (bleu1..4 -> bleu, rougel -> rouge), in a fixed order."""
    wanted = {"bleu" if m.startswith("bleu") else "rouge" if m == "rougel" else m for m in metrics}
    return [s for s in ("bleu", "meteor", "rouge", "cider", "spice") if s in wanted]


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
    data = files.read_json(path)
    pairs = (
        list(data.items())
        if isinstance(data, dict)
        else [
            (files.field(r, ("image_id", "img_id"), path, i), files.field(r, ("caption",), path, i))
            for i, r in enumerate(files.records(data, path, "caption result"))
        ]
    )
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
    data = files.read_json(path)
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
                "(--split) or pass Karpathy's dataset_coco.json"
            )
        refs: dict[str, list[str]] = {}
        for i, rec in enumerate(files.records(data["annotations"], path, "caption annotation")):
            key = image_key(files.field(rec, ("image_id",), path, i))
            text = files.as_text(files.field(rec, ("caption",), path, i), path, key, "caption")
            refs.setdefault(key, []).append(text)
        return refs, True
    raise DataError(
        f"{path}: not a caption annotation file: expected an 'annotations' field (COCO captions_*.json) or "
        "'images' with 'sentences' (Karpathy dataset_coco.json)"
    )


def _karpathy_references(images: list[Any], path: Path, split: str | None) -> dict[str, list[str]]:
    """Raw, stripped sentences per cocoid for one Karpathy split (train includes restval, as in the reference)."""
    if split is None or split not in KARPATHY_SPLITS:
        raise VlpetError(
            f"{path} is Karpathy's dataset_coco.json: choose the split that was predicted "
            f"({', '.join(KARPATHY_SPLITS)}), e.g. --split test (split='test')"
        )
    wanted = {"train", "restval"} if split == "train" else {split}
    refs: dict[str, list[str]] = {}
    for i, image in enumerate(files.records(images, path, "image")):
        if files.field(image, ("split",), path, i) not in wanted:
            continue
        key = image_key(files.field(image, ("cocoid",), path, i))
        sentences = files.field(image, ("sentences",), path, i)
        raws = [s.get("raw") for s in sentences if isinstance(s, dict)]
        if not raws or not all(isinstance(r, str) for r in raws):
            raise DataError(f"{path}: image {i} (cocoid {key}) has sentences without a 'raw' string")
        refs[key] = [r.strip() for r in raws]
    if not refs:
        raise DataError(f"{path}: no images in split {split!r}")
    return refs


class CocoTask(Task):
    """COCO captions: the prompt 'caption: ' alone -> the caption; token-averaged loss."""

    name = "coco"
    aliases = ("caption", "captions", "coco_caption")
    folder = "COCO"
    default_prompt = "caption: "
    splits: ClassVar[dict[str, str]] = {"train": "karpathy_train", "val": "karpathy_val", "test": "karpathy_test"}
    input_max_length = 40
    target_max_length = 40
    loss_reduction = "token"
    batch_ratio = Fraction(50, 60)
    decoding = Generate(num_beams=5, max_length=20)  # the reference's evaluation; 40 only truncates targets
    valid_metrics = ("cider", "bleu", "bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rougel", "spice")
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
        empty: list[str] = []  # images of this split with an empty caption
        n_images = 0
        for i, img in enumerate(images):
            ref = RecordRef(path, i, img, "filename")
            if SPLIT_RENAME[parse_record(KarpathySplit, img, ref).split] != karpathy:
                continue
            rec = parse_record(KarpathyImage, img, ref)
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
        for n, image in enumerate(data["images"]):
            if not isinstance(image, dict) or not image.get("filename"):
                raise DataError(f"{path}: images[{n}] has no 'filename'; expected Karpathy records with "
                                f"'filepath' and 'filename'.")
            rel = Path(str(image.get("filepath") or "")) / str(image["filename"])
            out.setdefault(Path(str(image["filename"])).stem, rel.as_posix())
        return out

    # ---- scoring and files ------------------------------------------------------------------------------
    def score(self, predictions: list[dict], metrics: list[str] | None = None,
              vqa_variant: str = "reference") -> dict:
        """Caption metrics x100 (pycocoevalcap's scorers) of one caption per image against its references."""
        from vlpet_cli.metrics.caption import caption_scores

        wanted = caption_metrics(self.resolve_metrics(metrics), explicit=metrics is not None)
        scorers = _scorers(wanted)
        result = caption_scores({p["img_id"]: p["prediction"] for p in predictions},
                                {p["img_id"]: p["references"] for p in predictions},
                                metrics=sorted(set(scorers) - {"spice"}), spice="spice" in scorers)
        return {k: 100 * v for k, v in result.items() if k in wanted}

    def submission(self, predictions: list[dict]) -> tuple[str, str]:
        """The COCO results format: [{"image_id", "caption"}], image_id the cocoid where known."""
        return "json", json.dumps([{"image_id": p.get("cocoid") or p["img_id"], "caption": p["prediction"]}
                                   for p in predictions])

    def score_files(self, predictions: Path, annotations: Path, *, split: str | None, metrics: list[str],
                    explicit: bool, vqa_variant: str, allow_missing: bool | None, tokenizer: str) -> dict:
        """Caption metrics x100 of COCO results against captions_*.json (a pool) or a Karpathy split."""
        from vlpet_cli.metrics.caption import caption_scores

        metrics = caption_metrics(metrics, explicit)
        preds = load_predictions(predictions)
        refs, pooled = load_references(annotations, split)
        ids = files.check_ids(preds, refs, predictions, annotations,
                              pooled if allow_missing is None else allow_missing)
        raw = caption_scores({i: preds[i] for i in ids}, {i: refs[i] for i in ids}, metrics=_scorers(metrics),
                             tokenizer=tokenizer)
        out: dict[str, Any] = {m: 100.0 * raw[m] for m in metrics}
        out.update(tokenizer=raw["tokenizer"], n=raw["n"])
        return out
