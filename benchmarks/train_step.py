"""Training-step time and peak memory of PET methods on a bart-base-size model built from config.

Batch 8, 20 text + 36 visual tokens (7x7 grid pooled to 6x6), 20 target tokens. Configurations alternate over
rounds, one fresh process per measurement (benchmarks/harness.py). A process's step time is its fastest step (on a
shared machine the other steps carry other programs' load); each ratio is the median of the per-round ratios:
  step_ratio_vlpet_large   vlpet-large step / bare frozen backbone step (projector only, no PET)   target <= 1.06
  step_ratio_lora          lora step / bare step                                                   target <= 1.10
  step_ratio_lora_vs_peft  vlpet lora / PEFT LoRA (r 128 on q, v; bias="all"; same projector)      target <= 1.00
  mem_ratio_vlpet_large    peak memory of vlpet-large / full fine-tuning                           target <= 0.45
  mem_ratio_gc_vlpet_large vlpet-large with train.gradient_checkpointing / without (memory)
  step_ratio_gc_vlpet_large the same for step time (the recompute's cost)
Peak memory: CUDA max allocated; CPU peak RSS above the process after imports (interpreter, torch and
transformers are the same for every configuration). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

BARE = ["pet.encoder=null", "pet.decoder=null", "pet.trainable.layernorms=none"]
# name: (preset, overrides, gradient checkpointing, PEFT LoRA)
CONFIGS = {"bare": ("vl-adapter", BARE, False, False),
           "vlpet-large": ("vlpet-large", [], False, False),
           "lora": ("lora", [], False, False),
           "peft-lora": ("vl-adapter", BARE, False, True),
           "full": ("full-finetune", [], False, False),
           "vlpet-large-gc": ("vlpet-large", [], True, False)}
TARGETS = {"step_ratio_vlpet_large": ("<=", 1.06), "step_ratio_lora": ("<=", 1.10),
           "step_ratio_lora_vs_peft": ("<=", 1.00), "mem_ratio_vlpet_large": ("<=", 0.45)}
RATIOS = {"step_ratio_vlpet_large": ("vlpet-large", "bare", "seconds_per_step"),
          "step_ratio_lora": ("lora", "bare", "seconds_per_step"),
          "step_ratio_lora_vs_peft": ("lora", "peft-lora", "seconds_per_step"),
          "mem_ratio_vlpet_large": ("vlpet-large", "full", "peak_mb"),
          "mem_ratio_lora": ("lora", "full", "peak_mb"),
          "mem_ratio_gc_vlpet_large": ("vlpet-large-gc", "vlpet-large", "peak_mb"),
          "step_ratio_gc_vlpet_large": ("vlpet-large-gc", "vlpet-large", "seconds_per_step")}
SHAPE = {"batch": 8, "text_tokens": 20, "visual_tokens": 36, "target_tokens": 20}


def add_peft_lora(model) -> None:
    """PEFT's LoRA at vlpet's lora budget: r 128, alpha 32, dropout 0.1 on q and v, every bias trained."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=128, lora_alpha=32, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], bias="all")
    inject_adapter_in_model(config, model.backbone)
    for name, p in model.backbone.named_parameters():
        p.requires_grad_("lora_" in name or name.endswith("bias"))
    for p in model.projector.parameters():
        p.requires_grad_(True)


def build(name: str, device, dtype=None):
    """A bart-base-size VLModel of one configuration, randomly initialised on `device`."""
    import torch

    from vlpet_cli.presets import resolve
    from vlpet_cli.vl.model import build_model

    preset_name, overrides, checkpointing, peft = CONFIGS[name]
    preset = resolve(preset_name, overrides, backbone="bart-base")
    meta_model, _ = build_model(preset, weights=False)
    model = meta_model.to_empty(device=device)
    model.backbone.tie_weights()  # to_empty gives tied tensors separate storage; tie them again
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    if peft:
        add_peft_lora(model)
        model.to(device)
    if checkpointing:
        model.enable_gradient_checkpointing()
    if dtype is not None:
        model.to(dtype)
    return model


def synthetic_batch(model, device, b: int = 8) -> dict:
    """A VQA-shaped batch: 20 text tokens, one 7x7 grid of 2048-d features, 20 target tokens."""
    import torch

    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    return {"task": "vqa", "input_ids": torch.randint(4, 1000, (b, 20), generator=g).to(device),
            "attention_mask": torch.ones(b, 20, dtype=torch.long, device=device),
            "vis_feats": torch.randn(b, 1, 49, 2048, generator=g).to(device),
            "labels": torch.randint(4, vocab - 300, (b, 20), generator=g).to(device),
            "loss_weights": torch.ones(b, device=device), "loss_reduction": "example"}


def measure(name: str, steps: int, warmup: int, precision: str = "fp32") -> dict:
    """Run `steps` optimiser steps of one configuration; returns the median seconds per step and peak MB."""
    import resource

    import torch

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model = build(name, device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(params, lr=1e-4, **fused)
    batch = synthetic_batch(model, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step() -> None:
        with autocast:
            loss = model(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
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
    return {"seconds_per_step": times[0], "median_seconds_per_step": times[len(times) // 2], "peak_mb": peak,
            "device": device.type,
            "samples_per_s": SHAPE["batch"] / times[0], "trainable": sum(p.numel() for p in params)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS))
    parser.add_argument("--one", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.steps, args.warmup, args.precision)))
        return
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration(s) {unknown}; choose from {list(CONFIGS)}")
    flags = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--precision", args.precision]
    results = harness.alternate(names, args.rounds, lambda n: harness.run_one(__file__, n, flags),
                                log=harness.log_stderr)
    ratios = {key: harness.ratio(results, num, den, field) for key, (num, den, field) in RATIOS.items()
              if num in results and den in results}
    absolute = {n: {"ms_per_step": round(harness.median_of(results, n, "seconds_per_step") * 1000, 2),
                    "samples_per_s": round(harness.median_of(results, n, "samples_per_s"), 2),
                    "peak_mb": round(harness.median_of(results, n, "peak_mb"), 1),
                    "trainable": results[n][0]["trainable"]} for n in names}
    harness.print_summary(harness.summary(
        "train_step", ratios, TARGETS,
        {"device": results[names[0]][0]["device"], "precision": args.precision, **SHAPE, "rounds": args.rounds,
         "steps": args.steps, "absolute": absolute}))


if __name__ == "__main__":
    main()
