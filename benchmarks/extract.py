"""Extraction speed: `extract_features` images/s against the bare model forward on the same preprocessed batches.

`--model vit` (default): a ViT-B/32-size CLIP vision tower built from config (random weights: 224 px, patch 32,
hidden 768, 12 layers). `--model rn101`: an RN101-size CLIP ResNet tower (random weights: stages 3-4-23-3, width
64, output 512) saved as a safetensors checkpoint in CLIP's key layout, giving the paper's (49, 2048) features.
Both run offline; N synthetic JPEG images (640x480, like COCO) are written to a temp dir. The ratio
forward/extraction says what decoding, preprocessing and writing cost on top of the model (target: within 1.3x for
the ViT, 1.05x for the heavier RN101, whose forward dominates). The last line printed is one JSON object; for
rn101 it includes seconds per 1,000 images.

Usage: python benchmarks/extract.py [--model vit|rn101] [--n 64] [--batch-size 32] [--workers 2] [--repeat 3]
                                    [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGETS = {"vit": 1.3, "rn101": 1.05}
RN101_LAYERS, RN101_WIDTH, RN101_OUTPUT = (3, 4, 23, 3), 64, 512


def write_images(folder: Path, n: int, seed: int = 0) -> dict[str, Path]:
    """N smooth-plus-noise 640x480 JPEGs (decoding cost close to real photos)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:480, 0:640]
    images = {}
    for i in range(n):
        base = np.stack([(xx * (i + 1)) % 256, (yy * 2 + i) % 256, (xx + yy) % 256], axis=-1)
        noise = rng.integers(0, 40, base.shape)
        path = folder / f"img{i:05d}.jpg"
        Image.fromarray(((base + noise) % 256).astype(np.uint8)).save(path, quality=90)
        images[path.stem] = path
    return images


def build_model(folder: Path, seed: int = 0) -> Path:
    """Save a ViT-B/32-size CLIPVisionModel with random weights."""
    import torch
    import transformers
    from transformers import CLIPVisionConfig, CLIPVisionModel

    transformers.utils.logging.disable_progress_bar()
    config = CLIPVisionConfig(image_size=224, patch_size=32, hidden_size=768, num_hidden_layers=12,
                              num_attention_heads=12, intermediate_size=3072)
    torch.manual_seed(seed)
    CLIPVisionModel(config).save_pretrained(folder)
    return folder


def build_rn101(folder: Path, seed: int = 0) -> Path:
    """Save an RN101-size CLIP ResNet tower with random weights, under `visual.` as in a full CLIP checkpoint."""
    import torch
    from safetensors.torch import save_file

    from vlpet_cli.features.clip_resnet import ModifiedResNet, ResNetSpec

    torch.manual_seed(seed)
    tower = ModifiedResNet(ResNetSpec(RN101_LAYERS, RN101_WIDTH, RN101_WIDTH * 32 // 64, RN101_OUTPUT, 224))
    folder.mkdir(parents=True, exist_ok=True)
    save_file({f"visual.{k}": v.contiguous() for k, v in tower.state_dict().items()},
              str(folder / "rn101-random.safetensors"))
    return folder


def decode_rate(images: dict[str, Path]) -> float:
    """images/s of decoding + preprocessing alone, in one thread."""
    from vlpet_cli.features.extract.images import CLIP_MEAN, CLIP_STD, preprocess

    start = time.perf_counter()
    for path in images.values():
        preprocess(path, 224, CLIP_MEAN, CLIP_STD)
    return len(images) / (time.perf_counter() - start)


def bare_forward(model_dir: Path, images: dict[str, Path], batch_size: int, device: str | None) -> float:
    """images/s of the model forward alone on batches preprocessed beforehand (one warm-up batch)."""
    from vlpet_cli.features.extract.images import grid_features, load_model, preprocess, to_pixels

    vm = load_model(model_dir, device)
    arrays = [preprocess(p, vm.image_size, vm.mean, vm.std) for p in images.values()]
    batches = [to_pixels(arrays[i:i + batch_size]) for i in range(0, len(arrays), batch_size)]
    grid_features(vm, batches[0])
    if vm.device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in batches:
        grid_features(vm, batch)  # copies the features back to the host, as extraction does
    return len(arrays) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(TARGETS), default="vit")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeat", type=int, default=3, help="alternate runs of each; the best counts")
    args = parser.parse_args()

    import torch

    from vlpet_cli.features.extract.images import extract as extract_features

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "images").mkdir()
        images = write_images(tmp_path / "images", args.n)
        model_dir = (build_rn101 if args.model == "rn101" else build_model)(tmp_path / "model")
        decode_ips = decode_rate(images)
        forward_runs, extract_runs = [], []
        for r in range(args.repeat):  # alternate, so that a busy machine slows both alike
            forward_runs.append(bare_forward(model_dir, images, args.batch_size, args.device))
            summary = extract_features(images, model_dir, tmp_path / f"features{r}.h5",
                                       batch_size=args.batch_size, workers=args.workers, progress=False,
                                       device=args.device)
            assert summary.written == args.n and not summary.failed
            extract_runs.append(summary.rate)
    forward_ips, extract_ips = max(forward_runs), max(extract_runs)
    ratio = forward_ips / extract_ips
    target = TARGETS[args.model]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"model {args.model}, device {device}, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores, "
          f"{args.n} images 640x480 JPEG -> 224 px, batch {args.batch_size}, {args.workers} decode workers")
    print(f"decode alone:  {decode_ips:8.1f} images/s (one thread: JPEG decode, BICUBIC resize, normalise)")
    print(f"bare forward:  {forward_ips:8.1f} images/s (best of {' '.join(f'{x:.1f}' for x in forward_runs)})")
    print(f"extraction:    {extract_ips:8.1f} images/s (best of {' '.join(f'{x:.1f}' for x in extract_runs)}; "
          f"decode + forward + fp16 write)")
    print(f"ratio forward/extraction: {ratio:.2f}x (target <= {target}x): {'ok' if ratio <= target else 'SLOW'}; "
          f"{1000 / extract_ips:.0f} s per 1,000 images")
    print(json.dumps({
        "benchmark": "extract", "model": args.model, "device": device, "n_images": args.n,
        "batch_size": args.batch_size,
        "workers": args.workers, "repeat": args.repeat, "decode_images_per_s": round(decode_ips, 2),
        "forward_images_per_s": round(forward_ips, 2), "extract_images_per_s": round(extract_ips, 2),
        "seconds_per_1000_images": round(1000 / extract_ips, 1),
        "ratio": round(ratio, 3), "target": target, "ok": ratio <= target,
    }))


if __name__ == "__main__":
    main()
