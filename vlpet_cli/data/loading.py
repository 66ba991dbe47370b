"""Records, feature stores and datasets for a preset's tasks under a data root."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vlpet_cli.config import Preset
from vlpet_cli.data.cache import load_records
from vlpet_cli.errors import DataError, VlpetError, file_error
from vlpet_cli.features.images import locate_features, open_features
from vlpet_cli.features.videos import locate_video_features, open_video_features
from vlpet_cli.tasks import get_task, task_class
from vlpet_cli.tasks.base import Task, TaskDataset, check_features, open_task_features


def feature_kind(task: str) -> str:
    """'image' or 'video': the kind of features a task (name or alias) reads (presets.resolve's task_kind)."""
    return task_class(task).feature_kind


@dataclass
class TaskData:
    """The train and validation datasets of the chosen tasks."""

    train: dict = field(default_factory=dict)
    val: dict = field(default_factory=dict)


def locate_store(root: Path, task: Task, split_name: str, image_name: str, video_name: str) -> Path:
    """The feature store a task's split reads (image: data.feature_name; video: data.video.feature_name)."""
    if task.feature_kind == "video":
        return locate_video_features(root, task.feature_source(split_name), video_name)
    return locate_features(root, task.feature_source(split_name), image_name)


def _store_dim(task: Task, path: Path) -> int | None:
    """A store's feature size from its header (None for an empty video folder: check_features reports it)."""
    if task.feature_kind == "video":
        return open_video_features(path).dim
    return open_features(path).dim


def check_feature_dims(root: Path, preset: Preset, splits=("train", "val")) -> None:
    """Every task's feature stores, for every split used, hold model.feat_dim-sized features (cheap: headers only),
    so a wrong file stops the run before the model is built or anything is written. Image and video tasks in one
    run are refused with one message unless their feature sizes agree."""
    want = preset.model.feat_dim
    seen: set[Path] = set()
    found: list[tuple[str, str, str, Path, int]] = []  # (kind, task, split, path, dim)
    for name in preset.data.tasks:
        task = get_task(name, video=preset.data.video)
        for split in splits:
            for split_name in task.split_names(split):
                path = locate_store(root, task, split_name, preset.data.feature_name, preset.data.video.feature_name)
                if path in seen:
                    continue
                seen.add(path)
                dim = _store_dim(task, path)
                if dim is not None:
                    found.append((task.feature_kind, name, split_name, path, dim))
    first = {}
    for entry in found:
        first.setdefault(entry[0], entry)
    if len(first) > 1 and len({entry[4] for entry in found}) > 1:
        image, video = first["image"], first["video"]
        raise VlpetError(
            f"image tasks ({image[1]}) and video tasks ({video[1]}) in one run need features of one size, but "
            f"{image[3]} is {image[4]}-dimensional and {video[3]} is {video[4]}-dimensional; train image and "
            f"video tasks in separate runs, or extract both with the same CLIP model and set model.feat_dim to "
            f"their size")
    for _, name, split_name, path, dim in found:
        if dim != want:
            raise VlpetError(_dim_message(name, split_name, path, dim, want))


def check_annotations(root: Path, preset: Preset, splits=("train", "val")) -> None:
    """Every annotation file the preset's tasks read for these splits exists and can be read (cheap: opened, not
    parsed), so that a missing or unreadable file stops the command before the model loads."""
    for name in preset.data.tasks:
        task = get_task(name, video=preset.data.video)
        paths = [task.split_path(root, split_name) for split in splits for split_name in task.split_names(split)]
        for path in dict.fromkeys([*paths, *task.support_files(root)]):
            if not path.is_file():
                raise DataError(f"{name}: annotation file not found: {path}. Fix: {task.missing_file_fix()}.")
            try:
                path.open("rb").close()
            except OSError as exc:
                raise file_error(exc, writing=False) from None


def _dim_message(task: str, split: str, path: Path, found: int, want: int) -> str:
    return (f"{task} {split}: the features in {path} are {found}-dimensional but the preset expects "
            f"model.feat_dim={want}; re-extract them with the model the other tasks use, or add the override "
            f"model.feat_dim={found} if every task's features are {found}-dimensional")


def check_record_features(task, records, stores) -> None:
    """check_features, on the Arrow columns for cached records; the full check (and its message) when any id is
    missing."""
    if getattr(records, "flat", False):
        from vlpet_cli.features.hdf5 import missing_ids

        by_source = records.images_by_source()
        if all(s in stores and not missing_ids(stores[s], ids) for s, ids in by_source.items()):
            return
        records = list(records)
    check_features(task, records, stores)


def load_task_data(preset: Preset, root: Path, tokenizer, splits=("train", "val"), cache: bool = True) -> TaskData:
    """Records, feature stores and datasets per task; stops early on missing features or bad files. With `cache`,
    the records come from the memory-mapped record cache when it is current (data/cache.py)."""
    data = TaskData()
    for name in preset.data.tasks:
        task = get_task(name, preset.data.prompts, preset.data.use_prompts, preset.data.video)
        store_name = preset.data.video.feature_name if task.feature_kind == "video" else preset.data.feature_name
        for split in splits:
            limit = preset.data.limit if split == "train" else preset.eval.limit
            records = load_records(task, root, split, tokenizer) if cache else task.load(root, split)
            records = records[:limit] if limit else records
            stores = open_task_features(records, root, store_name, task.feature_kind)
            for store in stores.values():
                if store.dim is not None and store.dim != preset.model.feat_dim:
                    raise VlpetError(_dim_message(name, split, store.path, store.dim, preset.model.feat_dim))
            check_record_features(task, records, stores)
            kind = "train" if split == "train" else "eval"
            ds = TaskDataset(task, records, stores, tokenizer, split_kind=kind, seed=preset.train.seed)
            (data.train if split == "train" else data.val)[task.name] = ds
    return data
