"""The run directory's layout: the names of its files and folders, and what a directory inside a run is.

`runs` reads and writes run directories and says what a path given to a command means (`runs.locate`, which refuses
what cannot be loaded); `artifacts` asks `place` where a directory's evaluations are, for its model card. Both read
this one layout, so the folder `vlpet eval` writes into is the folder the card reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
BEST = "best"
ADAPTER = "adapter"
EVAL = "eval"


def is_run(path: Path) -> bool:
    """Whether `path` is a run directory (it holds config.yaml)."""
    return (Path(path) / CONFIG).is_file()


@dataclass(frozen=True)
class Located:
    """The directory to load for a path a user gave, and the run it belongs to (None for a lone adapter)."""

    directory: Path  # an adapter, bundle or folded-model directory
    run: Path | None = None
    checkpoint: str | None = None  # 'best' for a run's best-validation adapter

    @property
    def eval_dir(self) -> Path:
        """Where evaluation files go unless --out says otherwise: the run's eval/ (eval/best/ for its best
        checkpoint, never inside a checkpoint, which training replaces), else <adapter>/eval."""
        if self.run is None:
            return self.directory / EVAL
        return self.run / EVAL / self.checkpoint if self.checkpoint else self.run / EVAL


def place(directory: Path) -> Located:
    """What a loadable directory is: a run's final adapter/, a run's checkpoints/best, or a directory of its own."""
    directory = Path(directory)
    if directory.name == ADAPTER and is_run(directory.parent):
        return Located(directory, directory.parent)
    if directory.name == BEST and directory.parent.name == CHECKPOINTS and is_run(directory.parent.parent):
        return Located(directory, directory.parent.parent, BEST)
    return Located(directory)
