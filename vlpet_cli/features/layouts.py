"""What the four on-disk layouts of a feature store share, read and written.

Two shapes of layout hold every kind of features: a *packed* HDF5 file (dataset `features`, all rows of all ids,
and dataset `ids`, utf-8, the valid ids being the first len(ids) non-empty ones) and a *folder* of one file per id
(`<id>.h5` or `<id>.npz`). `PackedStore` and `FolderStore` read them; `PackedWriter` and `FolderWriter` write them
so that an interrupted run loses at most what it was writing: a packed writer flushes an item's rows before its id,
a folder writer writes each file under a temporary name and renames it. The kinds of features (images.py,
videos.py) say what a row is and how stored features become the model's input; `MemoryStore` holds features
computed in memory (`vlpet predict`) behind the same interface.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, ClassVar

from vlpet_cli.errors import DataError
from vlpet_cli.features.hdf5 import (
    CHUNK_CACHE,
    RESERVE,
    H5Handle,
    Reserve,
    check_dtype,
    check_same,
    disk_full,
    is_disk_full,
    json_attrs,
    read_attrs,
)

if TYPE_CHECKING:
    import numpy as np
    from typing_extensions import Self

TMP_SUFFIX = ".tmp"


class Store(H5Handle):
    """Read-only view of one feature store; picklable (paths and index only, HDF5 handles opened per process).

    A kind of features (images.py, videos.py) sets `kind`, `noun` (what an id names, for messages) and `inputs`
    (how `vlpet extract-features` is given them), and adds `get` and `visual`."""

    kind: ClassVar[str]
    layout: ClassVar[str]
    noun: ClassVar[str]
    inputs: ClassVar[str]

    def __init__(self, path: Path):
        self.path = Path(path)
        self._row: tuple[int, ...] | None = None  # shape of one stored row: (n_tokens, dim) an image, (dim,) a frame
        self._dtype: str | None = None
        self._attrs: dict | None = None

    def ids(self) -> list[str]:
        """All ids in the store."""
        raise NotImplementedError

    @staticmethod
    def describe(info: dict) -> list[str]:
        """`features inspect`'s lines for this kind's `summary()` figures."""
        raise NotImplementedError

    def __contains__(self, item_id: object) -> bool:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.ids())

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids())

    def _missing(self, item_id: str) -> DataError:
        return DataError(
            f"{self.path}: no features for {self.noun} '{item_id}'. Extract them with `vlpet extract-features "
            f"{self.inputs} --out {self.path}` (those already there are skipped), or check --data-root."
        )

    def _meta(self) -> None:
        """Read the dtype, row shape and attributes if not known yet (a folder reads them from its files)."""

    @property
    def dtype(self) -> str:
        """Stored dtype name (float16 or float32)."""
        self._meta()
        return self._dtype or ""

    @property
    def attrs(self) -> dict:
        """Recorded attributes (model, dtype, ...) when the writer stored them; {} for the reference's files."""
        self._meta()
        return dict(self._attrs or {})

    @property
    def dim(self) -> int | None:
        """Feature size (2048 for RN101 grids, a CLIP's width); None for an empty folder that records none."""
        self._meta()
        return int(self._row[-1]) if self._row else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


class PackedStore(Store):
    """One HDF5 file holding every id: `features`, `ids` and the kind's own datasets (`index_datasets`)."""

    layout = "packed"
    datasets: ClassVar[tuple[str, ...]]
    other: ClassVar[str]  # the other layout, for messages
    kind_words: ClassVar[str] = "feature"

    def __init__(self, path: Path):
        super().__init__(path)
        import h5py

        try:
            with h5py.File(self.path, "r") as f:
                if not all(key in f for key in self.datasets):
                    names = ", ".join(f"'{key}'" for key in self.datasets)
                    raise DataError(f"{self.path}: not a vlpet packed {self.kind_words} file (needs datasets "
                                    f"{names}); pass a packed .h5 file or {self.other}.")
                feats = f["features"]
                self._row, self._dtype = tuple(feats.shape[1:]), str(feats.dtype)
                self._attrs = read_attrs(f.attrs)
                self._index = self._read_index(f)
        except OSError as exc:
            raise DataError(f"{self.path}: cannot read HDF5 file ({exc}); re-extract it or check the path.") from exc

    def _read_index(self, f: Any) -> dict[str, Any]:
        """id -> where its rows are, for the valid ids (an id never written reads back as "")."""
        raise NotImplementedError

    def ids(self) -> list[str]:
        """All ids, in write order."""
        return list(self._index)

    def __contains__(self, item_id: object) -> bool:
        return isinstance(item_id, str) and item_id in self._index

    def __len__(self) -> int:
        return len(self._index)

    def _where(self, item_id: str) -> Any:
        where = self._index.get(item_id)
        if where is None:
            raise self._missing(item_id)
        return where


class FolderStore(Store):
    """A folder of one `<id><suffix>` file per id."""

    suffix: ClassVar[str]

    def __init__(self, path: Path):
        super().__init__(path)
        self._ids: list[str] | None = None

    def _item_path(self, item_id: str) -> Path:
        return self.path / f"{item_id}{self.suffix}"

    def ids(self) -> list[str]:
        """All ids, sorted."""
        if self._ids is None:
            n = len(self.suffix)
            self._ids = sorted(entry.name[:-n] for entry in os.scandir(self.path)
                               if entry.name.endswith(self.suffix) and entry.is_file())
        return list(self._ids)

    def __contains__(self, item_id: object) -> bool:
        return isinstance(item_id, str) and self._item_path(item_id).is_file()

    def _existing_item(self, item_id: str) -> Path:
        item = self._item_path(item_id)
        if not item.is_file():
            raise self._missing(item_id)
        return item

    def _meta(self) -> None:
        if self._attrs is None:
            self._probe()

    def _probe(self) -> None:
        """Set `_attrs`, `_dtype` and `_row` from the folder's files."""
        raise NotImplementedError


class MemoryStore(Store):
    """Features computed in memory (id -> array), read like a store (`vlpet predict`)."""

    layout = "memory"

    def __init__(self, arrays: dict[str, np.ndarray]):
        super().__init__(Path("<memory>"))
        self.arrays = arrays
        self._attrs = {}

    def ids(self) -> list[str]:
        return list(self.arrays)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self.arrays

    def _stored(self, item_id: str) -> np.ndarray:
        if item_id not in self.arrays:
            raise self._missing(item_id)
        return self.arrays[item_id]


# ------------------------------------------------------------------------------------------------------------
# Writers
# ------------------------------------------------------------------------------------------------------------

class Writer:
    """Writes one store, resuming one written with the same settings: `existing()` ids are skipped by the caller,
    `write(ids, feats)` adds a batch (one array per id). A full disk raises `DiskFull` (one line, exit 2) with the
    store left valid: what was written before stays, and the same command resumes."""

    noun: ClassVar[str]
    layout: ClassVar[str]
    headroom: ClassVar[int] = 0  # free space the writer keeps while it writes

    def __init__(self, path: Path, row: tuple[int, ...], dtype: str = "float16", attrs: dict | None = None):
        self.path = Path(path)
        self.row = tuple(int(n) for n in row)
        self.dtype = check_dtype(dtype)
        self._existing: set[str] = set()

    def existing(self) -> set[str]:
        """Ids already in the store (skipped by a resumed run)."""
        return set(self._existing)

    def write(self, ids: Sequence[str], feats: Sequence[np.ndarray]) -> None:
        """Add a batch: feats[i] are the features of ids[i]."""
        for item_id, value in zip(ids, feats):
            self.add(item_id, value)

    def add(self, item_id: Any, feats: Any) -> None:
        raise NotImplementedError

    def _full(self) -> Exception:
        return disk_full(self.path, len(self._existing), self.noun)

    def close(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PackedWriter(Writer):
    """Append-only writer of a packed file: an item's rows are flushed, then the kind's index datasets, then its
    id, so the valid items are always the first len(ids). While it writes, a `Reserve` holds a little space on the
    disk: when the disk fills, it is released so that HDF5 can close the file in a valid state."""

    layout: ClassVar[str] = "packed"
    other: ClassVar[str]  # the other layout, for messages
    kind_words: ClassVar[str] = "feature"
    headroom = RESERVE

    def __init__(self, path: Path, row: tuple[int, ...], dtype: str = "float16", attrs: dict | None = None):
        super().__init__(path, row, dtype, attrs)
        wanted = json_attrs(dict(attrs or {}, dtype=dtype))
        if self.path.is_dir():
            raise DataError(f"{self.path} is a directory; the packed layout writes one .h5 file (or use the "
                            f"{self.other} layout).")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f: Any = None
        self._reserve: Reserve | None = None
        if self.path.exists():
            self._resume(wanted)
        self._hold_space()
        if self._f is None:
            self._create(wanted)

    def _hold_space(self) -> None:
        try:
            self._reserve = Reserve(self.path.parent)
        except OSError as exc:
            if self._f is not None:
                self._f.close()
                self._f = None
            if is_disk_full(exc):
                raise self._full() from None
            raise

    def _open(self, mode: str) -> Any:
        import h5py

        return h5py.File(self.path, mode, rdcc_nbytes=CHUNK_CACHE)

    def _create(self, wanted: dict) -> None:
        import h5py

        try:
            self._f = self._open("w")
            self._f.create_dataset("features", shape=(0, *self.row), maxshape=(None, *self.row), dtype=self.dtype,
                                   chunks=self._chunks())
            for name, shape, dtype, chunks in self._index_datasets():
                self._f.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype,
                                       chunks=(chunks, *shape))
            self._f.create_dataset("ids", shape=(0,), maxshape=(None,), dtype=h5py.string_dtype("utf-8"),
                                   chunks=(4096,))
            for key, value in wanted.items():
                self._f.attrs[key] = value
            self._f.flush()
        except Exception as exc:
            if is_disk_full(exc):  # nothing valid in it yet: the file goes
                self.close()
                self.path.unlink(missing_ok=True)
            self._fail(exc)
            raise
        self._n, self._rows = 0, 0

    def _resume(self, wanted: dict) -> None:
        """Reopen an existing file: check its settings and drop an item whose id never reached the file."""
        try:
            self._f = self._open("r+")
        except OSError as exc:
            raise DataError(f"{self.path}: cannot open the existing {self.kind_words} file for appending ({exc}); "
                            f"move it aside or choose another --out.") from exc
        try:
            if not all(key in self._f for key in ("features", *self._index_names(), "ids")):
                raise DataError(f"{self.path}: exists but is not a vlpet packed {self.kind_words} file; choose "
                                f"another --out.")
            feats = self._f["features"]
            found = dict(read_attrs(self._f.attrs), **self._settings(tuple(feats.shape[1:])), dtype=str(feats.dtype))
            check_same(self.path, found, dict(wanted, **self._settings(self.row)))
        except DataError:
            self._f.close()
            raise
        names = list(self._f["ids"].asstr()[:])
        n = min([len(names)] + [self._f[name].shape[0] for name in self._index_names()])
        while n and not names[n - 1]:
            n -= 1  # an id whose value never reached the file
        rows = self._rows_of(n)
        for name, size in (("ids", n), *((name, n) for name in self._index_names()), ("features", rows)):
            if self._f[name].shape[0] != size:
                self._f[name].resize(size, axis=0)  # rows or index entries whose id was never written
        self._f.flush()
        self._existing = set(names[:n])
        self._n, self._rows = n, rows

    def _append(self, ids: list[str], rows: np.ndarray, index: dict[str, Any]) -> None:
        """Append the rows of `ids` (flushed), their index entries (flushed), then the ids (flushed)."""
        try:
            k, r = len(ids), len(rows)
            features = self._f["features"]
            features.resize(self._rows + r, axis=0)
            features[self._rows:self._rows + r] = rows.astype(self.dtype, copy=False)
            self._f.flush()
            for name, values in index.items():
                dataset = self._f[name]
                dataset.resize(self._n + k, axis=0)
                dataset[self._n:self._n + k] = values
                self._f.flush()
            names = self._f["ids"]
            names.resize(self._n + k, axis=0)
            names[self._n:self._n + k] = ids
            self._f.flush()
        except Exception as exc:
            self._fail(exc)
            raise
        self._n += k
        self._rows += r
        self._existing.update(ids)

    def _fail(self, exc: Exception) -> None:
        """After a full disk: give the reserve back, let HDF5 write what it holds and close the file (its valid
        items are those whose ids were flushed), then raise DiskFull."""
        if not is_disk_full(exc):
            return
        self.close()
        raise self._full() from None

    def close(self) -> None:
        if self._reserve is not None:
            self._reserve.release()
        if self._f is not None:
            f, self._f = self._f, None
            f.close()

    # -- what a kind says about its packed file ----------------------------------------------------------------
    def _chunks(self) -> tuple[int, ...]:
        raise NotImplementedError

    def _index_datasets(self) -> list[tuple[str, tuple[int, ...], str, int]]:
        """(name, entry shape, dtype, chunk length) of the datasets between `features` and `ids`."""
        return []

    def _index_names(self) -> list[str]:
        return [name for name, *_ in self._index_datasets()]

    def _settings(self, row: tuple[int, ...]) -> dict:
        """What the rows' shape must agree on for a resumed file, as it is named in messages."""
        raise NotImplementedError

    def _rows_of(self, n: int) -> int:
        """How many rows the first n items take."""
        raise NotImplementedError


class FolderWriter(Writer):
    """Writer of a folder layout: each `<id><suffix>` is written under a temporary name and renamed, so a reader
    never sees half a file; leftovers of a killed run are removed when the next writer opens the folder."""

    suffix: ClassVar[str]
    store: ClassVar[type[FolderStore]]

    def __init__(self, path: Path, row: tuple[int, ...], dtype: str = "float16", attrs: dict | None = None):
        super().__init__(path, row, dtype, attrs)
        if self.path.is_file():
            raise DataError(f"{self.path} is a file; the {self.layout} layout writes a folder of "
                            f"<{self.noun}_id>{self.suffix} files (or use the packed layout).")
        self.path.mkdir(parents=True, exist_ok=True)
        for entry in os.scandir(self.path):  # leftovers of an interrupted run
            if entry.name.endswith(TMP_SUFFIX) and f"{self.suffix}." in entry.name:
                os.unlink(entry.path)
        self.attrs = json_attrs(dict(attrs or {}, dtype=dtype))
        store = self.store(self.path)
        self._existing = set(store.ids())
        self._check(store, self.attrs)

    def _check(self, store: FolderStore, wanted: dict) -> None:
        """DataError when the folder's files were written with other settings than `wanted`."""
        raise NotImplementedError

    def _put(self, item_id: str, write: Callable[[BinaryIO], object]) -> None:
        """Write one item's file atomically: `write(file)` under a temporary name, then a rename."""
        final = self.path / f"{item_id}{self.suffix}"
        tmp = self.path / f"{item_id}{self.suffix}.{os.getpid()}{TMP_SUFFIX}"
        try:
            with open(tmp, "wb") as fh:
                write(fh)
            os.replace(tmp, final)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if is_disk_full(exc):
                raise self._full() from None
            raise
        self._existing.add(item_id)
