"""Grid features from a CLIP vision model, written to a packed or per-image store (image extraction).

Grid features are the patch tokens of one layer (`hidden_states[layer]`, default the last), class token dropped,
in row-major grid order: ViT-B/32 at 224 px gives 7x7 = 49 tokens like the reference RN101 grid. A CLIP ResNet
checkpoint (`features/clip_resnet.py`: a safetensors file with the tower under `visual.`, or OpenAI's TorchScript
archive when asked for) gives the reference's own features instead: the last stage's map before attention pooling,
computed in fp16 on CUDA as the reference did and in fp32 on CPU. Preprocessing uses PIL only, as the reference
does: RGB, resize to (S, S) with BICUBIC (aspect ratio not kept), scale to [0, 1], normalise with the CLIP
mean/std. The loop (decode on a thread pool, write each batch as it is computed, resume, report) is loop.py's.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import CLIPVisionModel

from vlpet_cli.errors import VlpetError
from vlpet_cli.features.extract.clip import (
    CLIP_MEAN,
    CLIP_STD,
    VisionTower,
    load_clip,
    model_dir,
    normalize,
    pick_device,
    preprocessor_stats,
)
from vlpet_cli.features.extract.loop import ExtractSummary, Job, check_request, run
from vlpet_cli.features.kinds import IMAGE


@dataclass
class VisionModel(VisionTower):
    """A loaded CLIP vision tower giving grid features: a ViT's patch tokens or a ResNet's last map."""

    patch_size: int = 32
    num_layers: int = 0
    kind: str = "vit"  # "vit": a transformers CLIPVisionModel; "resnet": features/clip_resnet.ModifiedResNet
    compute_dtype: Any = None  # the ResNet's compute dtype (fp16 on CUDA as the reference, fp32 on CPU)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


# ------------------------------------------------------------------------------------------------------------
# Model and preprocessing
# ------------------------------------------------------------------------------------------------------------

def _is_resnet_checkpoint(model: str | Path, torchscript: bool) -> bool:
    """Whether --model names a CLIP checkpoint file (or a folder of one, with no config.json) for the ResNet path."""
    path = Path(model)
    if torchscript or path.is_file():
        return True
    return path.is_dir() and not (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _reference_precision(module: Any) -> Any:
    """fp16 convolutions and linears with fp32 BatchNorm, as CLIP's `convert_weights` leaves the reference tower."""
    from torch import nn

    for sub in module.modules():
        if isinstance(sub, (nn.Conv2d, nn.Linear)):
            sub.half()
    return module


def load_resnet_model(model: str | Path, device: str | None = None, torchscript: bool = False,
                      compute_dtype: str | None = None) -> VisionModel:
    """A CLIP ResNet tower from a checkpoint; fp16 compute on CUDA (the reference's), fp32 on CPU by default."""
    from vlpet_cli.features.clip_resnet import load_resnet, resnet_checkpoint

    path = Path(model)
    module = load_resnet(path, torchscript)
    device = pick_device(device)
    compute_dtype = compute_dtype or ("float16" if device.startswith("cuda") else "float32")
    if compute_dtype not in ("float16", "float32"):
        raise VlpetError(f"compute dtype '{compute_dtype}': use float16 or float32.")
    if compute_dtype == "float16":
        _reference_precision(module)
    module.to(device).eval()
    spec = module.spec
    file = path if torchscript else resnet_checkpoint(path)
    return VisionModel(module, str(Path(file or path).resolve()), spec.resolution, spec.channels, CLIP_MEAN,
                       CLIP_STD, device, patch_size=32, num_layers=4, kind="resnet",
                       compute_dtype=torch.float16 if compute_dtype == "float16" else torch.float32)


def load_model(model: str | Path, device: str | None = None, torchscript: bool = False) -> VisionModel:
    """Load a CLIPVisionModel (a vision-only or a full CLIP checkpoint) in eval mode, fp32, or a CLIP ResNet
    tower when `model` is a checkpoint file (or a folder holding one) rather than a transformers model directory."""
    if _is_resnet_checkpoint(model, torchscript):
        return load_resnet_model(model, device, torchscript)
    directory, model_id = model_dir(model)
    module, _ = load_clip(directory, CLIPVisionModel, "CLIP vision model")
    device = pick_device(device)
    module.to(device).eval()
    cfg = module.config
    mean, std = preprocessor_stats(directory)
    return VisionModel(module, model_id, int(cfg.image_size), int(cfg.hidden_size), mean, std, device,
                       patch_size=int(cfg.patch_size), num_layers=int(cfg.num_hidden_layers))


def load_image(path: Path, size: int) -> np.ndarray:
    """Decode an image with PIL: RGB, BICUBIC resize to (size, size); uint8 (size, size, 3)."""
    with Image.open(path) as img:
        img = img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        return np.asarray(img, dtype=np.uint8)


def preprocess(path: Path, size: int, mean: tuple, std: tuple) -> np.ndarray:
    """Decode, resize and normalise one image: float32 (3, size, size)."""
    return normalize(load_image(path, size), mean, std)


def to_pixels(arrays: list[np.ndarray]) -> Any:
    """Preprocessed images -> one pixel_values batch tensor (B, 3, S, S)."""
    return torch.from_numpy(np.stack(arrays))


def grid_features(vm: VisionModel, pixel_values: Any, layer: int = -1) -> Any:
    """Patch tokens of hidden_states[layer] (class token dropped), float32 (B, grid*grid, hidden); for a ResNet
    tower the last stage's map before attention pooling, row-major."""
    with torch.inference_mode():
        if vm.kind == "resnet":
            return vm.module.grid(pixel_values.to(vm.device, vm.compute_dtype)).float().cpu()
        pixel_values = pixel_values.to(vm.device)
        if layer in (-1, vm.num_layers):
            hidden = vm.module(pixel_values=pixel_values).last_hidden_state
        else:
            hidden = vm.module(pixel_values=pixel_values, output_hidden_states=True).hidden_states[layer]
        return hidden[:, 1:, :].float().cpu()


def embed_files(vm: VisionModel, paths: list[Path], batch_size: int = 16, layer: int = -1,
                dtype: str = "float16") -> dict[str, np.ndarray]:
    """Features of every distinct image file, in memory (`vlpet predict`), rounded to the store dtype a run was
    trained on: str(path) -> float32 (n_tokens, dim)."""
    unique = list(dict.fromkeys(str(p) for p in paths))
    out: dict[str, np.ndarray] = {}
    for i in range(0, len(unique), batch_size):
        chunk = unique[i:i + batch_size]
        try:
            arrays = [preprocess(Path(p), vm.image_size, vm.mean, vm.std) for p in chunk]
        except OSError as exc:
            raise VlpetError(f"cannot read an image ({exc}); check the file") from None
        feats = grid_features(vm, to_pixels(arrays), layer).numpy()
        for p, f in zip(chunk, feats):
            out[p] = f.astype(dtype).astype(np.float32)
    return out


# ------------------------------------------------------------------------------------------------------------
# Extraction
# ------------------------------------------------------------------------------------------------------------

def _check_layer(vm: VisionModel, layer: int) -> int:
    """The layer to record: -1 for a ResNet (its one map), else `layer` if the model has it."""
    if vm.kind == "resnet" and layer not in (-1, vm.num_layers):
        raise VlpetError(f"--layer {layer}: a CLIP ResNet gives the last stage's map (before attention pooling) "
                         f"only; leave --layer out (-1).")
    if vm.kind == "resnet":
        return -1  # recorded as -1 whichever way it was asked for, so stores and runs compare equal
    if not -(vm.num_layers + 1) <= layer <= vm.num_layers:
        raise VlpetError(f"--layer {layer} is out of range for {vm.model_id}: it has {vm.num_layers} layers, so "
                         f"use -{vm.num_layers + 1}..{vm.num_layers} (-1 = last).")
    return layer


def extract(images: dict[str, Path], model: str | Path, out: Path, layout: str = "packed", layer: int = -1,
            batch_size: int = 32, dtype: str = "float16", limit: int | None = None, workers: int = 2,
            progress: bool = True, device: str | None = None, torchscript: bool = False) -> ExtractSummary:
    """Extract grid features for `images` (img_id -> file) into `out`; resumable, failures reported.
    `torchscript` allows OpenAI's TorchScript CLIP archive (RN101.pt) as `model`."""
    out = Path(out)
    check_request(out, layout, tuple(IMAGE.writers), dtype, batch_size, limit)
    vm = load_model(model, device, torchscript)
    layer = _check_layer(vm, layer)
    attrs = {"model": vm.model_id, "layer": layer, "image_size": vm.image_size, "grid": [vm.grid, vm.grid]}
    writer = IMAGE.writer(out, layout, (vm.grid * vm.grid, vm.dim), dtype, attrs)
    job = Job(noun="image", unit="images", decode=partial(preprocess, size=vm.image_size, mean=vm.mean, std=vm.std),
              embed=lambda arrays: grid_features(vm, to_pixels(arrays), layer).numpy(),
              group=batch_size, ahead=2 * batch_size)
    return run(job, images, writer, limit, workers, progress)
