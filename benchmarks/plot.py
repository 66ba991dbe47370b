"""Plotting a long run: seconds `plots.plot_run` takes to draw `plots/loss.png` at the end of training.

A run directory in vlpet's format (config.yaml, metrics.jsonl) with `--epochs` x `--steps` updates of four tasks
(default 20 x 50: 4,000 training losses) and one validation per epoch. Each round is a fresh process that plots
once to import matplotlib and warm its caches, then times `--repeats` plots and keeps the fastest (the figure a
user waits for when training ends, without the one-off import).
  plot_seconds  fastest plot of a round, median over rounds                     target <= 1.0
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

TASKS = ("vqa", "gqa", "nlvr", "coco")
METRICS = {"vqa": "vqa", "gqa": "acc", "nlvr": "acc", "coco": "cider"}


def make_run(run: Path, epochs: int, steps: int) -> int:
    """Write a finished run's config.yaml and metrics.jsonl into `run`; the number of training-loss events."""
    import yaml

    run.mkdir(parents=True)
    config = {"name": run.name, "method": "VL-PET-large", "model": {"backbone": "bart-base"},
              "data": {"tasks": list(TASKS)}, "train": {"epochs": epochs}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    events: list[dict] = [{"event": "start", "trainable": 1000, "total": 24000, "percent": 4.16,
                           "batch_sizes": dict.fromkeys(TASKS, 4), "steps_per_epoch": steps, "processes": 1}]
    step = 0
    for epoch in range(epochs):
        for _ in range(steps):
            step += 1
            events += [{"event": "train", "epoch": epoch, "step": step, "update": step, "task": task,
                        "loss": 3.0 / step + i, "lr": 1e-3, "samples_per_s": 50.0} for i, task in enumerate(TASKS)]
        metrics = {task: {METRICS[task]: 40.0 + epoch + i} for i, task in enumerate(TASKS)}
        events.append({"event": "val", "epoch": epoch, "step": step, "metrics": metrics, "score": 50.0 + epoch})
    events.append({"event": "end", "updates": step, "seconds": 1.0, "adapter_bytes": 1234})
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return epochs * steps * len(TASKS)


def measure(epochs: int, steps: int, repeats: int) -> dict:
    """The fastest of `repeats` plots of a fresh run, after one plot that imports matplotlib."""
    from vlpet_cli.plots import plot_run

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "long"
        losses = make_run(run, epochs, steps)
        plot_run(run)
        timings = []
        for _ in range(repeats):
            started = time.perf_counter()
            plot_run(run)
            timings.append(time.perf_counter() - started)
    return {"seconds": min(timings), "train_events": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=50, help="updates per epoch")
    parser.add_argument("--repeats", type=int, default=2, help="timed plots per round (the fastest counts)")
    parser.add_argument("--one", choices=("plot",), help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = ["--epochs", str(args.epochs), "--steps", str(args.steps), "--repeats", str(args.repeats)]
    if args.one:
        print(json.dumps(measure(args.epochs, args.steps, args.repeats)))
        return
    results = harness.alternate(["plot"], args.rounds, lambda n: harness.run_one(__file__, n, sizes),
                                log=harness.log_stderr)
    stats = harness.spread([r["seconds"] for r in results["plot"]])
    extra = {"rounds": args.rounds, "train_events": results["plot"][0]["train_events"], "epochs": args.epochs}
    harness.print_summary(harness.summary("plot", {"plot_seconds": stats}, {"plot_seconds": ("<=", 1.0)}, extra))


if __name__ == "__main__":
    main()
