"""`vlpet extract-features`: which images or videos to extract, handed to the extraction libraries
(`features/extract/images.py` for images, `features/extract/videos.py` for videos)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from vlpet_cli.errors import DataError, VlpetError
from vlpet_cli.features.extract.images import ExtractSummary, extract_features
from vlpet_cli.features.extract.videos import VideoExtractSummary, extract_video_features
from vlpet_cli.tasks import annotation_images
from vlpet_cli.threads import configure_threads

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".ts"}


def _prepare(options: dict) -> None:
    """Refuse a negative --workers (it would quietly mean 0) and set the CPU threads (from the CPUs: the vision
    model's size is not known before it loads)."""
    if options.get("workers", 0) < 0:
        raise VlpetError(f"--workers {options['workers']}: give the number of decoding threads, at least 0 (0 "
                         f"decodes in the main thread)")
    configure_threads()


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
    _prepare(options)
    return extract_features(images_from(images_dir, annotations), model, out, **options)


def scan_videos(videos_dir: Path) -> dict[str, Path]:
    """All video files under a directory (recursively), keyed by filename stem (VALUE's vid_name), sorted."""
    videos_dir = Path(videos_dir)
    if not videos_dir.is_dir():
        raise DataError(f"{videos_dir}: video directory not found; pass --videos DIR holding the video files.")
    found: dict[str, Path] = {}
    for root, dirs, files in os.walk(videos_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith(".") or Path(name).suffix.lower() not in VIDEO_SUFFIXES:
                continue
            path = Path(root) / name
            if path.stem in found:
                raise DataError(f"{videos_dir}: two videos share the id '{path.stem}' ({found[path.stem]} and "
                                f"{path}); rename one, or select videos with --annotations.")
            found[path.stem] = path
    return dict(sorted(found.items()))


def annotation_videos(path: Path) -> list[str]:
    """The vid_name of every record of a VALUE annotation file (.jsonl, or a .json list), first-seen order."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found; check --annotations.")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); fix the file.") from exc
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a list of records with 'vid_name'.")
        numbered = list(enumerate(records, 1))
    else:
        numbered = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                numbered.append((n, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not a JSON object ({exc.msg}); fix or remove the line.") from exc
    out: dict[str, None] = {}
    for n, rec in numbered:
        if not isinstance(rec, dict) or not isinstance(rec.get("vid_name"), str) or not rec["vid_name"]:
            raise DataError(f"{path}:{n}: record has no 'vid_name'; --annotations needs a VALUE annotation or "
                            f"subtitle file.")
        out[rec["vid_name"]] = None
    if not out:
        raise DataError(f"{path}: no records; check --annotations.")
    return list(out)


def videos_from(videos_dir: Path, annotations: Path | None = None) -> dict[str, Path]:
    """vid_name -> video file: every video under videos_dir, or those a VALUE annotation file names.

    Named videos without a file keep an expected path, so extraction lists them as failed."""
    found = scan_videos(videos_dir)
    if annotations is None:
        if not found:
            raise DataError(f"{videos_dir}: no video files ({', '.join(sorted(VIDEO_SUFFIXES))}) found; "
                            f"check --videos.")
        return found
    wanted = annotation_videos(Path(annotations))
    if not any(vid in found for vid in wanted):
        raise DataError(f"{annotations}: none of its {len(wanted)} videos were found under {videos_dir} "
                        f"(e.g. '{wanted[0]}.mp4'); pass the --videos directory that holds them.")
    return {vid: found.get(vid, Path(videos_dir) / f"{vid}.mp4") for vid in wanted}


def extract_videos(videos_dir: Path, model: str | Path, out: Path, annotations: Path | None = None,
                   **options) -> VideoExtractSummary:
    """The command with --videos: the videos of a folder (or those a VALUE file names) -> features in `out`."""
    _prepare(options)
    return extract_video_features(videos_from(videos_dir, annotations), model, out, **options)
