"""The training loop's efficiency: `vlpet train` samples/s against a bare loop of the same model steps.

A synthetic VQA data root in the real formats (vqa/karpathy_train.json, COCO features in a packed HDF5 file,
`--records` questions, default 4000) and a bart-base-size backbone (benchmarks/synthetic.py). `vlpet` runs
`train.train` (vlpet-large, batch 8, `--steps` updates, no validation) and takes its samples/s (data loading
from HDF5, tokenisation, collation, Accelerate, the schedule, logging) as it reports it in metrics.jsonl
(samples over the seconds since the loop began, at the last step; the final checkpoint's write comes after it).
`bare` builds the same model and optimizer (`vlpet_cli.optim`), collates the same batches beforehand and times
forward/backward/clip/step only.
  loop_efficiency = bare seconds / vlpet seconds (per round, median over rounds)      target >= 0.95
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import synthetic  # noqa: E402

CONFIGS = ("vlpet", "bare")
BATCH = 8


def preset_for(root: Path, backbone: Path, steps: int, preset: str, precision: str):
    from vlpet_cli.train import resolve_train_preset

    return resolve_train_preset(preset, ["vqa"], str(root), str(backbone),
                                [f"train.batch_size={BATCH}", "train.epochs=1", f"train.max_steps={steps}",
                                 "eval.every=0", "train.checkpoint_every=0", f"train.precision={precision}"])


def measure(name: str, work: Path, steps: int, preset_name: str, precision: str = "fp32") -> dict:
    """Seconds for `steps` training steps of one configuration."""
    import torch

    root, backbone = work / "root", work / "backbone"
    preset = preset_for(root, backbone, steps, preset_name, precision)
    if name == "vlpet":
        from vlpet_cli.train import train

        with tempfile.TemporaryDirectory() as runs:
            result = train(preset, Path(runs) / "run")
            events = [json.loads(line) for line in (Path(runs) / "run" / "metrics.jsonl").read_text().splitlines()]
        rate = [e for e in events if e.get("event") == "train"][-1]["samples_per_s"]  # what vlpet reports
        return {"seconds": steps * BATCH / rate, "samples_per_s": rate, "steps": result.summary["updates"],
                "fit_seconds": result.summary["seconds"]}
    from accelerate.utils import set_seed

    from vlpet_cli.data.loading import load_task_data
    from vlpet_cli.data.multitask import MultitaskLoader, task_batch_sizes
    from vlpet_cli.optim import build_optimizer, clip_gradients
    from vlpet_cli.vl.model import build_model

    set_seed(preset.train.seed)
    model, tokenizer = build_model(preset, weights=True)
    data = load_task_data(preset, root, tokenizer, splits=("train",))
    sizes = task_batch_sizes(preset.train.batch_size, list(data.train), preset.train.task_ratios)
    loader = MultitaskLoader(data.train, sizes, data_seed=preset.train.data_seed)
    batches = []
    for _, batch in loader.epoch(0):
        batches.append(batch)
        if len(batches) == steps:
            break
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    batches = [{k: v.to(device) if hasattr(v, "to") else v for k, v in b.items()} for b in batches]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(model, preset, device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # fp16's loss scaling, as Accelerate's
    model.train()
    start = time.perf_counter()
    for batch in batches:
        with autocast:
            loss = model(batch)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        clip_gradients(params, preset.train.clip_grad_norm)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "samples_per_s": len(batches) * BATCH / seconds, "steps": len(batches)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--records", type=int, default=4000, help="training questions in the synthetic root")
    parser.add_argument("--images", type=int, default=400, help="images (feature rows) in the synthetic root")
    parser.add_argument("--preset", default="vlpet-large")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                        help="fp16 needs a CUDA GPU (vlpet refuses it on the CPU)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vlpet-bench-loop",
                        help="where the synthetic root and backbone are built (reused)")
    parser.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.work, args.steps, args.preset, args.precision)))
        return
    synthetic.make_root(args.work / "root", args.records, args.images)
    synthetic.make_backbone(args.work / "backbone")
    flags = ["--work", str(args.work), "--steps", str(args.steps), "--preset", args.preset, "--precision",
             args.precision]
    results = harness.alternate(list(CONFIGS), args.rounds, lambda n: harness.run_one(__file__, n, flags),
                                log=harness.log_stderr)
    ratios = {"loop_efficiency": harness.ratio(results, "bare", "vlpet", "seconds")}
    absolute = {n: {"samples_per_s": round(harness.median_of(results, n, "samples_per_s"), 3)} for n in CONFIGS}
    harness.print_summary(harness.summary(
        "loop", ratios, {"loop_efficiency": (">=", 0.95)},
        {"preset": args.preset, "precision": args.precision, "batch": BATCH, "steps": args.steps,
         "records": args.records, "images": args.images, "rounds": args.rounds, "absolute": absolute}))


if __name__ == "__main__":
    main()
