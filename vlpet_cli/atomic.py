"""Atomic writes: a reader sees the old file or the new one, never half of one (temp file + rename)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from vlpet_cli.errors import VlpetError


class WriteError(VlpetError):
    """A file could not be written (disk full, read-only, permissions); the previous version is intact."""

    def __init__(self, path: Path, exc: BaseException):
        self.path = Path(path)
        self.reason = write_failure_reason(exc)
        super().__init__(f"cannot write {path}: {self.reason}")


def write_failure_reason(exc: BaseException) -> str:
    """The OS's words for a failed write: strerror of an OSError, or the message inside a SafetensorError."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    found = re.search(r'message: "([^"]+)"', str(exc))
    return found.group(1) if found else str(exc)


def _is_write_failure(exc: BaseException) -> bool:
    """OSError, or safetensors' wrapper of one (its writer reports I/O errors as SafetensorError)."""
    return isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError"


def write_text(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (the temp file sits beside it, so the rename stays on one disk)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if _is_write_failure(exc):
            raise WriteError(path, exc) from exc
        raise


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary file handle whose content replaces `path` when the block succeeds (for writers that want a file
    object, like matplotlib's savefig); on failure the old file stays and the temp file is removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data) -> None:
    """Write JSON atomically."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False))


def append_line(path: Path, line: str) -> None:
    """Append one line with a single O_APPEND write, so the file only ever grows by whole lines (a log that a
    reader or a crash never sees half of)."""
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as exc:
        raise WriteError(path, exc) from exc
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except OSError as exc:
        raise WriteError(path, exc) from exc
    finally:
        os.close(fd)


def atomic_dir(final: Path):
    """A temp directory beside `final`; call commit() to move it into place (replacing any old one)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))

    def commit() -> None:
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)

    return tmp, commit


@contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """A temp directory beside `final` that replaces it when the block succeeds; on any failure it is removed
    and `final` is left as it was (a failed write, e.g. a full disk, raises WriteError naming `final`)."""
    final = Path(final)
    try:
        tmp, commit = atomic_dir(final)
    except OSError as exc:
        raise WriteError(final, exc) from exc
    try:
        yield tmp
        commit()
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_write_failure(exc):
            raise WriteError(final, exc) from exc
        raise


@contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block ends, so that files written together (an evaluation's per-task
    files) are never left half-written; the first signal received is delivered then. A no-op outside the main
    thread, and for a signal this process ignores."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous = {sig: handler for sig, handler in previous.items() if handler not in (None, signal.SIG_IGN)}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received:
            signal.raise_signal(received[0])
