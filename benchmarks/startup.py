"""Start-up at real size: seconds from `vlpet train` to the end of the first training step, first and second run.

A synthetic VQA data root in the real formats (vqa/karpathy_train.json in VL-T5's record format, COCO features
in a packed HDF5 file) with `--questions` training questions (VQA's Karpathy train split has about 600k; the
default, 100k, runs in a couple of minutes here). `first` empties the record cache and starts; `second` starts
with the cache the first left (vlpet_cli/data/cache.py). Each measurement is a fresh process timed from before
its imports to the first optimiser step (tiny-bart, so that the data dominates as it does at real size).
  startup_ratio_cached = second / first (per round, median)                  target <= 0.20
  records_rss_ratio    = peak RSS above imports of second / first (the records are memory-mapped)
The same for TVQA with subtitles (`first_tvqa`, `second_tvqa`; `--tvqa-questions`, TVQA has about 120k, default
20k): VALUE's video/ann/tvqa files, video/ann/tv_subtitles.jsonl with subtitles long enough that most encoder
texts reach the 600-token limit, packed CLIP-ViT features; a tiny-bart with 1024 positions.
  startup_ratio_cached_tvqa, records_rss_ratio_tvqa                         target <= 0.20
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
TVQA_CONFIGS = ("first_tvqa", "second_tvqa")
DIM = 64


def workdir(name: str, work: Path) -> tuple[str, Path]:
    """(task, its work folder) of a configuration: VQA in `work`, TVQA in `work/tvqa`."""
    return ("tvqa", work / "tvqa") if name.endswith("_tvqa") else ("vqa", work)


def measure(name: str, work: Path) -> dict:
    """Seconds from process start to the first step's end; peak RSS above the imports."""
    import resource

    task, work = workdir(name, work)
    backbone = "tiny-bart" if task == "vqa" else str(work / "backbone")

    cache = work / "cache"
    if name.startswith("first"):
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
    parser.add_argument("--tvqa-questions", type=int, default=20_000,
                        help="TVQA training questions with subtitles (TVQA: ~120k); 0 skips TVQA")
    parser.add_argument("--tvqa-videos", type=int, default=3_000, help="TVQA clips (TVQA: ~22k)")
    parser.add_argument("--no-vqa", action="store_true", help="measure TVQA only")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vlpet-bench-startup")
    parser.add_argument("--one", choices=CONFIGS + TVQA_CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.work)))
        return
    names: list[str] = []
    if not args.no_vqa:
        synthetic.make_root(args.work / "root", args.questions, args.images, n_val=64, dim=DIM)
        names += CONFIGS
    if args.tvqa_questions:
        tv = args.work / "tvqa"
        synthetic.make_tvqa_root(tv / "root", args.tvqa_questions, min(args.tvqa_videos, args.tvqa_questions),
                                 dim=DIM)
        synthetic.make_long_tiny_backbone(tv / "backbone")
        names += TVQA_CONFIGS
    results = harness.alternate(names, args.rounds,
                                lambda n: harness.run_one(__file__, n, ["--work", str(args.work)]),
                                log=harness.log_stderr)
    ratios, targets, extra = {}, {}, {"rounds": args.rounds}
    for first, second, suffix, size in (("first", "second", "", {"questions": args.questions,
                                                                   "images": args.images}),
                                        ("first_tvqa", "second_tvqa", "_tvqa",
                                         {"tvqa_questions": args.tvqa_questions, "tvqa_videos": args.tvqa_videos,
                                          "tvqa_tokens": "most encoder texts cut at 600"})):
        if first not in results:
            continue
        ratios[f"startup_ratio_cached{suffix}"] = harness.ratio(results, second, first, "seconds")
        ratios[f"records_rss_ratio{suffix}"] = harness.ratio(results, second, first, "peak_mb")
        targets[f"startup_ratio_cached{suffix}"] = ("<=", 0.20)
        extra.update(size)
        extra[f"second_used_cache{suffix}"] = all(r["cached"] for r in results[second])
        extra[f"records{suffix}"] = results[first][0]["records"]
    extra["absolute"] = {n: {"seconds": round(harness.median_of(results, n, "seconds"), 2),
                             "setup_seconds": round(harness.median_of(results, n, "setup_seconds"), 2),
                             "peak_mb": round(harness.median_of(results, n, "peak_mb"), 1)} for n in names}
    harness.print_summary(harness.summary("startup", ratios, targets, extra))


if __name__ == "__main__":
    main()
