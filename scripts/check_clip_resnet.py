"""Check vlpet's CLIP ResNet tower against golden outputs of OpenAI's own CLIP model code (issue 17).

    python scripts/check_clip_resnet.py DIR [DIR ...]

Each DIR holds `clip_visual.safetensors` (a vision tower in CLIP's key layout, under `visual.`), `io.safetensors`
(`pixel_values` [B, 3, 224, 224] already normalised, `grid_features` [B, 49, C] and `attnpool_output`
[B, output_dim]) and `README.json`. The tower is built from the checkpoint alone and run in float32; one JSON line
per directory (`{"golden": NAME, "grid": max_abs_diff, "pooled": max_abs_diff, "ok": bool}`), then `N/M match`.
Exit status 1 when any directory differs by more than 1e-4 (or cannot be checked).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOLERANCE = 1e-4


def _max_diff(a, b) -> float:
    """Max |a - b|, or infinity when the shapes differ."""
    if tuple(a.shape) != tuple(b.shape):
        return float("inf")
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def check_dir(directory: Path) -> dict:
    """{"golden", "grid", "pooled", "ok"} for one golden directory; a failure to load is reported, not raised."""
    import torch
    from safetensors.torch import load_file

    from vlpet_cli.features.clip_resnet import build_resnet

    directory = Path(directory)
    result: dict = {"golden": directory.name, "grid": None, "pooled": None, "ok": False}
    try:
        state = load_file(str(directory / "clip_visual.safetensors"))
        io = load_file(str(directory / "io.safetensors"))
        tower = build_resnet(state, str(directory / "clip_visual.safetensors"))
    except Exception as exc:  # noqa: BLE001 - a missing or damaged directory is a failed check, not a crash
        result["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
        return result
    with torch.inference_mode():
        grid, pooled = tower(io["pixel_values"].float())
    result["grid"] = _max_diff(grid, io["grid_features"])
    result["pooled"] = _max_diff(pooled, io["attnpool_output"])
    result["ok"] = result["grid"] <= TOLERANCE and result["pooled"] <= TOLERANCE
    return result


def main(argv: list[str] | None = None) -> int:
    """Check every directory given; 0 when all match, 1 otherwise (2 for a usage error)."""
    dirs = [Path(d) for d in (sys.argv[1:] if argv is None else argv)]
    if not dirs or any(d.name in ("-h", "--help") for d in dirs):
        print(__doc__.strip())
        return 0 if dirs else 2
    results = [check_dir(d) for d in dirs]
    for result in results:
        print(json.dumps(result))
    matched = sum(r["ok"] for r in results)
    print(f"{matched}/{len(results)} match")
    return 0 if matched == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
