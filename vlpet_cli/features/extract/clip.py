"""What image and video extraction share about CLIP models: finding the model (a directory, a cached hub id or a
built-in tiny one), loading a transformers CLIP class from it quietly, its normalisation, and the device."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from huggingface_hub import snapshot_download

from vlpet_cli.errors import VlpetError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ASSETS = Path(__file__).resolve().parents[2] / "assets"
TINY_CLIP = ASSETS / "tiny-clip"
TINY_CLIP_PROJ = ASSETS / "tiny-clip-proj"
BUILT_IN = {"tiny-clip": TINY_CLIP, "tiny-clip-proj": TINY_CLIP_PROJ}


@dataclass
class VisionTower:
    """A loaded vision model and how to feed it: its input size, normalisation and device, and the size of the
    features it gives (what a run's model.feat_dim must be)."""

    module: Any
    model_id: str
    image_size: int
    dim: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: str


def model_dir(model: str | Path) -> tuple[Path, str]:
    """Local directory and id of a model given as a directory, a cached hub id, or a built-in name."""
    path = Path(model)
    if path.is_dir():
        return path, str(path.resolve())
    if path.exists():
        raise VlpetError(f"{model}: --model must be a model directory (config.json + weights) or a hub id, "
                         f"not a file.")
    if str(model) in BUILT_IN:
        return BUILT_IN[str(model)], str(model)
    try:
        return Path(snapshot_download(str(model), local_files_only=True)), str(model)
    except Exception as exc:
        raise VlpetError(
            f"model '{model}' is neither a local directory nor in the local Hugging Face cache, and vlpet does not "
            f"download at run time. Download it with `hf download {model} --local-dir DIR` and pass "
            f"--model DIR."
        ) from exc


def preprocessor_stats(directory: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation mean/std from preprocessor_config.json when present, else CLIP's."""
    cfg_path = directory / "preprocessor_config.json"
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise VlpetError(f"{cfg_path}: not valid JSON ({exc.msg}); fix or delete it.") from exc
        mean = tuple(float(x) for x in cfg.get("image_mean", mean))
        std = tuple(float(x) for x in cfg.get("image_std", std))
    if len(mean) != 3 or len(std) != 3:
        raise VlpetError(f"{cfg_path}: image_mean and image_std need 3 values (RGB).")
    return mean, std


def load_clip(directory: Path, cls: Any, what: str) -> tuple[Any, dict]:
    """A transformers CLIP class (`what` names it in messages) from a model directory, eval-ready in fp32, with
    its loading info; the unused text weights of a full CLIP checkpoint are not reported."""
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise VlpetError(f"{directory}: no config.json; --model needs a transformers CLIP model directory.")
    try:
        model_type = json.loads(cfg_path.read_text(encoding="utf-8")).get("model_type")
    except json.JSONDecodeError as exc:
        raise VlpetError(f"{cfg_path}: not valid JSON ({exc.msg}); fix it or re-download the model.") from exc
    if model_type not in ("clip", "clip_vision_model"):
        raise VlpetError(f"{cfg_path}: model_type is '{model_type}', not a CLIP model; pass a {what} (e.g. "
                         f"openai/clip-vit-base-patch32 downloaded to a directory).")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        return cls.from_pretrained(directory, dtype=torch.float32, output_loading_info=True)
    except Exception as exc:
        raise VlpetError(f"{directory}: cannot load a {what} ({exc}).") from exc
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.utils.logging.enable_progress_bar()


def pick_device(device: str | None) -> str:
    """The device asked for, else cuda when there is one."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def normalize(pixels: np.ndarray, mean: tuple, std: tuple) -> np.ndarray:
    """uint8 RGB (S, S, 3) -> float32 (3, S, S), as ToTensor + Normalize would."""
    scale = 1.0 / (255.0 * np.asarray(std, dtype=np.float32))
    shift = np.asarray(mean, dtype=np.float32) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray((pixels.astype(np.float32) * scale - shift).transpose(2, 0, 1))
