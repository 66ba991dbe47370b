"""Video feature stores: VALUE's per-video `.npz` folders and vlpet's packed HDF5, and the reference's frame resize.

npz layout (VALUE, HERO extractor): a folder of `<vid_name>.npz`, each with array `features` (n_frames, dim),
float16; vlpet's writer adds `vlpet_attrs.json` beside them (model, dtype, fps, ...). Packed layout: one HDF5 file
with `features` (total_frames, dim), all videos' frames concatenated, `spans` (N, 2) int64 (first row, frame count)
and `ids` (N,) utf-8. Video i is `features[spans[i,0] : spans[i,0] + spans[i,1]]`; a writer flushes the frames,
then the span, then the id, so the valid videos are the first len(ids) with a non-empty id and a kill loses at
most the video being written (layouts.py). `resize_frames` is the reference's `resize` (zero rows at the end, or
adaptive max pooling over time) with a mask of the real frames.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlpet_cli.errors import DataError
from vlpet_cli.features.hdf5 import check_same
from vlpet_cli.features.layouts import FolderStore, FolderWriter, MemoryStore, PackedStore, PackedWriter

if TYPE_CHECKING:
    import numpy as np

NPZ = "npz"
PACKED = "packed"
DEFAULT_VIDEO_FEATURE_NAME = "clip-vit"
ATTRS_FILE = "vlpet_attrs.json"
_CHUNK_ROWS = 128


class VideoReads:
    """What every video store shares: the frames of one video, their count, and the resized model input."""

    kind = "video"
    noun = "video"
    inputs = "--videos DIR"

    def get(self, vid: str) -> np.ndarray:
        """Frames of one video (n_frames, dim) in the stored dtype; DataError for an unknown id."""
        raise NotImplementedError

    def frame_count(self, vid: str) -> int:
        """Number of frames of one video, without reading its features."""
        return len(self.get(vid))

    def visual(self, vids: Sequence[str], video: Any) -> dict:
        """The model's visual input for a record's videos (`video`: the run's data.video settings): vis_feats
        (n_videos, frames, dim) float32, each video resized as the reference does, vis_kind 'video', and with
        data.video.mask_padding vis_mask (n_videos * frames,), 0 for a zero row the resize appended."""
        import numpy as np

        frames = video.frames
        out = {"vis_feats": np.stack([resize_frames(self.get(vid), frames)[0] for vid in vids]), "vis_kind": "video"}
        if video.mask_padding:
            out["vis_mask"] = np.concatenate([(np.arange(frames) < min(self.frame_count(vid), frames))
                                              .astype(np.int64) for vid in vids])
        return out

    def summary(self) -> dict:
        """`features inspect`'s figures: dim, dtype, frames per video (min, max, mean) and attributes."""
        counts = [self.frame_count(vid) for vid in self.ids()]  # type: ignore[attr-defined]
        frames = ({"min": min(counts), "max": max(counts), "mean": round(sum(counts) / len(counts), 2)}
                  if counts else None)
        return {"dim": self.dim, "dtype": self.dtype or None, "frames": frames,  # type: ignore[attr-defined]
                "attributes": self.attrs}  # type: ignore[attr-defined]

    @staticmethod
    def describe(info: dict) -> list[str]:
        frames = info["frames"]
        return [f"  dim:        {info['dim']}  dtype: {info['dtype']}",
                "  frames:     " + (f"{frames['min']}-{frames['max']} per video (mean {frames['mean']})"
                                    if frames else "-")]


class PackedVideoStore(VideoReads, PackedStore):
    """A packed video feature file (see the module's docstring)."""

    datasets = ("features", "spans", "ids")
    other = "a folder of <vid_name>.npz files"
    kind_words = "video feature"

    def _read_index(self, f: Any) -> dict[str, tuple[int, int]]:
        ids = list(f["ids"].asstr()[:])
        spans = f["spans"][: len(ids)].tolist()
        n_rows = f["features"].shape[0]
        return {vid: (int(start), int(count)) for vid, (start, count) in zip(ids, spans)
                if vid and start + count <= n_rows}  # "" = id never written (interrupted writer)

    def get(self, vid: str) -> np.ndarray:
        import numpy as np

        start, count = self._where(vid)
        return np.asarray(self._file()["features"][start:start + count])

    def frame_count(self, vid: str) -> int:
        return self._where(vid)[1]


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


class NpzVideoStore(VideoReads, FolderStore):
    """VALUE's folder of `<vid_name>.npz` files (array `features`), with vlpet's attributes beside them."""

    layout = NPZ
    suffix = ".npz"

    def _probe(self) -> None:
        """Read attributes from the sidecar and dim/dtype from the first .npz header, else from the sidecar."""
        sidecar = self.path / ATTRS_FILE
        attrs: dict = {}
        if sidecar.is_file():
            try:
                attrs = json.loads(sidecar.read_text())
            except (OSError, ValueError) as exc:
                raise DataError(f"{sidecar}: unreadable ({exc}); delete it (it only records extraction settings) "
                                f"or re-extract.") from exc
        ids = self.ids()
        if ids:
            shape, self._dtype = self._header(ids[0])
            self._row = tuple(shape[1:])
        else:
            self._row = (attrs["dim"],) if attrs.get("dim") else None
            self._dtype = attrs.get("dtype")
        self._attrs = attrs

    def _unreadable(self, item: Path, exc: Exception) -> DataError:
        return DataError(f"{item}: cannot read array 'features' ({exc}); delete the file and re-run extraction.")

    def _header(self, vid: str) -> tuple[tuple[int, ...], str]:
        item = self._item_path(vid)
        try:
            shape, dtype = _npz_header(item)
        except (OSError, KeyError, ValueError) as exc:
            raise self._unreadable(item, exc) from exc
        _check_2d(item, shape)
        return shape, dtype

    def get(self, vid: str) -> np.ndarray:
        import numpy as np

        item = self._existing_item(vid)
        try:
            with np.load(item) as data:
                feats = np.asarray(data["features"])
        except (OSError, KeyError, ValueError) as exc:
            raise self._unreadable(item, exc) from exc
        _check_2d(item, feats.shape)
        return feats

    def frame_count(self, vid: str) -> int:
        self._existing_item(vid)
        return int(self._header(vid)[0][0])


def _check_2d(item: Path, shape: tuple[int, ...]) -> None:
    if len(shape) != 2:
        raise DataError(f"{item}: 'features' has shape {tuple(shape)}, expected (n_frames, dim); re-extract it.")


class MemoryVideoStore(VideoReads, MemoryStore):
    """Video features computed in memory (`vlpet predict`)."""

    def get(self, vid: str) -> np.ndarray:
        return self._stored(vid)


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
        return False  # opening it as an image store reports the unreadable file


# ------------------------------------------------------------------------------------------------------------
# Writers
# ------------------------------------------------------------------------------------------------------------

class VideoWrites:
    """What both video writers check: one video's frames are (n_frames, dim) under a plain file name."""

    path: Path
    row: tuple[int, ...]

    def _checked(self, vid: str, feats: Any) -> np.ndarray:
        import numpy as np

        feats = np.asarray(feats)
        dim = self.row[0]
        if feats.ndim != 2 or feats.shape[1] != dim:
            raise DataError(f"{self.path}: features of video '{vid}' have shape {tuple(feats.shape)}, expected "
                            f"(n_frames, {dim}).")
        if not vid or "/" in vid or vid.startswith("."):
            raise DataError(f"{self.path}: invalid video id {vid!r} (must be a plain file name).")
        return feats


class NpzVideoWriter(VideoWrites, FolderWriter):
    """Writer of VALUE's layout: one `<vid>.npz` per video, written under a temp name and renamed."""

    noun = "video"
    layout = NPZ
    suffix = ".npz"
    store = NpzVideoStore

    def _check(self, store: Any, wanted: dict) -> None:
        wanted = dict(wanted, dim=self.row[0])
        found = store.attrs
        if self._existing:
            found = dict(found, dim=store.dim, dtype=store.dtype)
        check_same(self.path, found, wanted)
        if found != dict(found, **wanted) or not (self.path / ATTRS_FILE).is_file():
            from vlpet_cli.atomic import write_text

            write_text(self.path / ATTRS_FILE, json.dumps(dict(found, **wanted), indent=1, sort_keys=True) + "\n")

    def add(self, vid: str, feats: np.ndarray) -> None:
        """Write `<vid>.npz` (array `features`) atomically."""
        import numpy as np

        feats = self._checked(vid, feats).astype(self.dtype, copy=False)
        self._put(vid, lambda fh: np.savez(fh, features=feats))


class PackedVideoWriter(VideoWrites, PackedWriter):
    """Append-only writer of a packed video file: frames flushed, then the span, then the id."""

    noun = "video"
    other = NPZ
    kind_words = "video feature"

    def add(self, vid: str, feats: np.ndarray) -> None:
        """Append one video: its frames (flushed), its span (flushed), then its id (flushed)."""
        feats = self._checked(vid, feats)
        if vid in self._existing:
            raise DataError(f"{self.path}: video '{vid}' is already in the file; skip the ids in existing().")
        self._append([vid], feats, {"spans": [(self._rows, len(feats))]})

    def _chunks(self) -> tuple[int, ...]:
        return (_CHUNK_ROWS, *self.row)

    def _index_datasets(self) -> list[tuple[str, tuple[int, ...], str, int]]:
        return [("spans", (2,), "int64", 4096)]

    def _settings(self, row: tuple[int, ...]) -> dict:
        return {"dim": int(row[0])}

    def _rows_of(self, n: int) -> int:
        return int(sum(self._f["spans"][n - 1])) if n else 0


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
