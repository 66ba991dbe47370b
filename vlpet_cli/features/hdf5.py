"""What the image and video feature stores share (features/images.py, features/videos.py): the lazily opened
HDF5 handle, attribute reading, the settings check of a resumed writer and the missing-id scan."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlpet_cli.errors import DataError

if TYPE_CHECKING:
    from typing_extensions import Self


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


class H5Handle:
    """What the image and video stores share: `path`, an HDF5 handle opened lazily per process (re-opened after a
    fork) and dropped when pickled, so data-loader workers open their own."""

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
    seen: set[str] = set()
    out = []
    for img_id in ids:
        if img_id not in seen:
            seen.add(img_id)
            if img_id not in store:
                out.append(img_id)
    return out


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
