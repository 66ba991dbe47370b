"""Training curves of one run directory: reads `metrics.jsonl` (through `runs`) and writes `plots/loss.png`.

metrics.jsonl is append-only, and a resumed run appends to it again from its last checkpoint, so the same steps
can appear twice. The curves follow the newest history: when a task's step goes back, the points it overlaps are
dropped (likewise for validation epochs). Lines that do not parse, such as a truncated last line after a crash,
are skipped. matplotlib is imported inside the functions that draw, so importing this module is cheap.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, TypeGuard

from vlpet_cli.atomic import atomic_file
from vlpet_cli.errors import VlpetError
from vlpet_cli.extras import require_extra
from vlpet_cli.runs import METRICS, read_config, read_events
from vlpet_cli.tasks import TASKS, primary_metrics

Series = tuple[list[float], list[float]]


def is_number(value: Any) -> TypeGuard[float]:
    """True for a finite int or float (bools and NaN are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def start_event(events: list[dict]) -> dict:
    """The last `start` event (trainable, total, percent, ...), or {} if there is none."""
    starts = [e for e in events if e.get("event") == "start"]
    return starts[-1] if starts else {}


def loss_series(events: list[dict]) -> dict[str, Series]:
    """Per task: (optimizer updates, mean training loss) from the `train` events, newest history kept."""
    points: dict[str, list[tuple[float, float, float]]] = {}
    for e in events:
        task, step, loss = e.get("task"), e.get("step"), e.get("loss")
        if e.get("event") != "train" or not isinstance(task, str) or not is_number(step) or not is_number(loss):
            continue
        x = e["update"] if is_number(e.get("update")) else step
        kept = points.setdefault(task, [])
        while kept and kept[-1][0] >= step:
            kept.pop()
        kept.append((step, x, float(loss)))
    return {t: ([p[1] for p in kept], [p[2] for p in kept]) for t, kept in points.items() if kept}


def val_events(events: list[dict]) -> list[dict]:
    """The `val` events with a metrics mapping, newest history kept (a repeated epoch replaces later ones)."""
    kept: list[dict] = []
    for e in events:
        if e.get("event") != "val" or not isinstance(e.get("metrics"), dict):
            continue
        where = e.get("epoch") if is_number(e.get("epoch")) else e.get("step")
        if not is_number(where):
            continue
        while kept and kept[-1]["_at"] >= where:
            kept.pop()
        kept.append({**e, "_at": where})
    return [{k: v for k, v in e.items() if k != "_at"} for e in kept]


def primary_scores(metrics: dict) -> dict[str, float]:
    """Task -> its primary metric (vqa: vqa, gqa/nlvr: acc, coco: cider) from a {task: {metric: value}} map."""
    scores = {}
    for task, values in metrics.items():
        name = primary_metrics().get(task)  # at call time: task files' tasks are registered as runs are read
        if isinstance(values, dict) and name and is_number(values.get(name)):
            scores[task] = float(values[name])
    return scores


def task_order(tasks: set[str] | list[str]) -> list[str]:
    """Known tasks in the usual order (vqa, gqa, nlvr, coco), then any others alphabetically."""
    return [t for t in TASKS if t in tasks] + sorted(t for t in tasks if t not in TASKS)


def val_series(events: list[dict]) -> tuple[dict[str, Series], Series]:
    """Per task (updates, primary metric) from the `val` events, and (updates, selection score)."""
    per_task: dict[str, Series] = {}
    score: Series = ([], [])
    for e in val_events(events):
        step = e.get("step")
        x = step if is_number(step) else e["epoch"]  # val_events keeps events with a numeric step or epoch
        for task, value in primary_scores(e["metrics"]).items():
            xs, ys = per_task.setdefault(task, ([], []))
            xs.append(x)
            ys.append(value)
        if is_number(e.get("score")):
            score[0].append(x)
            score[1].append(float(e["score"]))
    return per_task, score


def save_figure(fig: Any, path: Path) -> Path:
    """Save a matplotlib figure as PNG atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=110)
    return path


def plot_title(run_dir: Path, config: dict, start: dict) -> str:
    """'<run> — <method> on <backbone> (<p> % trainable)', leaving out what is unknown."""
    title = Path(run_dir).resolve().name
    method = config.get("method") or config.get("name")
    if method:
        title += f" — {method}"
    backbone = (config.get("model") or {}).get("backbone") if isinstance(config.get("model"), dict) else None
    if backbone:
        title += f" on {backbone}"
    if is_number(start.get("percent")):
        title += f" ({start['percent']:.2f} % trainable)"
    return title


def plot_run(run_dir: Path) -> Path:
    """Write run_dir/plots/loss.png: training loss per task and, if validated, primary metrics, against updates."""
    require_extra("plots")
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    path = run_dir / METRICS
    if not path.is_file():
        raise VlpetError(f"{path} does not exist; is {run_dir} a run directory made by `vlpet train`?")
    events = read_events(run_dir)
    losses = loss_series(events)
    if not losses:
        raise VlpetError(f"{path} has no training-loss records yet; plot again once training has logged a step")
    val_tasks, score = val_series(events)
    panels = 2 if val_tasks or score[0] else 1
    fig = Figure(figsize=(8, 3.6 * panels + 0.6), layout="constrained")
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    for task in task_order(set(losses)):
        xs, ys = losses[task]
        ax.plot(xs, ys, label=task, marker="o" if len(xs) < 30 else None, markersize=3, linewidth=1.4)
    ax.set_ylabel("training loss")
    ax.legend(title="task", fontsize="small")
    ax.grid(alpha=0.3)
    if panels == 2:
        ax = axes[1]
        for task in task_order(set(val_tasks)):
            xs, ys = val_tasks[task]
            ax.plot(xs, ys, marker="o", markersize=4, label=f"{task} ({primary_metrics()[task]})")
        if score[0]:
            ax.plot(score[0], score[1], color="black", linestyle="--", marker="s", markersize=3,
                    label="selection score")
        ax.set_ylabel("validation metric (×100)")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("optimizer update")
    fig.suptitle(plot_title(run_dir, read_config(run_dir), start_event(events)))
    return save_figure(fig, run_dir / "plots" / "loss.png")
