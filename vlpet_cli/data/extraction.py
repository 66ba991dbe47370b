"""Grid features from a CLIP vision model, written to a packed or per-image store (the extraction library).

Grid features are the patch tokens of one layer (`hidden_states[layer]`, default the last), class token dropped,
in row-major grid order: ViT-B/32 at 224 px gives 7x7 = 49 tokens like the reference RN101 grid. A CLIP ResNet
checkpoint (`data/clip_resnet.py`: a safetensors file with the tower under `visual.`, or OpenAI's TorchScript
archive when asked for) gives the reference's own features instead: the last stage's map before attention pooling,
computed in fp16 on CUDA as the reference did and in fp32 on CPU. Preprocessing
uses PIL only, as the reference does: RGB, resize to (S, S) with BICUBIC (aspect ratio not kept), scale to [0, 1],
normalise with the CLIP mean/std. Images are decoded by a thread pool while the model runs; each batch is
written (and flushed) as soon as it is computed, so an interrupted run loses at most the batch in flight and a
re-run skips the ids already written.
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
from huggingface_hub import snapshot_download
from PIL import Image
from transformers import CLIPVisionModel

from vlpet_cli.atomic import write_text
from vlpet_cli.data.features import (
    DTYPES,
    LAYOUTS,
    PACKED,
    open_writer,
)
from vlpet_cli.errors import VlpetError
from vlpet_cli.progress import Progress

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TINY_CLIP = Path(__file__).parent.parent / "assets" / "tiny-clip"
_REPORT_HEADER = "# id\tpath\treason\n"


@dataclass
class ExtractSummary:
    """What one extraction run did; `seconds` and `images_per_s` cover the extraction loop, not model loading."""

    out: Path
    layout: str
    written: int = 0
    skipped_existing: int = 0
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # (img_id, path, reason)
    seconds: float = 0.0
    images_per_s: float = 0.0
    report: Path | None = None

    def describe(self) -> str:
        """One human-readable paragraph for the CLI."""
        text = (f"{self.out} ({self.layout}): {self.written} written, {self.skipped_existing} already there, "
                f"{len(self.failed)} failed, {self.seconds:.1f} s ({self.images_per_s:.1f} images/s)")
        if self.failed and self.report:
            text += f"\nfailed images are listed in {self.report}"
        return text


@dataclass
class VisionModel:
    """A loaded CLIP vision tower and how to feed it."""

    module: Any
    model_id: str
    image_size: int
    patch_size: int
    hidden_size: int
    num_layers: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device: str
    kind: str = "vit"  # "vit": a transformers CLIPVisionModel; "resnet": data/clip_resnet.ModifiedResNet
    compute_dtype: Any = None  # the ResNet's compute dtype (fp16 on CUDA as the reference, fp32 on CPU)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


# ------------------------------------------------------------------------------------------------------------
# Model and preprocessing
# ------------------------------------------------------------------------------------------------------------

def _model_dir(model: str | Path) -> tuple[Path, str]:
    """Local directory of a model given as a directory, a cached hub id, or the built-in 'tiny-clip'."""
    path = Path(model)
    if path.is_dir():
        return path, str(path.resolve())
    if path.exists():
        raise VlpetError(f"{model}: --model must be a model directory (config.json + weights) or a hub id, "
                         f"not a file.")
    if str(model) == "tiny-clip":
        return TINY_CLIP, "tiny-clip"
    try:
        return Path(snapshot_download(str(model), local_files_only=True)), str(model)
    except Exception as exc:
        raise VlpetError(
            f"model '{model}' is neither a local directory nor in the local Hugging Face cache, and vlpet does not "
            f"download at run time. Download it with `hf download {model} --local-dir DIR` and pass "
            f"--model DIR."
        ) from exc


def _preprocessor_stats(model_dir: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation mean/std from preprocessor_config.json when present, else CLIP's."""
    cfg_path = model_dir / "preprocessor_config.json"
    mean, std = CLIP_MEAN, CLIP_STD
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
    from vlpet_cli.data.clip_resnet import load_resnet, resnet_checkpoint

    path = Path(model)
    module = load_resnet(path, torchscript)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    compute_dtype = compute_dtype or ("float16" if device.startswith("cuda") else "float32")
    if compute_dtype not in ("float16", "float32"):
        raise VlpetError(f"compute dtype '{compute_dtype}': use float16 or float32.")
    if compute_dtype == "float16":
        _reference_precision(module)
    module.to(device).eval()
    spec = module.spec
    file = path if torchscript else resnet_checkpoint(path)
    return VisionModel(module, str(Path(file or path).resolve()), spec.resolution, 32, spec.channels, 4,
                       CLIP_MEAN, CLIP_STD, device, kind="resnet",
                       compute_dtype=torch.float16 if compute_dtype == "float16" else torch.float32)


def load_vision_model(model: str | Path, device: str | None = None, torchscript: bool = False) -> VisionModel:
    """Load a CLIPVisionModel (a vision-only or a full CLIP checkpoint) in eval mode, fp32, or a CLIP ResNet
    tower when `model` is a checkpoint file (or a folder holding one) rather than a transformers model directory."""
    if _is_resnet_checkpoint(model, torchscript):
        return load_resnet_model(model, device, torchscript)
    model_dir, model_id = _model_dir(model)
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise VlpetError(f"{model_dir}: no config.json; --model needs a transformers CLIP model directory.")
    model_type = json.loads(cfg_path.read_text(encoding="utf-8")).get("model_type")
    if model_type not in ("clip", "clip_vision_model"):
        raise VlpetError(f"{cfg_path}: model_type is '{model_type}', not a CLIP model; pass a CLIP vision model "
                         f"(e.g. openai/clip-vit-base-patch32 downloaded to a directory).")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # a full CLIP checkpoint lists its unused text weights
    transformers.utils.logging.disable_progress_bar()
    try:
        module = CLIPVisionModel.from_pretrained(model_dir, dtype=torch.float32)
    except Exception as exc:
        raise VlpetError(f"{model_dir}: cannot load a CLIP vision model ({exc}).") from exc
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.utils.logging.enable_progress_bar()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    module.to(device).eval()
    cfg = module.config
    mean, std = _preprocessor_stats(model_dir)
    return VisionModel(module, model_id, int(cfg.image_size), int(cfg.patch_size), int(cfg.hidden_size),
                       int(cfg.num_hidden_layers), mean, std, device)  # type: ignore[arg-type]


def load_image(path: Path, size: int) -> np.ndarray:
    """Decode an image with PIL: RGB, BICUBIC resize to (size, size); uint8 (size, size, 3)."""
    with Image.open(path) as img:
        img = img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        return np.asarray(img, dtype=np.uint8)


def normalize(pixels: np.ndarray, mean: tuple, std: tuple) -> np.ndarray:
    """uint8 RGB (S, S, 3) -> float32 (3, S, S), as ToTensor + Normalize would."""
    scale = 1.0 / (255.0 * np.asarray(std, dtype=np.float32))
    shift = np.asarray(mean, dtype=np.float32) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray((pixels.astype(np.float32) * scale - shift).transpose(2, 0, 1))


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


# ------------------------------------------------------------------------------------------------------------
# The extraction loop
# ------------------------------------------------------------------------------------------------------------

class _Inline:
    """Executor stand-in that decodes in the calling thread (workers=0)."""

    def submit(self, fn: Any, *args: Any) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - delivered through the future like a pool would
            fut.set_exception(exc)
        return fut

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


def _reason(exc: BaseException, path: Path) -> str:
    if isinstance(exc, FileNotFoundError) or not Path(path).exists():
        return "file not found"
    return f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("\t", " ")


def _decoded_batches(pool: Any, items: list[tuple[str, Path]], size: int, mean: tuple, std: tuple,
                     batch_size: int) -> Iterator[tuple[list[str], list[Any], list[tuple[str, str, str]]]]:
    """Yield (ids, preprocessed images, failures) per batch while the next ones are already being decoded."""
    pending: deque[tuple[str, Path, Future]] = deque()
    source = iter(items)

    def fill() -> None:
        while len(pending) < 2 * batch_size:
            try:
                img_id, path = next(source)
            except StopIteration:
                return
            pending.append((img_id, path, pool.submit(preprocess, path, size, mean, std)))

    fill()
    while pending:
        batch = [pending.popleft() for _ in range(min(batch_size, len(pending)))]
        fill()
        ids, arrays, failures = [], [], []
        for img_id, path, fut in batch:
            try:
                arrays.append(fut.result())
                ids.append(img_id)
            except Exception as exc:  # noqa: BLE001 - any decoding failure is reported, not fatal
                failures.append((img_id, str(path), _reason(exc, path)))
        yield ids, arrays, failures


def _plain_line(bar: Progress) -> str:
    return f"extract: {bar.completed}/{bar.total} images ({bar.description}), {bar.rate():.1f} images/s"


def report_path(out: Path, layout: str) -> Path:
    """Where the failed-images report of an output goes: `<out>.errors.txt` or `<out>/errors.txt`."""
    return out.with_name(out.name + ".errors.txt") if layout == PACKED else out / "errors.txt"


def _write_report(path: Path, failed: list[tuple[str, str, str]], requested: set[str], attempted: set[str],
                  done: set[str]) -> None:
    """Failures of this run plus earlier ones still requested, not retried (limit) and still missing.

    The report is removed when no failure remains.
    """
    rows: dict[str, tuple[str, str, str]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            parts = line.split("\t")
            keep = len(parts) == 3 and not line.startswith("#") and parts[0] in requested
            if keep and parts[0] not in attempted and parts[0] not in done:
                rows[parts[0]] = (parts[0], parts[1], parts[2])
    for row in failed:
        rows[row[0]] = row
    if not rows:
        path.unlink(missing_ok=True)
        return
    write_text(path, _REPORT_HEADER + "".join("\t".join(r) + "\n" for r in rows.values()))


def extract_features(images: dict[str, Path], model: str | Path, out: Path, layout: str = "packed",
                     layer: int = -1, batch_size: int = 32, dtype: str = "float16", limit: int | None = None,
                     workers: int = 2, progress: bool = True, device: str | None = None,
                     torchscript: bool = False) -> ExtractSummary:
    """Extract grid features for `images` (img_id -> file) into `out`; resumable, failures reported.
    `torchscript` allows OpenAI's TorchScript CLIP archive (RN101.pt) as `model`."""
    out = Path(out)
    if layout not in LAYOUTS:
        raise VlpetError(f"unknown --layout '{layout}'; use one of {', '.join(LAYOUTS)}.")
    if dtype not in DTYPES:
        raise VlpetError(f"unsupported --dtype '{dtype}'; use one of {', '.join(DTYPES)}.")
    if batch_size < 1 or (limit is not None and limit < 0):
        raise VlpetError("--batch-size must be >= 1 and --limit >= 0.")
    vm = load_vision_model(model, device, torchscript)
    if vm.kind == "resnet" and layer not in (-1, vm.num_layers):
        raise VlpetError(f"--layer {layer}: a CLIP ResNet gives the last stage's map (before attention pooling) "
                         f"only; leave --layer out (-1).")
    if vm.kind == "resnet":
        layer = -1  # recorded as -1 whichever way it was asked for, so stores and runs compare equal
    if not -(vm.num_layers + 1) <= layer <= vm.num_layers:
        raise VlpetError(f"--layer {layer} is out of range for {vm.model_id}: it has {vm.num_layers} layers, so "
                         f"use -{vm.num_layers + 1}..{vm.num_layers} (-1 = last).")
    attrs = {"model": vm.model_id, "layer": layer, "image_size": vm.image_size, "grid": [vm.grid, vm.grid]}
    writer = open_writer(out, layout, vm.grid * vm.grid, vm.hidden_size, dtype, attrs)
    summary = ExtractSummary(out=out, layout=layout)
    done = writer.existing()
    todo = [(img_id, Path(path)) for img_id, path in images.items() if img_id not in done]
    summary.skipped_existing = len(images) - len(todo)
    if limit is not None:
        todo = todo[:limit]
    bar = Progress(len(todo), progress, label="extract", unit="img", every_s=5.0, stderr=True, line=_plain_line)
    bar.description = "0 failed"
    n_failed = 0
    pool: Any = ThreadPoolExecutor(max_workers=workers) if workers > 0 else _Inline()
    attempted: set[str] = set()
    start = time.perf_counter()
    try:
        for ids, arrays, failures in _decoded_batches(pool, todo, vm.image_size, vm.mean, vm.std, batch_size):
            attempted.update(ids)
            attempted.update(f[0] for f in failures)
            if arrays:
                feats = grid_features(vm, to_pixels(arrays), layer)
                writer.add(ids, feats.numpy())
                summary.written += len(ids)
            summary.failed.extend(failures)
            n_failed += len(failures)
            bar.advance(len(ids) + len(failures), f"{n_failed} failed")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        writer.close()
        bar.close()
        summary.seconds = time.perf_counter() - start
        summary.images_per_s = summary.written / summary.seconds if summary.seconds > 0 else 0.0
        report = report_path(out, layout)
        _write_report(report, summary.failed, set(images), attempted, writer.existing())
        summary.report = report if report.is_file() else None
    return summary
