"""Peak training memory of LST (Ladder Side-Tuning) against full fine-tuning and VL-PET-large.

LST's point is memory: the backbone runs without an autograd graph, so only the narrow side network keeps
activations for the backward pass. `lst_memory()` builds each configuration from a built-in config (random weights,
no download) in its own subprocess, runs a few optimiser steps on batch 8 (20 text + 36 visual tokens, 20 target
tokens) and reports the peak (CUDA: max allocated; CPU: peak RSS above the process after imports). The last line
printed is one JSON object with the two ratios:
  mem_ratio_lst_vs_full        = LST / full fine-tuning
  mem_ratio_lst_vs_vlpet_large = LST / vlpet-large
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CONFIGS = {"lst": "lst", "vlpet-large": "vlpet-large", "full": "full-finetune"}


def peak_memory(preset_name: str, backbone: str, steps: int) -> dict:
    """Peak memory (MB) and trainable count of `steps` training steps of one preset, in this process."""
    import resource

    import torch

    from vlpet_cli.presets import resolve
    from vlpet_cli.vl.model import build_model

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model, _ = build_model(resolve(preset_name, backbone=backbone), weights=False)
    model = model.to_empty(device=device)
    model.backbone.tie_weights()  # to_empty gives tied tensors separate storage
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    b = 8
    batch = {"task": "vqa", "input_ids": torch.randint(4, 1000, (b, 20), device=device),
             "attention_mask": torch.ones(b, 20, dtype=torch.long, device=device),
             "vis_feats": torch.randn(b, 1, 49, 2048, device=device),
             "labels": torch.randint(4, 1000, (b, 20), device=device)}
    for _ in range(steps):
        model(batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline)
    return {"peak_mb": peak, "trainable": sum(p.numel() for p in params), "device": device.type}


def lst_memory(backbone: str = "t5-base", steps: int = 2) -> dict:
    """Measure LST, vlpet-large and full fine-tuning (one subprocess each); returns the summary with the ratios."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    results = {}
    for name, preset in CONFIGS.items():
        out = subprocess.run([sys.executable, __file__, "--one", preset, "--backbone", backbone, "--steps",
                              str(steps)], capture_output=True, text=True, env=env, check=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    return {"benchmark": "lst_memory", "backbone": backbone, "device": results["lst"]["device"], "batch": 8,
            "peak_mb": {k: round(v["peak_mb"]) for k, v in results.items()},
            "trainable": {k: v["trainable"] for k, v in results.items()},
            "mem_ratio_lst_vs_full": results["lst"]["peak_mb"] / results["full"]["peak_mb"],
            "mem_ratio_lst_vs_vlpet_large": results["lst"]["peak_mb"] / results["vlpet-large"]["peak_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="t5-base")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(peak_memory(args.one, args.backbone, args.steps)))
        return
    print(json.dumps(lst_memory(args.backbone, args.steps)))


if __name__ == "__main__":
    main()
