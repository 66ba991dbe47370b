"""Training-step time and peak memory of PET methods on a bart-base-size model built from config.

Batch 8, 20 text + 36 visual tokens (7x7 grid pooled to 6x6), 20 target tokens. Prints ratios measured in one run:
  step_ratio_vlpet_large = vlpet-large step / bare frozen backbone step (projector only, no PET), target <= 1.15
  step_ratio_lora        = lora step / bare step
  mem_ratio_vlpet_large  = peak memory of vlpet-large / full fine-tuning, target <= 0.5 (same for lora)
Each configuration runs in its own subprocess so peak memory (CUDA: max allocated; CPU: peak RSS above the process
after imports) is its own.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CONFIGS = {"bare": ("vl-adapter", ["pet.encoder=null", "pet.decoder=null", "pet.trainable.layernorms=none"]),
           "vlpet-large": ("vlpet-large", []),
           "lora": ("lora", []),
           "full": ("full-finetune", [])}


def measure(name: str, steps: int, warmup: int) -> dict:
    """Run `steps` optimiser steps of one configuration; returns seconds per step and peak memory in MB."""
    import resource

    import torch

    from vlpet_cli.presets import resolve
    from vlpet_cli.vl.model import build_model

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # CPU: the memory a configuration needs is its peak RSS above the process after imports (interpreter,
    # torch and transformers are the same for every configuration).
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    preset_name, overrides = CONFIGS[name]
    preset = resolve(preset_name, overrides, backbone="bart-base")
    meta_model, _ = build_model(preset, weights=False)
    model = meta_model.to_empty(device=device)
    model.backbone.tie_weights()  # to_empty gives tied tensors separate storage; tie them again
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    b, vocab = 8, model.config.vocab_size
    batch = {"task": "vqa", "input_ids": torch.randint(4, 1000, (b, 20), device=device),
             "attention_mask": torch.ones(b, 20, dtype=torch.long, device=device),
             "vis_feats": torch.randn(b, 1, 49, 2048, device=device),
             "labels": torch.randint(4, vocab - 300, (b, 20), device=device),
             "loss_weights": torch.ones(b, device=device), "loss_reduction": "example"}

    def step() -> None:
        loss = model(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times.sort()
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline)
    return {"seconds_per_step": times[len(times) // 2], "peak_mb": peak, "device": device.type,
            "trainable": sum(p.numel() for p in params)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--one", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.steps, args.warmup)))
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    results = {}
    for name in CONFIGS:
        out = subprocess.run([sys.executable, __file__, "--one", name, "--steps", str(args.steps), "--warmup",
                              str(args.warmup)], capture_output=True, text=True, env=env, check=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[name]
        print(f"{name:12s} {r['seconds_per_step'] * 1000:8.1f} ms/step  peak {r['peak_mb']:8.0f} MB  "
              f"trainable {r['trainable']:,}", flush=True)
    bare, full = results["bare"], results["full"]
    summary = {
        "benchmark": "train_step", "device": bare["device"], "batch": 8, "text_tokens": 20, "visual_tokens": 36,
        "target_tokens": 20,
        "step_ratio_vlpet_large": results["vlpet-large"]["seconds_per_step"] / bare["seconds_per_step"],
        "step_ratio_lora": results["lora"]["seconds_per_step"] / bare["seconds_per_step"],
        "mem_ratio_vlpet_large": results["vlpet-large"]["peak_mb"] / full["peak_mb"],
        "mem_ratio_lora": results["lora"]["peak_mb"] / full["peak_mb"],
        "targets": {"step_ratio": 1.15, "mem_ratio": 0.5},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
