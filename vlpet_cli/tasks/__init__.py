"""The table of tasks (VQA, GQA, NLVR2, COCO captions; TVQA, How2QA, TVC, YC2C) and their aliases, used by
every command.

Adding a task is one new module holding its `Task` subclass plus its line in `TASKS`; every command (train,
eval, eval --predictions, extract-features, quickstart, report) reads the task's declarations from here. A user's
own task is a task file (`own.py`): `resolve_task("my.yaml")` reads it and registers its class in `TASKS` under its
name, so every command that then asks for the name gets it; the built-in tasks are `BUILT_IN`.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path

from vlpet_cli.config import VideoData
from vlpet_cli.errors import DataError, VlpetError
from vlpet_cli.tasks.base import (
    FileScoring,
    Generate,
    Inputs,
    PredictInput,
    Record,
    Review,
    ScoreChoices,
    Task,
    TaskDataset,
    collate,
)
from vlpet_cli.tasks.coco import CocoTask
from vlpet_cli.tasks.gqa import GqaTask
from vlpet_cli.tasks.nlvr import NlvrTask
from vlpet_cli.tasks.own import OwnTask, is_task_file, read_task_file, task_class_of, write_copy
from vlpet_cli.tasks.records import read_json, record_refs
from vlpet_cli.tasks.video.base import VideoCaptionTask, VideoQaTask, VideoTask
from vlpet_cli.tasks.video.caption import TvcTask, Yc2cTask
from vlpet_cli.tasks.video.qa import How2qaTask, TvqaTask
from vlpet_cli.tasks.vqa import VqaTask

TASKS: dict[str, type[Task]] = {
    "vqa": VqaTask,
    "gqa": GqaTask,
    "nlvr": NlvrTask,
    "coco": CocoTask,
    "tvqa": TvqaTask,
    "how2qa": How2qaTask,
    "tvc": TvcTask,
    "yc2c": Yc2cTask,
}
ALIASES: dict[str, str] = {alias: name for name, cls in TASKS.items() for alias in cls.aliases}
BUILT_IN: tuple[str, ...] = tuple(TASKS)
RUN_TASKS = "tasks"  # the folder of a run that keeps a copy of each task file it trained on


def register_task_file(path: str | Path) -> str:
    """Read a task file, register its task in `TASKS` (replacing one of the same name read before) and return
    its name; a name that is a built-in task's or alias is refused."""
    cls = task_class_of(read_task_file(Path(path), {*BUILT_IN, *ALIASES}))
    TASKS[cls.name] = cls
    return cls.name


def own_task(name: str) -> type[OwnTask] | None:
    """The class of a registered task file's task, None for a built-in task or an unknown name."""
    cls = TASKS.get(name)
    return cls if cls is not None and issubclass(cls, OwnTask) else None


def task_files(names: list[str] | None) -> dict[str, str]:
    """{name: task file} of the task-file tasks among `names` (what a run records in data.task_files)."""
    return {n: str(cls.spec.path) for n in names or [] if (cls := own_task(n)) is not None}


def save_task_files(run_dir: Path, names: list[str] | None) -> None:
    """Keep a copy of each task file of `names` in RUN/tasks/<name>.yaml, its paths absolute."""
    for name in names or []:
        cls = own_task(name)
        if cls is not None:
            write_copy(cls, Path(run_dir) / RUN_TASKS / f"{name}.yaml")


def register_run_tasks(data: dict | None, run_dir: Path | None = None, strict: bool = True) -> list[str]:
    """Register the task files a run recorded (`data` is its config's data section): from the run's copies
    (RUN/tasks/<name>.yaml) where they are, else from the recorded paths. With strict=False a task file that
    cannot be read is left out (`vlpet report` lists what it can); returns the names registered."""
    found = []
    recorded = (data or {}).get("task_files") or {}
    for name, path in recorded.items() if isinstance(recorded, dict) else ():
        copy = Path(run_dir) / RUN_TASKS / f"{name}.yaml" if run_dir is not None else None
        try:
            found.append(register_task_file(copy if copy is not None and copy.is_file() else path))
        except DataError:
            if strict:
                raise
    return found


def resolve_task(name: str) -> str:
    """The canonical task name for a name or alias (case and spaces ignored), or the name of a task file (a path
    ending in .yaml or .yml, registered on the way); unknown names list the tasks."""
    if is_task_file(name):
        return register_task_file(name)
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key in TASKS:
        return key
    close = difflib.get_close_matches(key, [*TASKS, *ALIASES], n=1)
    hint = f" Did you mean '{ALIASES.get(close[0], close[0])}'?" if close else ""
    aliases = ", ".join(f"{a} ({t})" for a, t in ALIASES.items())
    raise VlpetError(f"unknown task {name!r}.{hint} Known tasks: {', '.join(TASKS)}; aliases: {aliases}. "
                     f"Fix: pass one of the valid tasks: {', '.join(TASKS)}. Your own data: the path of its task "
                     f"file (.yaml).")


def task_class(name: str) -> type[Task]:
    """The Task class of a task name or alias (its declarations, without building a task)."""
    return TASKS[resolve_task(name)]


def get_task(name: str, prompts: Mapping[str, str] | None = None, use_prompts: bool = True,
             video: VideoData | None = None) -> Task:
    """The task called `name`; prompts overrides the default prompt per task; use_prompts=False gives '';
    video holds the video tasks' settings (data.video)."""
    cls = task_class(name)
    prompt = None
    if not use_prompts:
        prompt = ""
    elif prompts is not None:
        prompt = prompts.get(cls.name, prompts.get(name))
    return cls(prompt, video)


def primary_metrics() -> dict[str, str]:
    """{task: its primary metric} for every task in the table."""
    return {name: cls.primary_metric for name, cls in TASKS.items()}


def tasks_of_kind(kind: str) -> list[str]:
    """The tasks whose records read features of one kind ('image' or 'video'), in table order."""
    return [name for name, cls in TASKS.items() if cls.feature_kind == kind and name in BUILT_IN]


def default_tasks() -> list[str]:
    """The tasks of a run that names none (data.tasks left open): the image tasks, the reference's multitask."""
    return tasks_of_kind("image")


def annotation_images(annotations: Path) -> dict[str, str | None]:
    """Image (or video) ids named by an annotation file -> relative image path when the file gives one (Karpathy).

    The formats are the tasks' own (vlpet_cli/tasks/): a task's file format (Karpathy `dataset_coco.json`,
    {"images": [{"filepath", "filename"}]}), or a JSON list or JSON lines of records naming images or videos in a
    task's `image_fields` (VQA/GQA `img_id`, NLVR2 `img0`, `img1`, VALUE `vid_name`).
    """
    path = Path(annotations)
    data = read_json(path, "annotation file", "check --annotations")
    for cls in (TASKS[name] for name in BUILT_IN):
        found = cls.file_images(data, path)
        if found is not None:
            return found
    fields: dict[tuple[str, ...], list[str]] = {}
    for name, cls in ((n, TASKS[n]) for n in BUILT_IN):
        if cls.image_fields:
            fields.setdefault(cls.image_fields, []).append(name)
    keys = list(dict.fromkeys(k for group in fields for k in group))
    named = " or ".join(f"{'/'.join(repr(k) for k in group)} ({', '.join(names)})" for group, names in fields.items())
    if isinstance(data, list):
        out: dict[str, str | None] = {}
        for ref in record_refs(data, path, "annotation file"):
            present = [k for k in keys if isinstance(ref.raw, dict) and ref.raw.get(k)]
            if not present:
                raise ref.error(f"names no image or video (no {named})",
                                "fix the record or pass the right annotation file")
            for key in present:
                out.setdefault(str(ref.raw[key]), None)
        return out
    # a classmethod read on its class is a bound method (mypy types it as a plain Callable, without __func__)
    own = [name for name, cls in ((n, TASKS[n]) for n in BUILT_IN)
           if cls.file_images.__func__ is not Task.file_images.__func__]  # type: ignore[attr-defined]
    raise DataError(f"{path}: unrecognised annotation format. Fix: pass a {' or '.join(own)} annotation file "
                    f"(e.g. Karpathy's dataset_coco.json), or a list of records with {named}.")


__all__ = [
    "ALIASES",
    "BUILT_IN",
    "OwnTask",
    "is_task_file",
    "RUN_TASKS",
    "own_task",
    "register_run_tasks",
    "register_task_file",
    "save_task_files",
    "task_files",
    "annotation_images",
    "TASKS",
    "CocoTask",
    "FileScoring",
    "Generate",
    "GqaTask",
    "How2qaTask",
    "Inputs",
    "NlvrTask",
    "PredictInput",
    "Record",
    "Review",
    "ScoreChoices",
    "Task",
    "TaskDataset",
    "TvcTask",
    "TvqaTask",
    "VideoCaptionTask",
    "VideoQaTask",
    "VideoTask",
    "VqaTask",
    "Yc2cTask",
    "collate",
    "default_tasks",
    "get_task",
    "primary_metrics",
    "resolve_task",
    "task_class",
    "tasks_of_kind",
]
