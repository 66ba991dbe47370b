"""A benchmark harness that holds up on a noisy machine: configurations alternate over rounds, one process each.

Every measurement runs `python SCRIPT --one NAME [args]` in a fresh subprocess, which prints one JSON object as its
last line. Round r runs every configuration once, in the given order on even rounds and reversed on odd rounds
(A B, B A, ...), so slow drift of the machine's load falls on every configuration alike. A ratio is computed per
round (numerator and denominator measured side by side) and reported as the median of the rounds with its spread
(min, max). The script prints one JSON object last.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class MeasurementError(RuntimeError):
    """A measurement subprocess failed; its stderr tail is in the message."""


def run_one(script: str | Path, name: str, args: Sequence[str] = (), env: Mapping[str, str] | None = None,
            timeout: float | None = None) -> dict:
    """One measurement in a fresh process: the JSON object `SCRIPT --one NAME ARGS` prints last."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    path = os.environ.get("PYTHONPATH")
    full_env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{path}" if path else str(ROOT)
    proc = subprocess.run([sys.executable, str(script), "--one", name, *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)
    if proc.returncode != 0:
        raise MeasurementError(f"{Path(script).name} --one {name} failed (exit {proc.returncode}):\n"
                               f"{proc.stderr[-3000:]}")
    lines = [line for line in proc.stdout.strip().splitlines() if line.strip()]
    if not lines:
        raise MeasurementError(f"{Path(script).name} --one {name} printed nothing")
    return json.loads(lines[-1])


def alternate(names: Sequence[str], rounds: int, measure: Callable[[str], dict],
              log: Callable[[str], None] | None = None) -> dict[str, list[dict]]:
    """{name: [result of round 0, round 1, ...]}: every round measures each name once, order reversed on odd
    rounds."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, not {rounds}")
    results: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(rounds):
        order = list(names) if r % 2 == 0 else list(reversed(names))
        for name in order:
            result = measure(name)
            results[name].append(result)
            if log is not None:
                log(f"round {r + 1}/{rounds} {name}: " + ", ".join(
                    f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
    return results


def spread(values: Sequence[float]) -> dict:
    """Median and min-max of a list of per-round figures."""
    vals = list(values)
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "rounds": vals}


def ratio(results: Mapping[str, list[dict]], num: str, den: str, key: str) -> dict:
    """Per-round ratio results[num][r][key] / results[den][r][key], with its median and spread."""
    per_round = [a[key] / b[key] for a, b in zip(results[num], results[den]) if b[key]]
    if not per_round:
        raise ValueError(f"no round has a non-zero {key} for {den}")
    return spread(per_round)


def median_of(results: Mapping[str, list[dict]], name: str, key: str) -> float:
    """The median over rounds of one configuration's absolute figure."""
    return statistics.median(r[key] for r in results[name])


def summary(benchmark: str, ratios: Mapping[str, dict], targets: Mapping[str, tuple[str, float]],
            extra: Mapping | None = None) -> dict:
    """The final JSON object: each ratio's median under its key, its spread under KEY_spread, and the targets
    ({key: ["<=" | ">=", value]}) with whether the median meets them."""
    out: dict = {"benchmark": benchmark, **(extra or {})}
    for key, stats in ratios.items():
        out[key] = round(stats["median"], 4)
        out[f"{key}_spread"] = [round(stats["min"], 4), round(stats["max"], 4)]
    out["targets"] = {key: [op, value] for key, (op, value) in targets.items()}
    out["met"] = {key: (out[key] <= value if op == "<=" else out[key] >= value)
                  for key, (op, value) in targets.items() if key in out}
    return out


def print_summary(obj: dict) -> None:
    """Print the JSON object as the last line of stdout."""
    print(json.dumps(obj), flush=True)


def log_stderr(message: str) -> None:
    """Progress lines go to stderr so that stdout ends with the JSON object."""
    print(message, file=sys.stderr, flush=True)
