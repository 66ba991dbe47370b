"""Features on first use for task files (vlpet_cli/tasks/own.py): a task file naming `vision:` has the features of
its images extracted once, resumably, into its store (`features:`, by default features/<images>.<vision>.h5 beside
the file) by `vlpet train` and `vlpet eval`, with extraction's progress bar and its report of images that could not
be decoded; a second run finds them there. `vlpet extract-features` stays the explicit way."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from vlpet_cli.errors import DataError
from vlpet_cli.features.hdf5 import missing_ids
from vlpet_cli.features.kinds import feature_kind
from vlpet_cli.tasks import OwnTask, own_task


def task_images(cls: type[OwnTask]) -> dict[str, tuple[Path, str, int]]:
    """Every image the task's splits name, by its store id -> (its file, the split file and row of its first use);
    reading the splits checks them (columns, rows, images that do not exist)."""
    task = cls()
    found: dict[str, tuple[Path, str, int]] = {}
    for split in cls.spec.splits:
        for record in task.read_split(Path(), split, for_eval=True):
            for key, rel in zip(record.image_ids, (record.extra or {})["images"]):
                found.setdefault(key, (cls.spec.images / rel, record.file, record.index))
    return found


def prepare_task_features(names: list[str] | None, progress: bool = True) -> None:
    """Extract what the stores of the task files among `names` lack, for those that name a vision model. An image
    that cannot be decoded stops the command with one line naming the split file, its row and column (the others
    are listed in the extraction's report beside the store)."""
    for name in names or []:
        cls = own_task(name)
        if cls is None:
            continue
        if cls.spec.vision is None:
            check_store(cls)
            continue
        images = task_images(cls)
        store, kind = cls.store, feature_kind(cls.feature_kind)
        missing = missing_ids(kind.open(store), list(images)) if store.is_file() else list(images)
        if not missing:
            continue
        if progress:
            print(f"{name}: extracting the features of {len(missing)} {kind.name}s with {cls.spec.vision} into "
                  f"{store} (once)", file=sys.stderr, flush=True)
        store.parent.mkdir(parents=True, exist_ok=True)
        summary = kind.extraction().extract({i: images[i][0] for i in missing}, cls.spec.vision, store,
                                            layout="packed", progress=progress)
        if summary.failed:
            image, path, reason = summary.failed[0]
            _, file, row = images[image]
            noun = kind.name
            more = f"; {len(summary.failed)} {noun}s failed, listed in {summary.report}" if len(summary.failed) > 1 \
                else ""
            raise DataError(f"{file}: row {row}, column '{cls.spec.columns['image']}': {noun} {path} cannot be read "
                            f"({reason}){more}. Fix: replace the {noun} with a readable one, or remove the row.")


def task_feature_dim(cls: type[OwnTask]) -> int | None:
    """The size of a task file's features: its store's, else its vision model's (config.json), None if unknown."""
    if cls.store.is_file():
        return feature_kind(cls.feature_kind).open(cls.store).dim
    if cls.spec.vision is None:
        return None
    from vlpet_cli.features.extract.clip import model_dir

    try:
        config = json.loads((model_dir(cls.spec.vision)[0] / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # e.g. a CLIP ResNet checkpoint: the features' size is known once they are extracted
    key = feature_kind(cls.feature_kind).size_key  # video: VALUE's features are the frames' projected embeddings
    size = config.get(key) or (config.get("vision_config") or {}).get(key)
    return int(size) if isinstance(size, int) else None


def feature_defaults(names: list[str] | None) -> list[str]:
    """`model.feat_dim=N` when the task files among `names` tell the features' size (a preset default that the
    command line's overrides still change)."""
    for name in names or []:
        cls = own_task(name)
        dim = task_feature_dim(cls) if cls is not None else None
        if dim is not None:
            return [f"model.feat_dim={dim}"]
    return []


def check_store(cls: type[OwnTask]) -> None:
    """A task file without `vision:` needs its `features:` store to exist."""
    if cls.spec.vision is None and not cls.store.is_file():
        option = "--videos" if cls.spec.video else "--images"
        raise DataError(f"{cls.spec.path}: features: {cls.store} not found. Fix: extract them with `vlpet "
                        f"extract-features {option} {cls.spec.images} --model MODEL --out {cls.store}`, or name a "
                        f"vision model (vision: tiny-clip) to extract them on first use.")
