"""`vlpet extract-features`: which images or videos to extract, handed to the kind's extraction
(`features/extract/images.py` for images, `features/extract/videos.py` for videos, through the table of feature
kinds)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from vlpet_cli.errors import DataError, VlpetError
from vlpet_cli.features.kinds import IMAGE, VIDEO
from vlpet_cli.tasks import annotation_images
from vlpet_cli.threads import configure_threads

if TYPE_CHECKING:
    from vlpet_cli.features.extract.loop import ExtractSummary

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".ts"}


def _prepare(options: dict) -> None:
    """Refuse a negative --workers (it would quietly mean 0) and set the CPU threads (from the CPUs: the vision
    model's size is not known before it loads)."""
    if options.get("workers", 0) < 0:
        raise VlpetError(f"--workers {options['workers']}: give the number of decoding threads, at least 0 (0 "
                         f"decodes in the main thread)")
    configure_threads()


def scan(folder: Path, suffixes: set[str], noun: str) -> dict[str, Path]:
    """All files with one of `suffixes` under a folder (recursively, hidden ones left out), keyed by filename
    stem (an image id, VALUE's vid_name), sorted by id; two files with one id are refused."""
    found: dict[str, Path] = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith(".") or Path(name).suffix.lower() not in suffixes:
                continue
            path = Path(root) / name
            if path.stem in found:
                raise DataError(f"{folder}: two {noun}s share the id '{path.stem}' ({found[path.stem]} and {path}); "
                                f"rename one, or select {noun}s with --annotations.")
            found[path.stem] = path
    return dict(sorted(found.items()))


def scan_images(images_dir: Path) -> dict[str, Path]:
    """All image files under a directory (recursively), keyed by filename stem, sorted by id."""
    return scan(images_dir, IMAGE_SUFFIXES, "image")


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
    _prepare(options)
    return IMAGE.extraction().extract(images_from(images_dir, annotations), model, out, **options)


def scan_videos(videos_dir: Path) -> dict[str, Path]:
    """All video files under a directory (recursively), keyed by filename stem (VALUE's vid_name), sorted."""
    videos_dir = Path(videos_dir)
    if not videos_dir.is_dir():
        raise DataError(f"{videos_dir}: video directory not found; pass --videos DIR holding the video files.")
    return scan(videos_dir, VIDEO_SUFFIXES, "video")


def videos_from(videos_dir: Path, annotations: Path | None = None) -> dict[str, Path]:
    """vid_name -> video file: every video under videos_dir, or those a VALUE annotation (or subtitles) file names,
    read as the tasks read them (`tasks.annotation_images`).

    Named videos without a file keep an expected path, so extraction lists them as failed."""
    found = scan_videos(videos_dir)
    if annotations is None:
        if not found:
            raise DataError(f"{videos_dir}: no video files ({', '.join(sorted(VIDEO_SUFFIXES))}) found; "
                            f"check --videos.")
        return found
    wanted = list(annotation_images(Path(annotations)))
    if not wanted:
        raise DataError(f"{annotations}: names no videos. Fix: pass a VALUE annotation or subtitles file "
                        f"(--annotations).")
    if not any(vid in found for vid in wanted):
        raise DataError(f"{annotations}: none of its {len(wanted)} videos were found under {videos_dir} "
                        f"(e.g. '{wanted[0]}.mp4'); pass the --videos directory that holds them.")
    return {vid: found.get(vid, Path(videos_dir) / f"{vid}.mp4") for vid in wanted}


def extract_videos(videos_dir: Path, model: str | Path, out: Path, annotations: Path | None = None,
                   **options) -> ExtractSummary:
    """The command with --videos: the videos of a folder (or those a VALUE file names) -> features in `out`."""
    _prepare(options)
    return VIDEO.extraction().extract(videos_from(videos_dir, annotations), model, out, **options)
