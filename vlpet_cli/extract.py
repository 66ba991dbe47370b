"""`vlpet extract-features`: which images to extract, handed to the extraction library (`data/extraction.py`)."""

from __future__ import annotations

import os
from pathlib import Path

from vlpet_cli.data.extraction import ExtractSummary, extract_features
from vlpet_cli.data.tasks import annotation_images
from vlpet_cli.errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def scan_images(images_dir: Path) -> dict[str, Path]:
    """All image files under a directory (recursively), keyed by filename stem, sorted by id."""
    found: dict[str, Path] = {}
    for root, dirs, files in os.walk(images_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            path = Path(root) / name
            stem = path.stem
            if stem in found:
                raise DataError(f"{images_dir}: two images share the id '{stem}' ({found[stem]} and {path}); "
                                f"rename one, or select images with --annotations.")
            found[stem] = path
    return dict(sorted(found.items()))


def images_from(images_dir: Path, annotations: Path | None = None) -> dict[str, Path]:
    """img_id (filename stem) -> image file: every image under images_dir, or those an annotation file names.

    Annotation ids whose file cannot be found keep their expected path, so extraction reports them as failed.
    """
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: image directory not found; pass --images DIR holding the image files.")
    if annotations is None:
        images = scan_images(images_dir)
        if not images:
            raise DataError(f"{images_dir}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found; "
                            f"check --images.")
        return images
    wanted = annotation_images(Path(annotations))
    index: dict[str, Path] | None = None
    out: dict[str, Path] = {}
    found = 0
    for img_id, rel in wanted.items():
        candidates = [images_dir / rel, images_dir / Path(rel).name] if rel else []
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            if index is None:
                index = scan_images(images_dir)
            path = index.get(img_id)
        if path is None:
            path = images_dir / (rel or img_id)
        else:
            found += 1
        out[img_id] = path
    if wanted and not found:
        raise DataError(f"{annotations}: none of its {len(wanted)} images were found under {images_dir} "
                        f"(e.g. '{next(iter(wanted))}'); pass the --images directory that holds them.")
    return out


def extract(images_dir: Path, model: str | Path, out: Path, annotations: Path | None = None,
            **options) -> ExtractSummary:
    """The command: the images of a folder (or those an annotation file names) -> features in `out`."""
    return extract_features(images_from(images_dir, annotations), model, out, **options)
