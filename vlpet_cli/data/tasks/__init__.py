"""The table of tasks (VQA, GQA, NLVR2, COCO captions) and their aliases, used by every command.

Adding a task is one new module holding its `Task` subclass plus its line in `TASKS`; every command (train,
eval, eval --predictions, extract-features, quickstart, report) reads the task's declarations from here.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping

from vlpet_cli.data.tasks.base import (
    DEFAULT_FEATURE_NAME,
    Generate,
    Record,
    ScoreChoices,
    Task,
    TaskDataset,
    check_features,
    collate,
    open_task_features,
)
from vlpet_cli.data.tasks.coco import CocoTask
from vlpet_cli.data.tasks.gqa import GqaTask
from vlpet_cli.data.tasks.nlvr import NlvrTask
from vlpet_cli.data.tasks.vqa import VqaTask
from vlpet_cli.errors import VlpetError

TASKS: dict[str, type[Task]] = {
    "vqa": VqaTask,
    "gqa": GqaTask,
    "nlvr": NlvrTask,
    "coco": CocoTask,
}
ALIASES: dict[str, str] = {alias: name for name, cls in TASKS.items() for alias in cls.aliases}


def resolve_task(name: str) -> str:
    """The canonical task name for a name or alias (case and spaces ignored); unknown names list the tasks."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key in TASKS:
        return key
    close = difflib.get_close_matches(key, [*TASKS, *ALIASES], n=1)
    hint = f" Did you mean '{ALIASES.get(close[0], close[0])}'?" if close else ""
    aliases = ", ".join(f"{a} ({t})" for a, t in ALIASES.items())
    raise VlpetError(f"unknown task {name!r}.{hint} Known tasks: {', '.join(TASKS)}; aliases: {aliases}. "
                     f"Fix: pass one of the valid tasks: {', '.join(TASKS)}.")


def task_class(name: str) -> type[Task]:
    """The Task class of a task name or alias (its declarations, without building a task)."""
    return TASKS[resolve_task(name)]


def get_task(name: str, prompts: Mapping[str, str] | None = None, use_prompts: bool = True) -> Task:
    """The task called `name`; prompts overrides the default prompt per task; use_prompts=False gives ''."""
    cls = task_class(name)
    prompt = None
    if not use_prompts:
        prompt = ""
    elif prompts is not None:
        prompt = prompts.get(cls.name, prompts.get(name))
    return cls(prompt)


def primary_metrics() -> dict[str, str]:
    """{task: its primary metric} for every task in the table."""
    return {name: cls.primary_metric for name, cls in TASKS.items()}


__all__ = [
    "ALIASES",
    "DEFAULT_FEATURE_NAME",
    "TASKS",
    "CocoTask",
    "Generate",
    "GqaTask",
    "NlvrTask",
    "Record",
    "ScoreChoices",
    "Task",
    "TaskDataset",
    "VqaTask",
    "check_features",
    "collate",
    "get_task",
    "open_task_features",
    "primary_metrics",
    "resolve_task",
    "task_class",
]
