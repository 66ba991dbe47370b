"""Image feature stores: vlpet's packed HDF5 file and the reference's per-image layout.

Per-image (reference, VL-Adapter) layout: a directory with one `<img_id>.h5` per image holding dataset
`<img_id>/features` of shape (n_tokens, dim), float16. Packed layout: one HDF5 file per source with dataset
`features` (N, n_tokens, dim) and dataset `ids` (N,) of utf-8 strings; row i of `features` belongs to `ids[i]`.
A packed file's valid rows are the first len(ids): features are flushed before their id is written, so an
interrupted writer never leaves an id without its features (layouts.py).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from vlpet_cli.errors import DataError
from vlpet_cli.features.hdf5 import check_same, read_attrs
from vlpet_cli.features.layouts import FolderStore, FolderWriter, MemoryStore, PackedStore, PackedWriter

if TYPE_CHECKING:
    import numpy as np

PACKED = "packed"
PER_IMAGE = "per-image"
DEFAULT_FEATURE_NAME = "data_clip_RN101_att"


class ImageReads:
    """What every image store shares: features of one image as float32 (n_tokens, dim)."""

    kind = "image"
    noun = "image id"
    inputs = "--images DIR --model MODEL"
    _row: tuple[int, ...] | None

    def get(self, img_id: str) -> np.ndarray:
        """Features of one image as float32 (n_tokens, dim); DataError for an unknown id."""
        import numpy as np

        return np.asarray(self._stored(img_id), dtype=np.float32)  # type: ignore[attr-defined]

    def visual(self, ids: Sequence[str], video: Any = None) -> dict:
        """The model's visual input for a record's images: vis_feats (n_images, n_tokens, dim) float32."""
        import numpy as np

        return {"vis_feats": np.stack([self.get(img_id) for img_id in ids])}

    @property
    def shape(self) -> tuple[int, int]:
        """(n_tokens, dim) of one image."""
        self._meta()  # type: ignore[attr-defined]
        return self._row  # type: ignore[return-value]

    def summary(self) -> dict:
        """`features inspect`'s figures: shape (count, n_tokens, dim), dtype and attributes (an empty per-image
        folder has none)."""
        count = len(self)  # type: ignore[arg-type]
        if count:
            return {"shape": [count, *self.shape], "dtype": self.dtype, "attributes": self.attrs}  # type: ignore
        packed = self.layout == PACKED  # type: ignore[attr-defined]
        return {"shape": [0], "dtype": self.dtype if packed else None,  # type: ignore[attr-defined]
                "attributes": self.attrs if packed else {}}  # type: ignore[attr-defined]

    @staticmethod
    def describe(info: dict) -> list[str]:
        return [f"  shape:      {tuple(info['shape'])}  dtype: {info['dtype']}"]


class PackedImageStore(ImageReads, PackedStore):
    """A packed image feature file (see the module's docstring)."""

    datasets = ("features", "ids")
    other = "a per-image directory of <img_id>.h5 files"

    def _read_index(self, f: Any) -> dict[str, int]:
        return {img_id: row for row, img_id in enumerate(f["ids"].asstr()[:]) if img_id}

    def _stored(self, img_id: str) -> Any:
        return self._file()["features"][self._where(img_id)]


class PerImageStore(ImageReads, FolderStore):
    """The reference's directory of `<img_id>.h5` files (dataset `<img_id>/features`)."""

    layout = PER_IMAGE
    suffix = ".h5"

    def _probe(self) -> None:
        """Read shape, dtype and attributes from the first file."""
        ids = self.ids()
        if not ids:
            raise DataError(f"{self.path}: the feature directory holds no <img_id>.h5 files; run extraction first.")
        import h5py

        item = self._item_path(ids[0])
        try:
            with h5py.File(item, "r") as f:
                ds = f[f"{ids[0]}/features"]
                self._row, self._dtype = tuple(ds.shape), str(ds.dtype)
                self._attrs = read_attrs(f.attrs)
        except (OSError, KeyError) as exc:
            raise DataError(
                f"{item}: cannot read dataset '{ids[0]}/features' ({exc}); delete the file and re-run extraction."
            ) from exc

    def _stored(self, img_id: str) -> Any:
        import h5py

        item = self._existing_item(img_id)
        try:
            with h5py.File(item, "r") as f:
                return f[f"{img_id}/features"][...]
        except (OSError, KeyError) as exc:
            raise DataError(
                f"{item}: cannot read dataset '{img_id}/features' ({exc}); delete the file and re-run extraction."
            ) from exc


class MemoryImageStore(ImageReads, MemoryStore):
    """Image features computed in memory (`vlpet predict`)."""


def check_compatible(store: ImageReads, feat_dim: int) -> None:
    """DataError when the store's feature dim differs from the model's expected feat_dim."""
    dim = store.shape[-1]
    if dim != feat_dim:
        raise DataError(
            f"{store.path}: features have dim {dim} but the model expects feat_dim {feat_dim}. "  # type: ignore
            f"Set the override model.feat_dim={dim}, or point at features extracted with a "
            f"{feat_dim}-dim backbone."
        )


# ------------------------------------------------------------------------------------------------------------
# Writers
# ------------------------------------------------------------------------------------------------------------

class PackedImageWriter(PackedWriter):
    """Append-only writer of a packed image file; each batch is flushed before its ids are written."""

    noun = "image"
    other = PER_IMAGE

    def add(self, ids: list[str], feats: np.ndarray) -> None:  # type: ignore[override]
        """Append a batch: features (B, n_tokens, dim) first (flushed), then the ids (flushed)."""
        if ids:
            self._append(list(ids), feats, {})

    def write(self, ids: Sequence[str], feats: Sequence[np.ndarray]) -> None:
        import numpy as np

        self.add(list(ids), np.asarray(feats))

    def _chunks(self) -> tuple[int, ...]:
        return (1, *self.row)

    def _settings(self, row: tuple[int, ...]) -> dict:
        return {"shape": list(row)}

    def _rows_of(self, n: int) -> int:
        return n


class PerImageWriter(FolderWriter):
    """Writer of the reference per-image layout; each file is written under a temp name and renamed."""

    noun = "image"
    layout = PER_IMAGE
    suffix = ".h5"
    store = PerImageStore

    def _check(self, store: Any, wanted: dict) -> None:
        if self._existing:
            found = dict(store.attrs, shape=list(store.shape), dtype=store.dtype)
            check_same(self.path, found, dict(wanted, shape=list(self.row)))

    def add(self, ids: Sequence[str], feats: Sequence[np.ndarray]) -> None:  # type: ignore[override]
        """Write one `<img_id>.h5` per image (dataset `<img_id>/features`), each atomically."""
        for img_id, feat in zip(ids, feats):
            data = _h5_bytes(img_id, feat.astype(self.dtype, copy=False), self.attrs)
            self._put(img_id, lambda fh: fh.write(data))  # noqa: B023 - called before the next iteration

    write = add


def _h5_bytes(img_id: str, feat: np.ndarray, attrs: dict) -> bytes:
    """A reference per-image file, built in memory so that a full disk fails in a plain write, not inside HDF5."""
    import h5py

    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        f.create_dataset(f"{img_id}/features", data=feat)
        for key, value in attrs.items():
            f.attrs[key] = value
    return buffer.getvalue()
