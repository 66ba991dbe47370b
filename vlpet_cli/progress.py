"""One progress helper for every long loop: a rich bar on a terminal, plain periodic lines otherwise, silent
when disabled (e.g. on non-main processes or with --no-progress)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from rich.console import Console


class Progress:
    """Progress over `total` items starting at `done`. `advance(n, description)` moves it on; `count` (default n)
    is what the rate counts (samples, images); `unit` adds a '<rate> <unit>/s' column. Off a terminal a line
    (`line(self)`, default '[completed/total] description | ETA m:ss') is printed every `every_s` seconds and
    at the end; the ETA is left out once the bar is complete or closed."""

    def __init__(self, total: int, enabled: bool = True, label: str = "", done: int = 0, unit: str | None = None,
                 every_s: float = 10.0, stderr: bool = False, line: Callable[[Progress], str] | None = None,
                 final_line: bool = True):
        self.total, self.completed, self.counted = total, done, 0
        self.enabled, self.label, self.unit = enabled, label, unit
        self.description = ""
        self.every_s, self.final_line = every_s, final_line
        self.stream = sys.stderr if stderr else sys.stdout
        self.line = line or default_line
        self.started = self.last_plain = time.perf_counter()
        self.start_done, self.closed = done, False
        self.shown: int | None = None
        self.console = Console(stderr=stderr)
        self.bar = None
        if enabled and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            columns = [TextColumn(f"{label} {{task.description}}" if label else "{task.description}"),
                       BarColumn(), MofNCompleteColumn()]
            if unit:
                columns.append(TextColumn("{task.fields[rate]}"))
            self.bar = RichProgress(*columns, TimeRemainingColumn(), console=self.console)
            self.task = self.bar.add_task("", total=total, completed=done, rate="")
            self.bar.start()

    def rate(self) -> float:
        """Counted units per second since the start."""
        return self.counted / max(time.perf_counter() - self.started, 1e-9)

    def eta(self) -> float | None:
        """Seconds left at the pace since the start; None when complete, closed, or nothing is done yet."""
        done = self.completed - self.start_done
        if self.closed or self.completed >= self.total or done <= 0:
            return None
        return (self.total - self.completed) * (time.perf_counter() - self.started) / done

    def advance(self, n: int = 1, description: str | None = None, count: int | None = None) -> None:
        """Move on by n items (counting `count` units for the rate, default n)."""
        self.update(self.completed + n, description, count=n if count is None else count)

    def update(self, completed: int, description: str | None = None, count: int = 0) -> None:
        """Set the position (and description) directly."""
        self.completed = completed
        self.counted += count
        if description is not None:
            self.description = description
        if not self.enabled:
            return
        if self.bar is not None:
            rate = f"{self.rate():.1f} {self.unit}/s" if self.unit else ""
            self.bar.update(self.task, completed=completed, description=self.description, rate=rate)
        elif time.perf_counter() - self.last_plain >= self.every_s or completed == self.total:
            self._plain()

    def _plain(self) -> None:
        print(self.line(self), file=self.stream, flush=True)
        self.last_plain = time.perf_counter()
        self.shown = self.completed

    def print(self, text: str) -> None:
        """A message above the bar (or a plain line)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.console.print(text)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        """Stop the bar; off a terminal, print the final position if the last line did not show it."""
        self.closed = True
        if self.bar is not None:
            self.bar.stop()
        elif self.enabled and self.final_line and self.shown != self.completed:
            self._plain()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def clock(seconds: float) -> str:
    """'1:02:03' or '2:03': a duration as a clock."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def default_line(p: Progress) -> str:
    """'[completed/total] description | ETA m:ss' (no ETA once complete or closed)."""
    eta = p.eta()
    return f"[{p.completed}/{p.total}] {p.description}" + (f" | ETA {clock(eta)}" if eta is not None else "")
