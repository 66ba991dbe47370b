"""`vlpet train --dry-run`: what a run would do, checked and counted without training it.

The dry run makes every check `vlpet train` makes before it loads the model (`train.preflight`: the run directory,
--runs-dir, the backbone's files, the annotations, features and records), builds the model on the meta device (the
PET modules injected, no weights loaded) and counts what training would do from the same functions training uses:
the parameter budget (`pet.budget`, as `vlpet params`), the batches of an epoch (`data.multitask.epoch_batches`),
the updates and warm-up (`optim.total_updates`), the optimizer (`optim.optimizer_choice`) and the decay groups
(`optim.param_groups`). With `--time N` it also trains N real updates of a real model in a temporary directory
(`train.setup` and `train.fit` as they are), to measure the time of a step and the peak memory. Nothing is
written under --runs-dir.
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from vlpet_cli.backbones import DROPOUT_RATES
from vlpet_cli.config import Preset
from vlpet_cli.data.multitask import epoch_batches, task_batch_sizes
from vlpet_cli.optim import describe, optimizer_choice, param_groups, total_updates, update_due
from vlpet_cli.pet.budget import budget
from vlpet_cli.progress import Progress, clock
from vlpet_cli.runs import ADAPTER, CONFIG, METRICS, best_dir, checkpoints_dir, run_contents
from vlpet_cli.train import _check_resume_room, check_options, fit, preflight, schedule_warnings, setup
from vlpet_cli.vl.model import build_model

__all__ = ["describe_plan", "dry_run", "save_points"]


def save_points(batches_per_epoch: int, preset: Preset) -> tuple[list[int], list[tuple[int, int]]]:
    """(the updates at which `train.fit` writes a checkpoint, (epoch, update) of each validation), by fit's rules:
    every train.checkpoint_every updates inside an epoch, at the end of every epoch and where train.max_steps
    stops the run; validation after every eval.every-th whole epoch (1-based epochs)."""
    train, every_eval = preset.train, preset.eval.every
    total = total_updates(batches_per_epoch, train)
    every = train.checkpoint_every
    saves: list[int] = []
    validations: list[tuple[int, int]] = []
    update = 0
    for epoch in range(train.epochs):
        whole = False
        for step in range(batches_per_epoch):
            whole = step + 1 == batches_per_epoch
            updated = update_due(step, batches_per_epoch, train.grad_accum)
            update += updated
            finished = update >= total
            if not whole and (finished or (every and updated and update % every == 0)):
                saves.append(update)
            if finished:
                break
        if whole and every_eval and (epoch + 1) % every_eval == 0:
            validations.append((epoch + 1, update))
        saves.append(update)
        if update >= total:
            break
    return list(dict.fromkeys(saves)), validations


def dry_run(preset: Preset, run_dir: Path, resume: bool = False, overwrite: bool = False,
            time_steps: int | None = None) -> dict:
    """The plan of `vlpet train` for `preset` into `run_dir` (see the module's docstring), after the checks the
    run would make; with `time_steps`, the measured time and memory of that many real updates too."""
    check_options(preset, None)
    checked = preflight(preset, run_dir, resume=resume, overwrite=overwrite)
    model, _ = build_model(preset, weights=False)
    records = {task: len(ds) for task, ds in checked.data.train.items()}
    world = checked.accelerator.num_processes
    sizes = task_batch_sizes(preset.train.batch_size, list(records), preset.train.task_ratios)
    batches = epoch_batches(records, sizes, world)
    per_epoch = sum(batches.values())
    train = preset.train
    updates = total_updates(per_epoch, train)
    start = 0  # the update a resumed run continues after
    if checked.last is not None:
        _check_resume_room(checked.checkpointer, checked.last, preset, per_epoch)
        start = checked.checkpointer.progress(checked.last).global_step
    saves, validations = save_points(per_epoch, preset)
    decayed, exempt = param_groups(model, preset)
    device = checked.accelerator.device
    config = model.backbone.config
    val_limit = preset.eval.limit or sys.maxsize
    plan = {
        "preset": preset.name, "backbone": preset.model.backbone, "tasks": list(records), "run_dir": str(run_dir),
        "new_run": not resume, "replaces": bool(overwrite and run_contents(run_dir)),
        "resume": {"checkpoint": str(checked.last), "update": start} if checked.last is not None else None,
        "device": device.type, "processes": world, "parameters": budget(model),
        "records": {"train": records, "val": {t: min(len(ds), val_limit) for t, ds in checked.data.val.items()}},
        "batch_sizes": sizes, "steps_per_epoch": per_epoch, "steps_per_epoch_by_task": batches,
        "epochs": train.epochs, "grad_accum": train.grad_accum, "max_steps": train.max_steps, "updates": updates,
        "warmup_updates": int(train.warmup_ratio * updates), "warmup_ratio": train.warmup_ratio,
        "optimizer": {"name": describe(optimizer_choice(train, device)), "lr": train.lr, "eps": train.adam_eps,
                      "weight_decay": train.weight_decay, "decay_rule": train.decay_rule,
                      "decayed_tensors": len(decayed["params"]), "exempt_tensors": len(exempt["params"]),
                      "clip_grad_norm": train.clip_grad_norm},
        "precision": train.precision,
        "dropout": {k: getattr(config, k) for k in DROPOUT_RATES if hasattr(config, k)},
        "checkpoints": {"directory": str(checkpoints_dir(run_dir)), "updates": [u for u in saves if u > start],
                        "every": train.checkpoint_every, "keep": train.keep_checkpoints},
        "validations": {"epochs": [e for e, u in validations if u > start],
                        "updates": [u for _, u in validations if u > start], "every": preset.eval.every,
                        "metric": preset.eval.best_metric,
                        "best": str(best_dir(run_dir))},
        "files": {"config": str(run_dir / CONFIG), "metrics": str(run_dir / METRICS),
                  "adapter": str(run_dir / ADAPTER), "plot": str(run_dir / "plots" / "loss.png")},
        "warnings": [] if resume else schedule_warnings(preset, records, world),
        "timing": None,
    }
    if time_steps is not None:
        batches_left = min(per_epoch * train.epochs, updates * train.grad_accum) - start * train.grad_accum
        plan["timing"] = measure(preset, time_steps, per_epoch, batches_left)
    return plan


class StepClock(Progress):
    """A silent Progress noting when each training step (batch) ends: `fit` moves it on once per batch. On CUDA
    it waits for the device first, so that a step's time is its kernels' and not only their launch."""

    def __init__(self, cuda: bool) -> None:
        super().__init__(0, enabled=False)
        self.cuda = cuda
        self.ends: list[float] = []

    def update(self, completed: int, description: str | None = None, count: int = 0) -> None:
        if completed > self.completed:
            if self.cuda:
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())
        super().update(completed, description, count)


def _peak_rss() -> int:
    """This process's peak resident memory so far, in bytes (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def measure(preset: Preset, steps: int, batches_per_epoch: int, batches_left: int) -> dict:
    """Train `steps` updates of the real model (loaded weights, real optimizer and data) in a temporary run
    directory that is removed afterwards; the seconds per step (the first one, which warms up, left out when
    there are two or more), the estimated epoch and run times and the peak memory (CUDA: max_memory_allocated;
    CPU: how much the peak RSS grew). The updates stay inside the first epoch, without validation or mid-epoch
    checkpoints, so only training steps are timed."""
    first_epoch = -(-batches_per_epoch // preset.train.grad_accum)
    timed = min(steps, first_epoch, total_updates(batches_per_epoch, preset.train))
    quiet = preset.model_copy(update={"eval": preset.eval.model_copy(update={"every": 0}),
                                      "train": preset.train.model_copy(update={"checkpoint_every": 0})})
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss_before = _peak_rss()
    with tempfile.TemporaryDirectory(prefix="vlpet-dry-run-") as tmp:
        session = setup(quiet, Path(tmp) / "run")
        try:
            steps_clock = StepClock(cuda and session.accelerator.device.type == "cuda")
            started = time.perf_counter()
            fit(session, steps_clock, stop_after=timed)
        finally:
            if session.lock is not None:
                session.lock.release()
    ends = steps_clock.ends
    per_step = (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else ends[0] - started
    on_gpu = steps_clock.cuda
    return {"steps": len(ends), "updates": timed, "asked": steps, "seconds_per_step": per_step,
            "epoch_seconds": per_step * batches_per_epoch, "total_seconds": per_step * batches_left,
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if on_gpu else _peak_rss() - rss_before,
            "memory": "cuda max_memory_allocated" if on_gpu else "peak RSS growth"}


def _listed(values: list[int], most: int = 8) -> str:
    """'4, 8, 12' or '4, 8, 12, ..., 96, 100' (the first and last few of a long list)."""
    shown = [str(v) for v in values]
    if len(shown) > most:
        shown = [*shown[:most // 2], "...", *shown[-2:]]
    return ", ".join(shown)


def describe_plan(plan: dict) -> list[str]:
    """The plan in lines of text (after the parameter table, which the command prints itself)."""
    params, opt = plan["parameters"], plan["optimizer"]
    run = plan["run_dir"]
    if plan["resume"]:
        state = f"resumes from {Path(plan['resume']['checkpoint']).name} (update {plan['resume']['update']})"
    else:
        state = "replaces the run there (--overwrite)" if plan["replaces"] else "a new run"
    lines = [f"dry run of {plan['preset']} on {plan['backbone']} into {run} ({state}): the checks passed "
             f"(run directory, --runs-dir, backbone files, annotations, features and records); nothing was written",
             f"trainable parameters: {params['trainable']:,} of {params['total']:,} ({params['percent']:.2f} %)"]
    train, val = plan["records"]["train"], plan["records"]["val"]
    lines.append("tasks: " + "; ".join(
        f"{t}: {n:,} training records" + (f", {val[t]:,} validation" if t in val else "")
        + f", batch {plan['batch_sizes'][t]}, {plan['steps_per_epoch_by_task'][t]} steps/epoch"
        for t, n in train.items()) + (f" (per process, {plan['processes']} processes)" if plan["processes"] > 1
                                      else ""))
    accum = f", {plan['grad_accum']} steps per update" if plan["grad_accum"] > 1 else ""
    capped = f" (train.max_steps={plan['max_steps']})" if plan["max_steps"] else ""
    lines.append(f"steps: {plan['steps_per_epoch']} per epoch x {plan['epochs']} epochs{accum}; {plan['updates']} "
                 f"updates{capped}, the first {plan['warmup_updates']} warm-up (train.warmup_ratio="
                 f"{plan['warmup_ratio']:g})")
    clip = f"clip grad norm {opt['clip_grad_norm']:g}" if opt["clip_grad_norm"] > 0 else "no gradient clipping"
    lines.append(f"optimizer: {opt['name']}, lr {opt['lr']:g}, eps {opt['eps']:g}, weight decay "
                 f"{opt['weight_decay']:g} on {opt['decayed_tensors']} tensors, {opt['exempt_tensors']} exempt "
                 f"(train.decay_rule={opt['decay_rule']}); {clip}")
    rates = ", ".join(f"{k} {v:g}" for k, v in plan["dropout"].items()) or "none"
    lines.append(f"precision: {plan['precision']} on {plan['device']}; dropout: {rates}")
    ckpt = plan["checkpoints"]
    every = f"every {ckpt['every']} updates and " if ckpt["every"] else ""
    lines.append(f"checkpoints: {every}at the end of every epoch, {len(ckpt['updates'])} in all (after updates "
                 f"{_listed(ckpt['updates'])}) in {ckpt['directory']}/step-N, the last {ckpt['keep']} kept")
    checks = plan["validations"]
    if checks["epochs"]:
        lines.append(f"validation: after epoch{'s' if len(checks['epochs']) > 1 else ''} {_listed(checks['epochs'])} "
                     f"(updates {_listed(checks['updates'])}), logged to {plan['files']['metrics']}; the best "
                     f"({checks['metric']}) adapter in {checks['best']}")
    else:
        why = "eval.every=0" if not checks["every"] else \
            f"eval.every={checks['every']}, {'the rest of ' if plan['resume'] else ''}the run ends first"
        lines.append(f"validation: none ({why})")
    files = plan["files"]
    lines.append(f"also written: {files['config']}, {files['metrics']}, the final adapter {files['adapter']} and "
                 f"{files['plot']}")
    lines += [f"warning: {w}" for w in plan["warnings"]]
    timing = plan["timing"]
    if timing:
        short = f" (of {timing['asked']} asked: a timing stays in the first epoch)" \
            if timing["updates"] < timing["asked"] else ""
        lines.append(f"timing: {timing['steps']} real steps on {plan['device']}{short}: "
                     f"{timing['seconds_per_step']:.3f} s per step; an epoch ~{clock(timing['epoch_seconds'])}, "
                     f"the {'rest of the ' if plan['resume'] else ''}run ~{clock(timing['total_seconds'])} "
                     f"(training steps only, validation not included); peak memory "
                     f"{timing['peak_memory_bytes'] / 2**20:,.0f} MiB ({timing['memory']})")
    return lines
