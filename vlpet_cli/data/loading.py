"""Records, feature stores and datasets for a preset's tasks under a data root."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vlpet_cli.config import Preset
from vlpet_cli.data.cache import load_records
from vlpet_cli.data.features import locate_features, open_features
from vlpet_cli.data.tasks import get_task
from vlpet_cli.data.tasks.base import TaskDataset, check_features, open_task_features
from vlpet_cli.data.toy import toy_root
from vlpet_cli.errors import VlpetError


def resolve_data_root(data_root: str | None) -> Path:
    """'toy' is the built-in toy world (built on first use); anything else must be an existing directory."""
    if data_root is None:
        raise VlpetError("no data root: pass --data-root DIR (the folder holding vqa/, GQA/, nlvr/, COCO/) "
                         "or --data-root toy for the built-in toy world")
    if data_root == "toy":
        return toy_root()
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise VlpetError(f"--data-root {root} is not a directory")
    return root


def toy_feature_dim() -> int:
    """Feature size of the built-in toy world (building it on first use)."""
    return open_features(locate_features(resolve_data_root("toy"), "COCO")).dim


@dataclass
class TaskData:
    """The train and validation datasets of the chosen tasks."""

    train: dict = field(default_factory=dict)
    val: dict = field(default_factory=dict)


def check_feature_dims(root: Path, preset: Preset, splits=("train", "val")) -> None:
    """Every task's feature stores, for every split used, hold model.feat_dim-sized features (cheap: headers only),
    so a wrong file stops the run before the model is built or anything is written."""
    want = preset.model.feat_dim
    seen: set[Path] = set()
    for name in preset.data.tasks:
        task = get_task(name)
        for split in splits:
            for split_name in task.split_names(split):
                path = locate_features(root, task.feature_source(split_name), preset.data.feature_name)
                if path in seen:
                    continue
                seen.add(path)
                found = open_features(path).dim
                if found != want:
                    raise VlpetError(_dim_message(name, split_name, path, found, want))


def _dim_message(task: str, split: str, path: Path, found: int, want: int) -> str:
    return (f"{task} {split}: the features in {path} are {found}-dimensional but the preset expects "
            f"model.feat_dim={want}; re-extract them with the model the other tasks use, or add the override "
            f"model.feat_dim={found} if every task's features are {found}-dimensional")


def open_stores(records, root: Path, feature_name: str) -> dict:
    """One feature store per source of the records (cached records name their sources without building rows)."""
    if getattr(records, "flat", False):
        return {s: open_features(locate_features(Path(root), s, feature_name))
                for s in sorted(records.images_by_source())}
    return open_task_features(records, root, feature_name)


def check_record_features(task, records, stores) -> None:
    """check_features, on the Arrow columns for cached records; the full check (and its message) when any id is
    missing."""
    if getattr(records, "flat", False):
        from vlpet_cli.data.features import missing_ids

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
        for split in splits:
            limit = preset.data.limit if split == "train" else preset.eval.limit
            records = load_records(task, root, split, tokenizer) if cache else task.load(root, split)
            records = records[:limit] if limit else records
            stores = open_stores(records, root, preset.data.feature_name)
            for store in stores.values():
                if store.dim != preset.model.feat_dim:
                    raise VlpetError(_dim_message(name, split, store.path, store.dim, preset.model.feat_dim))
            check_record_features(task, records, stores)
            kind = "train" if split == "train" else "eval"
            ds = TaskDataset(task, records, stores, tokenizer, split_kind=kind, seed=preset.train.seed)
            (data.train if split == "train" else data.val)[task.name] = ds
    return data
