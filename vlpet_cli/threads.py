"""How many CPU threads torch computes with: chosen one way for every command and every process.

torch's default is a thread per core of the machine, whatever this process may use: beside other jobs, inside a
container with a CPU quota, or as one of several processes under `accelerate launch`, those threads then wait on
each other (on a loaded 2-core machine the toy COCO run took 807 s with the default and 43 s with one thread, for the
same scores). The count, in order of precedence:

1. `train.threads` of the preset, when set;
2. the environment variable VLPET_THREADS;
3. one thread for a tiny model (under TINY_PARAMETERS parameters, e.g. the toy world's tiny backbones): its steps
   are many small operations, which more threads only slow down;
4. else the CPUs this process may use (its affinity mask, capped by the cgroup CPU quota, v2 `cpu.max` or v1
   `cpu.cfs_quota_us`) divided by the processes started on this machine (LOCAL_WORLD_SIZE, which torchrun and
   `accelerate launch` set, or MPI's local size), at least one.

OMP_NUM_THREADS no longer decides it (`accelerate launch` sets it in every process on its own); use VLPET_THREADS.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlpet_cli.errors import VlpetError

ENV = "VLPET_THREADS"
TINY_PARAMETERS = 20_000_000  # tiny-bart, tiny-t5 and tiny-clip are ~1M; t5-small (60M) and up get the CPUs
LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE")
CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")
V1_CPU_MOUNTS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


@dataclass(frozen=True)
class Threads:
    """A thread count and why it was chosen (shown in the run header)."""

    count: int
    why: str

    def __str__(self) -> str:
        return f"{self.count} CPU thread{'' if self.count == 1 else 's'} ({self.why})"


def affinity_cpus() -> int:
    """The CPUs this process may run on (its affinity mask; the machine's count where there is no mask)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cgroup_quota(root: Path | None = None, self_cgroup: Path | None = None) -> float | None:
    """The CPU quota, in CPUs, of this process's cgroup and its ancestors (the tightest), from cgroup v2's
    `cpu.max` or v1's `cpu.cfs_quota_us` / `cpu.cfs_period_us`; None when there is none or it cannot be read.
    `root` and `self_cgroup` default to /sys/fs/cgroup and /proc/self/cgroup."""
    dirs = _cgroup_dirs(root or CGROUP_ROOT, self_cgroup or SELF_CGROUP)
    quotas = [q for directory in dirs if (q := _quota(directory)) is not None]
    return min(quotas) if quotas else None


def _cgroup_dirs(root: Path, self_cgroup: Path) -> list[Path]:
    """The directories that may hold this process's CPU limits: each mount's root (v2: `root`, v1: `root/cpu`
    and the like) and, below it, this process's cgroup as /proc/self/cgroup names it with every ancestor."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    paths: dict[Path, list[str]] = {root: [], **{root / name: [] for name in V1_CPU_MOUNTS}}
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # cgroup v2's unified hierarchy
            paths[root].append(path)
        elif "cpu" in controllers.split(","):
            for name in V1_CPU_MOUNTS:
                paths[root / name].append(path)
    dirs: list[Path] = []
    for mount, inside in paths.items():
        for path in inside:
            directory = mount / path.strip("/")
            while directory != mount and mount in directory.parents:
                dirs.append(directory)
                directory = directory.parent
        dirs.append(mount)
    return list(dict.fromkeys(dirs))


def _quota(directory: Path) -> float | None:
    """The CPU quota one cgroup directory sets, in CPUs, or None."""
    try:
        if (directory / "cpu.max").is_file():  # v2: "max 100000" or "150000 100000"
            limit, every = ((directory / "cpu.max").read_text().split() + ["100000"])[:2]
            return None if limit == "max" else int(limit) / int(every)
        if (directory / "cpu.cfs_quota_us").is_file():  # v1: -1 when unlimited
            quota = int((directory / "cpu.cfs_quota_us").read_text())
            period = int((directory / "cpu.cfs_period_us").read_text())
            return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError, ZeroDivisionError):
        return None
    return None


def usable_cpus(root: Path | None = None, self_cgroup: Path | None = None) -> tuple[int, str]:
    """(CPUs this process may keep busy, how that was found): the affinity mask, capped by a cgroup CPU quota
    (rounded down: 1.5 CPUs of quota keep one thread busy without throttling)."""
    cpus = affinity_cpus()
    quota = cgroup_quota(root, self_cgroup)
    if quota is not None and quota < cpus:
        return max(1, int(quota)), f"a cgroup CPU quota of {quota:g}"
    return cpus, f"{cpus} CPU{'' if cpus == 1 else 's'} usable"


def local_processes() -> int:
    """The processes started on this machine (torchrun and `accelerate launch` set LOCAL_WORLD_SIZE); 1 alone."""
    for name in LOCAL_SIZE_VARS:
        try:
            value = int(os.environ.get(name, ""))
        except ValueError:
            continue
        if value > 0:
            return value
    return 1


def requested_threads(preset_threads: int | None = None) -> Threads | None:
    """The count the user asked for: `train.threads`, else VLPET_THREADS (an unusable value is refused); None
    when neither is set."""
    if preset_threads:
        return Threads(int(preset_threads), "train.threads")
    text = os.environ.get(ENV, "").strip()
    if not text:
        return None
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise VlpetError(f"{ENV}={text!r}: give a whole number of CPU threads, at least 1 (e.g. {ENV}=1), or unset "
                         f"it to let vlpet choose")
    return Threads(count, ENV)


def choose_threads(parameters: int | None = None, preset_threads: int | None = None, root: Path | None = None,
                   self_cgroup: Path | None = None) -> Threads:
    """The thread count for a model of `parameters` parameters (None: size unknown), by the rule above."""
    asked = requested_threads(preset_threads)
    if asked is not None:
        return asked
    if parameters is not None and parameters < TINY_PARAMETERS:
        return Threads(1, f"a tiny model, {parameters / 1e6:.1f}M parameters")
    cpus, why = usable_cpus(root, self_cgroup)
    processes = local_processes()
    if processes > 1:
        return Threads(max(1, cpus // processes), f"{why}, shared by {processes} processes")
    return Threads(cpus, why)


def configure_threads(model: Any = None, preset_threads: int | None = None) -> Threads:
    """Choose the count for `model` (a torch module, a parameter count, or None) and set torch to it."""
    import torch

    if model is None or isinstance(model, int):
        parameters = model
    else:
        parameters = sum(p.numel() for p in model.parameters())
    chosen = choose_threads(parameters, preset_threads)
    torch.set_num_threads(chosen.count)
    return chosen
