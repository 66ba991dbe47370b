"""`vlpet report`: compare runs by trainable percentage and score (a table and the VL-PET Figure 1 scatter).

Per run and task the score is the task's primary metric (vqa: vqa, gqa/nlvr: acc, coco: cider; all x100) from
`eval/<task>-<split>.json` when that file exists, else from the run's last validation event in metrics.jsonl.
The run's average is the mean over the tasks that have a score.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from rich.table import Table

from vlpet_cli.data.tasks import primary_metrics
from vlpet_cli.errors import VlpetError
from vlpet_cli.plots import (
    is_number,
    primary_scores,
    read_config,
    read_events,
    save_figure,
    start_event,
    task_order,
    val_events,
)

SPLITS: tuple[str, ...] = ("test", "val")


def check_run_dir(path: Path) -> Path:
    """Return `path` if it is a run directory (holds config.yaml), else raise a VlpetError that says why."""
    path = Path(path)
    if not path.exists():
        raise VlpetError(f"{path} does not exist; pass run directories such as runs/<name>")
    if not path.is_dir():
        raise VlpetError(f"{path} is a file, not a run directory; pass run directories such as runs/<name>")
    if not (path / "config.yaml").is_file():
        inside = sorted(p.name for p in path.iterdir() if (p / "config.yaml").is_file())
        hint = (f"; it holds the runs {', '.join(inside[:5])}{' ...' if len(inside) > 5 else ''}: "
                f"pass them, e.g. {path}/*" if inside else "; a run directory is made by `vlpet train`")
        raise VlpetError(f"{path} is not a run directory (no config.yaml){hint}")
    return path


def eval_scores(run_dir: Path, split: str) -> dict[str, tuple[float, str]]:
    """Task -> (primary metric, file) from the run's eval/<task>-<split>.json files."""
    found = {}
    suffix = f"-{split}.json"
    eval_dir = run_dir / "eval"
    if not eval_dir.is_dir():
        return found
    for path in sorted(eval_dir.glob(f"*{suffix}")):
        task = path.name[: -len(suffix)]
        if not task or "." in task or task not in primary_metrics():
            continue
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise VlpetError(f"{path} is not readable JSON ({exc}); evaluate again with "
                             f"`vlpet evaluate {run_dir} --task {task} --split {split}`") from exc
        metrics = record.get("metrics") if isinstance(record, dict) else None
        scores = primary_scores({task: metrics}) if isinstance(metrics, dict) else {}
        if task in scores:
            found[task] = (scores[task], f"eval/{path.name}")
    return found


def run_row(run_dir: Path, split: str = "test") -> dict[str, Any]:
    """One run's summary: name, method, backbone, trainable %, per-task scores with their source, average."""
    run_dir = check_run_dir(run_dir)
    config = read_config(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    events = read_events(metrics_path) if metrics_path.is_file() else []
    start = start_event(events)
    scores: dict[str, float] = {}
    sources: dict[str, str] = {}
    vals = val_events(events)
    if vals:
        last = vals[-1]
        for task, value in primary_scores(last["metrics"]).items():
            scores[task] = value
            sources[task] = f"val epoch {last['epoch'] + 1}" if is_number(last.get("epoch")) else "val"
    for task, (value, source) in eval_scores(run_dir, split).items():
        scores[task], sources[task] = value, source
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    planned = [t for t in data.get("tasks") or [] if isinstance(t, str)]
    tasks = task_order(set(planned) | set(scores))
    scores = {t: scores[t] for t in tasks if t in scores}
    return {
        "name": run_dir.resolve().name,
        "path": str(run_dir),
        "preset": config.get("name"),
        "method": config.get("method") or config.get("name"),
        "backbone": model.get("backbone"),
        "trainable": start.get("trainable") if is_number(start.get("trainable")) else None,
        "total": start.get("total") if is_number(start.get("total")) else None,
        "percent": float(start["percent"]) if is_number(start.get("percent")) else None,
        "split": split,
        "tasks": tasks,
        "scores": scores,
        "sources": {t: sources[t] for t in scores},
        "average": sum(scores.values()) / len(scores) if scores else None,
    }


def report(runs: list[Path], out: Path | None = None, split: str = "test") -> dict[str, Any]:
    """Summarise runs (rows for a table) and write the trainable-% vs average-score scatter to `out`."""
    if split not in SPLITS:
        raise VlpetError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)}")
    if not runs:
        raise VlpetError("name at least one run directory, e.g. `vlpet report runs/*`")
    rows = [run_row(Path(r), split) for r in runs]
    names = Counter(r["name"] for r in rows)
    for row, run in zip(rows, runs):
        if names[row["name"]] > 1:  # e.g. two runs/quickstart folders: tell them apart by their parent
            row["name"] = f"{Path(run).resolve().parent.name}/{row['name']}"
    out = Path(out) if out is not None else Path("report.png")
    plotted = [r for r in rows if r["percent"] is not None and r["percent"] > 0 and r["average"] is not None]
    left_out = [r["name"] for r in rows if r["percent"] is None or r["percent"] <= 0 or r["average"] is None]
    plot = plot_report(plotted, out, split) if plotted else None
    return {"rows": rows, "split": split, "plot": str(plot) if plot else None, "not_plotted": left_out}


def plot_report(rows: list[dict], out: Path, split: str = "test") -> Path:
    """Scatter of trainable % (log x) against average score, one labelled point per run (VL-PET Figure 1)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5), layout="constrained")
    ax = fig.subplots()
    methods = list(dict.fromkeys(r["method"] or r["name"] for r in rows))
    for i, method in enumerate(methods):
        mine = [r for r in rows if (r["method"] or r["name"]) == method]
        ax.scatter([r["percent"] for r in mine], [r["average"] for r in mine], s=60, color=f"C{i % 10}",
                   label=method, zorder=3, edgecolor="black", linewidth=0.5)
    for r in rows:
        ax.annotate(r["name"], (r["percent"], r["average"]), textcoords="offset points", xytext=(6, 5),
                    fontsize="small")
    ax.set_xscale("log")
    plain_log_ticks(ax.xaxis, [r["percent"] for r in rows])
    ax.set_xlabel("trainable parameters (% of the model, log scale)")
    counted = task_order({t for r in rows for t in r["scores"]})
    ax.set_ylabel(f"average score on {split} ({', '.join(counted)})")
    ax.set_title("Average score against trainable parameters")
    ax.grid(alpha=0.3, which="major")
    ax.grid(alpha=0.1, which="minor")
    ax.legend(title="method", fontsize="small")
    ax.margins(x=0.15, y=0.15)
    return save_figure(fig, out)


def plain_log_ticks(axis: Any, values: list[float]) -> None:
    """Label a log axis 0.1, 1, 10 rather than 10^-1; label the minor ticks too when the data span one decade."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_major_formatter(plain)
    narrow = math.log10(max(values) / min(values)) < 1
    axis.set_minor_formatter(plain if narrow else NullFormatter())


def report_table(rows: list[dict]) -> Table:
    """A rich Table of the rows: run, method, backbone, trainable %, each task's score, average."""
    tasks = task_order({t for r in rows for t in r["tasks"]})
    split = rows[0]["split"] if rows else "test"
    table = Table(title=f"runs on {split}")
    for header in ("run", "method", "backbone", "trainable %"):
        table.add_column(header, justify="right" if header == "trainable %" else "left")
    for t in tasks:
        table.add_column(f"{t} ({primary_metrics().get(t, '?')})", justify="right")
    table.add_column("avg", justify="right")
    from_val = False
    for r in rows:
        cells = []
        for t in tasks:
            if t not in r["scores"]:
                cells.append("—")
                continue
            mark = "*" if r["sources"][t].startswith("val") else ""
            from_val = from_val or bool(mark)
            cells.append(f"{r['scores'][t]:.2f}{mark}")
        percent = f"{r['percent']:.2f}" if r["percent"] is not None else "—"
        average = f"{r['average']:.2f}" if r["average"] is not None else "—"
        table.add_row(r["name"], r["method"] or "—", r["backbone"] or "—", percent, *cells, average)
    if from_val:
        table.caption = f"* from the run's last validation event (no eval/<task>-{split}.json)"
    return table
