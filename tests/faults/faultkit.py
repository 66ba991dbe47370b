"""What the fault tests share: running `vlpet` in this process or as the installed console script (as a user
without root's rights where a test needs file permissions to hold), the one-line error check, and small worlds
built in a moment (a run directory with an untrained adapter, an NLVR2 data root of a few records)."""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

VLPET = Path(sys.executable).parent / "vlpet"  # the console script `pip install` made
FEAT = 64  # feature size of the small worlds (the toy world's too)


def vlpet(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """Run the `vlpet` entry point in this process: (exit code, stdout, stderr)."""
    from vlpet_cli.cli import main

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["vlpet", *map(str, args)])
    monkeypatch.setenv("COLUMNS", "400")
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def console_env(**extra) -> dict:
    """The environment of a console-script run: this checkout's code, offline, one thread, wide lines."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "300",
            **extra}


def console(*args, cwd: Path | None = None, unprivileged: bool = False, timeout: float = 300,
            **env) -> subprocess.CompletedProcess:
    """Run the installed `vlpet` console script; `unprivileged` runs it as a user without root's rights."""
    command = [*(as_unprivileged() if unprivileged else []), str(VLPET), *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=console_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def as_unprivileged() -> list[str]:
    """The prefix that drops root's rights (root reads any file whatever its mode); [] for other users."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: file permissions cannot be tested")
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


@contextmanager
def shared_dir():
    """A temporary directory the unprivileged user can enter (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="vlpet-faults-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for p in [path, *path.rglob("*")]:
            if not p.is_symlink():
                p.chmod(0o755 if p.is_dir() else 0o644)
        shutil.rmtree(path, ignore_errors=True)


def open_to_all(directory: Path) -> None:
    """Let every user read everything under `directory` (the atomic writers make private temp directories)."""
    for p in [directory, *Path(directory).rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)


def one_line_error(code: int, err: str, *needles: str) -> str:
    """Exit 2 and a single `error:` line (no traceback) holding every needle; returns the line."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under `directory` with its sha256 (to show a refused command changed nothing)."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def hidden(directory: Path) -> list[str]:
    """Hidden files or directories (temp files of the atomic writers, lock files) anywhere under `directory`."""
    return [str(p) for p in Path(directory).rglob(".*")]


# ---- simulated file-system faults (root ignores file modes, so these patch the calls) ------------------------
def unreadable(monkeypatch, *paths: Path) -> None:
    """Opening any of `paths` fails with EACCES, as a file without read permission does."""
    denied = {str(Path(p).resolve()) for p in paths}
    real = io.open

    def guarded(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and str(Path(os.fsdecode(file)).resolve()) in denied:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(file))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", guarded)
    monkeypatch.setattr(builtins, "open", guarded)


def read_only(monkeypatch, under: Path) -> None:
    """Everything under `under` behaves as a read-only mount: creating or writing a file or directory fails with
    EROFS."""
    real_open, real_mkdir, real_io_open = os.open, os.mkdir, io.open
    under = str(Path(under).resolve())

    def refuse(path) -> None:
        if str(Path(os.fsdecode(path)).absolute()).startswith(under):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

    def fake_io_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and set(mode) & set("wax+"):
            refuse(file)
        return real_io_open(file, mode, *args, **kwargs)

    def fake_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        refuse(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)
    monkeypatch.setattr(io, "open", fake_io_open)
    monkeypatch.setattr(builtins, "open", fake_io_open)


def no_model(monkeypatch) -> None:
    """Building a model fails the test: what is checked must be checked before the model loads."""
    import importlib

    for module in ("vlpet_cli.artifacts", "vlpet_cli.train"):  # their `from ... import build_model` binds the real one
        importlib.import_module(module)

    def fail(*args, **kwargs):
        pytest.fail("the model was built before the fault was found")

    for where in ("vlpet_cli.vl.model.build_model", "vlpet_cli.train.build_model", "vlpet_cli.artifacts.build_model"):
        monkeypatch.setattr(where, fail)


# ---- small worlds ------------------------------------------------------------------------------------------
def nlvr_root(root: Path, train: int = 6, val: int = 2, test: int = 2) -> Path:
    """An NLVR2 data root of a few records and their packed features (64-d, 49 tokens), made in a moment."""
    import numpy as np

    from vlpet_cli.features.kinds import IMAGE

    folder = root / "nlvr"
    folder.mkdir(parents=True, exist_ok=True)
    ids = []
    for split, n in (("train", train), ("valid", val), ("test", test)):
        records = [{"identifier": f"{split}-{i}-0", "img0": f"{split}-{i}-img0", "img1": f"{split}-{i}-img1",
                    "label": i % 2, "sent": "The left image contains a red circle.", "uid": f"nlvr2_{split}_{i}"}
                   for i in range(n)]
        (folder / f"{split}.json").write_text(json.dumps(records))
        ids += [r[k] for r in records for k in ("img0", "img1")]
    store = folder / "clip_features" / "data_clip_RN101_att.h5"
    store.parent.mkdir(parents=True, exist_ok=True)
    writer = IMAGE.writer(store, "packed", (49, FEAT), "float16", {"model": "tiny-clip", "layer": -1})
    rng = np.random.default_rng(0)
    writer.add(ids, rng.standard_normal((len(ids), 49, FEAT)).astype("float32"))
    writer.close()
    return root


def untrained_run(run: Path, data_root: Path | str, *overrides: str) -> Path:
    """A run directory as `vlpet train` leaves it (config.yaml, metrics.jsonl, adapter/, checkpoints/best), with
    an untrained vlpet-small adapter on tiny-bart for nlvr: enough to evaluate, predict and merge."""
    import torch

    from vlpet_cli.artifacts import save_adapter
    from vlpet_cli.presets import resolve
    from vlpet_cli.runs import append_event, best_dir, write_config
    from vlpet_cli.vl.model import build_model

    preset = resolve("vlpet-small", ["data.tasks=[nlvr]", f"data.data_root={data_root}", f"model.feat_dim={FEAT}",
                                     "eval.every=1", *overrides], "tiny-bart")
    torch.manual_seed(0)
    model, _ = build_model(preset, weights=True)
    run.mkdir(parents=True)
    write_config(run, preset)
    append_event(run, {"event": "start", "trainable": 1, "total": 100, "percent": 1.0})
    save_adapter(best_dir(run), model, preset, {"epoch": 0, "score": 50.0})
    save_adapter(run / "adapter", model, preset)
    return run
