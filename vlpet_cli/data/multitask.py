"""The multi-task batch schedule (spec/pipeline.md §4): single-task batches, tasks drawn without replacement.

Each epoch every task's training set is permuted like torch's DistributedSampler (generator seeded with
data_seed + epoch, padded so that every rank has the same number of batches) and cut into batches of that
task's size. The order of tasks is a list holding each task once per batch, shuffled with random.Random(epoch)
(independent of any seed, as in the reference) and consumed from the end. The whole schedule of an epoch is
known up front, so resuming at step k loads nothing before step k.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from fractions import Fraction
from functools import partial
from typing import Any

from vlpet_cli.errors import VlpetError
from vlpet_cli.tasks import TASKS, TaskDataset, collate
from vlpet_cli.tasks.base import is_flat


def _fraction(value: Any, task: str) -> Fraction:
    """A ratio given as a number, a Fraction or a string such as '100/60'."""
    try:
        if isinstance(value, float):
            return Fraction(value).limit_denominator(10_000)
        return Fraction(value)
    except (ValueError, TypeError, ZeroDivisionError):
        raise VlpetError(f"batch-size ratio for {task} must be a number or 'a/b', not {value!r}.") from None


def task_batch_sizes(base: int, tasks: Iterable[str],
                     ratios: Mapping[str, Any] | None = None) -> dict[str, int]:
    """Per-task batch sizes int(base * ratio), at least 1: the ratio given in `ratios` (train.task_ratios), else
    the task's own (`Task.batch_ratio`, the reference's)."""
    if base < 1:
        raise VlpetError(f"batch size must be >= 1, not {base}.")
    sizes = {}
    for task in tasks:
        if ratios is not None and task in ratios:
            ratio = _fraction(ratios[task], task)
        elif task in TASKS:
            ratio = TASKS[task].batch_ratio
        else:
            raise VlpetError(f"no batch-size ratio for task '{task}'. Fix: give one in the preset's ratios.")
        if ratio <= 0:
            raise VlpetError(f"batch-size ratio for {task} must be > 0, not {ratio}.")
        sizes[task] = max(1, math.floor(base * ratio))
    return sizes


def epoch_batches(records: Mapping[str, int], batch_sizes: Mapping[str, int], world_size: int = 1) -> dict[str, int]:
    """Batches per epoch per process, by task, for `records` training records per task: each task's records are
    shared out over the processes (padded, as shard_indices pads them) and cut into batches of the task's size,
    the last one possibly shorter: ceil(ceil(records / world_size) / batch size)."""
    return {task: math.ceil(math.ceil(n / world_size) / batch_sizes[task]) for task, n in records.items()}


def shard_indices(n: int, epoch: int, data_seed: int = 0, rank: int = 0, world_size: int = 1,
                  shuffle: bool = True) -> list[int]:
    """This rank's indices for an epoch, exactly as DistributedSampler(seed=data_seed, drop_last=False)."""
    import torch

    if shuffle:
        g = torch.Generator()
        g.manual_seed(data_seed + epoch)
        order = torch.randperm(n, generator=g).tolist()
    else:
        order = list(range(n))
    per_rank = math.ceil(n / world_size)
    total = per_rank * world_size
    pad = total - n
    if pad and order:
        order += (order * math.ceil(pad / len(order)))[:pad]
    return order[rank:total:world_size]


def task_order(n_batches: Mapping[str, int], epoch: int) -> list[str]:
    """The tasks of an epoch's steps, in the order they are consumed (the shuffled list popped from the end)."""
    names = [task for task, k in n_batches.items() for _ in range(k)]
    random.Random(epoch).shuffle(names)
    names.reverse()
    return names


def _chunks(indices: list[int], size: int) -> list[list[int]]:
    """Consecutive batches of `size` indices; the last one may be shorter."""
    return [indices[k:k + size] for k in range(0, len(indices), size)]


class _Items:
    """Dataset view addressed by (task, epoch, index) keys, so workers need no epoch state."""

    def __init__(self, datasets: Mapping[str, TaskDataset]) -> None:
        self.datasets = dict(datasets)

    def __getitem__(self, key: tuple[str, int, int]) -> dict:
        task, epoch, i = key
        return self.datasets[task].item(i, epoch)


class _Steps:
    """Batch sampler over the planned steps of one pass; keys are made lazily, one batch at a time."""

    def __init__(self) -> None:
        self.batches: Iterable[list[tuple[str, int, int]]] = ()
        self.count = 0

    def __iter__(self) -> Iterator[list[tuple[str, int, int]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return self.count


def _pad_id(datasets: Iterable[TaskDataset]) -> int:
    """The pad id of the first dataset's tokenizer."""
    for ds in datasets:
        return ds.pad_id
    return 0


class MultitaskLoader:
    """Per-process multi-task training batches: `epoch(e, start_step)` yields (task, batch) pairs."""

    def __init__(self, datasets: Mapping[str, TaskDataset], batch_sizes: Mapping[str, int], data_seed: int = 0,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, pad_id: int | None = None,
                 pin_memory: bool = False) -> None:
        if not datasets:
            raise VlpetError("no training tasks given.")
        if not 0 <= rank < world_size:
            raise VlpetError(f"rank {rank} is outside world size {world_size}.")
        for task, ds in datasets.items():
            if len(ds) == 0:
                raise VlpetError(f"{task}: the training split has no records.")
            if batch_sizes.get(task, 0) < 1:
                raise VlpetError(f"{task}: batch size must be >= 1, not {batch_sizes.get(task)}.")
        # reference order of the task list before shuffling: vqa, gqa, nlvr, caption
        self.tasks = [t for t in TASKS if t in datasets] + [t for t in datasets if t not in TASKS]
        self.datasets = {t: datasets[t] for t in self.tasks}
        self.batch_sizes = {t: int(batch_sizes[t]) for t in self.tasks}
        self.data_seed = data_seed
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.pad_id = _pad_id(self.datasets.values()) if pad_id is None else pad_id
        self._sampler = _Steps()
        self._loader: Any = None

    def n_batches(self) -> dict[str, int]:
        """Batches per epoch per process, by task."""
        return epoch_batches({t: len(self.datasets[t]) for t in self.tasks}, self.batch_sizes, self.world_size)

    def __len__(self) -> int:
        return sum(self.n_batches().values())

    def _plan(self, epoch: int, start_step: int = 0) -> Iterator[tuple[str, list[int]]]:
        """(task, record indices) for steps start_step.. of an epoch, computed lazily after the shards."""
        shards = {t: shard_indices(len(self.datasets[t]), epoch, self.data_seed, self.rank, self.world_size)
                  for t in self.tasks}
        order = task_order(self.n_batches(), epoch)
        done = Counter(order[:start_step])
        for t in order[start_step:]:
            b, j = self.batch_sizes[t], done[t]
            done[t] += 1
            yield t, shards[t][j * b:(j + 1) * b]

    def schedule(self, epoch: int) -> list[tuple[str, list[int]]]:
        """Every step of an epoch on this rank as (task, record indices); loads no data."""
        return list(self._plan(epoch))

    def _data_loader(self) -> Any:
        """One DataLoader over the step sampler; workers persist across epochs and open features lazily."""
        if self._loader is None:
            import torch
            from torch.utils.data import DataLoader

            # Its own generator: starting a pass must not draw from the global RNG (dropout), or a resumed run
            # would diverge from an uninterrupted one.
            # (torch's stub asks for a Dataset; DataLoader takes any map-style object: __getitem__, __len__)
            self._loader = DataLoader(
                _Items(self.datasets),  # type: ignore[arg-type]
                batch_sampler=self._sampler, collate_fn=partial(collate, pad_id=self.pad_id),
                num_workers=self.num_workers, pin_memory=self.pin_memory,
                persistent_workers=self.num_workers > 0, generator=torch.Generator().manual_seed(self.data_seed))
        return self._loader

    @property
    def generator(self) -> Any:
        """The DataLoader's own torch.Generator: each pass draws its workers' base seed from it, so a checkpoint
        saves its state (`get_state`) and a resumed run restores it (`set_state`) before the next pass."""
        return self._data_loader().generator

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[str, dict]]:
        """(task, batch) for steps start_step..len-1 of an epoch; skipped steps are never loaded.

        One pass at a time: starting another pass ends the previous one.
        """
        n_steps = len(self)
        if not 0 <= start_step <= n_steps:
            raise VlpetError(f"start step {start_step} is outside epoch {epoch} ({n_steps} steps).")
        for ds in self.datasets.values():
            ds.set_epoch(epoch)
        self._sampler.batches = ([(t, epoch, i) for i in idx] for t, idx in self._plan(epoch, start_step))
        self._sampler.count = n_steps - start_step
        return ((batch["task"], batch) for batch in self._data_loader())


def source_lengths(dataset: TaskDataset, indices: list[int]) -> list[int]:
    """Encoder length in tokens of each record (the task's batched tokenisation, as `item` tokenises)."""
    if is_flat(dataset.records):  # cached records know their token ids (data/cache.py)
        return dataset.records.token_lengths(indices)
    return [len(ids) for ids in dataset.task.source_ids([dataset.records[i] for i in indices], dataset.tokenizer)]


def eval_order(dataset: TaskDataset, rank: int = 0, world_size: int = 1, by_length: bool = False) -> list[int]:
    """This rank's records (r, r+W, ...), longest encoder text first when by_length, so that a batch pads
    little (stable: equal lengths keep record order); `inference.predict` puts predictions back in record order."""
    if not 0 <= rank < world_size:
        raise VlpetError(f"rank {rank} is outside world size {world_size}.")
    indices = list(range(rank, len(dataset), world_size))
    if not by_length or len(indices) < 2:
        return indices
    lengths = source_lengths(dataset, indices)
    if len(set(lengths)) == 1:
        return indices
    return [i for _, i in sorted(zip(lengths, indices), key=lambda pair: -pair[0])]


def shard_batches(order: list[int], batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """Rank r's batches: the batches of `order` one process would form, r, r+W, ... (no padding duplicates)."""
    if batch_size < 1:
        raise VlpetError(f"batch size must be >= 1, not {batch_size}.")
    if not 0 <= rank < world_size:
        raise VlpetError(f"rank {rank} is outside world size {world_size}.")
    return _chunks(list(order), batch_size)[rank::world_size]


def eval_batches(dataset: TaskDataset, batch_size: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, order: list[int] | None = None) -> Iterator[dict]:
    """Collated batches of a dataset; rank r takes records r, r+W, ... (no padding duplicates) in record order,
    or the records of `order` in that order (see eval_order)."""
    import torch
    from torch.utils.data import DataLoader

    if batch_size < 1:
        raise VlpetError(f"batch size must be >= 1, not {batch_size}.")
    if not 0 <= rank < world_size:
        raise VlpetError(f"rank {rank} is outside world size {world_size}.")
    indices = list(range(rank, len(dataset), world_size)) if order is None else list(order)
    batches = _chunks(indices, batch_size)
    # torch's stub asks for a Dataset; DataLoader takes any map-style object (__getitem__, __len__)
    loader: DataLoader[dict] = DataLoader(dataset,  # type: ignore[arg-type]
                                          batch_sampler=batches, collate_fn=partial(collate, pad_id=dataset.pad_id),
                                          num_workers=num_workers, generator=torch.Generator())
    return iter(loader)
