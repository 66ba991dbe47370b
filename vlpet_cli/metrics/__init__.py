"""Pure scorers the field reports: VQA accuracy (vqa.py), GQA/NLVR2 accuracy (accuracy.py), captions (caption.py).

Which metrics a task has, and how its predictions and files are read, belong to the task (vlpet_cli/tasks/).
This module stays light (no heavy imports) so the CLI can import it instantly.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["preview_ids"]


def preview_ids(ids: Iterable[object], limit: int = 5) -> str:
    """Show the first few ids of a collection for an error message, e.g. "'a', 'b', ... (+3 more)"."""
    items = list(ids)
    shown = ", ".join(repr(i) for i in items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")
