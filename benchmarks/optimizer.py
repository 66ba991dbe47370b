"""Step time of vlpet's default optimizer (the reference's AdamW, transformers 4.2.1 math, multi-tensor form)
against torch.optim.AdamW(foreach=True), on vlpet-large's trainable set at bart-base size.

The trainable tensors and their two decay groups come from vlpet-large built on bart-base's config (meta device, no
weights), materialised as random float32 tensors with fixed random gradients. Configurations alternate over rounds,
one fresh process per measurement (benchmarks/harness.py); a process times `--steps` optimizer steps after two
warm-up steps and keeps its fastest (on a shared machine the others carry other programs' load):
  step_ratio_reference_vs_torch   reference AdamW step / torch.optim.AdamW(foreach=True) step   target <= 1.10
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

CONFIGS = ("reference", "torch")
TARGET = 1.10


def trainable_groups(preset_name: str, backbone: str, device: str) -> list[dict]:
    """`optim.param_groups` of the preset on the backbone, each tensor a random one of its shape with a gradient."""
    import torch

    from vlpet_cli.optim import param_groups
    from vlpet_cli.presets import resolve
    from vlpet_cli.vl.model import build_model

    preset = resolve(preset_name, backbone=backbone)
    model, _ = build_model(preset, weights=False)
    gen = torch.Generator().manual_seed(0)
    groups = []
    for group in param_groups(model, preset):
        params = []
        for meta in group["params"]:
            p = torch.nn.Parameter(torch.randn(meta.shape, generator=gen).to(device) * 0.02)
            p.grad = (torch.randn(meta.shape, generator=gen) * 1e-3).to(device)
            params.append(p)
        groups.append({**group, "params": params})
    return groups


def measure(name: str, steps: int, preset_name: str, backbone: str) -> dict:
    """The fastest of `steps` optimizer steps of one configuration, in seconds."""
    import torch

    from vlpet_cli.optim import ReferenceAdamW

    device = "cuda" if torch.cuda.is_available() else "cpu"
    groups = trainable_groups(preset_name, backbone, device)
    if name == "reference":
        optimizer = ReferenceAdamW(groups, lr=1e-3, eps=1e-6)  # what `vlpet train` builds by default
    else:
        optimizer = torch.optim.AdamW(groups, lr=1e-3, eps=1e-6, foreach=True)
    times = []
    for i in range(steps + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    params = [p for g in groups for p in g["params"]]
    return {"seconds_per_step": min(times), "tensors": len(params), "numel": sum(p.numel() for p in params),
            "device": device, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--preset", default="vlpet-large")
    parser.add_argument("--backbone", default="bart-base")
    parser.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.steps, args.preset, args.backbone)))
        return
    flags = ["--steps", str(args.steps), "--preset", args.preset, "--backbone", args.backbone]
    results = harness.alternate(list(CONFIGS), args.rounds, lambda n: harness.run_one(__file__, n, flags),
                                log=harness.log_stderr)
    ratios = {"step_ratio_reference_vs_torch": harness.ratio(results, "reference", "torch", "seconds_per_step")}
    first = results["reference"][0]
    harness.print_summary(harness.summary(
        "optimizer", ratios, {"step_ratio_reference_vs_torch": ("<=", TARGET)},
        {"preset": args.preset, "backbone": args.backbone, "tensors": first["tensors"], "numel": first["numel"],
         "device": first["device"], "threads": first["threads"], "steps": args.steps, "rounds": args.rounds,
         "absolute_ms": {n: round(1000 * harness.median_of(results, n, "seconds_per_step"), 3) for n in CONFIGS}}))


if __name__ == "__main__":
    main()
