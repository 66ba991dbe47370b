"""The `vlpet` command line: every command is a thin call into one function elsewhere."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import re
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from vlpet_cli.atomic import write_text
from vlpet_cli.errors import Interrupted, VlpetError, file_error
from vlpet_cli.extras import require_extra
from vlpet_cli.features.tools import convert_features, describe_features, inspect_features
from vlpet_cli.presets import list_presets, load_raw, preset_path, resolve, to_yaml
from vlpet_cli.tasks import TASKS, annotation_images, default_tasks, task_class, tasks_of_kind

if TYPE_CHECKING:
    from typer._click.exceptions import ClickException

# Commands (and anything that imports torch or transformers) are imported inside the command functions, so that
# `vlpet --help` answers at once.

console = Console()
err_console = Console(stderr=True)
STATE = {"debug": False}


def _print_error(exc: VlpetError) -> None:
    """A user error as one line on stderr (brackets in it, like vlpet[video] or data.tasks=[coco], are text)."""
    err_console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True)


class _Group(TyperGroup):
    """The root command group: a VlpetError from any command is one line on stderr and exit code 2 (a
    traceback only with --debug), however the app is invoked (console script, `python -m`, CliRunner)."""

    def invoke(self, ctx):
        try:
            with _command_faults():
                return super().invoke(ctx)
        except VlpetError as exc:
            if STATE["debug"]:
                raise
            _print_error(exc)
            raise SystemExit(2) from None


# ---- signals and file-system errors: one mechanism for every command -------------------------------------------
class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every clean-up (finally blocks, staged directories) runs."""


_KEPT: list[Callable[[], str]] = []  # what the running command has kept, said if a signal stops it


def _on_interrupt(kept: Callable[[], str]) -> None:
    """Say what the running command has kept if SIGINT or SIGTERM stops it (`kept` is called then, so it can
    look at what is on disk)."""
    _KEPT.append(kept)


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def _kept() -> str:
    said = []
    for kept in _KEPT:
        try:
            said.append(kept())
        except Exception:  # noqa: BLE001 - the line must come out whatever state the files are in
            continue
    return "; ".join(said) or "nothing was left half-written; run the same command again"


@contextlib.contextmanager
def _command_faults():
    """Around every command. SIGINT (Ctrl-C) and SIGTERM stop it with one line saying what was kept and how to go
    on, exit code 130 and 143, so that `cmd1 && cmd2` stops (a signal the shell made vlpet ignore, as for a
    script's background job, stays ignored). An OSError no command turned into its own message (permission
    denied, a full disk, a read-only file system) is one error line naming the file, exit code 2."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig, handler in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, _raise_terminated)):
            if signal.getsignal(sig) not in (signal.SIG_IGN, None):
                previous[sig] = signal.signal(sig, handler)
    try:
        yield
    except Interrupted as exc:  # a command that stopped cleanly and says how to continue (train)
        err_console.print(str(exc), highlight=False, soft_wrap=True)
        raise SystemExit(exc.exit_code) from None
    except KeyboardInterrupt as exc:
        name, code = ("SIGTERM", 143) if isinstance(exc, Terminated) else ("SIGINT", 130)
        err_console.print(f"interrupted ({name}): {_kept()}", highlight=False, soft_wrap=True)
        raise SystemExit(code) from None
    except OSError as exc:
        if exc.errno == errno.EPIPE or STATE["debug"]:
            raise
        raise file_error(exc) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _KEPT.clear()


# -h is --help on every command (sub-commands' contexts inherit the option names); typer adds
# --install-completion and --show-completion for shell completion.
app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, cls=_Group,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Parameter-efficient tuning of vision-and-language encoder-decoders (VL-PET and baselines).")
presets_app = typer.Typer(no_args_is_help=True, help="List, show and copy presets.")
features_app = typer.Typer(no_args_is_help=True, help="Inspect and convert visual feature files.")
merge_app = typer.Typer(no_args_is_help=True, help="Combine, fold and export trained adapters.")
app.add_typer(presets_app, name="presets")
app.add_typer(features_app, name="features")
app.add_typer(merge_app, name="merge")

def _tasks_where(test) -> str:
    """The names of the tasks (table order) whose class passes `test`, for help texts and messages."""
    return ", ".join(name for name, cls in TASKS.items() if test(cls))


OVERRIDES = typer.Argument(None, help="preset overrides as dotted key=value, e.g. train.lr=5e-4", show_default=False)


def versions() -> str:
    """'vlpet X (torch Y, transformers Z, Python W)', read from the installed packages' metadata (nothing imported)."""
    from importlib.metadata import PackageNotFoundError, version

    def of(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    return (f"vlpet {of('vlpet')} (torch {of('torch')}, transformers {of('transformers')}, "
            f"Python {platform.python_version()})")


def _print_version(value: bool) -> None:
    if value:
        print(versions())
        raise typer.Exit()


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="show tracebacks for errors"),
          version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="print the versions of vlpet, torch and transformers and exit")) -> None:
    STATE["debug"] = debug


# ---- presets ----------------------------------------------------------------------------------------------
@presets_app.command("ls")
def presets_ls() -> None:
    """Name, method, description and backbone families of every shipped preset."""
    # preset names never wrap; the rest wraps (never cut with an ellipsis), so the table fits 80 columns
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    table.add_column("preset", no_wrap=True)
    table.add_column("method", overflow="fold", max_width=16)
    table.add_column("families", overflow="fold")
    table.add_column("description", overflow="fold")
    for name in list_presets():
        raw = load_raw(name)
        table.add_row(name, raw.get("method", ""), ", ".join(raw.get("families", ["bart", "t5"])),
                      raw.get("description", ""))
    console.print(table)


def _with_tasks(task: str | None, overrides: list[str] | None) -> list[str]:
    """The overrides with `data.tasks` set from a --task option (so that a video task's settings apply); a task
    file is read and named by its task's name."""
    from vlpet_cli.tasks import is_task_file, resolve_task

    tasks = [resolve_task(t) if is_task_file(t) else t for t in _tasks_option(task)]
    if task is not None and not tasks:
        raise VlpetError(f"--task {task!r} names no task; give one or a comma list, e.g. coco or tvqa,tvc")
    return [*([f"data.tasks=[{','.join(tasks)}]"] if tasks else []), *(overrides or [])]


def _task_file_defaults(task: str | None) -> list[str]:
    """The features' size of the task files among --task (model.feat_dim), as `vlpet train` resolves it."""
    from vlpet_cli.data.own_features import feature_defaults
    from vlpet_cli.tasks import resolve_task

    return feature_defaults([resolve_task(t) for t in _tasks_option(task)])


def _task_kind(name: str) -> str:
    """'image' or 'video' for a task name (unknown names are refused with the list of tasks)."""
    from vlpet_cli.tasks import task_class

    return task_class(name).feature_kind


TASK_FOR_PRESET = typer.Option(None, "--task", "-t", help="resolve for these tasks (video tasks: the video section)")


@presets_app.command("show")
def presets_show(name: str, backbone: str | None = typer.Option(None, help="resolve for this backbone"),
                 task: str | None = TASK_FOR_PRESET, overrides: list[str] | None = OVERRIDES) -> None:
    """Print the resolved preset as YAML (with --task tvqa, ...: the values a video run uses)."""
    print(to_yaml(resolve(name, _with_tasks(task, overrides), backbone, task_kind=_task_kind)), end="")


@presets_app.command("cp")
def presets_cp(name: str, file: Path, force: bool = typer.Option(False, help="overwrite FILE")) -> None:
    """Copy a preset to FILE for editing; use it with --preset FILE."""
    if file.exists() and not force:
        raise VlpetError(f"{file} exists; pass --force to overwrite it")
    text = preset_path(name).read_text()
    write_text(file, text)
    console.print(f"copied preset '{name}' to {file}")


# ---- params -----------------------------------------------------------------------------------------------
@app.command()
def params(preset: str = typer.Option(..., "--preset", "-p", help="preset name or YAML file"),
           backbone: str | None = typer.Option(None, help="bart-base | t5-base | tiny-bart | tiny-t5 | HF id | dir"),
           task: str | None = typer.Option(None, "--task", "-t",
                                           help="count the model these tasks use (video tasks: 512-d projector)"),
           as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
           overrides: list[str] | None = OVERRIDES) -> None:
    """Trainable-parameter budget per module group, built on the meta device (no weights needed)."""
    from vlpet_cli.pet.budget import budget
    from vlpet_cli.vl.model import build_model

    resolved = resolve(preset, _with_tasks(task, overrides), backbone, task_kind=_task_kind,
                       defaults=_task_file_defaults(task))
    model, _ = build_model(resolved, weights=False)
    result = {"preset": resolved.name, "backbone": resolved.model.backbone, "tasks": resolved.data.tasks,
              "feat_dim": resolved.model.feat_dim, **budget(model)}
    if as_json:
        print(json.dumps(result))
        return
    title = f"{resolved.name} on {resolved.model.backbone}"
    if task:
        title += f" for {', '.join(resolved.data.tasks or [])} ({resolved.model.feat_dim}-d features)"
    console.print(_budget_table(result, title))
    console.print(f"trainable: [bold]{result['percent']:.2f} %[/bold] "
                  f"({result['trainable']:,} / {result['total']:,}; denominator: {result['denominator']})")
    console.print(f"saved trainable state: {result['saved_mb']:.1f} MB (fp32)")


def _budget_table(result: dict, title: str) -> Table:
    """A `pet.budget` result as a table: trainable and total parameters per group, then all of them."""
    table = Table("group", "trainable", "total", title=title)
    for row in result["groups"]:
        table.add_row(row["group"], f"{row['trainable']:,}", f"{row['total']:,}")
    table.add_section()
    table.add_row("all", f"{result['trainable']:,}", f"{result['total']:,}", style="bold")
    return table


# ---- features ---------------------------------------------------------------------------------------------
@app.command("extract-features")
def extract_features(images: Path | None = typer.Option(None, help="folder of images (searched recursively)"),
                     videos: Path | None = typer.Option(None, help="folder of video files (searched recursively): "
                                                                   "per-frame CLIP image embeddings, 1 frame/1.5 s"),
                     model: str = typer.Option(..., help="CLIP model directory, cached hub id, 'tiny-clip' (images), "
                                                         "'tiny-clip-proj' (videos), or a CLIP ResNet checkpoint "
                                                         "(.safetensors file or its folder; images)"),
                     out: Path = typer.Option(..., help="packed .h5 file, or a folder for --layout per-image|npz"),
                     annotations: Path | None = typer.Option(None, help="only the images or videos this file names"),
                     layout: str | None = typer.Option(None, help="images: packed (default) | per-image (the "
                                                                  "reference layout); videos: npz (default, "
                                                                  "VALUE's) | packed"),
                     layer: int = typer.Option(-1, help="hidden layer whose patch tokens are kept (images)"),
                     batch_size: int = typer.Option(32, help="images or frames per forward pass"),
                     dtype: str = typer.Option("float16", help="float16 | float32"),
                     limit: int | None = typer.Option(None, help="extract at most N new images or videos"),
                     workers: int = typer.Option(2, help="image or video decoding threads"),
                     device: str | None = typer.Option(None, help="cpu | cuda (default: cuda if present)"),
                     torchscript: bool = typer.Option(False, "--torchscript",
                                                      help="--model is OpenAI's TorchScript archive (RN101.pt)"),
                     no_progress: bool = typer.Option(False, "--no-progress", help="plain output")) -> None:
    """Images -> CLIP grid features (HDF5), or videos -> per-frame CLIP embeddings; resumable, skipping bad files."""
    if (images is None) == (videos is None):
        raise VlpetError("extract-features needs exactly one of --images DIR (grid features) or --videos DIR "
                         "(per-frame video features).")
    if videos is not None:
        require_extra("video")
        if torchscript:
            raise VlpetError("--torchscript applies to --images only: video features need a CLIP ViT with its "
                             "projection (e.g. clip-vit-base-patch32).")
        if layer != -1:
            raise VlpetError("--layer applies to --images only: video features are the projected image "
                             "embedding (CLIP's encode_image), as VALUE's.")
        _on_interrupt(lambda: _extraction_kept(out, videos, annotations, video=True))
        from vlpet_cli.extract import extract_videos

        summary = extract_videos(videos, model, out, annotations, layout=layout or "npz", batch_size=batch_size,
                                 dtype=dtype, limit=limit, workers=workers, progress=not no_progress,
                                 device=device)
        console.print(summary.describe())
        return
    assert images is not None  # exactly one of --images and --videos, checked above
    _on_interrupt(lambda: _extraction_kept(out, images, annotations, video=False))
    from vlpet_cli.extract import extract

    summary = extract(images, model, out, annotations, layout=layout or "packed", layer=layer,
                      batch_size=batch_size, dtype=dtype, limit=limit, workers=workers,
                      progress=not no_progress, device=device, torchscript=torchscript)
    console.print(summary.describe())


def _extraction_kept(out: Path, folder: Path, annotations: Path | None, video: bool) -> str:
    """How many of the wanted images (videos) an interrupted extraction left in its store, and how to resume."""
    unit = "videos" if video else "images"
    resume = "run the same command again to resume (what is there is kept and skipped)"
    from vlpet_cli.extract import images_from, videos_from
    from vlpet_cli.features.kinds import IMAGE, VIDEO

    wanted = (videos_from if video else images_from)(folder, annotations)
    try:
        store = (VIDEO if video else IMAGE).open(out)
    except VlpetError:  # stopped before the first batch was written
        return f"0 of {len(wanted)} {unit} extracted into {out}; {resume}"
    try:
        done = len(set(store.ids()) & set(wanted))
    finally:
        store.close()
    return f"{done} of {len(wanted)} {unit} extracted into {out}; {resume}"


@features_app.command("inspect")
def features_inspect(path: Path, annotations: Path | None = typer.Option(None, help="report ids it lacks"),
                     as_json: bool = typer.Option(False, "--json", help="print one JSON object")) -> None:
    """Count, shape (video: dim and frames per video), dtype, attributes, and annotation ids without features."""
    info = inspect_features(path, annotation_images(annotations) if annotations else None, annotations)
    print(json.dumps(info) if as_json else describe_features(info))


@features_app.command("convert")
def features_convert(src: Path, dst: Path,
                     layout: str = typer.Option(..., help="layout to write: packed | per-image")) -> None:
    """Convert between the packed and the reference per-image layout (resumable)."""
    _on_interrupt(lambda: f"the images converted so far are kept in {dst}; run the same command again to resume")
    console.print(f"wrote {convert_features(src, dst, layout)} images to {dst}")


# ---- train ------------------------------------------------------------------------------------------------
def _tasks_option(task: str | None) -> list[str]:
    return [t.strip() for t in task.split(",") if t.strip()] if task else []


@app.command()
def train(preset: str | None = typer.Option(None, "--preset", "-p", help="preset name or YAML file"),
          task: str | None = typer.Option(None, "--task", "-t",
                                          help=f"one task or a comma list of {', '.join(TASKS)} (default: "
                                               f"{','.join(default_tasks())})"),
          data_root: str | None = typer.Option(None, help="dataset folder, or 'toy' for the built-in toy world"),
          backbone: str | None = typer.Option(None, help="bart-base | t5-base | tiny-bart | tiny-t5 | HF id | dir"),
          name: str | None = typer.Option(None, help="run name (default: PRESET-TASKS)"),
          runs_dir: Path = typer.Option(Path("runs"), help="where run directories go"),
          resume: bool = typer.Option(False, help="continue the run from its last checkpoint"),
          overwrite: bool = typer.Option(False, help="replace an existing run directory"),
          stop_after: int | None = typer.Option(None, help="pause after N updates (continue with --resume)"),
          seeds: str | None = typer.Option(None, help="one run per seed, e.g. 42,43,9595 (the paper's): NAME-s42, "
                                                      "... one after the other, then their mean ± std per task"),
          dry_run: bool = typer.Option(False, "--dry-run", help="check everything and print what the run would do "
                                                                "(parameters, steps, checkpoints); write nothing"),
          time_steps: int | None = typer.Option(None, "--time", help="with --dry-run: time N real steps (in a "
                                                                     "temporary directory) and estimate the run"),
          as_json: bool = typer.Option(False, "--json", help="with --dry-run: print the plan as one JSON object"),
          overrides: list[str] | None = OVERRIDES) -> None:
    """Train PET modules on a frozen backbone, on one task or several at once."""
    _check_dry_run_options(dry_run, time_steps, as_json, seeds)
    if seeds is not None:
        _train_seeds(dict(locals()))
        return
    from vlpet_cli.train import resolve_train_preset, resume_preset
    from vlpet_cli.train import train as run_training

    tasks = _tasks_option(task)
    if task is not None and not tasks:
        raise VlpetError(f"--task {task!r} names no task; give one or a comma list of {', '.join(TASKS)}")
    changes: list[str] = []
    if resume:
        if not name:
            raise VlpetError("--resume needs --name of the run to continue")
        if overwrite:
            raise VlpetError("--resume continues a run and --overwrite replaces it; give one of them")
        run_dir = runs_dir / name
        resolved, changes = resume_preset(run_dir, preset, tasks or None, data_root, backbone, overrides or [])
    else:
        if not preset:
            raise VlpetError("--preset is required (see `vlpet presets ls`)")
        resolved = resolve_train_preset(preset, tasks, data_root, backbone, overrides or [])
        run_dir = runs_dir / (name or _default_run_name(resolved))
    if dry_run:
        _dry_run(resolved, run_dir, resume, overwrite, time_steps, as_json)
        return
    _on_interrupt(lambda: _train_kept(run_dir))
    with _warnings_to_stderr():
        summary = run_training(resolved, run_dir, resume=resume, overwrite=overwrite, stop_after=stop_after,
                               changes=changes).summary
    if "adapter" in summary:
        console.print(f"done in {summary['seconds']:.0f} s, {summary['updates']} updates; adapter: "
                      f"{summary['adapter']} ({summary['adapter_bytes'] / 1e6:.2f} MB); run: {run_dir}")


def _check_dry_run_options(dry_run: bool, time_steps: int | None, as_json: bool, seeds: str | None) -> None:
    """--time and --json go with --dry-run, which plans one run (not --seeds); --time counts at least 1 step."""
    if not dry_run:
        for given, option in ((time_steps is not None, "--time N"), (as_json, "--json")):
            if given:
                raise VlpetError(f"{option} goes with --dry-run (vlpet train --dry-run {option} ...); add --dry-run "
                                 f"or drop {option.split()[0]}")
    elif seeds is not None:
        raise VlpetError("--dry-run plans one run and --seeds runs several that differ only in train.seed; drop "
                         "--seeds to see the plan")
    if time_steps is not None and time_steps < 1:
        raise VlpetError(f"--time {time_steps}: time at least 1 step (--time 2 or more leaves out the first, "
                         f"warm-up step)")


def _dry_run(resolved, run_dir: Path, resume: bool, overwrite: bool, time_steps: int | None, as_json: bool) -> None:
    """`vlpet train --dry-run`: the checks, then the plan as text (or JSON); nothing is written under run_dir."""
    from vlpet_cli.dryrun import describe_plan, dry_run

    _on_interrupt(lambda: f"a dry run writes nothing under {run_dir.parent}; run the same command again")
    with _warnings_to_stderr():
        plan = dry_run(resolved, run_dir, resume=resume, overwrite=overwrite, time_steps=time_steps)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun / accelerate launch the main process reports
        return
    if as_json:
        print(json.dumps(plan))
        return
    console.print(_budget_table(plan["parameters"], f"{resolved.name} on {resolved.model.backbone}"))
    for line in describe_plan(plan):
        console.print(line, highlight=False, soft_wrap=True)


def _default_run_name(resolved) -> str:
    """PRESET-TASK, or PRESET-multitask."""
    tasks = resolved.data.tasks
    return f"{resolved.name}-{tasks[0] if len(tasks) == 1 else 'multitask'}"


def _parse_seeds(text: str) -> list[int]:
    """--seeds 42,43,9595 as distinct whole numbers; anything else is one clear error."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items or not all(re.fullmatch(r"\d+", x) for x in items) or not all(int(x) < 2**32 for x in items):
        raise VlpetError(f"--seeds {text!r}: give a comma list of whole numbers from 0 to 2^32-1, e.g. 42,43,9595")
    seeds = [int(x) for x in items]
    if len(set(seeds)) < len(seeds):
        raise VlpetError(f"--seeds {text!r} names a seed twice; give each seed once")
    return seeds


def _train_seeds(params: dict) -> None:
    """`vlpet train --seeds 42,43,9595`: the same run once per seed (train.seed), one after the other, as NAME-s42,
    NAME-s43, ...; then their `vlpet report` table, one row with the mean ± std per task. With --resume, each run
    that exists is continued and the others are started."""
    from vlpet_cli.report import report as build_report
    from vlpet_cli.report import report_table
    from vlpet_cli.train import resolve_train_preset

    seeds = _parse_seeds(params["seeds"])
    overrides = list(params["overrides"] or [])
    if any(o.split("=", 1)[0].strip() == "train.seed" for o in overrides):
        raise VlpetError("--seeds sets train.seed of each run; drop the train.seed override")
    base = params["name"]
    if not base:
        if params["resume"]:
            raise VlpetError("--resume --seeds needs --name, the runs' common name (they are NAME-s42, ...)")
        if not params["preset"]:
            raise VlpetError("--preset is required (see `vlpet presets ls`)")
        base = _default_run_name(resolve_train_preset(params["preset"], _tasks_option(params["task"]),
                                                      params["data_root"], params["backbone"], overrides))
    runs = [params["runs_dir"] / f"{base}-s{seed}" for seed in seeds]
    taken = [r for r in runs if r.is_dir() and any(r.iterdir())]
    if taken and not (params["resume"] or params["overwrite"]):  # refused before the first run trains
        raise VlpetError(f"run directory {taken[0]} already exists; pass --resume to continue the seeds' runs, "
                         f"--overwrite to replace them, or --name to start others")
    for seed, run in zip(seeds, runs):
        train(**{**params, "seeds": None, "name": run.name, "resume": params["resume"] and run in taken,
                 "overrides": [*overrides, f"train.seed={seed}"]})
    finished = [r for r in runs if (r / "config.yaml").is_file()]
    if finished and int(os.environ.get("RANK", "0")) == 0:
        console.print(report_table(build_report(finished, split="val", draw=False)["rows"], width=console.width))


def _train_kept(run_dir: Path) -> str:
    """What an interrupted `vlpet train` kept (a signal before the loop, or a second one while it saved)."""
    from vlpet_cli.runs import Checkpointer

    last = Checkpointer(run_dir, 1).latest()
    if last is None:
        return "no checkpoint was written yet; run the same command again"
    return (f"the run's last checkpoint {last} is kept; continue with: vlpet train --resume --name {run_dir.name} "
            f"--runs-dir {run_dir.parent}")


# ---- eval -------------------------------------------------------------------------------------------------
@app.command("eval")
def eval_cmd(path: Path | None = typer.Argument(None, help="run directory, adapter, bundle or folded model"),
             task: str | None = typer.Option(None, "--task", "-t", help="task(s) to evaluate (default: the run's)"),
             split: str | None = typer.Option(None, help="test | val | train (default: test); with --predictions, "
                                                          "only for Karpathy's dataset_coco.json"),
             metric: list[str] | None = typer.Option(None, "--metric", "-m",
                                                        help=", ".join(dict.fromkeys(
                                                            m for c in TASKS.values() for m in c.valid_metrics))
                                                        + " (default: the task's own)"),
             batch_size: int | None = typer.Option(None, help="evaluation batch size"),
             data_root: str | None = typer.Option(None, help="dataset folder or 'toy' (default: the run's)"),
             backbone: str | None = typer.Option(None, help="the backbone directory, if it moved"),
             out: Path | None = typer.Option(None, help="output folder (default: RUN/eval; with --predictions "
                                                         "--html: beside the predictions file)"),
             limit: int | None = typer.Option(None, help="evaluate at most this many records per task"),
             predictions: Path | None = typer.Option(None, help="score this predictions file (no model)"),
             annotations: Path | None = typer.Option(None, help="annotation file for --predictions"),
             vqa_variant: str = typer.Option("reference", help="reference (VL-T5) | official"),
             allow_missing: bool = typer.Option(False, help="with --predictions: allow unpredicted ids"),
             check_submission: Path | None = typer.Option(None, help="check this leaderboard submission file "
                                                                     "(vqa, gqa) against --questions (no model)"),
             questions: Path | None = typer.Option(None, help="the server's question file for --check-submission"),
             as_json: bool = typer.Option(False, "--json", help="print the metrics as one JSON object"),
             html: bool = typer.Option(False, "--html", help="also write a results page per task, "
                                                              "<task>-<split>.html beside the eval files"),
             images: Path | None = typer.Option(None, help="with --html: the folder of the raw images (built-in "
                                                            "tasks ship features only)"),
             overrides: list[str] | None = OVERRIDES) -> None:
    """Generate and score (CIDEr, VQA accuracy, ...) a trained model, or score a predictions file."""
    if images is not None and not html:
        raise VlpetError(f"--images {images} applies to the results page; add --html, or leave --images out")
    if check_submission or questions:
        _check_submission(task, check_submission, questions, as_json)
        return
    if predictions or annotations:
        _score_file(task, predictions, annotations, split, metric, vqa_variant, allow_missing, as_json,
                    (out, images) if html else None)
        return
    if path is None:
        raise VlpetError("give a run or adapter directory, or --predictions FILE --annotations FILE --task T")
    _on_interrupt(lambda: "no evaluation file was written (they are written together once every task is scored); "
                          "run the same command again")
    from vlpet_cli.evaluate import evaluate

    with _warnings_to_stderr():
        results = evaluate(path, _tasks_option(task) or None, split or "test", metric or None, batch_size,
                           data_root, backbone, out, [*(overrides or []), f"eval.vqa_variant={vqa_variant}"],
                           progress=not as_json, limit=limit, html=html, images=images)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun / accelerate launch the main process reports
        return
    if as_json:
        print(json.dumps({t: _flat(r["metrics"]) for t, r in results.items()}))
        return
    table = Table("task", "split", "n", "metrics", "samples/s", title="evaluation")
    for t, r in results.items():
        shown = ", ".join(f"{k} {v:.2f}" for k, v in _flat(r["metrics"]).items())
        table.add_row(t, r["split"], str(r["n"]), shown, f"{r['samples_per_s']:.1f}")
    console.print(table)
    console.print(f"files written to {next(iter(results.values()))['out_dir']}")
    for r in results.values():
        if "page" in r:
            console.print(f"results page: {r['page']}")


# ---- predict ----------------------------------------------------------------------------------------------
@app.command()
def predict(path: Path = typer.Argument(..., help="run directory, adapter, bundle or folded model"),
            task: str = typer.Option(..., "--task", "-t", help=" | ".join(TASKS)),
            image: list[Path] | None = typer.Option(
                None, "--image", "-i",
                help=f"an image file (twice for {_tasks_where(lambda c: c.inputs.images == 2)}: left, right)"),
            video: Path | None = typer.Option(None, "--video",
                                              help=f"a video file ({', '.join(tasks_of_kind('video'))})"),
            question: str | None = typer.Option(
                None, help=f"the question ({_tasks_where(lambda c: c.inputs.text == 'question')})"),
            statement: str | None = typer.Option(
                None, help=f"the statement about the images ({_tasks_where(lambda c: c.inputs.text == 'statement')})"),
            choices: list[str] | None = typer.Option(
                None, "--choices", help="an answer choice, once per choice ("
                + ", ".join(f"{n}: {c.inputs.choices}" for n, c in TASKS.items() if c.inputs.choices) + ")"),
            subtitles: str | None = typer.Option(None, help="the video's subtitles text (default: none)"),
            ts: str | None = typer.Option(None, "--ts", help="the moment, START-END or START,END seconds ("
                                          + _tasks_where(lambda c: c.inputs.moment) + "; default: the whole video)"),
            inputs: Path | None = typer.Option(None, help="a folder of images, or a JSON-lines file of "
                                                          "{\"image(s)\": ..., \"question\"/\"statement\": ...} "
                                                          "or {\"video\": ..., \"question\", \"choices\", "
                                                          "\"subtitles\", \"ts\"}"),
            vision_model: str | None = typer.Option(None, help="the vision model, for runs that record none"),
            layer: int | None = typer.Option(None, help="the feature layer (default: the recorded one)"),
            torchscript: bool = typer.Option(False, "--torchscript",
                                             help="--vision-model is OpenAI's TorchScript archive (RN101.pt)"),
            batch_size: int = typer.Option(16, help="inputs per batch"),
            backbone: str | None = typer.Option(None, help="the backbone directory, if it moved"),
            as_json: bool = typer.Option(False, "--json", help="one JSON object per input, with its score")) -> None:
    """Answer a question, caption or judge a statement about your own images or videos with a trained model."""
    from vlpet_cli.predict import gather_inputs, register_tasks
    from vlpet_cli.predict import predict as run_predict

    register_tasks(path)  # the task files it was trained on, so that --task names them

    if question and statement:
        raise VlpetError(f"give --question ({_tasks_where(lambda c: c.inputs.text == 'question')}) or --statement "
                         f"({_tasks_where(lambda c: c.inputs.text == 'statement')}), not both")
    if video is not None or task_class(task).inputs.video:
        require_extra("video")
    items = gather_inputs(task, list(image or []), question or statement, inputs, video, list(choices or []),
                          subtitles, ts)
    _on_interrupt(lambda: "no answer was printed and nothing was written; run the same command again")
    with _warnings_to_stderr():
        results = run_predict(path, task, items, vision_model, layer, torchscript, batch_size, backbone,
                              progress=not as_json)
    for r in results:
        if as_json:
            print(json.dumps(r))
            continue
        shown = Path(r["video"]).name if "video" in r else " ".join(Path(p).name for p in r["images"])
        answer = f"{r['answer']} ({r['choice']})" if r.get("choice") else r["answer"]
        console.print(f"{shown}: {answer}  ({r['score_kind']} {r['score']:.3f})", highlight=False)


def _flat(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


@contextlib.contextmanager
def _warnings_to_stderr():
    """Print vlpet's warnings (e.g. METEOR left out without Java) once each, as one line, at the end."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            package = str(Path(__file__).parent)
            ours = [w for w in caught if str(w.filename).startswith(package)]
            for w in caught:
                if w not in ours:
                    warnings.showwarning(w.message, w.category, w.filename, w.lineno)
            for message in dict.fromkeys(str(w.message) for w in ours):
                err_console.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False, soft_wrap=True)


def _score_file(task, predictions, annotations, split, metric, vqa_variant, allow_missing, as_json,
                page: tuple[Path | None, Path | None] | None = None) -> None:
    """Score a predictions file; with `page` ((--out, --images) of --html) also write its results page."""
    from vlpet_cli.evaluate import page_folder, predictions_page, score_predictions_file
    from vlpet_cli.tasks import is_task_file

    if not (task and predictions and (annotations or is_task_file(task))):
        raise VlpetError("scoring a file needs --task, --predictions and --annotations (a task file's own split "
                         "needs none)")
    folder = page_folder(predictions, *page) if page is not None else None  # refused before anything is scored
    with _warnings_to_stderr():
        result = score_predictions_file(task, predictions, annotations, split, metric or None, vqa_variant,
                                        allow_missing or None)
        if page is not None and folder is not None:
            written = predictions_page(task, predictions, annotations, folder, split, vqa_variant,
                                       allow_missing or None, images=page[1], metrics=result)
            err_console.print(f"results page: {written}")
    flat = _flat(result)
    if as_json:
        print(json.dumps(flat))
        return
    table = Table("metric", "value", title=f"{task}: {predictions.name}")
    for k, v in flat.items():
        table.add_row(k, f"{v:.2f}" if isinstance(v, float) else str(v))
    console.print(table)


def _check_submission(task, submission, questions, as_json) -> None:
    from vlpet_cli.evaluate import check_submission_file

    if not (task and submission and questions):
        raise VlpetError("checking a submission needs --task, --check-submission FILE and --questions FILE")
    result = check_submission_file(task, submission, questions)
    if as_json:
        print(json.dumps(result))
        return
    console.print(f"{submission}: valid: answers each of the {result['questions']:,} questions of {questions} "
                  f"once", highlight=False, soft_wrap=True)


@app.command("import-reference")
def import_reference(checkpoint: Path = typer.Argument(..., help="the reference code's .pth (e.g. LAST.pth)"),
                     preset: str | None = typer.Option(None, "--preset", "-p",
                                                       help="the preset of its run (default: from the checkpoint)"),
                     out: Path = typer.Option(..., help="adapter directory to write"),
                     backbone: str | None = typer.Option(None, help="the backbone it was trained from"),
                     allow_mismatch: bool = typer.Option(False, help="import even if frozen weights differ"),
                     as_json: bool = typer.Option(False, "--json", help="print the import report as JSON"),
                     overrides: list[str] | None = OVERRIDES) -> None:
    """Import a reference VL-PET checkpoint (.pth, weights only) as a vlpet adapter for `vlpet eval`."""
    _on_interrupt(lambda: _not_written(out))
    from vlpet_cli.reference import import_reference_checkpoint

    report = import_reference_checkpoint(checkpoint, preset, out, backbone, overrides or [], allow_mismatch)
    if as_json:
        print(json.dumps(report, default=str))
        return
    for warning in report["warnings"]:
        err_console.print(f"[yellow]warning:[/yellow] {warning}")
    console.print(f"imported {report['imported']} tensors from {checkpoint} -> {out}; evaluate with `vlpet eval {out}`")


def _not_written(out: Path) -> str:
    """What an interrupted command that writes one directory whole (or not at all) kept."""
    state = "left as it was" if out.exists() else "not written"
    return f"{out} was {state} (it is written whole or not at all); run the same command again"


# ---- merge ------------------------------------------------------------------------------------------------
@merge_app.command("average")
def merge_average(adapters: list[Path] = typer.Argument(..., help="adapter (or run) directories"),
                  out: Path = typer.Option(..., help="output adapter directory"),
                  weights: str | None = typer.Option(None, help="comma list, e.g. 1,3 (default: equal)"),
                  mode: str = typer.Option("mean", help="mean (weights normalised) | sum (task arithmetic)"),
                  scale: float = typer.Option(1.0, help="multiplies the result"),
                  overwrite: bool = typer.Option(False, help="replace an existing --out")) -> None:
    """Combine adapters of the same preset and backbone parameter by parameter."""
    _on_interrupt(lambda: _not_written(out))
    from vlpet_cli.merge import average_adapters, parse_weights

    result = average_adapters(adapters, out, parse_weights(weights), mode, scale, overwrite=overwrite)
    console.print(f"{result['tensors']} tensors combined with coefficients {result['coefficients']} -> {out}")


@merge_app.command("fold")
def merge_fold(adapter: Path, out: Path = typer.Option(..., help="output directory"),
               bundle: bool = typer.Option(False, help="keep what cannot be folded: a self-contained directory"),
               backbone: str | None = typer.Option(None, help="the backbone directory, if it moved")) -> None:
    """Fold linear modules (LoRA, trained biases) into the backbone weights; --bundle for everything else."""
    _on_interrupt(lambda: _not_written(out))
    from vlpet_cli.merge import fold_adapter

    result = fold_adapter(adapter, out, bundle, backbone)
    kept = f"; kept as modules: {', '.join(result['kept'])}" if result["kept"] else ""
    console.print(f"folded: {result['folded'] or 'nothing'}{kept} -> {out} ({result['size_bytes'] / 1e6:.1f} MB)")


@merge_app.command("export-peft")
def merge_export_peft(adapter: Path, out: Path = typer.Option(..., help="output directory"),
                      backbone: str | None = typer.Option(None, help="the backbone directory, if it moved"),
                      no_base: bool = typer.Option(False, "--no-base", help="no base model beside")) -> None:
    """Write LoRA modules or IA3 vectors as a PEFT adapter (adapter_config.json + adapter_model.safetensors)."""
    _on_interrupt(lambda: _not_written(out))
    from vlpet_cli.merge import export_peft

    result = export_peft(adapter, out, backbone, with_base=not no_base)
    for note in result["notes"]:  # never wrapped: a note may hold a Python command to copy
        err_console.print(f"[yellow]note:[/yellow] {escape(note)}", highlight=False, soft_wrap=True)
    console.print(f"{result['exported']} exported to {out}")


# ---- quickstart -------------------------------------------------------------------------------------------
@app.command()
def quickstart(runs_dir: Path = typer.Option(Path("runs"), help="where the run and the toy data go"),
               preset: str = typer.Option("vlpet-small", help="preset to demonstrate"),
               backbone: str = typer.Option("tiny-bart", help="tiny-bart | tiny-t5"),
               video: bool = typer.Option(False, "--video", help="the four toy video tasks (TVQA, How2QA, TVC, "
                                                                  "YC2C) instead of the image tasks"),
               overrides: list[str] | None = OVERRIDES) -> None:
    """Offline demo: extract toy features, train on four toy tasks, and compare scores before and after."""
    from vlpet_cli.quickstart import TABLE_COLUMNS, table_rows
    from vlpet_cli.quickstart import quickstart as run

    if video:
        require_extra("video")
    _on_interrupt(lambda: f"the toy world and the features extracted so far are kept in {runs_dir}; run "
                          f"`vlpet quickstart` again to go on (extraction resumes, training starts over)")
    with _warnings_to_stderr():
        summary = run(runs_dir, preset, backbone, overrides or [], say=console.print, video=video)
    table = Table(*TABLE_COLUMNS, title=f"{preset} on {backbone}: the toy world's {summary['split']} splits")
    for task, metric, before, after in table_rows(summary):
        table.add_row(task, metric, before, f"[bold]{after}[/bold]")
    console.print(table)
    console.print(f"trainable parameters: {summary['trainable']:,} of {summary['total']:,} "
                  f"({summary['percent']:.2f} %); training took {summary['train_seconds']:.0f} s "
                  f"({summary['total_seconds']:.0f} s in all)")
    console.print(f"run directory: {summary['run']} (adapter/, eval/, plots/loss.png, metrics.jsonl)")


# ---- report -----------------------------------------------------------------------------------------------
@app.command()
def report(runs: list[Path] = typer.Argument(..., help="run directories to compare"),
           out: Path | None = typer.Option(None, help="scatter plot file (default: report.png)"),
           split: str = typer.Option("test", help="which eval files to read: test | val")) -> None:
    """Compare runs: a table of trainable % and scores, and a trainable-% vs score scatter plot."""
    from vlpet_cli.report import report as build_report
    from vlpet_cli.report import report_table

    require_extra("plots")
    result = build_report(runs, out, split)
    console.print(report_table(result["rows"], width=console.width))
    if result["plot"]:
        console.print(f"scatter plot: {result['plot']}")
    if result["not_plotted"]:
        console.print(f"not plotted (no trainable % or no score to average): "
                      f"{', '.join(map(str, result['not_plotted']))}")


# click's exception base class, from whichever click this typer uses: typer >= 0.2x bundles its own copy of click,
# so `import click` gives another one (or none); typer's own BadParameter descends from the right one.
_CLICK_ERROR = cast("type[ClickException]",
                    next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"))


def main() -> None:
    """Entry point: a usage error prints the command's usage and one line, a user error one line, both exit 2
    (tracebacks only with --debug); Ctrl-C exits 130."""
    try:
        code = app(standalone_mode=False)  # a command's return value, or the code of a typer.Exit
    except VlpetError as exc:
        if STATE["debug"]:
            raise
        _print_error(exc)
        sys.exit(2)
    except _CLICK_ERROR as exc:  # unknown command or option, bad or missing value: usage, then 'Error: ...'
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        code = 130
    except typer.Abort as exc:  # older typers turn Ctrl-C into Abort
        code = 130 if isinstance(exc.__cause__ or exc.__context__, KeyboardInterrupt) else 1
    if code == 130:  # typer >= 0.2x turns Ctrl-C into a silent exit code 130
        err_console.print("interrupted")
    sys.exit(code if isinstance(code, int) else 0)
