"""Tokenised records cached on disk and memory-mapped, so that a second start-up skips parsing and validating
the annotation files and the records' memory stays flat (Arrow buffers in the page cache, not a Python object
per row).

One Arrow IPC file per (task, split) under `$VLPET_RECORD_CACHE_DIR`, else `<cache>/records/` (`$VLPET_CACHE`,
else ~/.cache/vlpet; not the data root, which may be read-only), named by a key over everything the records
depend on: the task (class, prompt, truncation, video settings), the split's file names and whether it is read
for evaluation, the tokenizer (its full serialisation), and every annotation file of the task's folder by path
and content hash. Any change gives another key, so a stale file is never read. Files are written atomically
(`atomic.atomic_file`). pyarrow is used directly (the format the `datasets` library caches in) because the key is
ours and `datasets`' fingerprinting would only add an import of a second or more to every start-up.
`VLPET_RECORD_CACHE=0` turns the cache off.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlpet_cli.atomic import atomic_file
from vlpet_cli.tasks.base import Record, Task

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FORMAT = 3
COLUMNS = ("file", "index", "fields", "text", "image_ids", "source", "input_ids")
_FINGERPRINTS: dict[int, tuple[Any, str, int]] = {}
_HASHES: dict[tuple[str, int, int], str] = {}


def enabled() -> bool:
    """Whether the record cache is used (VLPET_RECORD_CACHE=0 turns it off)."""
    return os.environ.get("VLPET_RECORD_CACHE", "1") not in ("0", "false", "no", "off")


def cache_root() -> Path:
    """Where the cached records live: $VLPET_RECORD_CACHE_DIR, else $VLPET_CACHE/records, else
    ~/.cache/vlpet/records."""
    own = os.environ.get("VLPET_RECORD_CACHE_DIR")
    if own:
        return Path(own).expanduser()
    env = os.environ.get("VLPET_CACHE")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "vlpet"
    return base / "records"


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the tokenizer's full serialisation (vocabulary, merges, normaliser, added tokens)."""
    size = len(tokenizer)  # part of the memo's key: adding tokens changes the fingerprint
    memo = _FINGERPRINTS.get(id(tokenizer))
    if memo is not None and memo[0] is tokenizer and memo[2] == size:
        return memo[1]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    special = json.dumps(getattr(tokenizer, "all_special_tokens", []))
    digest = hashlib.sha256(f"{type(tokenizer).__name__}|{len(tokenizer)}|{special}|{text}".encode()).hexdigest()
    _FINGERPRINTS[id(tokenizer)] = (tokenizer, digest, size)
    return digest


def annotation_files(task: Task, root: Path, split: str) -> list[Path]:
    """The split's files and every annotation file of the task's folder (official answers, label maps)."""
    paths = {task.split_path(root, name) for name in task.split_names(split)} | set(task.support_files(root))
    folder = Path(root) / task.folder
    if folder.is_dir():
        paths |= {p for p in folder.iterdir() if p.suffix in (".json", ".jsonl") and p.is_file()}
    return sorted(p for p in paths if p.is_file())


def content_hash(path: Path) -> str:
    """blake2b of a file's bytes (about 1 GB/s: well under a second for VQA's annotation files, against tens of
    seconds of parsing), memoised per (path, size, mtime) within a process."""
    st = path.stat()
    memo_key = (str(path), st.st_size, st.st_mtime_ns)
    if memo_key not in _HASHES:
        digest = hashlib.blake2b(digest_size=20)
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
        _HASHES[memo_key] = digest.hexdigest()
    return _HASHES[memo_key]


def cache_key(task: Task, root: Path, split: str, for_eval: bool, tokenizer: PreTrainedTokenizerBase) -> str:
    """The key of a split's cached records (see the module docstring for what it covers)."""
    files = [[str(path.resolve()), content_hash(path)] for path in annotation_files(task, root, split)]
    parts = {"format": FORMAT, "task": f"{type(task).__module__}.{type(task).__qualname__}", "name": task.name,
             "prompt": task.prompt, "input_max_length": task.input_max_length, "video": repr(task.video),
             "split": task.split_names(split), "for_eval": for_eval, "tokenizer": tokenizer_fingerprint(tokenizer),
             "files": files}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:40]


CHUNK = 2048
"""Records tokenised per call of the task's batched tokenisation: the ids of a chunk live as Python lists only
until they are in numpy, so a first start-up's memory does not grow with the split's tokens."""


def source_ids(task: Task, records: Sequence[Record], tokenizer: PreTrainedTokenizerBase):
    """(flat token ids, offsets) of every record's encoder text: the task's own batched tokenisation
    (`Task.source_ids`, which TaskDataset.item asks too), `CHUNK` records a call."""
    import itertools

    import numpy as np

    flats, lengths = [], []
    for start in range(0, len(records), CHUNK):
        ids = task.source_ids(records[start:start + CHUNK], tokenizer)
        size = np.fromiter((len(x) for x in ids), dtype=np.int32, count=len(ids))
        flats.append(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(size.sum())))
        lengths.append(size)
        del ids
    lengths_all = np.concatenate(lengths) if lengths else np.zeros(0, np.int32)
    offsets = np.zeros(len(lengths_all) + 1, dtype=np.int32)
    np.cumsum(lengths_all, out=offsets[1:])
    flat = np.concatenate(flats) if flats else np.zeros(0, np.int32)
    return flat, offsets


def _table(task: Task, records: Sequence[Record], tokenizer: PreTrainedTokenizerBase):
    """The Arrow table of a split's records and their token ids, or None when a record's id, label or extra
    would not come back unchanged from JSON (e.g. a tuple): such records are not cached."""
    import pyarrow as pa

    dumps, loads = json.dumps, json.loads
    fields = [dumps([r.id, r.label, r.extra]) for r in records]
    if any(loads(f) != [r.id, r.label, r.extra] for f, r in zip(fields, records)):
        return None
    flat, offsets = source_ids(task, records, tokenizer)
    return pa.table({
        "file": pa.array([r.file for r in records], pa.string()).dictionary_encode(),
        "index": pa.array([r.index for r in records], pa.int64()),
        "fields": pa.array(fields, pa.string()),
        "text": pa.array([r.text for r in records], pa.string()),
        "image_ids": pa.array([list(r.image_ids) for r in records], pa.list_(pa.string())),
        "source": pa.array([r.source for r in records], pa.string()),
        "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat)),
    })


class CachedRecords(Sequence):
    """A read-only, memory-mapped sequence of Records (a view [start, stop) of one cache file); rows are built
    on access. Pickles as its path and range, so data-loader workers map the file themselves."""

    flat = True

    def __init__(self, path: Path, start: int = 0, stop: int | None = None, table: Any = None) -> None:
        self.path = Path(path)
        self._table = table if table is not None else _open(self.path)
        n = self._table.num_rows
        self.start = max(0, min(start, n))
        self.stop = n if stop is None else max(self.start, min(stop, n))
        self._cols = {c: _one_chunk(self._table.column(c)) for c in COLUMNS}
        self._images: dict[str, list[str]] | None = None

    def __getstate__(self) -> dict:
        return {"path": self.path, "start": self.start, "stop": self.stop}

    def __setstate__(self, state: dict) -> None:
        CachedRecords.__init__(self, state["path"], state["start"], state["stop"])

    def __len__(self) -> int:
        return self.stop - self.start

    def _row(self, i: int) -> int:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return self.start + (i % len(self))

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                return [self[k] for k in range(start, stop, step)]
            return CachedRecords(self.path, self.start + start, self.start + max(start, stop), self._table)
        row, cols = self._row(i), self._cols
        record_id, label, extra = json.loads(cols["fields"][row].as_py())
        return Record(cols["file"][row].as_py(), cols["index"][row].as_py(), record_id, cols["text"][row].as_py(),
                      tuple(cols["image_ids"][row].as_py()), cols["source"][row].as_py(), label, extra)

    def __iter__(self) -> Iterator[Record]:
        return (self[k] for k in range(len(self)))

    def load_warnings(self) -> list[str]:
        """The warnings reading the annotation files gave (empty questions or captions), kept with the records."""
        meta = self._table.schema.metadata or {}
        return json.loads(meta.get(b"warnings", b"[]"))

    def token_ids(self, i: int) -> list[int]:
        """The encoder token ids of record i (what TaskDataset.item would tokenise)."""
        return self._cols["input_ids"][self._row(i)].as_py()

    def token_lengths(self, indices: Sequence[int]) -> list[int]:
        """Encoder lengths of records `indices` without building the records."""
        import pyarrow.compute as pc

        lengths = pc.list_value_length(self._cols["input_ids"].slice(self.start, len(self))).to_numpy()
        return [int(lengths[i]) for i in indices]

    def images_by_source(self) -> dict[str, list[str]]:
        """{source: unique image ids} of the records in view, computed on the Arrow columns (once)."""
        if self._images is None:
            self._images = self._images_by_source()
        return self._images

    def _images_by_source(self) -> dict[str, list[str]]:
        import pyarrow as pa
        import pyarrow.compute as pc

        ids = self._cols["image_ids"].slice(self.start, len(self))
        sources = pc.take(self._cols["source"].slice(self.start, len(self)), pc.list_parent_indices(ids))
        pairs = pa.table({"source": sources, "id": pc.list_flatten(ids)}).group_by(["source", "id"]).aggregate([])
        out: dict[str, list[str]] = {}
        for source, img in zip(pairs.column("source").to_pylist(), pairs.column("id").to_pylist()):
            out.setdefault(source, []).append(img)
        return out


def _one_chunk(column: Any) -> Any:
    """The column as one array (a file written by one write_table holds one chunk: no copy)."""
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def _open(path: Path):
    """The memory-mapped table of a cache file."""
    import pyarrow as pa

    return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()  # buffers keep the map alive


def load_records(task: Task, root: Path, split: str, tokenizer: PreTrainedTokenizerBase) -> Sequence[Record]:
    """A split's records: memory-mapped from the cache when it holds them under the current key; otherwise read
    from the annotation files (task.load, with all its checks) and written to the cache for the next run."""
    root = Path(root)
    if not enabled() or tokenizer is None:
        return task.load(root, split)
    for_eval = not task.is_train_split(split)
    if any(not task.split_path(root, name).is_file() for name in task.split_names(split)):
        return task.load(root, split)  # its clear message about the missing file
    key = cache_key(task, root, split, for_eval, tokenizer)
    path = cache_root() / f"{task.name}-{'-'.join(task.split_names(split))}-{key}.arrow"
    if path.is_file():
        try:
            cached = CachedRecords(path)
        except (OSError, ValueError, KeyError):
            path.unlink(missing_ok=True)  # damaged (e.g. a foreign file): rebuild it below
        else:
            for message in cached.load_warnings():  # what parsing the files warned about, said again
                warnings.warn(message, UserWarning, stacklevel=2)
            return cached
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = task.load(root, split)
    said = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    for w in caught:  # pass them on as they were raised
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    table = _table(task, records, tokenizer) if records else None
    if table is None:
        return records
    try:
        import pyarrow as pa

        path.parent.mkdir(parents=True, exist_ok=True)
        table = table.replace_schema_metadata({"warnings": json.dumps(said)})
        with atomic_file(path) as f, pa.ipc.new_file(f, table.schema) as writer:
            writer.write_table(table)
        return CachedRecords(path)
    except OSError:
        return records  # an unwritable cache only costs the next start-up its speed
