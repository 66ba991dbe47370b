"""The table of feature kinds: for each kind a task may read (`Task.feature_kind`), where a source's store lives,
its layouts (how a store is opened and written), its default name, how the run's settings name it, and which
module extracts it. Every caller that works for either kind looks the kind up here instead of testing it.

    image  <root>/<source>/clip_features/<name>.h5 (packed) or <name>/ (per-image <img_id>.h5 files)
    video  <root>/video/vis_features/<source>/<name>.h5 (packed) or <name>/ (VALUE's <vid_name>.npz files)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from vlpet_cli.errors import DataError
from vlpet_cli.features import images, videos
from vlpet_cli.features.layouts import MemoryStore, Store, Writer


@dataclass(frozen=True)
class FeatureKind:
    """One kind of visual features (see the module's docstring)."""

    name: str
    folder: Callable[[Path, str], Path]  # (data root, source) -> the folder holding the source's stores
    default_name: str
    stores: dict[str, type[Store]]  # layout -> store class; the "packed" one is a file, the other a folder
    writers: dict[str, type[Writer]]
    default_layout: str
    memory: type[MemoryStore]  # features computed in memory (vlpet predict)
    setting: str  # the run's data setting that names the store, e.g. "video.feature_name"
    extractor: str  # the module that extracts this kind: extract(...), load_model(...), embed_files(...)
    ids_word: str  # what the missing ids are called in messages
    unpack_hint: str = ""
    extra: str | None = None  # the pip extra (vlpet[NAME]) that making this kind needs
    size_key: str = "hidden_size"  # the vision model's config key giving the features' size (video: projected)

    @property
    def folder_layout(self) -> str:
        return next(layout for layout in self.stores if layout != "packed")

    def paths(self, root: Path, source: str, name: str | None = None) -> tuple[Path, Path]:
        """(packed file, folder) where a source's store of this name lives; a source that is the absolute path of a
        packed file (a task file's store, vlpet_cli/tasks/own.py) is that file, whatever the root and name."""
        if source.endswith(".h5") and Path(source).is_absolute():
            return Path(source), Path(source).with_suffix("")
        base = self.folder(Path(root), source) / (name or self.default_name)
        return base.with_name(base.name + ".h5"), base

    def default_out(self, root: Path, source: str, name: str | None = None) -> Path:
        """Where `vlpet extract-features` writes a source's store in the default layout."""
        packed, folder = self.paths(root, source, name)
        return packed if self.default_layout == "packed" else folder

    def locate(self, root: Path, source: str, name: str | None = None) -> Path:
        """The packed file of a source's store if it exists, else its folder; DataError naming both."""
        packed, folder = self.paths(root, source, name)
        if packed.is_file():
            return packed
        if folder.is_dir():
            return folder
        out = self.default_out(root, source, name)
        raise DataError(
            f"no features for source '{source}' ({self.name}s): neither the packed file {packed} nor the folder "
            f"{folder} ({self.folder_layout} layout) exists. Extract them with `vlpet extract-features "
            f"{self.stores['packed'].inputs} --out {out}`{self.unpack_hint}, or check --data-root."
        )

    def open(self, path: Path) -> Any:
        """Open a packed .h5 file or a folder (the layout is told by the path)."""
        path = Path(path)
        if path.is_dir():
            return self.stores[self.folder_layout](path)
        if path.is_file():
            return self.stores["packed"](path)
        raise DataError(f"{path}: {self.name} feature file or folder not found; check the path or run "
                        f"`vlpet extract-features {self.stores['packed'].inputs} --out {path}`.")

    def writer(self, path: Path, layout: str, row: tuple[int, ...], dtype: str = "float16",
               attrs: dict | None = None) -> Any:
        """A writer for `layout` at `path` (rows of shape `row`: (n_tokens, dim) an image, (dim,) a frame),
        resuming an existing store written with the same settings."""
        if layout not in self.writers:
            raise DataError(f"unknown {self.name} feature layout '{layout}'; use one of {', '.join(self.writers)}.")
        return self.writers[layout](path, row, dtype, attrs)

    def store_name(self, data: Any) -> str:
        """The store's name in a run's data settings (data.feature_name, data.video.feature_name)."""
        value = data
        for part in self.setting.split("."):
            value = getattr(value, part)
        return value

    def extraction(self) -> ModuleType:
        """The module that extracts this kind (imported on first use: it needs torch)."""
        return importlib.import_module(self.extractor)

    def missing_message(self, task: str, n_bad: int, n_records: int, first: list[str], places: list[str]) -> str:
        """check_features' message: which records lack features, where it looked, the fix."""
        out = self.default_out(Path("<root>"), "<source>").as_posix()
        extract = f"vlpet extract-features {self.stores['packed'].inputs} --out {out}"
        return (f"{task}: {n_bad} of {n_records} records have no {self.name} features (first missing "
                f"{self.ids_word}: {', '.join(first)}); looked in {'; '.join(places)}. Fix: extract features for "
                f"these {self.name}s ({extract}) or point --data-root at the folder holding "
                f"{self.folder(Path(''), '<source>').as_posix()}/.")


IMAGE = FeatureKind(
    "image", lambda root, source: root / source / "clip_features", images.DEFAULT_FEATURE_NAME,
    stores={images.PACKED: images.PackedImageStore, images.PER_IMAGE: images.PerImageStore},
    writers={images.PACKED: images.PackedImageWriter, images.PER_IMAGE: images.PerImageWriter},
    default_layout=images.PACKED, memory=images.MemoryImageStore, setting="feature_name",
    extractor="vlpet_cli.features.extract.images", ids_word="ids")
VIDEO = FeatureKind(
    "video", lambda root, source: root / "video" / "vis_features" / source, videos.DEFAULT_VIDEO_FEATURE_NAME,
    stores={videos.PACKED: videos.PackedVideoStore, videos.NPZ: videos.NpzVideoStore},
    writers={videos.NPZ: videos.NpzVideoWriter, videos.PACKED: videos.PackedVideoWriter},
    default_layout=videos.NPZ, memory=videos.MemoryVideoStore, setting="video.feature_name",
    extractor="vlpet_cli.features.extract.videos", ids_word="videos",
    unpack_hint=" (or unpack VALUE's clip-vit features there)", extra="video", size_key="projection_dim")
KINDS: dict[str, FeatureKind] = {kind.name: kind for kind in (IMAGE, VIDEO)}


def feature_kind(name: str) -> FeatureKind:
    """The kind a task reads, by its `feature_kind` ('image' or 'video')."""
    if name not in KINDS:
        raise DataError(f"unknown feature kind '{name}'; use one of {', '.join(KINDS)}.")
    return KINDS[name]


def kind_of(path: Path) -> FeatureKind:
    """The kind of the store at `path`: video for a folder of .npz files or a packed file with per-video spans,
    image otherwise (an empty folder included)."""
    return VIDEO if videos.is_video_store(Path(path)) else IMAGE


def open_store(path: Path) -> Any:
    """Open any store, image or video, packed file or folder."""
    return kind_of(path).open(path)
