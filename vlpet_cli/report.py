"""`vlpet report`: compare runs by trainable percentage and score (a table and the VL-PET Figure 1 scatter).

Per run and task the score is the task's primary metric (vqa: vqa, gqa/nlvr: acc, coco: cider; all x100) from
`eval/<task>-<split>.json` when that file exists, else from the run's last validation event in metrics.jsonl.
Every score is shown, but only comparable ones are averaged: the run's average is the mean over the tasks it
trained, scored on a whole split; a `--limit` evaluation or a task the run never trained is shown, marked, and
left out. Where averages mix validation and test scores, or runs average over different task sets, the table and
the plot say so.

Runs that differ only in `train.seed` (the paper reports means over seeds 42, 43 and 9595) are one row: per task
the mean, the sample standard deviation and the number of runs it is over, and the same for the average; the plot
draws the mean with an error bar of one standard deviation.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table
from rich.text import Text

from vlpet_cli.errors import VlpetError, file_error
from vlpet_cli.extras import require_extra
from vlpet_cli.layout import CONFIG, EVAL, is_run
from vlpet_cli.plots import (
    is_number,
    primary_scores,
    save_figure,
    start_event,
    task_order,
    val_events,
)
from vlpet_cli.runs import check_writable, read_config, read_events
from vlpet_cli.tasks import primary_metrics, register_run_tasks

SPLITS: tuple[str, ...] = ("test", "val")


def check_run_dir(path: Path) -> Path:
    """Return `path` if it is a run directory (holds config.yaml), else raise a VlpetError that says why."""
    path = Path(path)
    if not path.exists():
        raise VlpetError(f"{path} does not exist; pass run directories such as runs/<name>")
    if not path.is_dir():
        raise VlpetError(f"{path} is a file, not a run directory; pass run directories such as runs/<name>")
    if not is_run(path):
        inside = sorted(p.name for p in path.iterdir() if is_run(p))
        hint = (f"; it holds the runs {', '.join(inside[:5])}{' ...' if len(inside) > 5 else ''}: "
                f"pass them, e.g. {path}/*" if inside else "; a run directory is made by `vlpet train`")
        raise VlpetError(f"{path} is not a run directory (no {CONFIG}){hint}")
    return path


@dataclass
class Score:
    """One task's score in a run, where it comes from, and whether it is comparable."""

    value: float
    source: str  # "eval/<task>-<split>.json" or "val epoch N"
    split: str  # the split it was measured on: the report's split, or "val" for validation events
    limit: int | None = None  # records per task of a --limit evaluation (None: the whole split)
    trained: bool = True  # whether the run trained on the task

    @property
    def comparable(self) -> bool:
        """Whether the score may enter an average: a whole split of a trained task."""
        return self.trained and self.limit is None

    @property
    def marks(self) -> str:
        """The table's marks: * validation, ~ --limit subset, ! task not trained (see MARKS)."""
        return ("*" if self.source.startswith("val") else "") + ("~" if self.limit is not None else "") + (
            "" if self.trained else "!")


MARKS = {
    "*": "from the run's last validation event (no eval/<task>-{split}.json)",
    "~": "a --limit evaluation of the first records only: not in avg",
    "!": "a task the run did not train: not in avg",
}


def eval_scores(run_dir: Path, split: str, planned: list[str] | None = None) -> dict[str, Score]:
    """Task -> Score from the run's eval/<task>-<split>.json files (their `limit` and `trained` fields; files
    written before those fields existed count as whole-split, and trained when the run's config names the task)."""
    found: dict[str, Score] = {}
    suffix = f"-{split}.json"
    eval_dir = run_dir / EVAL
    if not eval_dir.is_dir():
        return found
    for path in sorted(eval_dir.glob(f"*{suffix}")):
        task = path.name[: -len(suffix)]
        if not task or "." in task or task not in primary_metrics():
            continue
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise file_error(exc, writing=False) from None
        except ValueError as exc:
            raise VlpetError(f"{path} is not readable JSON ({exc}); evaluate again with "
                             f"`vlpet eval {run_dir} --task {task} --split {split}`") from exc
        metrics = record.get("metrics") if isinstance(record, dict) else None
        scores = primary_scores({task: metrics}) if isinstance(metrics, dict) else {}
        if task in scores:
            limit, n, trained = record.get("limit"), record.get("n"), record.get("trained")
            cut = is_number(limit) and not (is_number(n) and n < limit)  # fewer records than the limit: all
            found[task] = Score(scores[task], f"eval/{path.name}", split, int(limit) if cut else None,
                                trained if isinstance(trained, bool) else planned is None or task in planned)
    return found


def run_row(run_dir: Path, split: str = "test") -> dict[str, Any]:
    """One run's summary: name, method, backbone, trainable %, per-task scores with their source, average.

    `average` is over `average_tasks` (trained, whole-split scores) measured on `average_splits`."""
    run_dir = check_run_dir(run_dir)
    config = read_config(run_dir)
    events = read_events(run_dir)
    start = start_event(events)
    data, model = config.get("data"), config.get("model")
    data = data if isinstance(data, dict) else {}
    register_run_tasks(data, run_dir, strict=False)  # its task files' tasks, listed as the built-in ones
    model = model if isinstance(model, dict) else {}
    planned = [t for t in data.get("tasks") or [] if isinstance(t, str)]
    found: dict[str, Score] = {}
    vals = val_events(events)
    if vals:
        last = vals[-1]
        source = f"val epoch {last['epoch'] + 1}" if is_number(last.get("epoch")) else "val"
        for task, value in primary_scores(last["metrics"]).items():
            found[task] = Score(value, source, "val", trained=not planned or task in planned)
    found.update(eval_scores(run_dir, split, planned or None))
    tasks = task_order(set(planned) | set(found))
    found = {t: found[t] for t in tasks if t in found}
    counted = [t for t, sc in found.items() if sc.comparable]
    train = config.get("train")
    train = train if isinstance(train, dict) else {}
    return {
        "name": run_dir.resolve().name,
        "seed": train.get("seed"),
        "path": str(run_dir),
        "preset": config.get("name"),
        "method": config.get("method") or config.get("name"),
        "backbone": model.get("backbone"),
        "trainable": start.get("trainable") if is_number(start.get("trainable")) else None,
        "total": start.get("total") if is_number(start.get("total")) else None,
        "percent": float(start["percent"]) if is_number(start.get("percent")) else None,
        "split": split,
        "tasks": tasks,
        "trained_tasks": task_order(set(planned)),
        "scores": {t: sc.value for t, sc in found.items()},
        "sources": {t: sc.source for t, sc in found.items()},
        "marks": {t: sc.marks for t, sc in found.items()},
        "limits": {t: sc.limit for t, sc in found.items() if sc.limit is not None},
        "untrained": [t for t, sc in found.items() if not sc.trained],
        "average": sum(found[t].value for t in counted) / len(counted) if counted else None,
        "average_tasks": counted,
        "average_splits": sorted({found[t].split for t in counted}, key=lambda s: (s != split, s)),
    }


def average_kind(row: dict) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """What a row's average is over: (tasks, splits)."""
    return tuple(row["average_tasks"]), tuple(row["average_splits"])


def average_words(tasks: tuple[str, ...] | list[str], splits: tuple[str, ...] | list[str]) -> str:
    """'test: vqa, gqa' or 'test and val: vqa, coco', for labels and captions."""
    return f"{' and '.join(splits)}: {', '.join(tasks)}"


def report(runs: list[Path], out: Path | None = None, split: str = "test", draw: bool = True) -> dict[str, Any]:
    """Summarise runs (rows for a table; runs that differ only in their seed as one row) and write the
    trainable-% vs average-score scatter to `out` (report.png by default; none with draw=False)."""
    if split not in SPLITS:
        raise VlpetError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)}")
    if not runs:
        raise VlpetError("name at least one run directory, e.g. `vlpet report runs/*`")
    out = Path(out) if out is not None else Path("report.png")
    check_writable(out.parent, "--out", out)  # before anything is read or drawn
    rows = [run_row(Path(r), split) for r in runs]
    names = Counter(r["name"] for r in rows)
    for row, run in zip(rows, runs):
        if names[row["name"]] > 1:  # e.g. two runs/quickstart folders: tell them apart by their parent
            row["name"] = f"{Path(run).resolve().parent.name}/{row['name']}"
    rows = group_seeds(rows, [seedless_config(Path(r)) for r in runs])
    plotted = [r for r in rows if r["percent"] is not None and r["percent"] > 0 and r["average"] is not None]
    left_out = [r["name"] for r in rows if r["percent"] is None or r["percent"] <= 0 or r["average"] is None]
    plot = None
    if draw and plotted:
        plot = plot_report(plotted, Path(out) if out is not None else Path("report.png"), split)
    return {"rows": rows, "split": split, "plot": str(plot) if plot else None, "not_plotted": left_out}


# ---- runs that differ only in their seed --------------------------------------------------------------------
def seedless_config(run_dir: Path) -> str:
    """The run's resolved preset without train.seed, as one comparable string."""
    config = read_config(run_dir)
    if isinstance(config.get("train"), dict):
        config = {**config, "train": {k: v for k, v in config["train"].items() if k != "seed"}}
    return json.dumps(config, sort_keys=True, default=str)


def _spread(values: list[float]) -> tuple[float, float | None, int]:
    """(mean, sample standard deviation or None for one value, n)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values)


def _rank(row: dict, task: str) -> tuple[bool, bool]:
    """How good a run's score for a task is for a seed mean: comparable first, then the report's split."""
    marks = row["marks"].get(task, "")
    return "~" in marks or "!" in marks, "*" in marks


def group_name(members: list[dict]) -> str:
    """NAME for runs named NAME-s42, NAME-s43, ... (as `vlpet train --seeds` names them), else the first's + n."""
    bases = {re.sub(rf"-s{r['seed']}$", "", r["name"]) for r in members}
    if len(bases) == 1 and all(r["name"].endswith(f"-s{r['seed']}") for r in members):
        return bases.pop()
    return f"{members[0]['name']} (+{len(members) - 1})"


def seed_row(members: list[dict]) -> dict:
    """One row for runs that differ only in their seed: per task the mean of the best kind of score the runs have
    (whole-split scores of the report's split before validation ones before marked ones), its standard deviation
    and n; the average likewise over the runs whose averages cover the same tasks and splits."""
    first = members[0]
    tasks = task_order({t for r in members for t in r["tasks"]})
    row = {**first, "name": group_name(members), "runs": [r["name"] for r in members],
           "seeds": [r["seed"] for r in members], "tasks": tasks, "scores": {}, "std": {}, "n": {}, "marks": {},
           "sources": {}, "limits": {}, "untrained": []}
    for task in tasks:
        having = [r for r in members if task in r["scores"]]
        if not having:
            continue
        best = min(_rank(r, task) for r in having)
        chosen = [r for r in having if _rank(r, task) == best]
        row["scores"][task], row["std"][task], row["n"][task] = _spread([r["scores"][task] for r in chosen])
        row["marks"][task] = "".join(m for m in "*~!" if any(m in r["marks"].get(task, "") for r in chosen))
        row["sources"][task] = chosen[0]["sources"][task]
        if any(task in r["limits"] for r in chosen):
            row["limits"][task] = max(r["limits"][task] for r in chosen if task in r["limits"])
        if any(task in r["untrained"] for r in chosen):
            row["untrained"].append(task)
    kinds = Counter(average_kind(r) for r in members if r["average"] is not None)
    row["average"] = row["average_std"] = None
    row["average_n"] = 0
    if kinds:
        kind = kinds.most_common(1)[0][0]
        row["average_tasks"], row["average_splits"] = list(kind[0]), list(kind[1])
        row["average"], row["average_std"], row["average_n"] = _spread(
            [r["average"] for r in members if r["average"] is not None and average_kind(r) == kind])
    return row


def group_seeds(rows: list[dict], configs: list[str]) -> list[dict]:
    """The rows with every set of runs that differ only in train.seed (two or more runs, all seeds different)
    replaced by one `seed_row`, where its first run was."""
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(configs):
        groups.setdefault(key, []).append(i)
    out: list[dict] = []
    for i, row in enumerate(rows):
        members = groups[configs[i]]
        seeds = [rows[j]["seed"] for j in members]
        if len(members) < 2 or None in seeds or len(set(map(str, seeds))) < len(seeds):
            out.append(row)
        elif i == members[0]:
            out.append(seed_row([rows[j] for j in members]))
    return out


def plot_report(rows: list[dict], out: Path, split: str = "test") -> Path:
    """Scatter of trainable % (log x) against average score, one labelled point per run (VL-PET Figure 1).

    When the runs' averages are over different tasks or splits, the axis says so and each label names its own."""
    require_extra("plots")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5), layout="constrained")
    ax = fig.subplots()
    methods = list(dict.fromkeys(r["method"] or r["name"] for r in rows))
    for i, method in enumerate(methods):
        mine = [r for r in rows if (r["method"] or r["name"]) == method]
        ax.scatter([r["percent"] for r in mine], [r["average"] for r in mine], s=60, color=f"C{i % 10}",
                   label=method, zorder=3, edgecolor="black", linewidth=0.5)
        spread = [r for r in mine if r.get("average_std") is not None]  # runs over several seeds: ± one std
        if spread:
            ax.errorbar([r["percent"] for r in spread], [r["average"] for r in spread],
                        yerr=[r["average_std"] for r in spread], fmt="none", ecolor=f"C{i % 10}", elinewidth=1.2,
                        capsize=4, zorder=2)
    kinds = {average_kind(r) for r in rows}
    for r in rows:
        label = r["name"] + (f", {r['average_n']} seeds" if r.get("seeds") else "")
        if len(kinds) != 1:
            label += f" ({average_words(*average_kind(r))})"
        ax.annotate(label, (r["percent"], r["average"]), textcoords="offset points", xytext=(6, 5),
                    fontsize="small")
    ax.set_xscale("log")
    plain_log_ticks(ax.xaxis, [r["percent"] for r in rows])
    ax.set_xlabel("trainable parameters (% of the model, log scale)")
    if len(kinds) == 1:
        ax.set_ylabel(f"average score ({average_words(*next(iter(kinds)))})")
    else:
        ax.set_ylabel("average score: over different tasks or splits per run (see labels)")
    seeded = any(r.get("average_std") is not None for r in rows)
    ax.set_title("Average score against trainable parameters"
                 + ("\n(over seeds: the mean, error bars ± one standard deviation)" if seeded else ""))
    ax.grid(alpha=0.3, which="major")
    ax.grid(alpha=0.1, which="minor")
    ax.legend(title="method", fontsize="small")
    ax.margins(x=0.15, y=0.15)
    return save_figure(fig, out)


def plain_log_ticks(axis: Any, values: list[float]) -> None:
    """Label a log axis 0.1, 1, 10 rather than 10^-1; label the minor ticks too when the data span one decade."""
    require_extra("plots")
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_major_formatter(plain)
    narrow = math.log10(max(values) / min(values)) < 1
    axis.set_minor_formatter(plain if narrow else NullFormatter())


def spread_cell(value: str, row: dict, std: float | None, n: int | None) -> str | Text:
    """A score cell; for a row over several seeds, a second line: ±(sample standard deviation) n=(runs)."""
    if not row.get("seeds") or value == "—":
        return value
    cell = Text(value)
    cell.append(f"\n{'' if std is None else f'±{std:.2f} '}n={n}", style="dim")
    return cell


def report_table(rows: list[dict], width: int | None = None) -> Table:
    """A rich Table of the rows: run (with its method, and backbone unless every run shares it), trainable %,
    each task's score (marked when it is not comparable), average; a row over several seeds gives the mean with
    ±std n=runs beneath. Long names wrap instead of being cut; for a
    terminal narrower than 120 columns (`width`) the headers take two lines, so the table fits 80 columns."""
    sep = "\n" if width is not None and width < 120 else " "
    tasks = task_order({t for r in rows for t in r["tasks"]})
    split = rows[0]["split"] if rows else "test"
    backbones = {r["backbone"] for r in rows}
    shared = next(iter(backbones)) if len(backbones) == 1 and rows and rows[0]["backbone"] else None
    table = Table(title=f"runs on {split}" + (f", backbone {shared}" if shared else ""), box=box.SIMPLE_HEAD,
                  caption_justify="left", pad_edge=False, show_edge=False)
    table.add_column("run" if shared else "run (method, backbone)", overflow="fold")
    table.add_column(f"trainable{sep}%", justify="right")
    for t in tasks:
        table.add_column(f"{t}{sep}({primary_metrics().get(t, '?')})", justify="right")
    table.add_column("avg", justify="right")
    used: set[str] = set()
    for r in rows:
        cells: list[str | Text] = []
        for t in tasks:
            if t not in r["scores"]:
                cells.append("—")
                continue
            marks = r.get("marks", {}).get(t, "*" if r["sources"][t].startswith("val") else "")
            used.update(marks)
            cells.append(spread_cell(f"{r['scores'][t]:.2f}{marks}", r, r.get("std", {}).get(t), r.get("n", {}).get(t)))
        percent = f"{r['percent']:.2f}" if r["percent"] is not None else "—"
        average = f"{r['average']:.2f}" if r["average"] is not None else "—"
        if r["average"] is not None and "val" in r.get("average_splits", []) and split != "val":
            average += "*"
            used.add("*")
        average_cell = spread_cell(average, r, r.get("average_std"), r.get("average_n"))
        about = ", ".join(x for x in (r["method"], None if shared else r["backbone"] or "—") if x)
        if r.get("seeds"):
            about += f"{', ' if about else ''}seeds {', '.join(map(str, r['seeds']))}"
        name = Text(r["name"])
        if about:
            name.append(f"\n{about}", style="dim")
        table.add_row(name, percent, *cells, average_cell)
    notes = [f"{mark} {text.format(split=split)}" for mark, text in MARKS.items() if mark in used]
    if any(r.get("seeds") for r in rows):
        notes.append("a row over seeds: the mean, and beneath it ±the sample standard deviation and n, the runs "
                     "it is over")
    kinds = {tuple(r.get("average_tasks", ())) for r in rows if r["average"] is not None}
    splits = {tuple(r.get("average_splits", ())) for r in rows if r["average"] is not None}
    if len(kinds) > 1 or len(splits) > 1:
        notes.append("avg is over different tasks or splits: " + "; ".join(
            f"{r['name']} ({average_words(r['average_tasks'], r['average_splits'])})"
            for r in rows if r["average"] is not None))
    elif "*" in used and any("val" in s for s in splits) and split != "val":
        notes.append("an avg marked * includes validation scores")
    if notes:
        table.caption = "\n".join(notes)
    return table
