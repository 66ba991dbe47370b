"""Start-up at real size: seconds from `vlpet train` to the end of the first training step, first and second run.

A synthetic VQA data root in the real formats (vqa/karpathy_train.json in VL-T5's record format, COCO features
in a packed HDF5 file) with `--questions` training questions (VQA's Karpathy train split has about 600k; the
default, 100k, runs in a couple of minutes here). `first` empties the record cache and starts; `second` starts
with the cache the first left (vlpet_cli/data/cache.py). Each measurement is a fresh process timed from before
its imports to the first optimiser step (tiny-bart, so that the data dominates as it does at real size).
  startup_ratio_cached = second / first (per round, median)                  target <= 0.20
  records_rss_ratio    = peak RSS above imports of second / first (the records are memory-mapped)
The last line is one JSON object.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import synthetic  # noqa: E402

CONFIGS = ("first", "second")
DIM = 64


def measure(name: str, work: Path, task: str = "vqa", backbone: str = "tiny-bart") -> dict:
    """Seconds from process start to the first step's end; peak RSS above the imports."""
    import resource

    cache = work / "cache"
    if name == "first":
        shutil.rmtree(cache, ignore_errors=True)
    os.environ["VLPET_RECORD_CACHE_DIR"] = str(cache)
    import torch

    from vlpet_cli.train import resolve_train_preset, setup

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    preset = resolve_train_preset("vlpet-large", [task], str(work / "root"), backbone,
                                  ["train.batch_size=8", "train.epochs=1", "eval.every=0", f"model.feat_dim={DIM}"])
    with tempfile.TemporaryDirectory() as runs:
        session = setup(preset, Path(runs) / "run")
        loaded = time.perf_counter() - STARTED
        _, batch = next(iter(session.loader.epoch(0)))
        device = session.accelerator.device
        loss = session.model({k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()})
        session.accelerator.backward(loss)
        session.optimizer.step()
        seconds = time.perf_counter() - STARTED
    records = len(session.data.train[task])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline
    return {"seconds": seconds, "setup_seconds": loaded, "peak_mb": peak, "records": records,
            "cached": type(session.data.train[task].records).__name__ == "CachedRecords",
            "loss_finite": bool(torch.isfinite(loss))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--questions", type=int, default=100_000, help="training questions (VQA Karpathy: ~600k)")
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vlpet-bench-startup")
    parser.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.work)))
        return
    synthetic.make_root(args.work / "root", args.questions, args.images, n_val=64, dim=DIM)
    results = harness.alternate(list(CONFIGS), args.rounds,
                                lambda n: harness.run_one(__file__, n, ["--work", str(args.work)]),
                                log=harness.log_stderr)
    ratios = {"startup_ratio_cached": harness.ratio(results, "second", "first", "seconds"),
              "records_rss_ratio": harness.ratio(results, "second", "first", "peak_mb")}
    absolute = {n: {"seconds": round(harness.median_of(results, n, "seconds"), 2),
                    "setup_seconds": round(harness.median_of(results, n, "setup_seconds"), 2),
                    "peak_mb": round(harness.median_of(results, n, "peak_mb"), 1)} for n in CONFIGS}
    harness.print_summary(harness.summary(
        "startup", ratios, {"startup_ratio_cached": ("<=", 0.20)},
        {"questions": args.questions, "images": args.images, "rounds": args.rounds,
         "second_used_cache": all(r["cached"] for r in results["second"]), "absolute": absolute}))


if __name__ == "__main__":
    main()
