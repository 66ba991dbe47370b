"""Experiment trackers (`train.report_to`): Accelerate's trackers, logging into the run directory's logs/ folder.

TensorBoard writes its event files to RUN/logs/tensorboard/; MLflow a file store in RUN/logs/mlflow/ (or the
server MLFLOW_TRACKING_URI names); W&B its files in RUN/logs/wandb/ (to `wandb sync` later when WANDB_MODE=offline);
the other trackers Accelerate offers get RUN/logs/ as their directory. RUN/logs/trackers.json remembers which
trackers the run started, the MLflow run id and store, and the W&B run id, so that a resumed run goes on logging to
the same runs. metrics.jsonl stays the run's record (`vlpet report` and the plots read it); the trackers get:

    train/<task>/loss     the loss of every batch, at its batch number (metrics.jsonl's `step`)
    train/lr              the learning rate after every update
    train/grad_norm       the total gradient norm of every update, before clipping
    train/samples_per_s   at every log line
    val/<task>/<metric>   every validation metric, and val/score (the selection score)

and the resolved preset, flattened to dotted keys (train.lr, ...), as hyper-parameters. Only the main process logs.
"""

from __future__ import annotations

import importlib
import json
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlpet_cli.atomic import write_json
from vlpet_cli.errors import VlpetError
from vlpet_cli.extras import EXTRAS, MissingExtraError, require_extra

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from vlpet_cli.config import Preset

LOGS = "logs"
STATE = "trackers.json"
PROJECT = "vlpet"  # the MLflow experiment (MLFLOW_EXPERIMENT_NAME overrides it) and W&B project (WANDB_PROJECT)


def log_dir(run_dir: Path) -> Path:
    return Path(run_dir) / LOGS


def check_trackers(names: Sequence[str]) -> None:
    """Every tracker of train.report_to imports; a missing one is refused with the extra to install (tensorboard,
    mlflow, wandb), or for the other trackers Accelerate offers the package, before anything is loaded."""
    for name in names:
        if name in EXTRAS:
            require_extra(name)
            continue
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise MissingExtraError(f"logging to {name} (train.report_to) needs {name}, which does not import "
                                    f"({exc}); install it with: pip install {name}") from None


def read_state(run_dir: Path) -> dict:
    """RUN/logs/trackers.json ({} when absent)."""
    path = log_dir(run_dir) / STATE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise VlpetError(f"{path} is not readable JSON ({exc}); delete it to go on logging to new MLflow and W&B "
                         f"runs") from None
    return data if isinstance(data, dict) else {}


def build(names: Sequence[str], run_dir: Path, resume: bool = False) -> list[Any]:
    """What the Accelerator's `log_with` gets: TensorBoard, MLflow and W&B trackers placed in the run directory
    (a resumed run's MLflow and W&B runs continued), the other trackers by name. Nothing is written."""
    if not names:
        return []
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    state = read_state(run_dir) if resume else {}
    logs, name = log_dir(run_dir), Path(run_dir).name
    trackers: list[Any] = []
    for tracker in dict.fromkeys(names):
        if tracker == "tensorboard":
            trackers.append(TensorBoardTracker("tensorboard", str(logs)))
        elif tracker == "mlflow":
            trackers.append(MLflowTracker(PROJECT, run_id=state.get("mlflow", {}).get("run_id"), run_name=name))
        elif tracker == "wandb":
            run_id = state.get("wandb", {}).get("id") or secrets.token_hex(4)
            trackers.append(WandBTracker(os.environ.get("WANDB_PROJECT", PROJECT), name=name, dir=str(logs),
                                         id=run_id, resume="allow"))
        else:
            trackers.append(tracker)
    return trackers


def hyperparameters(preset: Preset) -> dict[str, bool | int | float | str]:
    """The resolved preset as {dotted key: value}; lists, mappings and None as JSON text."""
    flat: dict[str, bool | int | float | str] = {}

    def walk(tree: Any, prefix: str) -> None:
        if isinstance(tree, dict) and tree:
            for key, value in tree.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        else:
            flat[prefix] = tree if isinstance(tree, (bool, int, float, str)) else json.dumps(tree)

    walk(preset.model_dump(mode="json"), "")
    return flat


class Tracking:
    """The main process's logging to the run's trackers (`Accelerator.log`). Losses are handed over at log points,
    already read from the device; the updates' gradient norms stay on the device until then (one read for all)."""

    def __init__(self, accelerator: Accelerator, run_dir: Path) -> None:
        self.accelerator = accelerator
        self.run_dir = Path(run_dir)
        self.updates: list[tuple[int, float, torch.Tensor | None]] = []  # (batch, lr, grad norm) since the last log

    def start(self, preset: Preset, next_batch: int) -> None:
        """Start the trackers. `next_batch` (> 1 when resuming) is the first batch logged now: TensorBoard drops
        what an interrupted run logged from there on. The trackers this run has not started before get the
        hyper-parameters; trackers.json records them and the runs' ids."""
        logs = log_dir(self.run_dir)
        logs.mkdir(parents=True, exist_ok=True)
        state = read_state(self.run_dir)
        for tracker in self.accelerator.log_with:
            if getattr(tracker, "name", None) == "tensorboard" and next_batch > 1:
                tracker.init_kwargs["purge_step"] = next_batch
            if getattr(tracker, "name", None) == "mlflow":
                self._mlflow_store(state)
        try:
            self.accelerator.init_trackers(PROJECT)
        except Exception as exc:  # a tracker's own failure (not logged in, server unreachable) as one line
            self.accelerator.trackers = []  # not all of them started: none is finished
            raise VlpetError(f"train.report_to: a tracker did not start ({type(exc).__name__}: {exc}); fix its "
                             f"settings (W&B: `wandb login`, or WANDB_MODE=offline to log into {logs}) and start "
                             f"the run again with --overwrite, or leave the tracker out of train.report_to") from None
        started = set(state.get("started", []))
        params = hyperparameters(preset)
        for tracker in self.accelerator.trackers:
            if tracker.name not in started:
                tracker.store_init_configuration(params)
            started.add(tracker.name)
            if tracker.name == "mlflow":
                state["mlflow"] = {**state.get("mlflow", {}), "run_id": tracker.tracker.info.run_id}
            if tracker.name == "wandb":
                state["wandb"] = {"id": tracker.run.id, "project": tracker.run.project}
        state["started"] = sorted(started)
        write_json(logs / STATE, state)

    def _mlflow_store(self, state: dict) -> None:
        """Point MLflow at the run's store: the one it used before, else MLFLOW_TRACKING_URI, else a file store
        in RUN/logs/mlflow (MLflow 3 keeps file stores behind MLFLOW_ALLOW_FILE_STORE)."""
        import mlflow

        uri = (state.get("mlflow", {}).get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
               or (log_dir(self.run_dir) / "mlflow").resolve().as_uri())
        if uri.startswith("file:"):
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
        mlflow.set_tracking_uri(uri)
        state["mlflow"] = {**state.get("mlflow", {}), "tracking_uri": uri}

    def update(self, batch: int, lr: float | torch.Tensor, grad_norm: torch.Tensor | None,
               params: Sequence[torch.Tensor]) -> None:
        """Note an update made at `batch`; `grad_norm` is clipping's (None when train.clip_grad_norm is off: it is
        computed here, from the unscaled gradients)."""
        if grad_norm is None:
            import torch

            self.accelerator.unscale_gradients()  # fp16: the gradient scaler's factor out (its step skips this)
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        self.updates.append((batch, float(lr), grad_norm))

    def log_train(self, losses: dict[str, list[tuple[int, float]]], samples_per_s: float, batch: int) -> None:
        """Log the losses {task: [(batch, loss)]}, the updates noted since the last call and the throughput."""
        import torch

        by_step: dict[int, dict[str, float]] = {}
        for task, values in losses.items():
            for step, loss in values:
                by_step.setdefault(step, {})[f"train/{task}/loss"] = loss
        norms = [n for _, _, n in self.updates if n is not None]
        read = iter(torch.stack([n.float() for n in norms]).tolist() if norms else [])
        for step, lr, norm in self.updates:
            by_step.setdefault(step, {})["train/lr"] = lr
            if norm is not None:
                by_step[step]["train/grad_norm"] = next(read)
        by_step.setdefault(batch, {})["train/samples_per_s"] = samples_per_s
        for step in sorted(by_step):
            self.accelerator.log(by_step[step], step=step)
        self.updates = []

    def log_validation(self, result: dict, score: float, batch: int) -> None:
        """Every numeric validation metric as val/<task>/<metric>, and the selection score as val/score."""
        values = {f"val/{task}/{metric}": value for task, metrics in result.items()
                  for metric, value in metrics.items() if isinstance(value, (int, float))}
        self.accelerator.log({**values, "val/score": score}, step=batch)

    def finish(self) -> None:
        """Close the trackers (TensorBoard's writer, the MLflow and W&B runs)."""
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers = []
