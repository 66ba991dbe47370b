"""What every feature store shares with the others: the lazily opened HDF5 handle, attribute reading, the settings
check of a resumed writer, the missing-id scan, and what a writer does when the disk fills up (the space
reserve that lets an HDF5 file close cleanly, and the one-line `DiskFull` error)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlpet_cli.errors import DataError, VlpetError

if TYPE_CHECKING:
    from typing_extensions import Self

DTYPES = ("float16", "float32")
CHUNK_CACHE = 1 << 20  # HDF5's raw-data chunk cache per dataset: what a failed write may leave unwritten
RESERVE = 2 * CHUNK_CACHE  # kept free while a packed file is written, so that it can close after a full disk


def _plain(value: Any) -> Any:
    """HDF5 attribute value -> JSON-friendly python value."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value


def read_attrs(attrs: Any) -> dict:
    """HDF5 attribute manager -> plain dict of JSON-friendly values (arrays as lists, bytes as str)."""
    return {key: _plain(attrs[key]) for key in attrs}


def json_attrs(attrs: dict) -> dict:
    """Attributes as they read back (tuples -> lists; None left out, HDF5 cannot hold it), so a resumed writer
    compares like with like."""
    return json.loads(json.dumps({key: value for key, value in attrs.items() if value is not None}))


def check_dtype(dtype: str) -> str:
    """DataError for a dtype the stores do not write."""
    if dtype not in DTYPES:
        raise DataError(f"unsupported feature dtype '{dtype}'; use one of {', '.join(DTYPES)}.")
    return dtype


class H5Handle:
    """What the stores share: `path`, an HDF5 handle opened lazily per process (re-opened after a fork) and
    dropped when pickled, so data-loader workers open their own."""

    path: Path
    _h5: Any = None
    _pid: int | None = None

    def _file(self) -> Any:
        """The packed file's handle for this process, opened on first use and re-opened after a fork."""
        if self._h5 is None or self._pid != os.getpid():
            import h5py

            self._h5 = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._h5

    def close(self) -> None:
        """Close this process's HDF5 handle, if any."""
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5, self._pid = None, None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_h5"], state["_pid"] = None, None
        return state


def missing_ids(store: Any, ids: Iterable[str]) -> list[str]:
    """The ids (first occurrence order, no repeats) that have no features in the store (image or video)."""
    return [item_id for item_id in dict.fromkeys(ids) if item_id not in store]


def check_same(path: Path, found: dict, wanted: dict) -> None:
    """DataError when an existing store was written with different settings than this run."""
    diffs = [
        f"{key}={found[key]!r} (this run: {wanted[key]!r})"
        for key in wanted
        if key in found and found[key] != wanted[key]
    ]
    if diffs:
        raise DataError(
            f"{path}: existing features were written with different settings: {'; '.join(diffs)}. "
            f"Use a new --out, or repeat the run with the same settings to resume it."
        )


# ------------------------------------------------------------------------------------------------------------
# A full disk
# ------------------------------------------------------------------------------------------------------------

class DiskFull(VlpetError):
    """The disk holding a store filled up; what was written before stays, and a re-run resumes."""

    def __init__(self, message: str, path: Path):
        super().__init__(message)
        self.path = Path(path)


def is_disk_full(exc: BaseException) -> bool:
    """An OSError for a full disk or quota, or HDF5's report of one (h5py raises it as RuntimeError too)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, (OSError, RuntimeError)) and ("errno = 28," in str(exc) or "No space left" in str(exc))


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def free_bytes(path: Path) -> int | None:
    """Free space on the disk holding `path` (its nearest existing folder); None when it cannot be told."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def disk_full(path: Path, kept: int, noun: str) -> DiskFull:
    """The error a writer raises when the disk fills: which store, what it keeps, how to go on (the extraction
    loop says more: how many this run wrote and about how much space the rest needs)."""
    return DiskFull(f"{path}: the disk is full; the {kept} {noun}s already in the store are kept and valid. Free "
                    f"some space and run the same command again to resume.", path)


class Reserve:
    """Space held on a disk while a packed HDF5 file is written there: an unnamed file of RESERVE bytes, released
    when the disk fills so that HDF5 can write what it still holds and close the file in a valid state (without
    it, a full disk leaves HDF5 unable to close the file and the process crashing at exit). The file has no name,
    so nothing is left behind even when the process is killed."""

    def __init__(self, folder: Path, size: int = RESERVE):
        self._fh: Any = None
        try:
            self._fh = tempfile.TemporaryFile(dir=folder)
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(self._fh.fileno(), 0, size)
            else:
                self._fh.write(b"\0" * size)
                self._fh.flush()
                os.fsync(self._fh.fileno())
        except OSError:
            self.release()
            raise

    def release(self) -> None:
        """Give the space back (idempotent)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
