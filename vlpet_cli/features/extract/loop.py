"""The extraction loop that images and videos share: decode -> model -> writer -> report.

A `Job` says what differs (how one file is decoded, how a group of decoded files becomes features, what the rate
counts); `run` does the rest: it skips the ids the store already holds, decodes on a thread pool while the model
runs, writes (and flushes) each group as soon as it is computed, so an interrupted run loses at most the group in
flight and a re-run resumes, and lists the files it could not decode in a report beside the store (`<out>.errors.txt`
for a file, `<out>/errors.txt` for a folder; removed once nothing is missing). A full disk ends the run with one
line (which store, how many were written, about how much more space the rest needs) and the store left valid.
`check_request` refuses, before any model loads, what would fail later: unknown options and an output that cannot be
written.
"""

from __future__ import annotations

import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlpet_cli.atomic import write_text
from vlpet_cli.errors import VlpetError
from vlpet_cli.features.hdf5 import DTYPES, DiskFull, human_bytes
from vlpet_cli.progress import Progress

_REPORT_HEADER = "# id\tpath\treason\n"


@dataclass
class ExtractSummary:
    """What one extraction run did; `seconds` and `rate` (`unit` per second) cover the loop, not model loading."""

    out: Path
    layout: str
    noun: str = "image"
    unit: str = "images"  # what `units` and `rate` count: images, or a video's frames
    written: int = 0
    units: int = 0
    skipped_existing: int = 0
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # (id, path, reason)
    seconds: float = 0.0
    report: Path | None = None

    @property
    def rate(self) -> float:
        return self.units / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        """One human-readable paragraph for the CLI."""
        text = f"{self.out} ({self.layout}): {self.written} written"
        if self.unit != f"{self.noun}s":  # a video: how many and what it counts
            text = f"{self.out} ({self.layout}): {self.written} {self.noun}s written ({self.units} {self.unit})"
        text += (f", {self.skipped_existing} already there, {len(self.failed)} failed, {self.seconds:.1f} s "
                 f"({self.rate:.1f} {self.unit}/s)")
        if self.failed and self.report:
            text += f"\nfailed {self.noun}s are listed in {self.report}"
        return text


@dataclass
class Job:
    """What an extraction of one kind plugs into the loop."""

    noun: str  # "image" | "video"
    unit: str  # what the rate counts: "images" | "frames"
    decode: Callable[[Path], np.ndarray]  # one file -> the model's input for it
    embed: Callable[[list[np.ndarray]], Sequence[np.ndarray]]  # decoded files -> one features array each
    group: int  # decoded files per `embed` call
    ahead: int  # files decoded ahead of the model
    units: Callable[[np.ndarray], int] = lambda decoded: 1  # what one decoded file counts for the rate


# ------------------------------------------------------------------------------------------------------------
# Before the model loads
# ------------------------------------------------------------------------------------------------------------

def check_request(out: Path, layout: str, layouts: Sequence[str], dtype: str, batch_size: int,
                  limit: int | None) -> None:
    """Refuse unknown options and an output that cannot be written, before any model loads."""
    if layout not in layouts:
        raise VlpetError(f"unknown --layout '{layout}'; use one of {', '.join(layouts)}.")
    if dtype not in DTYPES:
        raise VlpetError(f"unsupported --dtype '{dtype}'; use one of {', '.join(DTYPES)}.")
    if batch_size < 1 or (limit is not None and limit < 0):
        raise VlpetError("--batch-size must be >= 1 and --limit >= 0.")
    check_writable(Path(out))


def check_writable(out: Path) -> None:
    """VlpetError when `out` cannot be written: the folder that will hold it (or its nearest existing parent) must
    take a new file, and an existing file must open for writing."""
    folder = out if out.is_dir() else out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise VlpetError(f"{out}: cannot write the features there ({exc.strerror or exc}: {folder}); choose "
                         f"another --out, or make {folder} writable.") from None
    if out.is_file():
        try:
            open(out, "r+b").close()
        except OSError as exc:
            raise VlpetError(f"{out}: cannot write the features there ({exc.strerror or exc}); choose another "
                             f"--out, or make the file writable.") from None


# ------------------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------------------

class _Inline:
    """Executor stand-in that decodes in the calling thread (workers=0)."""

    def submit(self, fn: Any, *args: Any) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - delivered through the future like a pool would
            fut.set_exception(exc)
        return fut

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


def _reason(exc: BaseException, path: Path) -> str:
    if isinstance(exc, FileNotFoundError) or not Path(path).exists():
        return "file not found"
    return f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("\t", " ")


def _decoded(pool: Any, items: list[tuple[str, Path]], decode: Callable[[Path], Any], group: int,
             ahead: int) -> Iterator[tuple[list[str], list[Any], list[tuple[str, str, str]]]]:
    """Yield (ids, decoded inputs, failures) per group of files while the next ones are already being decoded."""
    pending: deque[tuple[str, Path, Future]] = deque()
    source = iter(items)

    def fill() -> None:
        while len(pending) < ahead:
            try:
                item_id, path = next(source)
            except StopIteration:
                return
            pending.append((item_id, path, pool.submit(decode, path)))

    fill()
    while pending:
        batch = [pending.popleft() for _ in range(min(group, len(pending)))]
        fill()
        ids, inputs, failures = [], [], []
        for item_id, path, fut in batch:
            try:
                inputs.append(fut.result())
                ids.append(item_id)
            except Exception as exc:  # noqa: BLE001 - any decoding failure is reported, not fatal
                failures.append((item_id, str(path), _reason(exc, path)))
        yield ids, inputs, failures


def report_path(out: Path) -> Path:
    """Where the failed-files report of a store goes: `<out>/errors.txt` for a folder, else `<out>.errors.txt`."""
    return out / "errors.txt" if out.is_dir() else out.with_name(out.name + ".errors.txt")


def _write_report(path: Path, failed: list[tuple[str, str, str]], requested: set[str], attempted: set[str],
                  done: set[str]) -> None:
    """Failures of this run plus earlier ones still requested, not retried (limit) and still missing.

    The report is removed when no failure remains.
    """
    rows: dict[str, tuple[str, str, str]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            parts = line.split("\t")
            keep = len(parts) == 3 and not line.startswith("#") and parts[0] in requested
            if keep and parts[0] not in attempted and parts[0] not in done:
                rows[parts[0]] = (parts[0], parts[1], parts[2])
    for row in failed:
        rows[row[0]] = row
    if not rows:
        path.unlink(missing_ok=True)
        return
    write_text(path, _REPORT_HEADER + "".join("\t".join(r) + "\n" for r in rows.values()))


def _full_message(out: Path, noun: str, summary: ExtractSummary, kept: int, left: int, need: float) -> str:
    more = f" need about {human_bytes(need)} more" if need else " still wait"
    return (f"{out}: the disk is full after {summary.written} new {noun}s this run; the {kept} {noun}s in the store "
            f"are kept and valid, and the {left} left{more}. Free space on that disk and run the same command again "
            f"to resume.")


def run(job: Job, items: dict[str, Path], writer: Any, limit: int | None = None, workers: int = 2,
        progress: bool = True) -> ExtractSummary:
    """Extract `items` (id -> file) into the store `writer` writes; resumable, failures reported (module docstring).
    The writer is closed when the run ends."""
    out = writer.path
    summary = ExtractSummary(out=out, layout=writer.layout, noun=job.noun, unit=job.unit)
    done = writer.existing()
    todo = [(item_id, Path(path)) for item_id, path in items.items() if item_id not in done]
    summary.skipped_existing = len(items) - len(todo)
    if limit is not None:
        todo = todo[:limit]
    bar = Progress(len(todo), progress, label="extract", unit=job.unit, every_s=5.0, stderr=True,
                   line=lambda b: _plain_line(b, job))
    bar.description = "0 failed"
    pool: Any = ThreadPoolExecutor(max_workers=workers) if workers > 0 else _Inline()
    attempted: set[str] = set()
    itemsize, stored_bytes, stored_items = np.dtype(writer.dtype).itemsize, 0, 0
    error: DiskFull | None = None
    start = time.perf_counter()
    try:
        for ids, inputs, failures in _decoded(pool, todo, job.decode, job.group, job.ahead):
            attempted.update(ids)
            attempted.update(f[0] for f in failures)
            units = 0
            if inputs:
                feats = job.embed(inputs)
                stored_bytes += sum(int(np.asarray(f).size) for f in feats) * itemsize
                stored_items += len(ids)
                writer.write(ids, feats)
                summary.written += len(ids)
                units = sum(job.units(x) for x in inputs)
                summary.units += units
            summary.failed.extend(failures)
            bar.advance(len(ids) + len(failures), f"{len(summary.failed)} failed", count=units)
    except DiskFull:
        left = len(todo) - summary.written - len(summary.failed)
        need = stored_bytes / stored_items * left * 1.05 + writer.headroom if stored_items and left else 0.0
        error = DiskFull(_full_message(out, job.noun, summary, len(writer.existing()), left, need), out)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        writer.close()
        bar.close()
        summary.seconds = time.perf_counter() - start
        report = report_path(out)
        try:
            _write_report(report, summary.failed, set(items), attempted, writer.existing())
        except (OSError, VlpetError):
            if error is None:
                raise
        summary.report = report if report.is_file() else None
    if error is not None:
        raise error
    return summary


def _plain_line(bar: Progress, job: Job) -> str:
    eta = bar.eta()
    tail = f", ETA {int(eta // 60)}:{int(eta % 60):02d}" if eta is not None else ""
    return (f"extract: {bar.completed}/{bar.total} {job.noun}s ({bar.description}), {bar.rate():.1f} "
            f"{job.unit}/s{tail}")
