"""The run directory: `config.yaml`, `metrics.jsonl`, resumable `checkpoints/step-N/`, and `checkpoints/best`.

A checkpoint holds the trainable tensors (`model.safetensors`), the optimizer moments and every random state
(`optimizer.safetensors`: CPU, each CUDA device when present, the data loaders' generators, numpy), and the loop
position, optimizer groups and scheduler (`state.json`), so `--resume` continues exactly where the run stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from vlpet_cli.artifacts import adapter_state, load_adapter_state
from vlpet_cli.atomic import append_line, staged_dir, write_failure_reason, write_json, write_text
from vlpet_cli.config import Preset
from vlpet_cli.errors import VlpetError
from vlpet_cli.presets import to_yaml, validate

if TYPE_CHECKING:
    from torch.optim.lr_scheduler import LRScheduler

    from vlpet_cli.vl.model import VLModel

MANIFEST = "files.json"  # sizes and sha256 of a checkpoint's other files, written last
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
BEST = "best"


@dataclass
class TrainState:
    """Where the training loop is: the next batch is `step_in_epoch` of `epoch`; `best` is the best val score."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best: float | None = None
    pending_validation: bool = False  # saved before an epoch's validation, so a failed best-adapter save loses nothing

    @classmethod
    def from_dict(cls, data: dict) -> TrainState:
        """Read the `progress` entry of a checkpoint's state.json (unknown keys from newer versions ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# ---- the run directory ------------------------------------------------------------------------------------
def write_config(run_dir: Path, preset: Preset) -> None:
    """config.yaml: the resolved preset the run was started with."""
    write_text(Path(run_dir) / CONFIG, to_yaml(preset))


def load_run_preset(run_dir: Path) -> Preset:
    """The resolved preset a run was started with (its config.yaml), to resume it."""
    path = Path(run_dir) / CONFIG
    if not path.exists():
        raise VlpetError(f"cannot resume: {run_dir} is not a run directory (no {CONFIG})")
    return validate(yaml.safe_load(path.read_text()), str(path))


def check_writable(run_dir: Path) -> None:
    """The runs directory (or, for a new one, its nearest existing parent) is a directory we can write in; checked
    before the model is built, with a probe file that is removed at once."""
    runs = Path(run_dir).parent
    probe = Path(run_dir) if Path(run_dir).is_dir() else runs
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise VlpetError(f"--runs-dir {runs}: {probe} is a file, not a directory; choose another --runs-dir")
    try:
        fd, name = tempfile.mkstemp(prefix=".vlpet-write-test-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise VlpetError(f"--runs-dir {runs}: cannot write in {probe} ({write_failure_reason(exc)}); choose a "
                         f"writable --runs-dir") from None


def read_events(run_dir: Path) -> list[dict]:
    """The events of metrics.jsonl (unreadable lines are skipped)."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def rewind_events(run_dir: Path, batches: int, state: TrainState) -> int:
    """Drop the train and val events logged after the checkpoint a resumed run continues from (the resumed run
    logs them again); returns how many were dropped. The file is rewritten atomically."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            kept.append(line)
            continue
        kind = event.get("event")
        after = (kind == "train" and event.get("step", 0) > batches) or (kind == "val" and (
            event.get("step", 0) > state.global_step
            or (event.get("step") == state.global_step and state.pending_validation)))
        if after:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        write_text(path, "".join(f"{line}\n" for line in kept))
    return dropped


def append_event(run_dir: Path, record: dict) -> None:
    """Append one event to metrics.jsonl, the run's record of truth, as one whole line."""
    append_line(Path(run_dir) / METRICS, json.dumps(record))


def checkpoints_dir(run_dir: Path) -> Path:
    """Where the resumable step-N checkpoints (and `best`) are kept."""
    return Path(run_dir) / CHECKPOINTS


def best_dir(run_dir: Path) -> Path:
    """Where the adapter with the best validation score is kept."""
    return checkpoints_dir(run_dir) / BEST


# ---- random states ----------------------------------------------------------------------------------------
def rng_tensors(generators: dict[str, torch.Generator] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Every random state as (tensors, JSON): torch CPU, each CUDA device when CUDA is present, the named
    generators (data loaders), numpy's and Python's global generators."""
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = state
    for name, gen in (generators or {}).items():
        tensors[f"rng/generator/{name}"] = gen.get_state()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng/numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, py_gauss = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)], "python": [version, list(internal), py_gauss]}
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict | None,
                generators: dict[str, torch.Generator] | None = None) -> None:
    """Set every random state rng_tensors saved; states a checkpoint lacks (older versions) are left alone."""
    if "rng/torch" in tensors:
        torch.set_rng_state(tensors["rng/torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng/cuda/")),
                                       key=lambda k: int(k.rsplit("/", 1)[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    for name, gen in (generators or {}).items():
        if f"rng/generator/{name}" in tensors:
            gen.set_state(tensors[f"rng/generator/{name}"])
    meta = meta or {}
    if "numpy" in meta and "rng/numpy" in tensors:
        kind, pos, has_gauss, gauss = meta["numpy"]
        np.random.set_state((kind, tensors["rng/numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "python" in meta:
        version, internal, gauss = meta["python"]
        random.setstate((version, tuple(internal), gauss))


# ---- checkpoints ------------------------------------------------------------------------------------------
def _step_of(path: Path) -> int:
    return int(path.name.split("-")[1])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """files.json: size and sha256 of every other file of a checkpoint, to detect damage before resuming."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST)
    write_json(directory / MANIFEST, {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files})


def damage(directory: Path) -> str | None:
    """Why a checkpoint cannot be trusted (a missing, resized or changed file), or None when it is intact.
    Checkpoints written before manifests existed are trusted when their state.json is there."""
    if not (directory / "state.json").is_file():
        return "state.json is missing"
    path = directory / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except ValueError:
        return f"{MANIFEST} is not valid JSON"
    for name, want in manifest.items():
        file = directory / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != want["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, {want['bytes']} were written"
        if _sha256(file) != want["sha256"]:
            return f"{name} does not match the sha256 recorded when it was written"
    return None


class Checkpointer:
    """Saves and restores the full resumable state of a run under `<run>/checkpoints/step-N/`, keeping `keep`."""

    def __init__(self, run_dir: Path, keep: int):
        self.directory = checkpoints_dir(run_dir)
        self.keep = keep

    def steps(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        found = [p for p in self.directory.glob("step-*") if p.name[5:].isdigit() and (p / "state.json").exists()]
        return sorted(found, key=_step_of)

    def latest(self) -> Path | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def latest_intact(self) -> tuple[Path | None, list[tuple[Path, str]]]:
        """The newest checkpoint whose files match their manifest, and the newer damaged ones with the reason."""
        candidates = sorted((p for p in self.directory.glob("step-*") if p.is_dir() and p.name[5:].isdigit()),
                            key=_step_of, reverse=True)
        damaged: list[tuple[Path, str]] = []
        for path in candidates:
            why = damage(path)
            if why is None:
                return path, damaged
            damaged.append((path, why))
        return None, damaged

    def save(self, model: VLModel, optimizer: torch.optim.Optimizer, scheduler: LRScheduler, state: TrainState,
             generators: dict[str, torch.Generator] | None = None) -> Path:
        """checkpoints/step-N/: trainable tensors, optimizer moments, scheduler, every RNG and the loop position."""
        final = self.directory / f"step-{state.global_step}"
        with staged_dir(final) as tmp:
            save_file(adapter_state(model), str(tmp / "model.safetensors"))
            opt = optimizer.state_dict()
            tensors = {f"{i}/{k}": v.contiguous() for i, st in opt["state"].items() for k, v in st.items()}
            rng, rng_meta = rng_tensors(generators)
            tensors.update(rng)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            progress = asdict(state)
            if not progress["pending_validation"]:  # only written when set, so other checkpoints keep their format
                del progress["pending_validation"]
            write_json(tmp / "state.json", {"progress": progress, "param_groups": opt["param_groups"],
                                            "scheduler": scheduler.state_dict(), "rng": rng_meta})
            write_manifest(tmp)
        steps = sorted((p for p in self.directory.glob("step-*") if p.is_dir() and p.name[5:].isdigit()),
                       key=_step_of)
        for old in steps[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def progress(self, path: Path) -> TrainState:
        """The loop position a checkpoint holds (read without loading its tensors)."""
        return TrainState.from_dict(json.loads((path / "state.json").read_text())["progress"])

    def load(self, path: Path, model: VLModel, optimizer: torch.optim.Optimizer, scheduler: LRScheduler,
             generators: dict[str, torch.Generator] | None = None) -> TrainState:
        """Restore everything save() wrote into the given objects; returns the loop position."""
        load_adapter_state(model, load_file(str(path / "model.safetensors")), str(path))
        meta = json.loads((path / "state.json").read_text())
        tensors = load_file(str(path / "optimizer.safetensors"))
        opt_state: dict = {}
        for key, value in tensors.items():
            if key.startswith("rng/"):
                continue
            i, name = key.split("/", 1)
            opt_state.setdefault(int(i), {})[name] = value
        optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
        scheduler.load_state_dict(meta["scheduler"])
        restore_rng(tensors, meta.get("rng"), generators)
        return TrainState.from_dict(meta["progress"])
