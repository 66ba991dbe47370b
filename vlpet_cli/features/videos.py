"""Video feature stores: VALUE's per-video `.npz` folders and vlpet's packed HDF5, read lazily and written safely.

npz layout (VALUE, HERO extractor): a folder of `<vid_name>.npz`, each with array `features` (n_frames, dim),
float16; vlpet's writer adds `vlpet_attrs.json` beside them (model, dtype, fps, ...). Packed layout: one HDF5 file
with `features` (total_frames, dim), all videos' frames concatenated, `spans` (N, 2) int64 (first row, frame count)
and `ids` (N,) utf-8. Video i is `features[spans[i,0] : spans[i,0] + spans[i,1]]`; a writer flushes the frames,
then the span, then the id, so the valid videos are the first len(ids) with a non-empty id and a kill loses at
most the video being written. `resize_frames` is the reference's `resize` (zero rows at the end, or adaptive max
pooling over time) with a mask of the real frames. The module depends on nothing else of vlpet's data package
(features.py imports it for `vlpet features inspect`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlpet_cli.errors import DataError
from vlpet_cli.features.hdf5 import H5Handle, check_same, missing_ids, read_attrs

if TYPE_CHECKING:
    import numpy as np
    from typing_extensions import Self

NPZ = "npz"
PACKED = "packed"
VIDEO_LAYOUTS = (NPZ, PACKED)
DEFAULT_VIDEO_FEATURE_NAME = "clip-vit"
ATTRS_FILE = "vlpet_attrs.json"
_TMP_SUFFIX = ".tmp"
_CHUNK_ROWS = 128
DTYPES = ("float16", "float32")  # as the image stores (features.py, which imports this module for inspect)


def video_feature_paths(data_root: Path, source: str, name: str = DEFAULT_VIDEO_FEATURE_NAME) -> tuple[Path, Path]:
    """(packed file, npz folder) where a source's video features live: <root>/video/vis_features/<source>/."""
    base = Path(data_root) / "video" / "vis_features" / source
    return base / f"{name}.h5", base / name


def locate_video_features(data_root: Path, source: str, name: str = DEFAULT_VIDEO_FEATURE_NAME) -> Path:
    """The packed <root>/video/vis_features/<source>/<name>.h5 if it exists, else the folder of .npz files."""
    packed, folder = video_feature_paths(data_root, source, name)
    if packed.is_file():
        return packed
    if folder.is_dir():
        return folder
    raise DataError(
        f"no video features for source '{source}': neither the packed file {packed} nor the folder {folder} of "
        f"<vid_name>.npz files exists. Extract them with `vlpet extract-features --videos DIR --out {folder}` "
        f"(or unpack VALUE's clip-vit features there), or check --data-root."
    )


def open_video_features(path: Path) -> VideoFeatureStore:
    """Open a packed .h5 file or a folder of <vid>.npz files (the layout is detected from the path)."""
    path = Path(path)
    if path.is_dir():
        return VideoFeatureStore(path, NPZ)
    if path.is_file():
        return VideoFeatureStore(path, PACKED)
    raise DataError(f"{path}: video feature file or folder not found; check the path or run "
                    f"`vlpet extract-features --videos DIR --out {path}`.")


def _json_attrs(attrs: dict) -> dict:
    """Attributes as they read back (tuples -> lists; None left out, HDF5 cannot hold it), so a resumed writer
    compares like with like."""
    return json.loads(json.dumps({key: value for key, value in attrs.items() if value is not None}))


def _npz_header(path: Path) -> tuple[tuple[int, ...], str]:
    """Shape and dtype of `features` in an .npz without reading the array (the .npy header inside the zip)."""
    import zipfile

    import numpy as np

    with zipfile.ZipFile(path) as zf, zf.open("features.npy") as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
    return tuple(shape), str(dtype)


class VideoFeatureStore(H5Handle):
    """Read-only view of one video feature store; picklable (paths and index only, handles opened per process)."""

    def __init__(self, path: Path, layout: str):
        self.path = Path(path)
        self.layout = layout
        self._ids: list[str] | None = None
        self._spans: dict[str, tuple[int, int]] | None = None
        self._dim: int | None = None
        self._dtype: str | None = None
        self._attrs: dict | None = None
        if layout == PACKED:
            self._load_packed_index()
        elif layout != NPZ:
            raise ValueError(f"unknown video layout {layout!r}; expected one of {VIDEO_LAYOUTS}")

    # -- packed ---------------------------------------------------------------------------------------------
    def _load_packed_index(self) -> None:
        """Read ids, spans, dim, dtype and attributes of a packed file once, with a short-lived handle."""
        import h5py

        try:
            with h5py.File(self.path, "r") as f:
                if not all(key in f for key in ("features", "spans", "ids")):
                    raise DataError(
                        f"{self.path}: not a vlpet packed video feature file (needs datasets 'features', 'spans' "
                        f"and 'ids'); pass a packed .h5 file or a folder of <vid_name>.npz files."
                    )
                ids = list(f["ids"].asstr()[:])
                spans = f["spans"][: len(ids)]
                feats = f["features"]
                n_rows, self._dim, self._dtype = feats.shape[0], int(feats.shape[1]), str(feats.dtype)
                self._attrs = read_attrs(f.attrs)
        except OSError as exc:
            raise DataError(f"{self.path}: cannot read HDF5 file ({exc}); re-extract it or check the path.") from exc
        self._spans = {}
        for vid, (start, count) in zip(ids, spans.tolist()):
            if vid and start + count <= n_rows:  # "" = id never written (interrupted writer)
                self._spans[vid] = (int(start), int(count))
        self._ids = list(self._spans)

    # -- npz ------------------------------------------------------------------------------------------------
    def _item_path(self, vid: str) -> Path:
        return self.path / f"{vid}.npz"

    def _npz_ids(self) -> list[str]:
        if self._ids is None:
            self._ids = sorted(
                entry.name[:-4] for entry in os.scandir(self.path) if entry.name.endswith(".npz") and entry.is_file()
            )
        return self._ids

    def _probe(self) -> None:
        """Read attributes from the sidecar and dim/dtype from it or from the first .npz header."""
        if self._attrs is not None:
            return
        sidecar = self.path / ATTRS_FILE
        attrs: dict = {}
        if sidecar.is_file():
            try:
                attrs = json.loads(sidecar.read_text())
            except (OSError, ValueError) as exc:
                raise DataError(f"{sidecar}: unreadable ({exc}); delete it (it only records extraction settings) "
                                f"or re-extract.") from exc
        ids = self._npz_ids()
        if ids:
            shape, dtype = self._header(ids[0])
            self._dim, self._dtype = int(shape[-1]), dtype
        else:
            self._dim, self._dtype = attrs.get("dim"), attrs.get("dtype")
        self._attrs = attrs

    def _header(self, vid: str) -> tuple[tuple[int, ...], str]:
        item = self._item_path(vid)
        try:
            shape, dtype = _npz_header(item)
        except (OSError, KeyError, ValueError) as exc:
            raise DataError(f"{item}: cannot read array 'features' ({exc}); delete the file and re-run "
                            f"extraction.") from exc
        if len(shape) != 2:
            raise DataError(f"{item}: 'features' has shape {shape}, expected (n_frames, dim); re-extract it.")
        return shape, dtype

    # -- public ---------------------------------------------------------------------------------------------
    def ids(self) -> list[str]:
        """All video ids (packed: in write order; npz: sorted)."""
        if self.layout == PACKED:
            return list(self._ids or [])
        return list(self._npz_ids())

    def __contains__(self, vid: object) -> bool:
        if not isinstance(vid, str):
            return False
        if self.layout == PACKED:
            return vid in (self._spans or {})
        return self._item_path(vid).is_file()

    def __len__(self) -> int:
        return len(self._spans or {}) if self.layout == PACKED else len(self._npz_ids())

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids())

    def _missing(self, vid: str) -> DataError:
        return DataError(
            f"{self.path}: no features for video '{vid}'. Extract them with `vlpet extract-features --videos DIR "
            f"--out {self.path}` (videos already there are skipped), or check --data-root."
        )

    def get(self, vid: str) -> np.ndarray:
        """Frames of one video (n_frames, dim) in the stored dtype; DataError for an unknown id."""
        import numpy as np

        if self.layout == PACKED:
            span = (self._spans or {}).get(vid)
            if span is None:
                raise self._missing(vid)
            start, count = span
            return np.asarray(self._file()["features"][start:start + count])
        item = self._item_path(vid)
        if not item.is_file():
            raise self._missing(vid)
        try:
            with np.load(item) as data:
                feats = np.asarray(data["features"])
        except (OSError, KeyError, ValueError) as exc:
            raise DataError(f"{item}: cannot read array 'features' ({exc}); delete the file and re-run "
                            f"extraction.") from exc
        if feats.ndim != 2:
            raise DataError(f"{item}: 'features' has shape {feats.shape}, expected (n_frames, dim); re-extract it.")
        return feats

    def frame_count(self, vid: str) -> int:
        """Number of frames of one video, without reading its features."""
        if self.layout == PACKED:
            span = (self._spans or {}).get(vid)
            if span is None:
                raise self._missing(vid)
            return span[1]
        if not self._item_path(vid).is_file():
            raise self._missing(vid)
        return int(self._header(vid)[0][0])

    @property
    def dim(self) -> int | None:
        """Feature size per frame (512 for CLIP ViT-B/32); None for an empty npz folder without attributes."""
        if self.layout == NPZ:
            self._probe()
        return self._dim

    @property
    def dtype(self) -> str:
        """Stored dtype name (float16 or float32)."""
        if self.layout == NPZ:
            self._probe()
        return self._dtype or ""

    @property
    def attrs(self) -> dict:
        """Recorded attributes (model, dtype, fps, ...) as the writer stored them; {} for VALUE's own files."""
        if self.layout == NPZ:
            self._probe()
        return dict(self._attrs or {})

    def __repr__(self) -> str:
        return f"VideoFeatureStore({str(self.path)!r}, layout={self.layout!r})"


# ------------------------------------------------------------------------------------------------------------
# Inspect
# ------------------------------------------------------------------------------------------------------------

def is_video_store(path: Path) -> bool:
    """True for a video feature store: a folder of <vid>.npz files, or a packed file with per-video spans."""
    path = Path(path)
    if path.is_dir():
        return (path / ATTRS_FILE).is_file() or any(e.name.endswith(".npz") for e in os.scandir(path))
    if not path.is_file():
        return False
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return "spans" in f
    except OSError:
        return False  # open_features reports the unreadable file


def inspect_video_features(path: Path, wanted: Iterable[str] | None, annotations: Path | None) -> dict:
    """`vlpet features inspect` of a video store: count, dim, dtype, frame-count range, attributes, missing videos."""
    store = open_video_features(path)
    try:
        counts = [store.frame_count(vid) for vid in store.ids()]
        info: dict[str, Any] = {"path": str(store.path), "layout": store.layout, "kind": "video",
                                "count": len(counts), "dim": store.dim, "dtype": store.dtype or None,
                                "frames": ({"min": min(counts), "max": max(counts),
                                            "mean": round(sum(counts) / len(counts), 2)} if counts else None),
                                "attributes": store.attrs}
        if wanted is not None:
            wanted = list(wanted)
            missing = missing_ids(store, wanted)
            info.update(annotations=str(annotations), annotation_ids=len(wanted),
                        missing_count=len(missing), missing_ids=missing)
        return info
    finally:
        store.close()


def describe_video_features(info: dict, show_missing: int = 10) -> str:
    """Human-readable lines for a video store's inspect_features() result."""
    frames = info["frames"]
    lines = [
        f"{info['path']}  ({info['layout']}, video)",
        f"  videos:     {info['count']}",
        f"  dim:        {info['dim']}  dtype: {info['dtype']}",
        "  frames:     " + (f"{frames['min']}-{frames['max']} per video (mean {frames['mean']})" if frames else "-"),
    ]
    for key, value in sorted((info.get("attributes") or {}).items()):
        lines.append(f"  {key + ':':<11} {value}")
    if "annotation_ids" in info:
        lines.append(f"  annotations: {info['annotations']} names {info['annotation_ids']} videos, "
                     f"{info['missing_count']} without features")
        for vid in info["missing_ids"][:show_missing]:
            lines.append(f"    missing: {vid}")
        if info["missing_count"] > show_missing:
            lines.append(f"    ... and {info['missing_count'] - show_missing} more")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# Writers
# ------------------------------------------------------------------------------------------------------------

def _check_feats(path: Path, vid: str, feats: np.ndarray, dim: int) -> None:
    if feats.ndim != 2 or feats.shape[1] != dim:
        raise DataError(f"{path}: features of video '{vid}' have shape {tuple(feats.shape)}, expected "
                        f"(n_frames, {dim}).")
    if not vid or "/" in vid or vid.startswith("."):
        raise DataError(f"{path}: invalid video id {vid!r} (must be a plain file name).")


class NpzVideoWriter:
    """Writer of VALUE's layout: one `<vid>.npz` per video, written under a temp name and renamed."""

    def __init__(self, path: Path, dim: int, dtype: str = "float16", attrs: dict | None = None):
        self.path, self.dim, self.dtype = Path(path), int(dim), dtype
        wanted = _json_attrs(dict(attrs or {}, dim=self.dim, dtype=dtype))
        if self.path.is_file():
            raise DataError(f"{self.path} is a file; the npz layout writes a folder of <vid_name>.npz files "
                            f"(or use the packed layout).")
        self.path.mkdir(parents=True, exist_ok=True)
        for entry in os.scandir(self.path):  # leftovers of an interrupted run
            if entry.name.endswith(_TMP_SUFFIX) and ".npz." in entry.name:
                os.unlink(entry.path)
        store = VideoFeatureStore(self.path, NPZ)
        self._existing = set(store.ids())
        found = store.attrs
        if self._existing:
            found = dict(found, dim=store.dim, dtype=store.dtype)
        check_same(self.path, found, wanted)
        if found != dict(found, **wanted) or not (self.path / ATTRS_FILE).is_file():
            from vlpet_cli.atomic import write_text

            write_text(self.path / ATTRS_FILE, json.dumps(dict(found, **wanted), indent=1, sort_keys=True) + "\n")

    def existing(self) -> set[str]:
        """Video ids already in the folder (skipped by a resumed run)."""
        return set(self._existing)

    def add(self, vid: str, feats: np.ndarray) -> None:
        """Write `<vid>.npz` (array `features`) atomically."""
        import numpy as np

        feats = np.asarray(feats)
        _check_feats(self.path, vid, feats, self.dim)
        final = self.path / f"{vid}.npz"
        tmp = self.path / f"{vid}.npz.{os.getpid()}{_TMP_SUFFIX}"
        try:
            with open(tmp, "wb") as fh:
                np.savez(fh, features=feats.astype(self.dtype, copy=False))
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._existing.add(vid)

    def close(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PackedVideoWriter:
    """Append-only writer of a packed video file: frames flushed, then the span, then the id."""

    def __init__(self, path: Path, dim: int, dtype: str = "float16", attrs: dict | None = None):
        import h5py

        self.path, self.dim, self.dtype = Path(path), int(dim), dtype
        wanted = _json_attrs(dict(attrs or {}, dtype=dtype))
        if self.path.is_dir():
            raise DataError(f"{self.path} is a folder; the packed layout writes one .h5 file (or use the npz "
                            f"layout).")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self._resume(wanted)
            return
        self._f = h5py.File(self.path, "w")
        self._f.create_dataset("features", shape=(0, self.dim), maxshape=(None, self.dim), dtype=dtype,
                               chunks=(_CHUNK_ROWS, self.dim))
        self._f.create_dataset("spans", shape=(0, 2), maxshape=(None, 2), dtype="int64", chunks=(4096, 2))
        self._f.create_dataset("ids", shape=(0,), maxshape=(None,), dtype=h5py.string_dtype("utf-8"),
                               chunks=(4096,))
        for key, value in wanted.items():
            self._f.attrs[key] = value
        self._f.flush()
        self._existing: set[str] = set()
        self._n, self._rows = 0, 0

    def _resume(self, wanted: dict) -> None:
        """Reopen an existing file: check its settings and drop a video whose id never reached the file."""
        import h5py

        try:
            self._f = h5py.File(self.path, "r+")
        except OSError as exc:
            raise DataError(f"{self.path}: cannot open the existing video feature file for appending ({exc}); "
                            f"move it aside or choose another --out.") from exc
        try:
            if not all(key in self._f for key in ("features", "spans", "ids")):
                raise DataError(f"{self.path}: exists but is not a vlpet packed video feature file; choose another "
                                f"--out.")
            feats, spans, ids = self._f["features"], self._f["spans"], self._f["ids"]
            found = dict(read_attrs(self._f.attrs), dim=int(feats.shape[1]), dtype=str(feats.dtype))
            check_same(self.path, found, dict(wanted, dim=self.dim))
        except DataError:
            self._f.close()
            raise
        names = list(ids.asstr()[:])
        n = min(len(names), spans.shape[0])
        while n and not names[n - 1]:
            n -= 1
        rows = int(sum(spans[n - 1])) if n else 0
        for dataset, size in ((ids, n), (spans, n), (feats, rows)):
            if dataset.shape[0] != size:
                dataset.resize(size, axis=0)
        self._f.flush()
        self._existing = set(names[:n])
        self._n, self._rows = n, rows

    def existing(self) -> set[str]:
        """Video ids already in the file (skipped by a resumed run)."""
        return set(self._existing)

    def add(self, vid: str, feats: np.ndarray) -> None:
        """Append one video: its frames (flushed), its span (flushed), then its id (flushed)."""
        import numpy as np

        feats = np.asarray(feats)
        _check_feats(self.path, vid, feats, self.dim)
        if vid in self._existing:
            raise DataError(f"{self.path}: video '{vid}' is already in the file; skip the ids in existing().")
        k = feats.shape[0]
        features, spans, ids = self._f["features"], self._f["spans"], self._f["ids"]
        features.resize(self._rows + k, axis=0)
        features[self._rows:self._rows + k] = feats.astype(self.dtype, copy=False)
        self._f.flush()
        spans.resize(self._n + 1, axis=0)
        spans[self._n] = (self._rows, k)
        self._f.flush()
        ids.resize(self._n + 1, axis=0)
        ids[self._n] = vid
        self._f.flush()
        self._n += 1
        self._rows += k
        self._existing.add(vid)

    def close(self) -> None:
        if self._f:
            self._f.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_video_writer(path: Path, layout: str, dim: int, dtype: str = "float16",
                      attrs: dict | None = None) -> NpzVideoWriter | PackedVideoWriter:
    """A writer for `layout` at `path`, resuming an existing store written with the same dim and attributes."""
    if dtype not in DTYPES:
        raise DataError(f"unsupported feature dtype '{dtype}'; use one of {', '.join(DTYPES)}.")
    if layout == NPZ:
        return NpzVideoWriter(path, dim, dtype, attrs)
    if layout == PACKED:
        return PackedVideoWriter(path, dim, dtype, attrs)
    raise DataError(f"unknown video feature layout '{layout}'; use one of {', '.join(VIDEO_LAYOUTS)}.")


# ------------------------------------------------------------------------------------------------------------
# Frames
# ------------------------------------------------------------------------------------------------------------

def adaptive_max_pool_time(feats: np.ndarray, n: int) -> np.ndarray:
    """(T, dim) -> (n, dim): max over frames [floor(i*T/n), ceil((i+1)*T/n)), torch's adaptive_max_pool1d."""
    import numpy as np

    total = feats.shape[0]
    idx = np.arange(n)
    starts = (idx * total) // n
    ends = -((-(idx + 1) * total) // n)
    return np.stack([feats[s:e].max(axis=0) for s, e in zip(starts.tolist(), ends.tolist())])


def resize_frames(feats: np.ndarray, n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The reference's resize: (n, dim) float32, zero rows appended below n frames or adaptive max pooling over
    time above it, and a mask (n,) int64 with 1 for real frames (all ones after pooling)."""
    import numpy as np

    feats = np.asarray(feats, dtype=np.float32)
    if feats.ndim != 2:
        raise ValueError(f"video features must be (n_frames, dim), got shape {feats.shape}")
    total, dim = feats.shape
    mask = np.ones(n, dtype=np.int64)
    if total < n:
        out = np.zeros((n, dim), dtype=np.float32)
        out[:total] = feats
        mask[total:] = 0
        return out, mask
    if total == n:
        return feats, mask
    return adaptive_max_pool_time(feats, n), mask
