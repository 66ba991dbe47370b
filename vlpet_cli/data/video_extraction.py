"""Per-frame CLIP image embeddings from video files, as VALUE's extractor makes them (the video extraction library).

Frames are decoded with PyAV (bundled FFmpeg) and one is kept per 1.5 s tick: the frame on screen at t = 0, 1.5,
3, ... (the last frame whose timestamp is at or before the tick), for every tick before the end of the video.
Each kept frame is scaled (BICUBIC) so its short side is the model's image size, centre-cropped to a square and
normalised with the model's mean/std, then run through a CLIP vision model *with its projection*
(`CLIPVisionModelWithProjection.image_embeds`, 512-d for ViT-B/32). A video gives (n_frames, dim) float16, written
through the video feature writers of `data/video_features.py` (VALUE's per-video `.npz` or vlpet's packed HDF5).
Videos are decoded by a thread pool while the model runs; each video is written as soon as it is computed, so an
interrupted run loses at most the video in flight and a re-run skips the videos already written.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import CLIPVisionModelWithProjection

from vlpet_cli.data.extraction import _Inline, _model_dir, _preprocessor_stats, _write_report, normalize
from vlpet_cli.data.video_features import NPZ, PACKED, VIDEO_LAYOUTS, open_video_writer
from vlpet_cli.errors import VlpetError
from vlpet_cli.extras import require_extra
from vlpet_cli.progress import Progress

FRAME_STEP_S = 1.5  # VALUE's CLIP-ViT features: one frame every 1.5 seconds
TINY_CLIP_PROJ = Path(__file__).parent.parent / "assets" / "tiny-clip-proj"


@dataclass
class VideoExtractSummary:
    """What one video extraction run did; `seconds` and `frames_per_s` cover the loop, not model loading."""

    out: Path
    layout: str
    written: int = 0
    frames: int = 0
    skipped_existing: int = 0
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # (vid_name, path, reason)
    seconds: float = 0.0
    frames_per_s: float = 0.0
    report: Path | None = None

    def describe(self) -> str:
        """One human-readable paragraph for the CLI."""
        text = (f"{self.out} ({self.layout}): {self.written} videos written ({self.frames} frames), "
                f"{self.skipped_existing} already there, {len(self.failed)} failed, {self.seconds:.1f} s "
                f"({self.frames_per_s:.1f} frames/s)")
        if self.failed and self.report:
            text += f"\nfailed videos are listed in {self.report}"
        return text


@dataclass
class ProjectedVisionModel:
    """A loaded CLIP vision tower with its projection, and how to feed it."""

    module: Any
    model_id: str
    image_size: int
    dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device: str


# ------------------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------------------

def _resolve(model: str | Path) -> tuple[Path, str]:
    """Model directory and id; the built-in name 'tiny-clip-proj' is the shipped tiny projected CLIP."""
    if str(model) == "tiny-clip-proj" and not Path(model).exists():
        return TINY_CLIP_PROJ, "tiny-clip-proj"
    return _model_dir(model)


def load_projected_model(model: str | Path, device: str | None = None) -> ProjectedVisionModel:
    """Load a CLIPVisionModelWithProjection (a full CLIP or a vision-with-projection checkpoint), eval mode, fp32.

    A checkpoint without the visual projection (e.g. a bare CLIPVisionModel such as 'tiny-clip') is refused: its
    features would be hidden states, not the image embeddings VALUE's features are."""
    model_dir, model_id = _resolve(model)
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise VlpetError(f"{model_dir}: no config.json; --model needs a transformers CLIP model directory.")
    try:
        model_type = json.loads(cfg_path.read_text(encoding="utf-8")).get("model_type")
    except json.JSONDecodeError as exc:
        raise VlpetError(f"{cfg_path}: not valid JSON ({exc.msg}); fix it or re-download the model.") from exc
    if model_type not in ("clip", "clip_vision_model"):
        raise VlpetError(f"{cfg_path}: model_type is '{model_type}', not a CLIP model; pass a CLIP model with its "
                         f"projection (e.g. openai/clip-vit-base-patch32 downloaded to a directory).")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # a full CLIP checkpoint lists its unused text weights
    transformers.utils.logging.disable_progress_bar()
    try:
        module, info = CLIPVisionModelWithProjection.from_pretrained(model_dir, dtype=torch.float32,
                                                                     output_loading_info=True)
    except Exception as exc:
        raise VlpetError(f"{model_dir}: cannot load a CLIP vision model with projection ({exc}).") from exc
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.utils.logging.enable_progress_bar()
    if any("visual_projection" in key for key in info.get("missing_keys", ())):
        raise VlpetError(f"{model_dir}: this CLIP checkpoint has no visual projection (visual_projection.weight), "
                         f"so it cannot give VALUE's image embeddings; pass a full CLIP model (e.g. "
                         f"openai/clip-vit-base-patch32) or 'tiny-clip-proj'.")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    module.to(device).eval()
    mean, std = _preprocessor_stats(model_dir)
    return ProjectedVisionModel(module, model_id, int(module.config.image_size), int(module.config.projection_dim),
                                mean, std, device)  # type: ignore[arg-type]


def image_embeds(vm: ProjectedVisionModel, pixel_values: Any) -> Any:
    """Projected image embeddings, float32 (B, dim)."""
    with torch.inference_mode():
        return vm.module(pixel_values=pixel_values.to(vm.device)).image_embeds.float().cpu()


# ------------------------------------------------------------------------------------------------------------
# Decoding
# ------------------------------------------------------------------------------------------------------------

def square_crop(rgb: np.ndarray, size: int) -> np.ndarray:
    """Scale (BICUBIC) so the short side is `size`, then centre-crop to (size, size); uint8 (size, size, 3)."""
    img = Image.fromarray(rgb)
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def decode_frames(path: Path, step: float = FRAME_STEP_S) -> list[np.ndarray]:
    """RGB uint8 frames (H, W, 3) of a video at one per `step` seconds, the frame on screen at each tick."""
    require_extra("video")
    import av

    picked: list[np.ndarray] = []
    eps = 1e-6
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
        start: float | None = None
        prev: Any = None
        k, n, t = 0, 0, 0.0
        for frame in container.decode(stream):
            raw = frame.time if frame.time is not None else n / rate
            start = raw if start is None else start
            t = raw - start
            while k * step < t - eps:  # ticks before this frame starts show the previous one
                picked.append((frame if prev is None else prev).to_ndarray(format="rgb24"))
                k += 1
            prev, n = frame, n + 1
            duration = getattr(frame, "duration", None)
            last = float(duration * frame.time_base) if duration and frame.time_base else 1.0 / rate
        if prev is not None:
            while k * step < t + last - eps:
                picked.append(prev.to_ndarray(format="rgb24"))
                k += 1
    return picked


def preprocess_video(path: Path, size: int, mean: tuple, std: tuple) -> np.ndarray:
    """Decode, crop and normalise one video's frames: float32 (n_frames, 3, size, size); ValueError when empty."""
    frames = decode_frames(path)
    if not frames:
        raise ValueError("no frames decoded (empty video)")
    return np.stack([normalize(square_crop(f, size), mean, std) for f in frames])


# ------------------------------------------------------------------------------------------------------------
# The extraction loop
# ------------------------------------------------------------------------------------------------------------

def _reason(exc: BaseException, path: Path) -> str:
    if isinstance(exc, FileNotFoundError) or not Path(path).exists():
        return "file not found"
    return f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("\t", " ")


def _decoded(pool: Any, items: list[tuple[str, Path]], size: int, mean: tuple, std: tuple,
             ahead: int) -> Iterator[tuple[str, Path, np.ndarray | None, str]]:
    """Yield (vid, path, frames or None, failure reason) in order while the next videos are being decoded."""
    pending: deque[tuple[str, Path, Future]] = deque()
    source = iter(items)

    def fill() -> None:
        while len(pending) < ahead:
            try:
                vid, path = next(source)
            except StopIteration:
                return
            pending.append((vid, path, pool.submit(preprocess_video, path, size, mean, std)))

    fill()
    while pending:
        vid, path, fut = pending.popleft()
        fill()
        try:
            yield vid, path, fut.result(), ""
        except Exception as exc:  # noqa: BLE001 - any decoding failure is reported, not fatal
            yield vid, path, None, _reason(exc, path)


def _plain_line(bar: Progress) -> str:
    eta = bar.eta()
    tail = f", ETA {int(eta // 60)}:{int(eta % 60):02d}" if eta is not None else ""
    return f"extract: {bar.completed}/{bar.total} videos ({bar.description}), {bar.rate():.1f} frames/s{tail}"


def video_report_path(out: Path, layout: str) -> Path:
    """Where the failed-videos report goes: `<out>.errors.txt` (packed) or `<out>/errors.txt` (npz folder)."""
    return out.with_name(out.name + ".errors.txt") if layout == PACKED else out / "errors.txt"


def extract_video_features(videos: dict[str, Path], model: str | Path, out: Path, layout: str = NPZ,
                           batch_size: int = 64, dtype: str = "float16", limit: int | None = None,
                           workers: int = 2, progress: bool = True,
                           device: str | None = None) -> VideoExtractSummary:
    """Extract per-frame image embeddings for `videos` (vid_name -> file) into `out`; resumable, failures listed."""
    out = Path(out)
    if layout not in VIDEO_LAYOUTS:
        raise VlpetError(f"unknown --layout '{layout}' for videos; use one of {', '.join(VIDEO_LAYOUTS)}.")
    if batch_size < 1 or (limit is not None and limit < 0):
        raise VlpetError("--batch-size must be >= 1 and --limit >= 0.")
    vm = load_projected_model(model, device)
    attrs = {"model": vm.model_id, "embedding": "image_embeds", "image_size": vm.image_size,
             "frame_step_s": FRAME_STEP_S}
    writer = open_video_writer(out, layout, vm.dim, dtype, attrs)
    summary = VideoExtractSummary(out=out, layout=layout)
    done = writer.existing()
    todo = [(vid, Path(path)) for vid, path in videos.items() if vid not in done]
    summary.skipped_existing = len(videos) - len(todo)
    if limit is not None:
        todo = todo[:limit]
    bar = Progress(len(todo), progress, label="extract", unit="frames", every_s=5.0, stderr=True, line=_plain_line)
    bar.description = "0 failed"
    pool: Any = ThreadPoolExecutor(max_workers=workers) if workers > 0 else _Inline()
    attempted: set[str] = set()
    start = time.perf_counter()
    try:
        for vid, path, frames, reason in _decoded(pool, todo, vm.image_size, vm.mean, vm.std, max(2, 2 * workers)):
            attempted.add(vid)
            if frames is None:
                summary.failed.append((vid, str(path), reason))
                bar.advance(1, f"{len(summary.failed)} failed", count=0)
                continue
            pixels = torch.from_numpy(frames)
            feats = torch.cat([image_embeds(vm, pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)])
            writer.add(vid, feats.numpy())
            summary.written += 1
            summary.frames += len(frames)
            bar.advance(1, f"{len(summary.failed)} failed", count=len(frames))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        writer.close()
        bar.close()
        summary.seconds = time.perf_counter() - start
        summary.frames_per_s = summary.frames / summary.seconds if summary.seconds > 0 else 0.0
        report = video_report_path(out, layout)
        _write_report(report, summary.failed, set(videos), attempted, writer.existing())
        summary.report = report if report.is_file() else None
    return summary
