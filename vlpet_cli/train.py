"""`vlpet train`: multi-task PET training on Accelerate, with exact resume and atomic run files."""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from vlpet_cli.config import Preset
from vlpet_cli.data.loading import feature_dim, load_task_data, resolve_data_root, toy_feature_dim
from vlpet_cli.errors import VlpetError

# The toy world is small: smaller batches give the PET modules enough updates, and a higher rate suits them.
TOY_DEFAULTS = ["train.batch_size=24", "train.lr=3e-3", "train.epochs=8", "eval.every=4", "eval.batch_size=64"]


def resolve_train_preset(name: str, tasks: list[str] | None = None, data_root: str | None = None,
                         backbone: str | None = None, overrides: list[str] | None = None) -> Preset:
    """The preset a `vlpet train` command line describes; the toy world brings its own defaults."""
    from vlpet_cli.data.tasks import get_task
    from vlpet_cli.presets import resolve

    extra = [f"data.tasks=[{','.join(tasks)}]"] if tasks else []
    if data_root:
        extra.append(f"data.data_root={data_root}")
    defaults = [*TOY_DEFAULTS, f"model.feat_dim={toy_feature_dim()}"] if data_root == "toy" else []
    preset = resolve(name, [*extra, *(overrides or [])], backbone, defaults=defaults)
    for task in preset.data.tasks:
        get_task(task)
    return preset


def param_groups(model, preset: Preset) -> list[dict]:
    """AdamW groups: what skips decay is `pet.inject.no_decay_names` under the preset's decay rule (reference:
    names containing 'bias' or 'LayerNorm.weight'; corrected: also norms and the tensors each method declares)."""
    from vlpet_cli.pet.inject import no_decay_names

    exempt = no_decay_names(model, preset.train.decay_rule)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name in exempt else decay).append(p)
    return [{"params": decay, "weight_decay": preset.train.weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


# ---- checkpoints ------------------------------------------------------------------------------------------
def save_checkpoint(directory: Path, model, optimizer, scheduler, progress: dict, keep: int) -> Path:
    """checkpoints/step-N/: trainable tensors, optimizer moments, scheduler, RNG and loop position."""
    import torch
    from safetensors.torch import save_file

    from vlpet_cli.vl.state import adapter_state, atomic_dir, write_json

    final = directory / f"step-{progress['global_step']}"
    tmp, commit = atomic_dir(final)
    save_file(adapter_state(model), str(tmp / "model.safetensors"))
    opt = optimizer.state_dict()
    tensors = {f"{i}/{k}": v.contiguous() for i, st in opt["state"].items() for k, v in st.items()}
    tensors["rng/torch"] = torch.get_rng_state()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    write_json(tmp / "state.json", {"progress": progress, "param_groups": opt["param_groups"],
                                    "scheduler": scheduler.state_dict()})
    commit()
    steps = sorted((p for p in directory.glob("step-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(directory: Path) -> Path | None:
    steps = [p for p in directory.glob("step-*") if (p / "state.json").exists()]
    return max(steps, key=lambda p: int(p.name.split("-")[1])) if steps else None


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore everything save_checkpoint wrote; returns the loop position."""
    import torch
    from safetensors.torch import load_file

    from vlpet_cli.vl.state import load_adapter_state

    load_adapter_state(model, load_file(str(path / "model.safetensors")), str(path))
    meta = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "optimizer.safetensors"))
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("rng/"):
            continue
        i, name = key.split("/", 1)
        state.setdefault(int(i), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng/torch"])
    return meta["progress"]


# ---- the loop ---------------------------------------------------------------------------------------------
class Reporter:
    """Rich progress on a terminal, plain log lines otherwise; silent on non-main processes."""

    def __init__(self, enabled: bool, total: int, done: int):
        self.enabled = enabled
        self.total = total
        self.tty = sys.stdout.isatty()
        self.progress = None
        self.last_plain = time.time()
        if enabled and self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn())
            self.progress.start()
            self.bar = self.progress.add_task("training", total=total, completed=done)

    def update(self, step: int, text: str) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.update(self.bar, completed=step, description=text)
        elif time.time() - self.last_plain > 10 or step == self.total:
            print(f"[{step}/{self.total}] {text}", flush=True)
            self.last_plain = time.time()

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def append_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def load_run_preset(run_dir: Path) -> Preset:
    """The resolved preset a run was started with (its config.yaml), to resume it."""
    import yaml

    from vlpet_cli.presets import validate

    path = run_dir / "config.yaml"
    if not path.exists():
        raise VlpetError(f"cannot resume: {run_dir} is not a run directory (no config.yaml)")
    return validate(yaml.safe_load(path.read_text()), str(path))


@dataclass
class TrainResult:
    summary: dict
    model: object  # the trained VLModel (unwrapped)


def train(preset: Preset, run_dir: Path, resume: bool = False, overwrite: bool = False,
          stop_after: int | None = None) -> TrainResult:
    """Train `preset` into `run_dir`. `stop_after` pauses after that many updates in this invocation (the
    schedule still spans the whole run; continue with resume=True). Data are checked before anything is written."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed
    from transformers import get_linear_schedule_with_warmup

    from vlpet_cli.data.multitask import MultitaskLoader, task_batch_sizes
    from vlpet_cli.presets import to_yaml
    from vlpet_cli.vl.model import build_model
    from vlpet_cli.vl.state import save_adapter

    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # so that processes started by `accelerate launch` join over gloo
        mixed_precision="bf16" if preset.train.precision == "bf16" else "no",
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    main = accelerator.is_main_process
    if resume:
        load_run_preset(run_dir)  # a clear error when it is not a run
    if not resume and run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise VlpetError(f"run directory {run_dir} already exists; pass --resume to continue it, "
                         f"--overwrite to replace it, or --name to start another")
    root = resolve_data_root(preset.data.data_root)
    found_dim = feature_dim(root, preset)
    if found_dim != preset.model.feat_dim:
        raise VlpetError(f"the features under {root} are {found_dim}-dimensional but the preset expects "
                         f"model.feat_dim={preset.model.feat_dim}; add the override model.feat_dim={found_dim}")

    set_seed(preset.train.seed)
    model, tokenizer = build_model(preset, weights=True)
    data = load_task_data(preset, root, tokenizer, splits=("train", "val") if preset.eval.every else ("train",))
    sizes = task_batch_sizes(preset.train.batch_size, list(data.train), preset.train.task_ratios)
    accelerator.wait_for_everyone()  # every process has checked the run directory before it is replaced
    if main and not resume:
        shutil.rmtree(run_dir, ignore_errors=True)  # empty, or --overwrite was given
        run_dir.mkdir(parents=True)
    accelerator.wait_for_everyone()
    loader = MultitaskLoader(data.train, sizes, data_seed=preset.train.data_seed,
                             rank=accelerator.process_index, world_size=accelerator.num_processes,
                             num_workers=preset.data.num_workers)
    accum = preset.train.grad_accum
    steps_per_epoch = len(loader)
    total_batches = steps_per_epoch * preset.train.epochs
    total_updates = math.ceil(total_batches / accum)
    if preset.train.max_steps:
        total_updates = min(total_updates, preset.train.max_steps)
    optimizer = torch.optim.AdamW(param_groups(model, preset), lr=preset.train.lr, eps=preset.train.adam_eps)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(preset.train.warmup_ratio * total_updates),
                                                total_updates)

    position = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best": None}
    ckpt_dir = run_dir / "checkpoints"
    if resume:
        last = latest_checkpoint(ckpt_dir)
        if last is None:
            raise VlpetError(f"cannot resume {run_dir}: it has no checkpoint yet; start it again with --overwrite")
        position = load_checkpoint(last, model, optimizer, scheduler)
    elif main:
        (run_dir / "config.yaml").write_text(to_yaml(preset))
    model, optimizer = accelerator.prepare(model, optimizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    metrics_path = run_dir / "metrics.jsonl"
    unwrapped = accelerator.unwrap_model(model)

    from vlpet_cli.pet.budget import budget

    info = budget(unwrapped)
    reporter = Reporter(main, min(total_batches, total_updates * accum), position["epoch"] * steps_per_epoch
                        + position["step_in_epoch"])
    reporter.print(f"{preset.name} on {preset.model.backbone}: {info['trainable']:,} trainable of "
                   f"{info['total']:,} ({info['percent']:.2f} %); tasks {', '.join(data.train)}; "
                   f"batches {sizes}; {steps_per_epoch} steps/epoch x {preset.train.epochs} epochs")
    if main and not resume:
        append_jsonl(metrics_path, {"event": "start", "trainable": info["trainable"], "total": info["total"],
                                    "percent": info["percent"], "batch_sizes": sizes,
                                    "steps_per_epoch": steps_per_epoch, "processes": accelerator.num_processes})

    def checkpoint() -> None:
        accelerator.wait_for_everyone()
        if main:
            save_checkpoint(ckpt_dir, unwrapped, optimizer, scheduler, dict(position), preset.train.keep_checkpoints)

    device = accelerator.device
    window: dict[str, list[float]] = {}  # losses since the last log line, per task
    recent: dict[str, float] = {}  # the last loss per task, for the progress bar
    started = time.time()
    samples, last_log = 0, time.time()
    done_batches = position["epoch"] * steps_per_epoch + position["step_in_epoch"]
    finished = position["global_step"] >= total_updates
    pause_at = position["global_step"] + stop_after if stop_after else None
    paused = False
    last_val: dict = {}
    try:
        for epoch in range(position["epoch"], preset.train.epochs):
            if finished:
                break
            model.train()
            for step, (task, batch) in enumerate(loader.epoch(epoch, position["step_in_epoch"]),
                                                 start=position["step_in_epoch"]):
                batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
                with accelerator.autocast():
                    loss = model(batch)
                if not torch.isfinite(loss):
                    raise VlpetError(f"the {task} loss became {loss.item()} at epoch {epoch} step {step}; lower "
                                     f"train.lr or use train.precision=fp32 (last good checkpoint: "
                                     f"{latest_checkpoint(ckpt_dir) or 'none'})")
                accelerator.backward(loss / accum)
                done_batches += 1
                samples += batch["input_ids"].shape[0] * accelerator.num_processes
                window.setdefault(task, []).append(loss.item())
                last_in_epoch = step + 1 == steps_per_epoch
                if done_batches % accum == 0 or last_in_epoch:
                    if preset.train.clip_grad_norm:
                        accelerator.clip_grad_norm_(trainable, preset.train.clip_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    position["global_step"] += 1
                position.update(epoch=epoch, step_in_epoch=step + 1)
                lr = scheduler.get_last_lr()[0]
                rate = samples / max(time.time() - started, 1e-9)
                recent.update({t: v[-1] for t, v in window.items() if v})
                losses = " ".join(f"{t} {v:.3f}" for t, v in recent.items())
                reporter.update(done_batches, f"epoch {epoch + 1}/{preset.train.epochs} | {losses} | lr {lr:.1e} | "
                                              f"{rate:.0f} samples/s")
                if main and (time.time() - last_log > 5 or last_in_epoch):
                    for t, values in window.items():
                        if values:
                            append_jsonl(metrics_path, {"event": "train", "epoch": epoch, "step": done_batches,
                                                        "update": position["global_step"], "task": t,
                                                        "loss": sum(values) / len(values), "lr": lr,
                                                        "samples_per_s": rate})
                    window = {t: [] for t in window}
                    last_log = time.time()
                every = preset.train.checkpoint_every
                finished = position["global_step"] >= total_updates
                paused = pause_at is not None and position["global_step"] >= pause_at and not finished
                if not last_in_epoch and (finished or paused or (every and done_batches % (every * accum) == 0)):
                    checkpoint()
                if finished or paused:
                    break
            if paused and position["step_in_epoch"] < steps_per_epoch:
                break
            if position["step_in_epoch"] == steps_per_epoch:
                position.update(epoch=epoch + 1, step_in_epoch=0)
            if preset.eval.every and (epoch + 1) % preset.eval.every == 0 and position["step_in_epoch"] == 0:
                last_val = validate_and_keep_best(accelerator, unwrapped, tokenizer, preset, data.val, run_dir,
                                                  position, epoch, reporter)
            checkpoint()
            if paused:
                break
    finally:
        reporter.close()
    accelerator.wait_for_everyone()
    seconds = time.time() - started
    summary = {"run": str(run_dir), "updates": position["global_step"], "seconds": seconds,
               "trainable": info["trainable"], "total": info["total"], "percent": info["percent"],
               "validation": last_val, "paused": paused}
    if paused:
        reporter.print(f"paused after {position['global_step']} updates; continue with --resume")
        return TrainResult(summary, unwrapped)
    if main:
        size = save_adapter(run_dir / "adapter", unwrapped, preset)
        summary.update(adapter=str(run_dir / "adapter"), adapter_bytes=size)
        append_jsonl(metrics_path, {"event": "end", "updates": position["global_step"], "seconds": seconds,
                                    "adapter_bytes": size})
        from vlpet_cli.plots import plot_run

        try:
            plot_run(run_dir)
        except VlpetError as exc:
            reporter.print(f"no plot: {exc}")
    return TrainResult(summary, unwrapped)


def validate_and_keep_best(accelerator, model, tokenizer, preset, val_data, run_dir, position, epoch, reporter):
    """Score every task's validation split (main process), log it, and keep the best adapter."""
    from vlpet_cli.inference import best_score, validate
    from vlpet_cli.vl.state import save_adapter

    result: dict = {}
    if accelerator.is_main_process:
        result = validate(model, tokenizer, preset, val_data, progress=False)
        score = best_score(result, preset.eval.best_metric)
        append_jsonl(run_dir / "metrics.jsonl", {"event": "val", "epoch": epoch, "step": position["global_step"],
                                                 "metrics": result, "score": score})
        shown = "  ".join(f"{t}: " + ", ".join(f"{k} {v:.2f}" for k, v in m.items() if isinstance(v, float))
                          for t, m in result.items())
        reporter.print(f"epoch {epoch + 1} validation: {shown}  (selection score {score:.2f})")
        if position["best"] is None or score > position["best"]:
            position["best"] = score
            save_adapter(run_dir / "checkpoints" / "best", model, preset, {"epoch": epoch, "score": score})
    accelerator.wait_for_everyone()
    return result
