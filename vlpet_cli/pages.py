"""The results page of `vlpet eval --html`: one self-contained HTML file per task and split, a row per record.

Each row shows the record's image(s) as thumbnails where the raw images are known (`Task.image_folder()`, or the
`--images DIR` a user names for built-in tasks, whose datasets ship features only), the text the model was asked,
its prediction, the references and its own score (`Task.record_scores`), worst first; at the top a summary
(metric, counts, per answer type) and filters (correct / wrong, a text search) that work without a server. The
page is rendered from the package's Jinja2 template `assets/results.html.j2` with autoescaping, so every field a
data file holds is shown as text, never as markup. Thumbnails are downsized once per image and embedded as data
URIs in one JSON map, so an image shared by many questions is stored once.
"""

from __future__ import annotations

import base64
import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vlpet_cli.atomic import write_text
from vlpet_cli.errors import VlpetError
from vlpet_cli.tasks import Task

CORRECT_AT = 100.0
"""A record counts as correct when its score (0-100 for answers, CIDEr x100 for captions) is at least this."""
THUMBNAIL_PX = 160
VIDEO_SUFFIXES = frozenset({".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg"})
TEMPLATE = "results.html.j2"
_TRAILING_NUMBER = re.compile(r"_(\d+)$")


def is_correct(score: float) -> bool:
    """The one rule of the page: a score of 100 or more (a VQA answer at least 3 annotators gave, an exact GQA
    answer, a right NLVR2 or video-QA judgement, a caption whose own CIDEr is at least 100)."""
    return score >= CORRECT_AT


def rule_text(task: Task) -> str:
    """How the page decides correct and wrong, for its summary."""
    if task.primary_metric == "cider":
        return ("A caption counts as correct when its own CIDEr against its references is at least 100 (1.0 on "
                "pycocoevalcap's scale); the task's CIDEr is the mean of these scores.")
    if task.primary_metric == "vqa":
        return ("A record counts as correct when its VQA soft score is 100 (at least 3 of its annotators gave the "
                "answer); an answer fewer annotators gave scores between 0 and 100 and counts as wrong.")
    return "A record counts as correct when its score is 100 (the answer is right), wrong when it is 0."


def check_images_folder(images: Path | None) -> None:
    """Refuse an --images that is not a folder, before any model is loaded."""
    if images is not None and not Path(images).is_dir():
        raise VlpetError(f"--images {images}: not a folder. Fix: name the folder that holds the task's raw images "
                         f"(searched recursively for a file named after each image id), or leave --images out.")


class ImageFinder:
    """An image id's file under a folder: the exact relative path, else a file whose stem is the id, else for a
    numeric id (COCO's 391895) a file whose stem ends in that number (COCO_val2014_000000391895.jpg). The folder is
    searched once, recursively; the first path in sorted order wins."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = None if folder is None else Path(folder)
        self._stems: dict[str, Path] | None = None
        self._numbers: dict[str, Path] = {}

    def find(self, image_id: str) -> Path | None:
        """The file of an image id, or None where it is not there (or no folder is known)."""
        if self.folder is None:
            return None
        exact = self.folder / image_id
        if exact.is_file() and exact.resolve().is_relative_to(self.folder.resolve()):  # never outside the folder
            return exact
        if self._stems is None:
            self._stems = {}
            for path in sorted(self.folder.rglob("*")):
                if path.is_file():
                    self._stems.setdefault(path.stem, path)
                    number = _TRAILING_NUMBER.search(path.stem)
                    if number:
                        self._numbers.setdefault(str(int(number.group(1))), path)
        found = self._stems.get(Path(image_id).stem if Path(image_id).suffix else image_id)
        if found is None and image_id.isdigit():
            found = self._numbers.get(str(int(image_id)))
        return found


def thumbnail(path: Path) -> str | None:
    """A JPEG data URI of the image downsized to fit THUMBNAIL_PX, or None where PIL cannot read it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.draft("RGB", (THUMBNAIL_PX, THUMBNAIL_PX))  # JPEG: decode at a reduced size
            small = img.convert("RGB")
            small.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            buf = io.BytesIO()
            small.save(buf, format="JPEG", quality=80)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass
class Picture:
    """One image (or video) of a row: its id, and the key of its thumbnail or why it has none."""

    image_id: str
    thumb: str | None = None
    note: str = ""


@dataclass
class Row:
    """One record on the page."""

    index: int
    score: float | None
    status: str
    text: str
    prediction: str
    references: Sequence[str]
    answer_type: str | None
    pictures: list[Picture] = field(default_factory=list)


class Thumbnails:
    """The page's thumbnails, one per image id, keyed 't0', 't1', ..."""

    def __init__(self, finder: ImageFinder) -> None:
        self.finder = finder
        self.uris: dict[str, str] = {}
        self._keys: dict[str, Picture] = {}

    def picture(self, image_id: str) -> Picture:
        """The picture of an image id (found, thumbnailed and remembered once)."""
        if image_id not in self._keys:
            self._keys[image_id] = self._make(image_id)
        return self._keys[image_id]

    def _make(self, image_id: str) -> Picture:
        path = self.finder.find(image_id)
        if path is None:
            return Picture(image_id, note="" if self.finder.folder is None else "not found")
        if path.suffix.lower() in VIDEO_SUFFIXES:
            return Picture(image_id, note="video")
        uri = thumbnail(path)
        if uri is None:
            return Picture(image_id, note="unreadable")
        key = f"t{len(self.uris)}"
        self.uris[key] = uri
        return Picture(image_id, thumb=key)


def rows_of(task: Task, predictions: list[dict], vqa_variant: str, images: Path | None) -> tuple[list[Row], dict]:
    """The page's rows, worst first (unscored last), and the thumbnails they refer to."""
    scores = task.record_scores(predictions, vqa_variant)
    folder = images if images is not None else task.image_folder()
    thumbs = Thumbnails(ImageFinder(folder))
    rows = []
    for i, (pred, score) in enumerate(zip(predictions, scores, strict=True)):
        review = task.review(pred)
        scored = None if math.isnan(score) else float(score)
        status = "unscored" if scored is None else "correct" if is_correct(scored) else "wrong"
        rows.append(Row(i, scored, status, review.text, str(pred.get("prediction", "")), review.references,
                        review.answer_type, [thumbs.picture(str(x)) for x in review.image_ids if str(x)]))
    rows.sort(key=lambda r: (r.score is None, r.score if r.score is not None else 0.0, r.index))
    return rows, thumbs.uris


def summary(task: Task, rows: list[Row], metrics: dict | None) -> dict:
    """The figures at the top: the task's metric (as scored, else the mean of the rows' scores), counts and the
    per-answer-type breakdown."""
    scored = [r.score for r in rows if r.score is not None]
    value = (metrics or {}).get(task.primary_metric)
    if not isinstance(value, (int, float)):
        value = sum(scored) / len(scored) if scored else None
    types: dict[str, list[float]] = {}
    for r in rows:
        if r.answer_type is not None and r.score is not None:
            types.setdefault(r.answer_type, []).append(r.score)
    others = {k: v for k, v in (metrics or {}).items() if isinstance(v, float) and k != task.primary_metric}
    return {
        "metric": task.primary_metric, "label": task.label, "value": value, "others": others,
        "n": len(rows), "correct": sum(r.status == "correct" for r in rows),
        "wrong": sum(r.status == "wrong" for r in rows), "unscored": sum(r.status == "unscored" for r in rows),
        "types": [{"name": name, "n": len(vals), "mean": sum(vals) / len(vals),
                   "correct": sum(is_correct(v) for v in vals)} for name, vals in sorted(types.items())],
        "rule": rule_text(task),
    }


def render_page(task: Task, split: str, predictions: list[dict], *, metrics: dict | None = None,
                images: Path | None = None, vqa_variant: str = "reference", source: str = "") -> str:
    """The HTML of the results page of one task's predictions (each carrying its record's eval_info)."""
    from jinja2 import Environment, PackageLoader, StrictUndefined

    rows, uris = rows_of(task, predictions, vqa_variant, images)
    env = Environment(loader=PackageLoader("vlpet_cli", "assets"), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    return env.get_template(TEMPLATE).render(task=task.name, split=split, source=source, rows=rows, thumbs=uris,
                                             summary=summary(task, rows, metrics))


def page_path(out_dir: Path, task: str, split: str) -> Path:
    """Where the page of a task and split goes: <out>/<task>-<split>.html, beside its eval JSON."""
    return Path(out_dir) / f"{task}-{split}.html"


def write_page(task: Task, split: str, predictions: list[dict], out_dir: Path, *, metrics: dict | None = None,
               images: Path | None = None, vqa_variant: str = "reference", source: str = "") -> Path:
    """Write the results page (atomically) and return its path. Characters beyond ASCII are written as character
    references, so the file reads the same whatever the locale's encoding."""
    path = page_path(out_dir, task.name, split)
    html = render_page(task, split, predictions, metrics=metrics, images=images, vqa_variant=vqa_variant,
                       source=source)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, html.encode("ascii", "xmlcharrefreplace").decode("ascii"))
    return path
