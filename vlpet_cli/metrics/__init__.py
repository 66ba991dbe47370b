"""Metrics the field reports: VQA accuracy, GQA/NLVR2 accuracy, caption scores, and scoring of prediction files.

This module stays light (no heavy imports) so the CLI can list tasks and metric names instantly.
"""

from __future__ import annotations

from collections.abc import Iterable

TASKS: tuple[str, ...] = ("vqa", "gqa", "nlvr", "coco")

PRIMARY_METRIC: dict[str, str] = {"vqa": "vqa", "gqa": "acc", "nlvr": "acc", "coco": "cider"}

CAPTION_METRICS: tuple[str, ...] = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rougel", "cider", "spice")

# Names a user may ask for, per task ("bleu" is shorthand for bleu1..bleu4).
VALID_METRICS: dict[str, tuple[str, ...]] = {
    "vqa": ("vqa",),
    "gqa": ("acc",),
    "nlvr": ("acc", "consistency"),
    "coco": ("cider", "bleu", "bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rougel", "spice"),
}

# What is computed when the user names no metric.
DEFAULT_METRICS: dict[str, tuple[str, ...]] = {
    "vqa": ("vqa",),
    "gqa": ("acc",),
    "nlvr": ("acc", "consistency"),
    "coco": ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rougel", "cider"),
}

__all__ = ["CAPTION_METRICS", "DEFAULT_METRICS", "PRIMARY_METRIC", "TASKS", "VALID_METRICS", "preview_ids"]


def preview_ids(ids: Iterable[object], limit: int = 5) -> str:
    """Show the first few ids of a collection for an error message, e.g. "'a', 'b', ... (+3 more)"."""
    items = list(ids)
    shown = ", ".join(repr(i) for i in items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")
