"""CPU threads: the toy COCO run's time at 1 thread, 2 threads and the count vlpet chooses, alone and beside a busy
process.

The run is the README's `vlpet train --preset vlpet-small --task coco --data-root toy --backbone tiny-bart` (the toy
world's defaults: batch 24, lr 3e-3; `--epochs` of them, validated once at the end, CIDEr reported), timed from
before `train()` to its end in a fresh process (`--one NAME`), the thread count set by VLPET_THREADS (`t1`, `t2`)
or left to vlpet (`auto`). `_busy` configurations run beside a competing process this script starts before the
measurement and stops after it: a pure-Python busy loop (one CPU's worth), bounded by a deadline so that it never
outlives the benchmark. Configurations alternate over rounds (benchmarks/harness.py); ratios are per round:
  slowdown_auto   auto_busy / auto: the chosen count beside one busy process vs alone      target <= 2.0
  slowdown_t1, slowdown_t2          the same at 1 and 2 threads
  t2_vs_t1, auto_vs_t1              alone, against one thread
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

THREADS = {"t1": "1", "t2": "2", "auto": None}  # VLPET_THREADS per configuration (None: vlpet chooses)
CONFIGS = [*THREADS, *(f"{name}_busy" for name in THREADS)]
RATIOS = {"slowdown_auto": ("auto_busy", "auto"), "slowdown_t1": ("t1_busy", "t1"),
          "slowdown_t2": ("t2_busy", "t2"), "t2_vs_t1": ("t2", "t1"), "auto_vs_t1": ("auto", "t1")}
TARGETS = {"slowdown_auto": ("<=", 2.0)}
BUSY_LOOP = "import sys, time\nend = time.time() + float(sys.argv[1])\nwhile time.time() < end:\n    pass\n"


def measure(epochs: int, work: Path) -> dict:
    """One toy COCO run in this process: seconds, the thread count it chose and its validation CIDEr."""
    import torch

    from vlpet_cli.threads import usable_cpus
    from vlpet_cli.train import resolve_train_preset, train

    preset = resolve_train_preset("vlpet-small", ["coco"], "toy", "tiny-bart",
                                  [f"train.epochs={epochs}", f"eval.every={epochs}"])
    with tempfile.TemporaryDirectory(dir=work) as runs:
        started = time.perf_counter()
        result = train(preset, Path(runs) / "run", overwrite=True)
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "train_seconds": result.summary["seconds"], "threads": torch.get_num_threads(),
            "cider": result.summary["validation"]["coco"]["cider"], "usable_cpus": usable_cpus()[0]}


def busy_process(limit_s: float) -> subprocess.Popen:
    """A competing process that keeps one CPU busy for at most `limit_s` seconds (stopped earlier by the caller)."""
    return subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(limit_s)])


def measure_config(name: str, epochs: int, work: Path, timeout: float) -> dict:
    """One measurement of a configuration in a fresh process, beside a busy process for `_busy` ones."""
    threads = THREADS[name.removesuffix("_busy")]
    env = {"VLPET_CACHE": str(work / "cache"), "VLPET_THREADS": threads or ""}
    busy = busy_process(timeout + 60) if name.endswith("_busy") else None
    try:
        return harness.run_one(__file__, name, ["--epochs", str(epochs), "--work", str(work)], env=env,
                               timeout=timeout)
    finally:
        if busy is not None:
            busy.terminate()
            busy.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8, help="epochs of the toy run (the README's: 8)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one measurement may take")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help="comma list of configurations to measure (default: all; two threads on a loaded "
                             "machine can take many minutes a run)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vlpet-bench-threads")
    parser.add_argument("--one", choices=[*CONFIGS, "build"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.one == "build":
        from vlpet_cli.toy.root import resolve_data_root

        print(json.dumps({"toy": str(resolve_data_root("toy"))}))
        return
    if args.one:
        print(json.dumps(measure(args.epochs, args.work)))
        return
    names = [name.strip() for name in args.configs.split(",") if name.strip()]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown or not names:
        parser.error(f"--configs: unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(CONFIGS)}")
    harness.run_one(__file__, "build", ["--work", str(args.work)], env={"VLPET_CACHE": str(args.work / "cache")})
    results = harness.alternate(names, args.rounds,
                                lambda n: measure_config(n, args.epochs, args.work, args.timeout),
                                log=harness.log_stderr)
    ratios = {key: harness.ratio(results, num, den, "seconds") for key, (num, den) in RATIOS.items()
              if num in results and den in results}
    extra = {"rounds": args.rounds, "epochs": args.epochs, "usable_cpus": results[names[0]][0]["usable_cpus"],
             "load_average_at_end": round(os.getloadavg()[0], 2),
             "absolute": {n: {"seconds": round(harness.median_of(results, n, "seconds"), 1),
                              "threads": results[n][0]["threads"],
                              "cider": round(harness.median_of(results, n, "cider"), 1)} for n in names}}
    harness.print_summary(harness.summary("threads", ratios, TARGETS, extra))


if __name__ == "__main__":
    main()
