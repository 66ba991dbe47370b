"""Feature stores: the reference per-image HDF5 layout and vlpet's packed layout, read lazily and written safely.

Per-image (reference, VL-Adapter) layout: a directory with one `<img_id>.h5` per image holding dataset
`<img_id>/features` of shape (n_tokens, dim), float16. Packed layout: one HDF5 file per source with dataset
`features` (N, n_tokens, dim) and dataset `ids` (N,) of utf-8 strings; row i of `features` belongs to `ids[i]`.
A packed file's valid rows are the first len(ids): features are flushed before their id is written, so an
interrupted writer never leaves an id without its features. Video stores live in `video_features.py`;
`inspect_features` reports on both kinds.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlpet_cli.errors import DataError
from vlpet_cli.features.hdf5 import H5Handle, check_same, missing_ids, read_attrs

if TYPE_CHECKING:
    import numpy as np

PACKED = "packed"
PER_IMAGE = "per-image"
LAYOUTS = (PACKED, PER_IMAGE)
DTYPES = ("float16", "float32")
DEFAULT_FEATURE_NAME = "data_clip_RN101_att"
_TMP_SUFFIX = ".tmp"


def locate_features(data_root: Path, source: str, name: str = DEFAULT_FEATURE_NAME) -> Path:
    """The packed file <root>/<source>/clip_features/<name>.h5 if it exists, else the per-image directory."""
    base = Path(data_root) / source / "clip_features"
    packed, per_image = base / f"{name}.h5", base / name
    if packed.is_file():
        return packed
    if per_image.is_dir():
        return per_image
    raise DataError(
        f"no features for source '{source}': neither the packed file {packed} nor the per-image directory "
        f"{per_image} exists. Extract them with `vlpet extract-features --images DIR --model MODEL --out {packed}` "
        f"or check --data-root."
    )


def open_features(path: Path) -> FeatureStore:
    """Open a packed .h5 file or a per-image directory (the layout is detected from the path)."""
    path = Path(path)
    if path.is_dir():
        return FeatureStore(path, PER_IMAGE)
    if path.is_file():
        return FeatureStore(path, PACKED)
    raise DataError(f"{path}: feature file or directory not found; check the path or run `vlpet extract-features`.")


class FeatureStore(H5Handle):
    """Read-only view of one feature store; picklable (paths and index only, HDF5 handles opened per process)."""

    def __init__(self, path: Path, layout: str):
        self.path = Path(path)
        self.layout = layout
        self._index: dict[str, int] | None = None
        self._ids: list[str] | None = None
        self._shape: tuple[int, ...] | None = None
        self._dtype: str | None = None
        self._attrs: dict | None = None
        if layout == PACKED:
            self._load_packed_index()
        elif layout != PER_IMAGE:
            raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")

    # -- packed ---------------------------------------------------------------------------------------------
    def _load_packed_index(self) -> None:
        """Read ids, shape, dtype and attributes of a packed file once, with a short-lived handle."""
        import h5py

        try:
            with h5py.File(self.path, "r") as f:
                if "features" not in f or "ids" not in f:
                    raise DataError(
                        f"{self.path}: not a vlpet packed feature file (needs datasets 'features' and 'ids'); "
                        f"pass a packed .h5 file or a per-image directory of <img_id>.h5 files."
                    )
                ids = [s for s in f["ids"].asstr()[:]]
                feats = f["features"]
                self._shape = tuple(feats.shape[1:])
                self._dtype = str(feats.dtype)
                self._attrs = read_attrs(f.attrs)
        except OSError as exc:
            raise DataError(f"{self.path}: cannot read HDF5 file ({exc}); re-extract it or check the path.") from exc
        # An id written without its value (interrupted writer) reads back as ""; such rows are not valid.
        self._ids = [i for i in ids if i]
        self._index = {img_id: row for row, img_id in enumerate(ids) if img_id}

    # -- per-image ------------------------------------------------------------------------------------------
    def _item_path(self, img_id: str) -> Path:
        return self.path / f"{img_id}.h5"

    def _per_image_ids(self) -> list[str]:
        if self._ids is None:
            self._ids = sorted(
                entry.name[:-3] for entry in os.scandir(self.path) if entry.name.endswith(".h5") and entry.is_file()
            )
        return self._ids

    def _probe(self) -> None:
        """Read shape, dtype and attributes from the first per-image file."""
        if self._shape is not None:
            return
        ids = self._per_image_ids()
        if not ids:
            raise DataError(f"{self.path}: the feature directory holds no <img_id>.h5 files; run extraction first.")
        import h5py

        item = self._item_path(ids[0])
        try:
            with h5py.File(item, "r") as f:
                ds = f[f"{ids[0]}/features"]
                self._shape, self._dtype = tuple(ds.shape), str(ds.dtype)
                self._attrs = read_attrs(f.attrs)
        except (OSError, KeyError) as exc:
            raise DataError(
                f"{item}: cannot read dataset '{ids[0]}/features' ({exc}); delete the file and re-run extraction."
            ) from exc

    # -- public ---------------------------------------------------------------------------------------------
    def ids(self) -> list[str]:
        """All image ids in the store (packed: in row order; per-image: sorted)."""
        if self.layout == PACKED:
            return list(self._ids or [])
        return list(self._per_image_ids())

    def __contains__(self, img_id: object) -> bool:
        if not isinstance(img_id, str):
            return False
        if self.layout == PACKED:
            return img_id in (self._index or {})
        return self._item_path(img_id).is_file()

    def __len__(self) -> int:
        if self.layout == PACKED:
            return len(self._index or {})
        return len(self._per_image_ids())

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids())

    def _missing(self, img_id: str) -> DataError:
        return DataError(
            f"{self.path}: no features for image id '{img_id}'. Extract them with `vlpet extract-features "
            f"--images DIR --model MODEL --out {self.path}` (ids already there are skipped), or check --data-root."
        )

    def get(self, img_id: str) -> np.ndarray:
        """Features of one image as float32 (n_tokens, dim); DataError for an unknown id."""
        import numpy as np

        if self.layout == PACKED:
            row = (self._index or {}).get(img_id)
            if row is None:
                raise self._missing(img_id)
            return np.asarray(self._file()["features"][row], dtype=np.float32)
        item = self._item_path(img_id)
        if not item.is_file():
            raise self._missing(img_id)
        import h5py

        try:
            with h5py.File(item, "r") as f:
                return np.asarray(f[f"{img_id}/features"][...], dtype=np.float32)
        except (OSError, KeyError) as exc:
            raise DataError(
                f"{item}: cannot read dataset '{img_id}/features' ({exc}); delete the file and re-run extraction."
            ) from exc

    @property
    def shape(self) -> tuple[int, int]:
        """(n_tokens, dim) of one image."""
        if self.layout == PER_IMAGE:
            self._probe()
        return self._shape  # type: ignore[return-value]

    @property
    def dim(self) -> int:
        """Feature dimension (2048 for RN101 grids, the hidden size for CLIP ViT patch tokens)."""
        return int(self.shape[-1])

    @property
    def dtype(self) -> str:
        """Stored dtype name (float16 or float32)."""
        if self.layout == PER_IMAGE:
            self._probe()
        return self._dtype or ""

    @property
    def attrs(self) -> dict:
        """Recorded attributes (model, layer, image_size, grid, dtype) when the writer stored them."""
        if self.layout == PER_IMAGE:
            self._probe()
        return dict(self._attrs or {})

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, layout={self.layout!r})"


def check_compatible(store: FeatureStore, feat_dim: int) -> None:
    """DataError when the store's feature dim differs from the model's expected feat_dim."""
    if store.dim != feat_dim:
        raise DataError(
            f"{store.path}: features have dim {store.dim} but the model expects feat_dim {feat_dim}. "
            f"Set the override model.feat_dim={store.dim}, or point at features extracted with a "
            f"{feat_dim}-dim backbone."
        )


# ------------------------------------------------------------------------------------------------------------
# Writers
# ------------------------------------------------------------------------------------------------------------

def _check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise DataError(f"unsupported feature dtype '{dtype}'; use one of {', '.join(DTYPES)}.")
    return dtype


class PackedWriter:
    """Append-only writer of a packed file; each batch is flushed before its ids are written."""

    def __init__(self, path: Path, n_tokens: int, dim: int, dtype: str = "float16", attrs: dict | None = None):
        import h5py

        self.path = Path(path)
        self.dtype = _check_dtype(dtype)
        attrs = dict(attrs or {}, dtype=dtype)
        if self.path.is_dir():
            raise DataError(f"{self.path} is a directory; the packed layout writes one .h5 file (or use the "
                            f"per-image layout).")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            try:
                self._f = h5py.File(self.path, "r+")
            except OSError as exc:
                raise DataError(f"{self.path}: cannot open the existing feature file for appending ({exc}); "
                                f"move it aside or choose another --out.") from exc
            if "features" not in self._f or "ids" not in self._f:
                self._f.close()
                raise DataError(f"{self.path}: exists but is not a vlpet packed feature file; choose another --out.")
            feats, ids = self._f["features"], self._f["ids"]
            found = read_attrs(self._f.attrs)
            found.update(shape=list(feats.shape[1:]), dtype=str(feats.dtype))
            try:
                check_same(self.path, found, dict(attrs, shape=[n_tokens, dim]))
            except DataError:
                self._f.close()
                raise
            names = list(ids.asstr()[:])
            n = len(names)
            while n and not names[n - 1]:
                n -= 1  # drop ids whose value never reached the file
            if ids.shape[0] != n:
                ids.resize(n, axis=0)
            if feats.shape[0] != n:
                feats.resize(n, axis=0)  # drop rows whose ids were never written
            self._f.flush()
            self._existing = set(names[:n])
            self._n = n
        else:
            self._f = h5py.File(self.path, "w")
            self._f.create_dataset(
                "features", shape=(0, n_tokens, dim), maxshape=(None, n_tokens, dim),
                dtype=dtype, chunks=(1, n_tokens, dim),
            )
            self._f.create_dataset(
                "ids", shape=(0,), maxshape=(None,), dtype=h5py.string_dtype("utf-8"), chunks=(4096,)
            )
            for key, value in attrs.items():
                self._f.attrs[key] = value
            self._f.flush()
            self._existing = set()
            self._n = 0

    def existing(self) -> set[str]:
        """Ids already in the file (skipped by a resumed run)."""
        return set(self._existing)

    def add(self, ids: list[str], feats: np.ndarray) -> None:
        """Append a batch: features first (flushed), then the ids (flushed)."""
        if not ids:
            return
        n, k = self._n, len(ids)
        features, names = self._f["features"], self._f["ids"]
        features.resize(n + k, axis=0)
        features[n:n + k] = feats.astype(self.dtype, copy=False)
        self._f.flush()
        names.resize(n + k, axis=0)
        names[n:n + k] = ids
        self._f.flush()
        self._n += k
        self._existing.update(ids)

    def close(self) -> None:
        if self._f:
            self._f.close()


class PerImageWriter:
    """Writer of the reference per-image layout; each file is written under a temp name and renamed."""

    def __init__(self, path: Path, n_tokens: int, dim: int, dtype: str = "float16", attrs: dict | None = None):
        self.path = Path(path)
        self.dtype = _check_dtype(dtype)
        self.attrs = dict(attrs or {}, dtype=dtype)
        if self.path.is_file():
            raise DataError(f"{self.path} is a file; the per-image layout writes a directory of <img_id>.h5 files "
                            f"(or use the packed layout).")
        self.path.mkdir(parents=True, exist_ok=True)
        for entry in os.scandir(self.path):  # leftovers of an interrupted run
            if entry.name.endswith(_TMP_SUFFIX) and ".h5." in entry.name:
                os.unlink(entry.path)
        store = FeatureStore(self.path, PER_IMAGE)
        self._existing = set(store.ids())
        if self._existing:
            found = dict(store.attrs, shape=list(store.shape), dtype=store.dtype)
            check_same(self.path, found, dict(self.attrs, shape=[n_tokens, dim]))

    def existing(self) -> set[str]:
        """Ids already in the directory (skipped by a resumed run)."""
        return set(self._existing)

    def add(self, ids: list[str], feats: np.ndarray) -> None:
        """Write one `<img_id>.h5` per image (dataset `<img_id>/features`), atomically."""
        import h5py

        for img_id, feat in zip(ids, feats):
            final = self.path / f"{img_id}.h5"
            tmp = self.path / f"{img_id}.h5.{os.getpid()}{_TMP_SUFFIX}"
            with h5py.File(tmp, "w") as f:
                f.create_dataset(f"{img_id}/features", data=feat.astype(self.dtype, copy=False))
                for key, value in self.attrs.items():
                    f.attrs[key] = value
            os.replace(tmp, final)
            self._existing.add(img_id)

    def close(self) -> None:
        pass


def open_writer(path: Path, layout: str, n_tokens: int, dim: int, dtype: str = "float16",
                attrs: dict | None = None) -> PackedWriter | PerImageWriter:
    """A writer for `layout` at `path`, resuming an existing store written with the same settings."""
    if layout == PACKED:
        return PackedWriter(path, n_tokens, dim, dtype, attrs)
    if layout == PER_IMAGE:
        return PerImageWriter(path, n_tokens, dim, dtype, attrs)
    raise DataError(f"unknown feature layout '{layout}'; use one of {', '.join(LAYOUTS)}.")


def convert_features(src: Path, dst: Path, layout: str, batch_size: int = 256) -> int:
    """Copy a store into `layout` at `dst` (resumable: ids already in dst are skipped); returns ids written."""
    import numpy as np

    store = open_features(src)
    attrs = {k: v for k, v in store.attrs.items() if k != "dtype"}
    writer = open_writer(dst, layout, store.shape[0], store.shape[1], store.dtype or "float16", attrs)
    try:
        todo = [i for i in store.ids() if i not in writer.existing()]
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            writer.add(chunk, np.stack([store.get(i) for i in chunk]))
    finally:
        writer.close()
        store.close()
    return len(todo)


def inspect_features(path: Path, wanted: Iterable[str] | None = None, annotations: Path | None = None) -> dict:
    """Summary of a store: layout, count, shape, dtype, attributes; with the ids an annotation file names
    (`data.tasks.annotation_images`), the ids without features. Video stores (VALUE .npz folders, packed video
    files) report their dim and frame-count range instead of one shape."""
    from vlpet_cli.features.videos import inspect_video_features, is_video_store

    if is_video_store(Path(path)):
        return inspect_video_features(Path(path), wanted, annotations)
    store = open_features(Path(path))
    try:
        count = len(store)
        info: dict[str, Any] = {"path": str(store.path), "layout": store.layout, "count": count}
        if count:
            info.update(shape=[count, *store.shape], dtype=store.dtype, attributes=store.attrs)
        else:
            info.update(shape=[0], dtype=store.dtype if store.layout == PACKED else None,
                        attributes=store.attrs if store.layout == PACKED else {})
        if wanted is not None:
            wanted = list(wanted)
            missing = missing_ids(store, wanted)
            info.update(annotations=str(annotations), annotation_ids=len(wanted),
                        missing_count=len(missing), missing_ids=missing)
        return info
    finally:
        store.close()


def describe_features(info: dict, show_missing: int = 10) -> str:
    """Human-readable lines for an inspect_features() result."""
    if info.get("kind") == "video":
        from vlpet_cli.features.videos import describe_video_features

        return describe_video_features(info, show_missing)
    lines = [
        f"{info['path']}  ({info['layout']})",
        f"  images:     {info['count']}",
        f"  shape:      {tuple(info['shape'])}  dtype: {info['dtype']}",
    ]
    for key, value in sorted((info.get("attributes") or {}).items()):
        lines.append(f"  {key + ':':<11} {value}")
    if "annotation_ids" in info:
        lines.append(f"  annotations: {info['annotations']} names {info['annotation_ids']} images, "
                     f"{info['missing_count']} without features")
        for img_id in info["missing_ids"][:show_missing]:
            lines.append(f"    missing: {img_id}")
        if info["missing_count"] > show_missing:
            lines.append(f"    ... and {info['missing_count'] - show_missing} more")
    return "\n".join(lines)

