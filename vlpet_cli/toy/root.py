"""Where a run's data lives: `--data-root toy` is the built-in toy world (built on first use), anything else a
directory holding the datasets."""

from __future__ import annotations

from pathlib import Path

from vlpet_cli.errors import DataError, VlpetError
from vlpet_cli.extras import require_extra
from vlpet_cli.features.kinds import feature_kind
from vlpet_cli.tasks import get_task, own_task
from vlpet_cli.toy.images import toy_root


def resolve_data_root(data_root: str | None, tasks: list[str] | None = None) -> Path:
    """'toy' is the built-in toy world (built on first use); anything else must be an existing directory. A run
    whose `tasks` are all task files needs none (they name their own files): the current directory stands in."""
    if data_root is None and tasks and all(own_task(t) is not None for t in tasks):
        return Path.cwd()
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
    """Feature size of the built-in toy world (building it on first use): the features its tasks read when they
    all read one kind (its video features for video tasks), else its image features'."""
    root = resolve_data_root("toy")
    chosen = [get_task(t) for t in tasks or ()]
    if len({task.feature_kind for task in chosen}) != 1:
        chosen = [get_task("coco")]
    task = chosen[0]
    kind = feature_kind(task.feature_kind)
    try:
        path = kind.locate(root, task.feature_source(task.split_names("train")[0]))
    except DataError:
        if kind.extra:  # the toy world is built without what needs a missing extra (videos without PyAV)
            require_extra(kind.extra)
        raise
    dim = kind.open(path).dim
    if dim is None:
        raise VlpetError(f"{path}: the toy world's {kind.name} features are empty; rebuild the toy world")
    return dim
