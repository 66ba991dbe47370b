"""Records, feature stores and datasets for a preset's tasks under a data root."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlpet_cli.config import Preset
from vlpet_cli.data.cache import load_records
from vlpet_cli.errors import DataError, VlpetError, file_error
from vlpet_cli.features.hdf5 import missing_ids
from vlpet_cli.features.kinds import feature_kind as kind_named
from vlpet_cli.tasks import get_task, task_class
from vlpet_cli.tasks.base import Record, Task, TaskDataset

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def feature_kind(task: str) -> str:
    """'image' or 'video': the kind of features a task (name or alias) reads (presets.resolve's task_kind)."""
    return task_class(task).feature_kind


@dataclass
class TaskData:
    """The train and validation datasets of the chosen tasks."""

    train: dict = field(default_factory=dict)
    val: dict = field(default_factory=dict)


def open_task_features(records: Sequence[Record], data_root: Path, name: str | None = None,
                       kind: str = "image") -> dict[str, Any]:
    """Open one feature store per source used by the records (lazy HDF5 / npz; picklable), of the feature kind
    the task reads (`Task.feature_kind`) and named `name` (default: the kind's)."""
    by_source = getattr(records, "images_by_source", None)  # cached records name their sources without rows
    sources = sorted(by_source()) if by_source else sorted({r.source for r in records})
    table = kind_named(kind)
    return {s: table.open(table.locate(Path(data_root), s, name)) for s in sources}


def check_features(task: Task, records: Sequence[Record], stores: Any) -> None:
    """Raise one DataError if any record's image (or video) features are missing (count, first ids, where);
    `stores` maps sources to stores, or is the one store of every source."""
    by_source: dict[str, list[str]] = {}
    for r in records:
        by_source.setdefault(r.source, []).extend(r.image_ids)
    missing: set[str] = set()
    places: list[str] = []
    for source, ids in by_source.items():
        store = stores.get(source) if isinstance(stores, Mapping) else stores
        if store is None:
            lost = list(dict.fromkeys(ids))
            places.append(f"no store for source '{source}'")
        else:
            lost = missing_ids(store, ids)
            if lost:
                places.append(str(store.path))
        missing.update(lost)
    if not missing:
        return
    bad = [r for r in records if any(i in missing for i in r.image_ids)]
    first = list(dict.fromkeys(i for r in bad for i in r.image_ids if i in missing))[:5]
    raise DataError(kind_named(task.feature_kind).missing_message(task.name, len(bad), len(records), first, places))


def check_feature_dims(root: Path, preset: Preset, splits=("train", "val")) -> None:
    """Every task's feature stores, for every split used, hold model.feat_dim-sized features (cheap: headers only),
    so a wrong file stops the run before the model is built or anything is written. Image and video tasks in one
    run are refused with one message unless their feature sizes agree."""
    want = preset.model.feat_dim
    seen: set[Path] = set()
    found: list[tuple[str, str, str, Path, int]] = []  # (kind, task, split, path, dim)
    assert preset.data.tasks is not None, "resolve sets data.tasks"
    for name in preset.data.tasks:
        task = get_task(name, video=preset.data.video)
        for split in splits:
            for split_name in task.split_names(split):
                kind = kind_named(task.feature_kind)
                path = kind.locate(root, task.feature_source(split_name), kind.store_name(preset.data))
                if path in seen:
                    continue
                seen.add(path)
                dim = kind.open(path).dim  # from the header; None for an empty video folder: check_features says
                if dim is not None:
                    found.append((task.feature_kind, name, split_name, path, dim))
    first: dict[str, tuple[str, str, str, Path, int]] = {}
    for entry in found:
        first.setdefault(entry[0], entry)
    if len(first) > 1 and len({entry[4] for entry in found}) > 1:
        a, b = list(first.values())[:2]
        raise VlpetError(
            f"{a[0]} tasks ({a[1]}) and {b[0]} tasks ({b[1]}) in one run need features of one size, but "
            f"{a[3]} is {a[4]}-dimensional and {b[3]} is {b[4]}-dimensional; train {a[0]} and {b[0]} tasks in "
            f"separate runs, or extract both with the same CLIP model and set model.feat_dim to their size")
    for _, name, split_name, path, dim in found:
        if dim != want:
            raise VlpetError(_dim_message(name, split_name, path, dim, want))


def check_annotations(root: Path, preset: Preset, splits=("train", "val")) -> None:
    """Every annotation file the preset's tasks read for these splits exists and can be read (cheap: opened, not
    parsed), so that a missing or unreadable file stops the command before the model loads."""
    assert preset.data.tasks is not None, "resolve sets data.tasks"
    for name in preset.data.tasks:
        task = get_task(name, video=preset.data.video)
        paths = [task.split_path(root, split_name) for split in splits for split_name in task.split_names(split)]
        for path in dict.fromkeys([*paths, *task.support_files(root)]):
            if not path.is_file():
                raise DataError(f"{name}: annotation file not found: {path}. Fix: {task.split_files_fix}.")
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
        by_source = records.images_by_source()
        if all(s in stores and not missing_ids(stores[s], ids) for s, ids in by_source.items()):
            return
        records = list(records)
    check_features(task, records, stores)


def load_task_data(preset: Preset, root: Path, tokenizer: PreTrainedTokenizerBase, splits=("train", "val"),
                   cache: bool = True) -> TaskData:
    """Records, feature stores and datasets per task; stops early on missing features or bad files. With `cache`,
    the records come from the memory-mapped record cache when it is current (data/cache.py)."""
    data = TaskData()
    assert preset.data.tasks is not None, "resolve sets data.tasks"
    for name in preset.data.tasks:
        task = get_task(name, preset.data.prompts, preset.data.use_prompts, preset.data.video)
        store_name = kind_named(task.feature_kind).store_name(preset.data)
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
