"""`vlpet train`: multi-task PET training on Accelerate, in three stages: setup -> fit -> validate.

`setup` checks the data and builds the model, loader, optimizer and schedule (restoring a checkpoint on resume);
`fit` runs the epochs, logging to metrics.jsonl and checkpointing through `runs.Checkpointer`; `validate_epoch`
scores the validation splits and keeps the best adapter. The run directory's files are written by `runs`, the
adapter by `artifacts`.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed

from vlpet_cli import backbones
from vlpet_cli.artifacts import save_adapter
from vlpet_cli.atomic import WriteError
from vlpet_cli.config import Preset
from vlpet_cli.data.loading import (
    TaskData,
    check_annotations,
    check_feature_dims,
    feature_kind,
    load_task_data,
)
from vlpet_cli.data.multitask import MultitaskLoader, epoch_batches, task_batch_sizes
from vlpet_cli.data.own_features import feature_defaults, prepare_task_features
from vlpet_cli.errors import DataError, Interrupted, VlpetError
from vlpet_cli.inference import best_score, check_precision, validate
from vlpet_cli.optim import (
    build_optimizer,
    clip_gradients,
    describe,
    param_groups,
    schedule,
    total_updates,
    update_due,
)
from vlpet_cli.pet.budget import budget
from vlpet_cli.plots import plot_run
from vlpet_cli.presets import T5_PREFIX, VIDEO_PREFIX, apply, check_key, parse_overrides, resolve
from vlpet_cli.progress import Progress
from vlpet_cli.runs import (
    ADAPTER,
    Checkpointer,
    RunLock,
    TrainState,
    append_event,
    best_dir,
    check_not_in_use,
    check_runs_dir,
    clear_run_dir,
    load_run_preset,
    recorded_path,
    rewind_events,
    run_contents,
    write_config,
)
from vlpet_cli.tasks import (
    get_task,
    is_task_file,
    own_task,
    register_run_tasks,
    resolve_task,
    save_task_files,
    task_files,
)
from vlpet_cli.threads import Threads, configure_threads, requested_threads
from vlpet_cli.toy.root import resolve_data_root, toy_feature_dim
from vlpet_cli.trackers import Tracking, build, check_trackers, log_dir
from vlpet_cli.vl.model import build_model

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from vlpet_cli.vl.model import VLModel

__all__ = ["RESUMABLE", "TOY_DEFAULTS", "TrainResult", "TrainingInterrupted", "load_run_preset", "param_groups",
           "resolve_train_preset", "resume_preset", "train"]

# What `--resume` may change: how long the run goes on, how often it checkpoints, where it logs, and every evaluation
# setting (keys under eval.). Everything else shapes what was already trained and is refused.
RESUMABLE = ("train.epochs", "train.max_steps", "train.checkpoint_every", "train.keep_checkpoints",
             "train.threads", "data.num_workers", "train.report_to")

# The toy world is small: smaller batches give the PET modules enough updates, and a higher rate suits them.
TOY_DEFAULTS = ["train.batch_size=24", "train.lr=3e-3", "train.epochs=8", "eval.every=4", "eval.batch_size=64"]
FEW_UPDATES = 5  # an epoch with fewer updates than this is warned about before training
FIT_UPDATES = 20  # the batch size a warning suggests gives an epoch at least this many updates


def resolve_train_preset(name: str, tasks: list[str] | None = None, data_root: str | None = None,
                         backbone: str | None = None, overrides: list[str] | None = None) -> Preset:
    """The preset a `vlpet train` command line describes; the toy world brings its own defaults, task files (read
    and registered here, their features extracted on first use) the size of their features."""
    tasks = [resolve_task(t) if is_task_file(t) else t for t in tasks or []]
    extra = [f"data.tasks=[{','.join(tasks)}]"] if tasks else []
    if data_root:
        extra.append(f"data.data_root={data_root}")
    overrides = [*extra, *(overrides or [])]
    defaults = []
    own = any(own_task(t) for t in tasks)
    if own and int(os.environ.get("RANK", "0")) == 0:  # features on first use (other processes wait in `setup`)
        prepare_task_features(tasks)
    if data_root == "toy":  # the toy features' size depends on the tasks (image or video) the run ends up with
        chosen = resolve(name, overrides, backbone, defaults=TOY_DEFAULTS, task_kind=feature_kind).data.tasks
        defaults = [*TOY_DEFAULTS, f"model.feat_dim={toy_feature_dim(chosen)}"]
    elif own:  # task files: their features' size
        defaults = feature_defaults(tasks)
    preset = resolve(name, overrides, backbone, defaults=defaults, task_kind=feature_kind, run=True)
    assert preset.data.tasks is not None, "resolve sets data.tasks"
    for task in preset.data.tasks:
        get_task(task)
    return with_task_files(absolute_paths(preset))


def with_task_files(preset: Preset) -> Preset:
    """The preset recording the task files of its own tasks (data.task_files; the run keeps copies in tasks/)."""
    recorded = task_files(preset.data.tasks)
    return preset.model_copy(update={"data": preset.data.model_copy(update={"task_files": recorded})})


def _local_dir(value: str | None) -> Path | None:
    """The absolute path of a data root or backbone given as an existing directory (not 'toy', not a built-in
    backbone name such as tiny-bart, not a hub id)."""
    if not value or value == "toy" or backbones.ALIASES.get(value, value) in backbones.TINY:
        return None
    path = Path(value).expanduser()
    return path.resolve() if path.is_dir() else None


def absolute_paths(preset: Preset) -> Preset:
    """The preset with its data root and backbone directory as absolute paths, so that config.yaml and the
    adapter work from any directory (`vlpet eval RUN` run elsewhere)."""
    root, backbone = _local_dir(preset.data.data_root), _local_dir(preset.model.backbone)
    if root is not None:
        preset = preset.model_copy(update={"data": preset.data.model_copy(update={"data_root": str(root)})})
    if backbone is not None:
        preset = preset.model_copy(update={"model": preset.model.model_copy(update={"backbone": str(backbone)})})
    return preset


def _leaves(tree, prefix: str = "") -> dict[str, object]:
    """{dotted key: value} of a nested dict's leaves."""
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    out: dict[str, object] = {}
    for key, value in tree.items():
        out.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _same_path(given: str, saved: str | None) -> bool:
    """Whether a data root or backbone given on the command line is the one a run recorded (as paths)."""
    if saved is None or given == saved:
        return given == saved
    return _local_dir(given) is not None and _local_dir(given) == _local_dir(saved)


def resume_preset(run_dir: Path, preset: str | None = None, tasks: list[str] | None = None,
                  data_root: str | None = None, backbone: str | None = None,
                  overrides: list[str] | None = None) -> tuple[Preset, list[str]]:
    """The preset a resumed run continues with: its config.yaml plus the overrides that are safe to change when
    continuing (RESUMABLE and eval.*), and the list of changes ('train.epochs: 2 -> 5'). Options or overrides that
    would change what was trained are refused, each by name."""
    saved = load_run_preset(run_dir)
    register_run_tasks(saved.data.model_dump(), run_dir)
    root = saved.data.data_root
    if root not in (None, "toy") and not Path(root).expanduser().is_absolute():
        # an older run recorded its data root as typed, relative to where it was started: found from here, else
        # where --data-root says
        found = recorded_path(root, run_dir, "data root", "--data-root", required=data_root is None)
        if data_root is not None and found == root and not Path(root).expanduser().exists():
            found = data_root
        root = str(_local_dir(found) or found)
        saved = saved.model_copy(update={"data": saved.data.model_copy(update={"data_root": root})})
    fixed = [("--preset", preset, saved.name, preset and saved.name in (preset, Path(preset).stem)),
             ("--task", ",".join(tasks or []), ",".join(saved.data.tasks or []), tasks == saved.data.tasks),
             ("--data-root", data_root, root, data_root and _same_path(data_root, root)),
             ("--backbone", backbone, saved.model.backbone, backbone and _same_path(backbone, saved.model.backbone))]
    for option, given, kept, same in fixed:
        if given and not same:
            raise VlpetError(f"{option} {given}: a resumed run keeps what it was started with ({kept}); drop "
                             f"{option}, or start a new run with --name")
    pairs = parse_overrides(overrides or [])
    for key, _ in pairs:
        check_key(key)
        for prefix in (T5_PREFIX, VIDEO_PREFIX):
            if key.startswith(prefix):
                raise VlpetError(f"{key}: {prefix}* overrides are for new runs; when resuming, give the key "
                                 f"without '{prefix}'")
    updated = apply(saved, pairs, f"--resume overrides for {run_dir}")
    before, after = _leaves(saved.model_dump(mode="json")), _leaves(updated.model_dump(mode="json"))
    changes = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if old == new:
            continue
        if not (key in RESUMABLE or key.startswith("eval.")):
            raise VlpetError(f"{key}={new}: cannot be changed when resuming (the run was trained with "
                             f"{key}={old}); --resume may change {', '.join(RESUMABLE)} and eval.*; start a new "
                             f"run with --name to change it")
        changes.append(f"{key}: {old} -> {new}")
    return updated, changes


@dataclass
class TrainResult:
    summary: dict
    model: object  # the trained VLModel (unwrapped)


@dataclass
class Session:
    """Everything `fit` needs, built by `setup`."""

    preset: Preset
    run_dir: Path
    accelerator: Accelerator
    model: torch.nn.Module  # as prepared by Accelerate (DDP-wrapped under several processes)
    unwrapped: VLModel
    tokenizer: PreTrainedTokenizerBase
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None  # set once the loader's length is known
    loader: MultitaskLoader
    data: TaskData
    sizes: dict[str, int]
    info: dict
    checkpointer: Checkpointer
    state: TrainState = field(default_factory=TrainState)
    resumed_from: Path | None = None  # the checkpoint a resumed run continues from
    epoch_rng: torch.Tensor | None = None  # the loader generator's state when the current epoch's pass began
    features: dict = field(default_factory=dict)  # feature-store attributes per source (feature_attrs)
    lock: RunLock | None = None  # held by the main process until training ends
    threads: Threads | None = None  # the CPU thread count chosen for this process
    tracking: Tracking | None = None  # the main process's experiment trackers (train.report_to)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader)

    @property
    def total_batches(self) -> int:
        return self.steps_per_epoch * self.preset.train.epochs

    @property
    def total_updates(self) -> int:
        return total_updates(self.steps_per_epoch, self.preset.train)

    @property
    def done_batches(self) -> int:
        return self.state.epoch * self.steps_per_epoch + self.state.step_in_epoch


class TrainingInterrupted(Interrupted):
    """SIGINT/SIGTERM stopped training after a resumable checkpoint; `exit_code` is 130 or 143."""


class Interrupts:
    """While active, the first SIGINT/SIGTERM only asks the loop to checkpoint and stop; a second one aborts at
    once (Ctrl-C raises KeyboardInterrupt, SIGTERM kills). Handlers are installed only in the main thread."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():  # a signal the shell made us ignore stays so
            self._previous = {sig: signal.signal(sig, self._request) for sig in self.SIGNALS
                              if signal.getsignal(sig) is not signal.SIG_IGN}
        return self

    def _request(self, signum: int, frame) -> None:
        self.signum = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def requested(self, accelerator: Accelerator) -> bool:
        """Whether any process was asked to stop (all processes agree, so they checkpoint together)."""
        asked = self.signum is not None
        if accelerator.num_processes > 1:
            flag = torch.tensor([1.0 if asked else 0.0], device=accelerator.device)
            asked = bool(accelerator.reduce(flag, reduction="sum").item() > 0)
        return asked

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """A run to resume must be a run; a new run must not silently replace one; a run another process is
    writing is refused, naming it."""
    if resume:
        load_run_preset(run_dir)  # a clear error when it is not a run
    if not resume and run_contents(run_dir) and not overwrite:
        raise VlpetError(f"run directory {run_dir} already exists; pass --resume to continue it, "
                         f"--overwrite to replace it, or --name to start another")
    check_not_in_use(run_dir)


def check_records(data: TaskData) -> None:
    """Every task has training records, and validation records when the run validates (checked before the model
    is built: an empty validation split would otherwise stop the run after its first epoch)."""
    for task, ds in data.train.items():
        if len(ds) == 0:
            raise DataError(f"{task}: the training split has no records; check the task's annotation files "
                            f"under --data-root (`vlpet features inspect` lists what a split holds)")
    for task, ds in data.val.items():
        if len(ds) == 0:
            raise DataError(f"{task}: the validation split has no records, so the run could not choose its best "
                            f"adapter; fix the task's validation annotation file, or train without validation "
                            f"(eval.every=0)")


def _check_resume_room(checkpointer: Checkpointer, path: Path, preset: Preset, steps_per_epoch: int) -> None:
    """A resumed run cannot be asked to end before the point it already reached."""
    state = checkpointer.progress(path)
    if preset.train.max_steps and state.global_step > preset.train.max_steps:
        raise VlpetError(f"train.max_steps={preset.train.max_steps}: {path.name} already made {state.global_step} "
                         f"updates; give a larger train.max_steps")
    if state.epoch * steps_per_epoch + state.step_in_epoch > preset.train.epochs * steps_per_epoch:
        raise VlpetError(f"train.epochs={preset.train.epochs}: {path.name} is already in epoch {state.epoch + 1}; "
                         f"give at least train.epochs={state.epoch + (1 if state.step_in_epoch else 0)}")


MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # train.precision -> Accelerate's mixed_precision


def accelerator_kwargs(preset: Preset, run_dir: Path, resume: bool = False) -> dict:
    """The Accelerator's arguments: the device, train.precision as Accelerate's mixed precision (fp16 with its
    gradient scaler), DDP's settings, and the trackers of train.report_to logging under RUN/logs/."""
    return {"cpu": not torch.cuda.is_available(),  # so that processes started by `accelerate launch` join over gloo
            "mixed_precision": MIXED_PRECISION[preset.train.precision],
            "kwargs_handlers": [DistributedDataParallelKwargs(find_unused_parameters=True)],
            "log_with": build(preset.train.report_to, run_dir, resume) or None,
            "project_config": ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(log_dir(run_dir)))}


def check_precisions(preset: Preset) -> None:
    """train.precision and eval.precision work on this machine and backbone (fp16: a CUDA GPU and a BART-family
    backbone; bf16 on a GPU: one that supports it); refused in one line before anything is loaded."""
    if "fp16" in (preset.train.precision, preset.eval.precision) or torch.cuda.is_available():
        family = backbones.family_of(preset.model.backbone)
        for key, value in (("train.precision", preset.train.precision), ("eval.precision", preset.eval.precision)):
            check_precision(key, value, family)


@dataclass
class Preflight:
    """What `preflight` checked and loaded: the run's Accelerator, its data, and the checkpoint a resume starts
    from."""

    accelerator: Accelerator
    data: TaskData
    checkpointer: Checkpointer
    last: Path | None  # the intact checkpoint a resumed run continues from


def preflight(preset: Preset, run_dir: Path, resume: bool = False, overwrite: bool = False) -> Preflight:
    """Every check before the model loads, writing nothing: the run directory and --runs-dir, the backbone's
    files, the annotations and features, the records each split holds, and the checkpoint a resume continues
    from (`setup` and `vlpet train --dry-run` both start here)."""
    accelerator = Accelerator(**accelerator_kwargs(preset, run_dir, resume))
    check_run_dir(run_dir, resume, overwrite)
    check_runs_dir(run_dir)
    bb = backbones.resolve(preset.model.backbone)
    backbones.check_weights(bb)
    root = resolve_data_root(preset.data.data_root, preset.data.tasks)
    splits = ("train", "val") if preset.eval.every else ("train",)
    if accelerator.is_main_process:  # a task file's features on first use, written by one process
        prepare_task_features(preset.data.tasks)
    accelerator.wait_for_everyone()
    check_annotations(root, preset, splits)
    check_feature_dims(root, preset, splits)
    checkpointer = Checkpointer(run_dir, preset.train.keep_checkpoints)
    last = intact_checkpoint(checkpointer, run_dir, accelerator.is_main_process) if resume else None
    # the data first (it needs only the tokenizer): what the annotations hold is known before the model loads
    data = load_task_data(preset, root, backbones.load_tokenizer(bb), splits=splits)
    check_records(data)
    return Preflight(accelerator, data, checkpointer, last)


def setup(preset: Preset, run_dir: Path, resume: bool = False, overwrite: bool = False) -> Session:
    """Check the run directory, the backbone and the data, build model, data, optimizer and schedule; restore a
    checkpoint when resuming. Nothing is written before everything that can be checked is known to be good."""
    checked = preflight(preset, run_dir, resume, overwrite)
    accelerator, data, checkpointer, last = checked.accelerator, checked.data, checked.checkpointer, checked.last
    set_seed(preset.train.seed)
    model, tokenizer = build_model(preset, weights=True)
    chosen_threads = configure_threads(model, preset.train.threads)
    if preset.train.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    sizes = task_batch_sizes(preset.train.batch_size, list(data.train), preset.train.task_ratios)
    lock = RunLock(run_dir)
    accelerator.wait_for_everyone()  # every process has checked the run directory before it is replaced
    if accelerator.is_main_process:
        lock.acquire()  # from here on this process is the run's one writer
    try:
        return _prepare(preset, run_dir, accelerator, model, tokenizer, data, sizes, checkpointer, last, lock,
                        resume, overwrite, chosen_threads)
    except BaseException:
        lock.release()
        raise


def _prepare(preset: Preset, run_dir: Path, accelerator: Accelerator, model, tokenizer, data: TaskData,
             sizes: dict[str, int], checkpointer: Checkpointer, last: Path | None, lock: RunLock, resume: bool,
             overwrite: bool, threads: Threads) -> Session:
    """The part of `setup` that holds the run's lock: (re)create the run directory, build loader, optimizer and
    schedule, restore the checkpoint or write config.yaml."""
    if accelerator.is_main_process and not resume:
        if run_contents(run_dir) and not overwrite:  # made by another process since it was checked
            raise VlpetError(f"run directory {run_dir} already exists; pass --resume to continue it, "
                             f"--overwrite to replace it, or --name to start another")
        clear_run_dir(run_dir)  # empty, or --overwrite was given
    accelerator.wait_for_everyone()
    loader = MultitaskLoader(data.train, sizes, data_seed=preset.train.data_seed,
                             rank=accelerator.process_index, world_size=accelerator.num_processes,
                             num_workers=preset.data.num_workers, pin_memory=accelerator.device.type == "cuda")
    optimizer = build_optimizer(model, preset, accelerator.device)
    session = Session(preset, run_dir, accelerator, model, model, tokenizer, optimizer, None, loader, data, sizes,
                      {}, checkpointer, lock=lock, threads=threads)
    if last is not None:
        _check_resume_room(checkpointer, last, preset, session.steps_per_epoch)
    session.scheduler = schedule(optimizer, preset.train, session.total_updates)
    if last is not None:
        session.state = session.checkpointer.load(last, model, optimizer, session.scheduler,
                                                  {"train": loader.generator})
        session.resumed_from = last
        if accelerator.scaler is not None and session.state.grad_scaler:
            accelerator.scaler.load_state_dict(session.state.grad_scaler)
    elif accelerator.is_main_process:
        write_config(run_dir, preset)
        save_task_files(run_dir, preset.data.tasks)
    session.model, session.optimizer = accelerator.prepare(model, optimizer)
    session.unwrapped = accelerator.unwrap_model(session.model)
    session.info = budget(session.unwrapped)
    session.features = feature_attrs(data)
    return session


def feature_attrs(data: TaskData) -> dict[str, dict]:
    """What made the features the run reads, per source (vision model, layer, grid, dtype, shape: (tokens, dim) of
    an image, (None, dim) of a video's frames): the adapter records it so that `vlpet predict` extracts new
    inputs' features the same way."""
    found: dict[str, dict] = {}
    for datasets in (data.train, data.val):
        for ds in datasets.values():
            stores = getattr(ds, "features", None)
            for source, store in (stores.items() if isinstance(stores, dict) else ()):
                if source not in found and hasattr(store, "attrs"):
                    shape = getattr(store, "shape", (None, store.dim))
                    found[source] = {**store.attrs, "dtype": store.dtype, "shape": list(shape)}
    return found


def intact_checkpoint(checkpointer: Checkpointer, run_dir: Path, main: bool = True) -> Path:
    """The newest checkpoint whose files match what was written; newer damaged ones are named in a warning."""
    last, damaged = checkpointer.latest_intact()
    if last is None:
        if damaged:
            reasons = "; ".join(f"{path.name}: {why}" for path, why in damaged)
            raise VlpetError(f"cannot resume {run_dir}: no intact checkpoint ({reasons}); start it again "
                             f"with --overwrite")
        raise VlpetError(f"cannot resume {run_dir}: it has no checkpoint yet; start it again with "
                         f"--overwrite")
    if main:
        for path, why in damaged:
            print(f"warning: checkpoint {path} is damaged ({why}); resuming from {last.name} instead",
                  file=sys.stderr, flush=True)
    return last


def _interrupted(session: Session, interrupts: Interrupts) -> TrainingInterrupted:
    """Record the stop and say where the checkpoint is and how to continue."""
    state, run_dir = session.state, session.run_dir
    signum = interrupts.signum or signal.SIGINT
    name = signal.Signals(signum).name
    if session.main:
        append_event(run_dir, {"event": "interrupted", "signal": name, "epoch": state.epoch,
                               "step_in_epoch": state.step_in_epoch, "update": state.global_step})
    where = session.checkpointer.directory / f"step-{state.global_step}"
    return TrainingInterrupted(
        f"{name}: training stopped at update {state.global_step} (epoch {state.epoch + 1}, step "
        f"{state.step_in_epoch}); checkpoint saved in {where}. Continue with: vlpet train --resume "
        f"--name {run_dir.name} --runs-dir {run_dir.parent}", 128 + int(signum))


def checkpoint(session: Session) -> None:
    """Save the resumable state (main process); mid-epoch, the loader generator as it was when the pass began."""
    session.accelerator.wait_for_everyone()
    if not session.main:
        return
    generator = session.loader.generator
    if session.state.step_in_epoch and session.epoch_rng is not None:
        generator = torch.Generator()
        generator.set_state(session.epoch_rng)
    assert session.scheduler is not None, "setup sets the schedule"
    if session.accelerator.scaler is not None:  # fp16: the loss scale goes on where it was
        session.state.grad_scaler = session.accelerator.scaler.state_dict()
    session.checkpointer.save(session.unwrapped, session.optimizer, session.scheduler,
                              TrainState(**vars(session.state)), {"train": generator})


def _announce(session: Session, resume: bool, progress: Progress) -> None:
    """The one-line summary of what is trained, and the start event of a new run."""
    preset, info = session.preset, session.info
    progress.print(f"{preset.name} on {preset.model.backbone}: {info['trainable']:,} trainable of "
                   f"{info['total']:,} ({info['percent']:.2f} %); tasks {', '.join(session.data.train)}; "
                   f"batches {session.sizes}; {session.steps_per_epoch} steps/epoch x {preset.train.epochs} epochs; "
                   f"{session.threads}")
    if session.main and not resume:
        append_event(session.run_dir, {"event": "start", "trainable": info["trainable"], "total": info["total"],
                                       "percent": info["percent"], "batch_sizes": session.sizes,
                                       "steps_per_epoch": session.steps_per_epoch,
                                       "processes": session.accelerator.num_processes,
                                       "optimizer": describe(getattr(session.optimizer, "optimizer",
                                                                     session.optimizer)),
                                       "threads": session.threads.count if session.threads else None})


@dataclass
class FitResult:
    paused: bool
    validation: dict
    seconds: float


def fit(session: Session, progress: Progress, stop_after: int | None = None,
        interrupts: Interrupts | None = None) -> FitResult:
    """The epochs: forward/backward, (accumulated) updates, logging, checkpoints and validation every
    eval.every epochs. `stop_after` pauses after that many updates in this invocation; a signal caught by
    `interrupts` checkpoints at the next update and raises TrainingInterrupted."""
    interrupts = interrupts or Interrupts()
    preset, state, accelerator = session.preset, session.state, session.accelerator
    model, optimizer, scheduler = session.model, session.optimizer, session.scheduler
    assert scheduler is not None, "setup sets the schedule"
    accum, steps_per_epoch = preset.train.grad_accum, session.steps_per_epoch
    trainable = [p for p in model.parameters() if p.requires_grad]
    device = accelerator.device
    # losses since the last log line, per task, as (epoch, step, loss on the device): read (one host sync) and
    # checked for non-finite values at log points only, so a step never waits for the device
    window: dict[str, list[tuple[int, int, torch.Tensor]]] = {}
    recent: dict[str, float] = {}  # the last loss per task, for the progress bar
    started = time.time()
    samples, last_log = 0, time.time()
    done_batches = session.done_batches
    finished = state.global_step >= session.total_updates
    pause_at = state.global_step + stop_after if stop_after else None
    paused = False
    last_val: dict = {}
    generator = session.loader.generator
    if state.pending_validation:  # the last leg stopped while validating (e.g. the disk filled up): do it now
        last_val = validate_epoch(session, state.epoch - 1, progress)
        checkpoint(session)
    for epoch in range(state.epoch, preset.train.epochs):
        if finished:
            break
        model.train()
        session.epoch_rng = generator.get_state()
        for step, (task, batch) in enumerate(session.loader.epoch(epoch, state.step_in_epoch),
                                             start=state.step_in_epoch):
            batch = {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()}
            with accelerator.autocast():
                loss = model(batch)
            accelerator.backward(loss / accum)
            done_batches += 1
            samples += batch["input_ids"].shape[0] * accelerator.num_processes
            window.setdefault(task, []).append((epoch, step, loss.detach()))
            last_in_epoch = step + 1 == steps_per_epoch
            updated = update_due(step, steps_per_epoch, accum)
            if updated:
                # Accelerate's clipping unscales fp16 gradients first; its optimizer skips a step whose scaled
                # gradients overflowed (the scaler then lowers the scale), and so does the schedule
                norm = clip_gradients(trainable, preset.train.clip_grad_norm, accelerator.clip_grad_norm_)
                if session.tracking is not None:
                    session.tracking.update(done_batches, scheduler.get_last_lr()[0], norm, trainable)
                optimizer.step()
                if not getattr(optimizer, "step_was_skipped", False):
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.global_step += 1
            state.epoch, state.step_in_epoch = epoch, step + 1
            lr = scheduler.get_last_lr()[0]
            rate = samples / max(time.time() - started, 1e-9)
            progress.update(done_batches)
            every = preset.train.checkpoint_every
            finished = state.global_step >= session.total_updates
            paused = pause_at is not None and state.global_step >= pause_at and not finished
            # under several processes the ranks agree through an all-reduce (a host sync): every 20 updates only
            asked = updated and (accelerator.num_processes == 1 or finished or paused or last_in_epoch
                                 or state.global_step % 20 == 0) and interrupts.requested(accelerator)
            due = bool(every) and updated and state.global_step % every == 0
            saving = not last_in_epoch and (finished or paused or asked or due)
            # the losses since the last line are logged before every checkpoint, so a resumed run neither loses
            # nor repeats any (runs.rewind_events drops what came after the checkpoint it resumes from)
            if time.time() - last_log > 5 or last_in_epoch or saving or asked:
                losses = read_losses(window, preset.train.precision, session.checkpointer)
                if session.tracking is not None:
                    session.tracking.log_train(batch_losses(window, losses, steps_per_epoch), rate, done_batches)
                recent.update({t: v[-1] for t, v in losses.items() if v})
                shown = " ".join(f"{t} {v:.3f}" for t, v in recent.items())
                progress.update(done_batches, f"epoch {epoch + 1}/{preset.train.epochs} | {shown} | lr {lr:.1e} | "
                                              f"{rate:.0f} samples/s")
                for t, values in losses.items():
                    if values and session.main:
                        append_event(session.run_dir, {"event": "train", "epoch": epoch, "step": done_batches,
                                                       "update": state.global_step, "task": t,
                                                       "loss": sum(values) / len(values), "lr": lr,
                                                       "samples_per_s": rate})
                window = {t: [] for t in window}
                last_log = time.time()
            if saving:
                checkpoint(session)
            if asked:
                if last_in_epoch:
                    checkpoint(session)
                raise _interrupted(session, interrupts)
            if finished or paused:
                break
        if paused and state.step_in_epoch < steps_per_epoch:
            break
        if state.step_in_epoch == steps_per_epoch:
            state.epoch, state.step_in_epoch = epoch + 1, 0
        if preset.eval.every and (epoch + 1) % preset.eval.every == 0 and state.step_in_epoch == 0:
            state.pending_validation = True
            checkpoint(session)  # the epoch is safe before validation writes the best adapter
            last_val = validate_epoch(session, epoch, progress)
        checkpoint(session)
        if interrupts.requested(accelerator):
            raise _interrupted(session, interrupts)
        if paused:
            break
    accelerator.wait_for_everyone()
    return FitResult(paused, last_val, time.time() - started)


def read_losses(window: dict[str, list[tuple[int, int, torch.Tensor]]], precision: str,
                checkpointer: Checkpointer) -> dict[str, list[float]]:
    """The logged losses as floats (one host sync for all of them); the first non-finite one stops training with
    its task, epoch and step (the steps after it have not been checkpointed)."""
    flat = [(task, epoch, step, loss) for task, values in window.items() for epoch, step, loss in values]
    if not flat:
        return {}
    values = torch.stack([loss.float() for *_, loss in flat]).tolist()
    for (task, epoch, step, _), value in zip(flat, values):
        if not math.isfinite(value):
            fix = "lower train.lr" if precision == "fp32" else "lower train.lr or use train.precision=fp32"
            raise VlpetError(f"the {task} loss became {value} at epoch {epoch} step {step}; {fix} "
                             f"(last good checkpoint: {checkpointer.latest() or 'none'})")
    out: dict[str, list[float]] = {}
    for (task, *_), value in zip(flat, values):
        out.setdefault(task, []).append(value)
    return out


def batch_losses(window: dict[str, list[tuple[int, int, torch.Tensor]]], losses: dict[str, list[float]],
                 steps_per_epoch: int) -> dict[str, list[tuple[int, float]]]:
    """read_losses' values per task with the batch number each came from (metrics.jsonl's `step` axis)."""
    return {task: [(epoch * steps_per_epoch + step + 1, value) for (epoch, step, _), value in zip(window[task], values)]
            for task, values in losses.items()}


def validate_epoch(session: Session, epoch: int, progress: Progress) -> dict:
    """Predict every task's validation split (sharded over the processes), score it and log it (main process),
    and keep the best adapter."""
    preset, state = session.preset, session.state
    result = validate(session.unwrapped, session.tokenizer, preset, session.data.val, progress=False,
                      state=session.accelerator)
    if session.main:
        score = best_score(result, preset.eval.best_metric)
        append_event(session.run_dir, {"event": "val", "epoch": epoch, "step": state.global_step,
                                       "metrics": result, "score": score})
        shown = "  ".join(f"{t}: " + ", ".join(f"{k} {v:.2f}" for k, v in m.items() if isinstance(v, float))
                          for t, m in result.items())
        progress.print(f"epoch {epoch + 1} validation: {shown}  (selection score {score:.2f})")
        if session.tracking is not None:
            session.tracking.log_validation(result, score, session.done_batches)
        if state.best is None or score > state.best:
            state.best = score
            save_adapter(best_dir(session.run_dir), session.unwrapped, preset,
                         {"epoch": epoch, "score": score, "features": session.features})
    session.state.pending_validation = False
    session.accelerator.wait_for_everyone()
    return result


def finish(session: Session, fitted: FitResult, progress: Progress) -> dict:
    """The summary; for a finished run also the final adapter, the end event and the loss plot."""
    info, state = session.info, session.state
    summary = {"run": str(session.run_dir), "updates": state.global_step, "seconds": fitted.seconds,
               "trainable": info["trainable"], "total": info["total"], "percent": info["percent"],
               "validation": fitted.validation, "paused": fitted.paused}
    if fitted.paused:
        progress.print(f"paused after {state.global_step} updates; continue with --resume")
        return summary
    if session.main:
        adapter = session.run_dir / ADAPTER
        size = save_adapter(adapter, session.unwrapped, session.preset, {"features": session.features})
        summary.update(adapter=str(adapter), adapter_bytes=size)
        append_event(session.run_dir, {"event": "end", "updates": state.global_step, "seconds": fitted.seconds,
                                       "adapter_bytes": size})
        try:
            plot_run(session.run_dir)
        except VlpetError as exc:
            progress.print(f"no plot: {exc}")
    return summary


def _resumed(session: Session, changes: list[str], progress: Progress) -> None:
    """Say where a resumed run continues and what changed; forget the events logged after that checkpoint."""
    state, last = session.state, session.resumed_from
    if not session.main or last is None:
        return
    dropped = rewind_events(session.run_dir, session.done_batches, state)
    if changes:
        write_config(session.run_dir, session.preset)
    append_event(session.run_dir, {"event": "resume", "checkpoint": last.name, "update": state.global_step,
                                   "changes": changes, "events_dropped": dropped})
    said = f"resuming {session.run_dir} from {last.name} (update {state.global_step})"
    if changes:
        said += f"; changed: {'; '.join(changes)}; the learning-rate schedule now spans {session.total_updates} updates"
    progress.print(said)


def updates_per_epoch(preset: Preset, records: dict[str, int], world_size: int = 1,
                      batch_size: int | None = None) -> int:
    """Optimiser updates in one epoch of `records` training records per task (at `batch_size`, default the
    preset's), as MultitaskLoader batches them over `world_size` processes."""
    sizes = task_batch_sizes(batch_size or preset.train.batch_size, list(records), preset.train.task_ratios)
    return math.ceil(sum(epoch_batches(records, sizes, world_size).values()) / preset.train.grad_accum)


def schedule_warnings(preset: Preset, records: dict[str, int], world_size: int = 1) -> list[str]:
    """What makes a run train little, said before it starts with the overrides that fit: epochs of fewer than
    FEW_UPDATES updates (a preset's batch of 500 on a small dataset), a warm-up as long as the run."""
    found = []
    per_epoch = updates_per_epoch(preset, records, world_size)
    total = per_epoch * preset.train.epochs
    if preset.train.max_steps:
        total = min(total, preset.train.max_steps)
    if per_epoch < FEW_UPDATES:
        fitting = _fitting_batch_size(preset, records, world_size)
        toy = dict(setting.split("=", 1) for setting in TOY_DEFAULTS)
        shown = ", ".join(f"{n:,} {task}" for task, n in records.items())
        found.append(f"an epoch is {per_epoch} update{'' if per_epoch == 1 else 's'} ({shown} training records, "
                     f"train.batch_size={preset.train.batch_size}), {total} in the whole run: too few to train; "
                     f"give train.batch_size={fitting} ({updates_per_epoch(preset, records, world_size, fitting)} "
                     f"updates per epoch) and a learning rate for that batch (the toy world's batches of "
                     f"{toy['train.batch_size']} train at train.lr={toy['train.lr']})")
    warmup = int(preset.train.warmup_ratio * total)
    if total and warmup >= total:
        found.append(f"the warm-up (train.warmup_ratio={preset.train.warmup_ratio:g}: {warmup} updates) is as long "
                     f"as the run ({total} updates), so the learning rate never reaches train.lr; give "
                     f"train.warmup_ratio=0.1")
    return found


def _fitting_batch_size(preset: Preset, records: dict[str, int], world_size: int) -> int:
    """The largest batch size below the preset's giving an epoch FIT_UPDATES updates or more (1 if none does);
    updates only fall as the batch grows, so a binary search finds it."""
    low, high, best = 1, preset.train.batch_size - 1, 1
    while low <= high:
        middle = (low + high) // 2
        if updates_per_epoch(preset, records, world_size, middle) >= FIT_UPDATES:
            best, low = middle, middle + 1
        else:
            high = middle - 1
    return best


def _warn_schedule(session: Session) -> None:
    """Print schedule_warnings on stderr (main process), before the first step."""
    if not session.main:
        return
    records = {task: len(ds) for task, ds in session.data.train.items()}
    for message in schedule_warnings(session.preset, records, session.accelerator.num_processes):
        print(f"warning: {message}", file=sys.stderr, flush=True)


def check_options(preset: Preset, stop_after: int | None) -> None:
    """Options that would be ignored or cannot work, refused before anything is loaded."""
    if stop_after is not None and stop_after < 1:
        raise VlpetError(f"--stop-after {stop_after}: pause after at least 1 update (--stop-after 1), or leave "
                         f"--stop-after out to train to the end")
    requested_threads(preset.train.threads)  # a bad VLPET_THREADS is refused now, not after the model loads
    check_precisions(preset)
    check_trackers(preset.train.report_to)


def _write_failed(session: Session, exc: WriteError) -> VlpetError:
    """A failed write (disk full, read-only) as one line: what failed, what is intact, how to continue."""
    last = session.checkpointer.latest()
    where = f"its last checkpoint {last}" if last else "its start (no checkpoint was written)"
    how = (f"continue with: vlpet train --resume --name {session.run_dir.name} --runs-dir {session.run_dir.parent}"
           if last else "start it again with --overwrite")
    return VlpetError(f"{exc}; the run is intact up to {where}; free some space and {how}")


def train(preset: Preset, run_dir: Path, resume: bool = False, overwrite: bool = False,
          stop_after: int | None = None, changes: list[str] | None = None) -> TrainResult:
    """Train `preset` into `run_dir`. `stop_after` pauses after that many updates in this invocation (the
    schedule still spans the whole run; continue with resume=True); `changes` are the resume_preset changes to
    announce. Everything that can be checked is checked before anything is written."""
    check_options(preset, stop_after)
    session = setup(preset, run_dir, resume=resume, overwrite=overwrite)
    try:
        return _run(session, resume, stop_after, changes)
    finally:
        if session.lock is not None:
            session.lock.release()


def _run(session: Session, resume: bool, stop_after: int | None, changes: list[str] | None) -> TrainResult:
    """Fit and finish a set-up session (train's body, while the run's lock is held)."""
    preset = session.preset
    progress = Progress(min(session.total_batches, session.total_updates * preset.train.grad_accum),
                        enabled=session.main, done=session.done_batches, every_s=10.0, final_line=False)
    try:
        _resumed(session, changes or [], progress)
        _start_tracking(session, resume)
        _announce(session, resume, progress)
        if not resume:
            _warn_schedule(session)
        with Interrupts() as interrupts:
            fitted = fit(session, progress, stop_after, interrupts)
    except WriteError as exc:
        raise _write_failed(session, exc) from None
    finally:
        progress.close()
        if session.tracking is not None:
            session.tracking.finish()
    try:
        return TrainResult(finish(session, fitted, progress), session.unwrapped)
    except WriteError as exc:
        raise _write_failed(session, exc) from None


def _start_tracking(session: Session, resume: bool) -> None:
    """Start the trackers of train.report_to in the main process; a resumed run continues its trackers' runs."""
    if session.main and session.preset.train.report_to:
        tracking = Tracking(session.accelerator, session.run_dir)
        tracking.start(session.preset, session.done_batches + 1 if resume else 1)
        session.tracking = tracking
