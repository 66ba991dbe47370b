"""Per-frame CLIP image embeddings from video files, as VALUE's extractor makes them (video extraction).

Frames are decoded with PyAV (bundled FFmpeg) and one is kept per 1.5 s tick: the frame on screen at t = 0, 1.5,
3, ... (the last frame whose timestamp is at or before the tick), for every tick before the end of the video.
Each kept frame is scaled (BICUBIC) so its short side is the model's image size, centre-cropped to a square and
normalised with the model's mean/std, then run through a CLIP vision model *with its projection*
(`CLIPVisionModelWithProjection.image_embeds`, 512-d for ViT-B/32). A video gives (n_frames, dim) float16, written
through the video stores' writers (VALUE's per-video `.npz` or vlpet's packed HDF5); the loop (decode on a thread
pool, write each video as it is computed, resume, report) is loop.py's.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import CLIPVisionModelWithProjection

from vlpet_cli.errors import VlpetError
from vlpet_cli.extras import require_extra
from vlpet_cli.features.extract import clip
from vlpet_cli.features.extract.clip import VisionTower
from vlpet_cli.features.extract.loop import ExtractSummary, Job, check_request, run
from vlpet_cli.features.kinds import VIDEO

FRAME_STEP_S = 1.5  # VALUE's CLIP-ViT features: one frame every 1.5 seconds


# ------------------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------------------

def load_model(model: str | Path, device: str | None = None, torchscript: bool = False) -> VisionTower:
    """Load a CLIPVisionModelWithProjection (a full CLIP or a vision-with-projection checkpoint), eval mode, fp32.

    A checkpoint without the visual projection (e.g. a bare CLIPVisionModel such as 'tiny-clip') is refused: its
    features would be hidden states, not the image embeddings VALUE's features are. (`torchscript` is the image
    models' option; a video model is never one.)"""
    directory, model_id = clip.model_dir(model)
    module, info = clip.load_clip(directory, CLIPVisionModelWithProjection, "CLIP vision model with projection")
    if any("visual_projection" in key for key in info.get("missing_keys", ())):
        raise VlpetError(f"{directory}: this CLIP checkpoint has no visual projection (visual_projection.weight), "
                         f"so it cannot give VALUE's image embeddings; pass a full CLIP model (e.g. "
                         f"openai/clip-vit-base-patch32) or 'tiny-clip-proj'.")
    device = clip.pick_device(device)
    module.to(device).eval()
    mean, std = clip.preprocessor_stats(directory)
    return VisionTower(module, model_id, int(module.config.image_size), int(module.config.projection_dim), mean, std,
                       device)


def image_embeds(vm: VisionTower, pixel_values: Any) -> Any:
    """Projected image embeddings, float32 (B, dim)."""
    with torch.inference_mode():
        return vm.module(pixel_values=pixel_values.to(vm.device)).image_embeds.float().cpu()


def frame_embeds(vm: VisionTower, frames: np.ndarray, batch_size: int) -> np.ndarray:
    """One video's preprocessed frames (n, 3, S, S) -> embeddings float32 (n, dim), `batch_size` frames a pass."""
    pixels = torch.from_numpy(frames)
    return torch.cat([image_embeds(vm, pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)]).numpy()


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
    return np.stack([clip.normalize(square_crop(f, size), mean, std) for f in frames])


def embed_files(vm: VisionTower, paths: list[Path], batch_size: int = 64, layer: int = -1,
                dtype: str = "float16") -> dict[str, np.ndarray]:
    """Per-frame embeddings (n_frames, dim) of every distinct video file, in memory (`vlpet predict`), decoded and
    cropped as VALUE's extractor does, rounded to the store dtype a run was trained on (`layer` is the image
    models' option)."""
    out: dict[str, np.ndarray] = {}
    for p in dict.fromkeys(str(p) for p in paths):
        try:
            frames = preprocess_video(Path(p), vm.image_size, vm.mean, vm.std)
        except Exception as exc:  # noqa: BLE001 - PyAV raises its own errors for unreadable files
            raise VlpetError(f"cannot decode video {p} ({type(exc).__name__}: {exc}); check the file") from None
        out[p] = frame_embeds(vm, frames, batch_size).astype(dtype).astype(np.float32)
    return out


# ------------------------------------------------------------------------------------------------------------
# Extraction
# ------------------------------------------------------------------------------------------------------------

def extract(videos: dict[str, Path], model: str | Path, out: Path, layout: str = "npz", batch_size: int = 64,
            dtype: str = "float16", limit: int | None = None, workers: int = 2, progress: bool = True,
            device: str | None = None) -> ExtractSummary:
    """Extract per-frame image embeddings for `videos` (vid_name -> file) into `out`; resumable, failures listed."""
    out = Path(out)
    check_request(out, layout, tuple(VIDEO.writers), dtype, batch_size, limit)
    vm = load_model(model, device)
    attrs = {"model": vm.model_id, "embedding": "image_embeds", "image_size": vm.image_size,
             "frame_step_s": FRAME_STEP_S}
    writer = VIDEO.writer(out, layout, (vm.dim,), dtype, attrs)
    job = Job(noun="video", unit="frames", decode=partial(preprocess_video, size=vm.image_size, mean=vm.mean,
                                                         std=vm.std),
              embed=lambda videos: [frame_embeds(vm, frames, batch_size) for frames in videos],
              group=1, ahead=max(2, 2 * workers), units=len)
    return run(job, videos, writer, limit, workers, progress)
