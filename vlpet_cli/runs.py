"""The run directory: `config.yaml`, `metrics.jsonl`, resumable `checkpoints/step-N/`, `checkpoints/best`, the
final `adapter/` and `eval/`; what a path given to a command means (`locate`); and the writer's lock.

A checkpoint holds the trainable tensors (`model.safetensors`), the optimizer moments and every random state
(`optimizer.safetensors`: CPU, each CUDA device when present, the data loaders' generators, numpy), and the loop
position, optimizer groups and scheduler (`state.json`), so `--resume` continues exactly where the run stopped.

torch, numpy and safetensors are imported inside the functions that need them, so that reading a run (`vlpet
report`, the plots) stays cheap.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from vlpet_cli.atomic import append_line, staged_dir, write_failure_reason, write_json, write_text
from vlpet_cli.config import Preset
from vlpet_cli.errors import VlpetError, file_error
from vlpet_cli.layout import ADAPTER, BEST, CHECKPOINTS, CONFIG, METRICS, Located, is_run, place
from vlpet_cli.presets import read_yaml, to_yaml, validate

if TYPE_CHECKING:
    import torch
    from filelock import BaseFileLock
    from torch.optim.lr_scheduler import LRScheduler

    from vlpet_cli.vl.model import VLModel

MANIFEST = "files.json"  # sizes and sha256 of a checkpoint's other files, written last
LOCK = ".lock"  # held by the process writing the run (train); removed when it ends
HOLDER = ".lock.json"  # who holds the lock: pid, host, command, since


@dataclass
class TrainState:
    """Where the training loop is: the next batch is `step_in_epoch` of `epoch`; `best` is the best val score."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best: float | None = None
    pending_validation: bool = False  # saved before an epoch's validation, so a failed best-adapter save loses nothing
    grad_scaler: dict | None = None  # train.precision=fp16: the gradient scaler's state (loss scale, growth tracker)

    @classmethod
    def from_dict(cls, data: dict) -> TrainState:
        """Read the `progress` entry of a checkpoint's state.json (unknown keys from newer versions ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# ---- the run directory ------------------------------------------------------------------------------------
def write_config(run_dir: Path, preset: Preset) -> None:
    """config.yaml: the resolved preset the run was started with."""
    write_text(Path(run_dir) / CONFIG, to_yaml(preset))


def read_config(run_dir: Path) -> dict:
    """The run's resolved preset (config.yaml) as a dict; {} when the file is absent."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        return {}
    data = read_yaml(path, "restore it from the preset with `vlpet presets show`")
    if not isinstance(data, dict):
        raise VlpetError(f"{path} does not hold a preset mapping; restore it from the preset with "
                         f"`vlpet presets show`")
    return data


def load_run_preset(run_dir: Path) -> Preset:
    """The resolved preset a run was started with (its config.yaml), to resume it."""
    path = Path(run_dir) / CONFIG
    if not path.exists():
        raise VlpetError(f"cannot resume: {run_dir} is not a run directory (no {CONFIG})")
    return validate(read_config(run_dir), str(path))


def check_writable(target: Path, option: str = "--runs-dir", shown: Path | None = None) -> None:
    """`target` (a directory to write in, or to create) can be written: probed in it, or for a new one in its
    nearest existing parent, with a file that is removed at once; checked before anything expensive. The error
    names `option` with `shown` (default: target)."""
    target = Path(target)
    shown = target if shown is None else shown
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise VlpetError(f"{option} {shown}: {probe} is a file, not a directory; choose another {option}")
    try:
        fd, name = tempfile.mkstemp(prefix=".vlpet-write-test-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise VlpetError(f"{option} {shown}: cannot write in {probe} ({write_failure_reason(exc)}); choose a "
                         f"writable {option}") from None


def check_runs_dir(run_dir: Path) -> None:
    """The runs directory of a run can be written in (the run directory itself, when it exists)."""
    run_dir = Path(run_dir)
    check_writable(run_dir if run_dir.is_dir() else run_dir.parent, "--runs-dir", run_dir.parent)


def read_events(run_dir: Path) -> list[dict]:
    """The events of a run's metrics.jsonl, in order ([] when there is none). Lines that do not parse, such as a
    truncated last line after a crash, are skipped."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    events = []
    try:
        f = path.open(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise file_error(exc, writing=False) from None
    with f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                events.append(record)
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


# ---- what a path given to eval, predict or merge means ------------------------------------------------------
def locate(path: Path) -> Located:
    """What a path means to `vlpet eval`, `predict` and `merge`: a run directory means its final adapter/ (a run
    without one is refused, saying whether it is training now), RUN/checkpoints/best the best-validation adapter;
    anything else is loaded as it is (adapter, bundle or folded model)."""
    from vlpet_cli.artifacts import ADAPTER_CONFIG

    path = Path(path)
    if not path.exists():
        raise VlpetError(f"{path} does not exist; give a run directory (runs/<name>), an adapter, a bundle or a "
                         f"folded model")
    if is_run(path):
        if (path / ADAPTER / ADAPTER_CONFIG).is_file():
            return Located(path / ADAPTER, path)
        raise VlpetError(unfinished(path))
    located = place(path)  # a run's adapter/ or checkpoints/best, or a directory of its own
    if located.run is not None:
        return located
    if path.parent.name == CHECKPOINTS and is_run(path.parent.parent):
        raise VlpetError(f"{path} is a resumable training checkpoint, not an adapter; give the run "
                         f"{path.parent.parent} (its final adapter) or {path.parent / BEST} (its best validation "
                         f"adapter)")
    if (path / ADAPTER / ADAPTER_CONFIG).is_file() and not (path / ADAPTER_CONFIG).is_file():
        return Located(path / ADAPTER, path)  # a run directory copied without its config.yaml
    return Located(path)


def unfinished(run_dir: Path) -> str:
    """Why a run has no final adapter yet (training now, or stopped), and what to use instead."""
    from vlpet_cli.artifacts import ADAPTER_CONFIG

    run_dir = Path(run_dir)
    best = best_dir(run_dir)
    instead = f", or use its best validation adapter {best}" if (best / ADAPTER_CONFIG).is_file() else ""
    who = holder(run_dir)
    if who is not None:
        return (f"{run_dir} is a run without a final adapter yet: it is training now ({describe_holder(who)}); "
                f"wait for it to finish{instead}")
    return (f"{run_dir} is a run without a final adapter: its training stopped before the end; finish it with "
            f"`vlpet train --resume --name {run_dir.name} --runs-dir {run_dir.parent}`{instead}")


def recorded_path(value: str, run: Path | None, what: str, option: str, required: bool = True) -> str:
    """A path a run recorded, as found from here. Runs record absolute paths; older ones recorded the path as
    typed, relative to the directory they were started in, which is looked for from the current directory and
    from the runs directory's parent (where `vlpet train` usually runs). Not found: an error saying where it was
    looked for and which option gives it (`required`), else `value` unchanged."""
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists():
        return value
    tried = [Path.cwd() / path]
    if run is not None:
        tried.append(Path(run).resolve().parent.parent / path)
    for candidate in tried[1:]:
        if candidate.exists():
            return str(candidate)
    if not required:
        return value
    where = f"the run {run}" if run is not None else "the adapter"
    raise VlpetError(f"{where} recorded its {what} as the relative path '{value}' (relative to the directory it "
                     f"was started in), which is not at {' nor at '.join(map(str, dict.fromkeys(tried)))}; pass "
                     f"{option} with its location")


# ---- the writer's lock --------------------------------------------------------------------------------------
def describe_holder(info: dict) -> str:
    """'pid 123 on host, vlpet train, since 2025-01-01 12:00:00' from a holder record."""
    parts = [f"pid {info.get('pid', '?')}"]
    if info.get("host") and info.get("host") != socket.gethostname():
        parts[0] += f" on {info['host']}"
    if info.get("command"):
        parts.append(str(info["command"]))
    if info.get("since"):
        parts.append(f"since {info['since']}")
    return ", ".join(parts)


def _read_holder(run_dir: Path) -> dict:
    try:
        info = json.loads((Path(run_dir) / HOLDER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def holder(run_dir: Path) -> dict | None:
    """Who holds the run's lock ({} when it does not say), or None when no process does."""
    from filelock import FileLock, Timeout

    path = Path(run_dir) / LOCK
    if not path.exists():
        return None
    probe = FileLock(str(path))
    try:
        probe.acquire(timeout=0)
    except Timeout:
        return _read_holder(run_dir)
    except OSError:  # a lock file we may not open (another user's run): it says nothing about a holder
        return None
    probe.release()
    return None


class RunLock:
    """The lock of the one process that writes a run directory (`vlpet train`, new, --overwrite or --resume).
    A second writer is refused with one line naming the run and the holder. The lock file and the holder record
    live in the run directory while it is held and are removed when it is released."""

    def __init__(self, run_dir: Path, command: str = "vlpet train"):
        self.run_dir = Path(run_dir)
        self.command = command
        self._lock: BaseFileLock | None = None

    def acquire(self) -> RunLock:
        from filelock import FileLock, Timeout

        self.run_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.run_dir / LOCK))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise VlpetError(in_use(self.run_dir, _read_holder(self.run_dir))) from None
        self._lock = lock
        write_json(self.run_dir / HOLDER, {"pid": os.getpid(), "host": socket.gethostname(),
                                           "command": self.command,
                                           "since": time.strftime("%Y-%m-%d %H:%M:%S")})
        return self

    def release(self) -> None:
        if self._lock is None:
            return
        for name in (HOLDER, LOCK):  # removed while still held, so no other process finds a stale record
            (self.run_dir / name).unlink(missing_ok=True)
        self._lock.release()
        self._lock = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def in_use(run_dir: Path, info: dict) -> str:
    """The refusal of a second writer."""
    who = describe_holder(info) if info else "another process"
    stop = f" (or stop it: kill -INT {info['pid']})" if info.get("pid") else ""
    return (f"run {run_dir} is in use by {who}; wait for it to finish{stop}, or choose another --name")


def check_not_in_use(run_dir: Path) -> None:
    """Refuse at once, before anything expensive, a run that another process is writing."""
    info = holder(run_dir)
    if info is not None:
        raise VlpetError(in_use(run_dir, info))


def clear_run_dir(run_dir: Path) -> None:
    """Empty a run directory for --overwrite, keeping the lock this process holds."""
    for child in Path(run_dir).iterdir():
        if child.name in (LOCK, HOLDER):
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def run_contents(run_dir: Path) -> list[Path]:
    """What a run directory holds apart from its lock."""
    run_dir = Path(run_dir)
    return [p for p in run_dir.iterdir() if p.name not in (LOCK, HOLDER)] if run_dir.is_dir() else []


# ---- random states ----------------------------------------------------------------------------------------
def rng_tensors(generators: dict[str, torch.Generator] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Every random state as (tensors, JSON): torch CPU, each CUDA device when CUDA is present, the named
    generators (data loaders), numpy's and Python's global generators."""
    import numpy as np
    import torch

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
    import numpy as np
    import torch

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
        from safetensors.torch import save_file

        from vlpet_cli.artifacts import adapter_state

        final = self.directory / f"step-{state.global_step}"
        with staged_dir(final) as tmp:
            save_file(adapter_state(model), str(tmp / "model.safetensors"))
            opt = optimizer.state_dict()
            tensors = {f"{i}/{k}": v.contiguous() for i, st in opt["state"].items() for k, v in st.items()}
            rng, rng_meta = rng_tensors(generators)
            tensors.update(rng)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            progress = asdict(state)
            for key in ("pending_validation", "grad_scaler"):  # only written when set: other checkpoints keep their
                if not progress[key]:  # format
                    del progress[key]
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
        from safetensors.torch import load_file

        from vlpet_cli.artifacts import load_adapter_state

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
