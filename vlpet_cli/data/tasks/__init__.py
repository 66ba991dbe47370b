"""The image-text tasks (VQA, GQA, NLVR2, COCO captions): registry, datasets and collation."""

from __future__ import annotations

import difflib
from collections.abc import Mapping

from vlpet_cli.data.tasks.base import (
    DEFAULT_FEATURE_NAME,
    Record,
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

TASKS: dict[str, type[Task]] = {"vqa": VqaTask, "gqa": GqaTask, "nlvr": NlvrTask, "coco": CocoTask}
ALIASES = {"nlvr2": "nlvr", "caption": "coco"}


def get_task(name: str, prompts: Mapping[str, str] | None = None, use_prompts: bool = True) -> Task:
    """The task called `name`; prompts overrides the default prompt per task; use_prompts=False gives ''."""
    key = ALIASES.get(name, name)
    if key not in TASKS:
        close = difflib.get_close_matches(name, [*TASKS, *ALIASES], n=1)
        hint = f" Did you mean '{ALIASES.get(close[0], close[0])}'?" if close else ""
        raise VlpetError(f"unknown task '{name}'.{hint} Known tasks: {', '.join(TASKS)}.")
    cls = TASKS[key]
    prompt = None
    if not use_prompts:
        prompt = ""
    elif prompts is not None:
        prompt = prompts.get(key, prompts.get(name))
    return cls(prompt)


__all__ = [
    "ALIASES",
    "DEFAULT_FEATURE_NAME",
    "TASKS",
    "CocoTask",
    "GqaTask",
    "NlvrTask",
    "Record",
    "Task",
    "TaskDataset",
    "VqaTask",
    "check_features",
    "collate",
    "get_task",
    "open_task_features",
]
