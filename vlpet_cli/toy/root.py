"""Where a run's data lives: `--data-root toy` is the built-in toy world (built on first use), anything else a
directory holding the datasets."""

from __future__ import annotations

from pathlib import Path

from vlpet_cli.data.loading import feature_kind, locate_store
from vlpet_cli.errors import VlpetError
from vlpet_cli.features.images import locate_features, open_features
from vlpet_cli.features.videos import open_video_features
from vlpet_cli.tasks import get_task
from vlpet_cli.toy.images import toy_root


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


def toy_feature_dim(tasks: list[str] | None = None) -> int:
    """Feature size of the built-in toy world (building it on first use): its video features' when every task
    is a video task, else its image features'."""
    root = resolve_data_root("toy")
    if tasks and all(feature_kind(t) == "video" for t in tasks):
        task = get_task(tasks[0])
        path = locate_store(root, task, task.split_names("train")[0], "", task.video.feature_name)
        dim = open_video_features(path).dim
        if dim is None:
            raise VlpetError(f"{path}: the toy world's video features are empty; rebuild the toy world")
        return dim
    return open_features(locate_features(root, "COCO")).dim
