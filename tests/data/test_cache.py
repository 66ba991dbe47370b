"""The record cache (vlpet_cli/data/cache.py): a second load memory-maps the tokenised records, gives exactly the
records and model items of a fresh parse, and any change of tokenizer, prompt or annotation file misses it."""

from __future__ import annotations

import json
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from vlpet_cli.data import cache
from vlpet_cli.data.loading import open_task_features
from vlpet_cli.presets import resolve
from vlpet_cli.tasks import get_task
from vlpet_cli.tasks.base import TaskDataset
from vlpet_cli.toy.root import resolve_data_root
from vlpet_cli.vl.model import build_model

SPLITS = {"vqa": ("train", "val"), "gqa": ("train", "val"), "nlvr": ("train", "val"), "coco": ("train", "test")}


def _hf_ids(tok, text: str, limit: int | None) -> list[int]:
    """The tokenizer's own ids of one text (the oracle the batched ids are checked against)."""
    return tok(text, max_length=limit, truncation=True)["input_ids"] if limit is not None else tok(text)["input_ids"]


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("VLPET_RECORD_CACHE_DIR", str(tmp_path / "records"))
    monkeypatch.delenv("VLPET_RECORD_CACHE", raising=False)
    return tmp_path / "records"


@pytest.fixture(scope="module", params=["tiny-bart", "tiny-t5"])
def tok(request):
    return build_model(resolve("vlpet-small", backbone=request.param), weights=True)[1]


def synthetic():
    """benchmarks/synthetic.py: data roots in the real formats."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    try:
        import synthetic
    finally:
        sys.path.pop(0)
    return synthetic


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    """A data root of annotation files only (the record cache reads no features): 40 VQA training questions and
    12 GQA ones in each of GQA/train.json and GQA/valid.json."""
    root = tmp_path_factory.mktemp("small") / "root"
    make = synthetic().vqa_records
    (root / "vqa").mkdir(parents=True)
    (root / "vqa" / "karpathy_train.json").write_text(json.dumps(make(40, 8, seed=1)))
    (root / "GQA").mkdir()
    for split, seed in (("train", 2), ("valid", 3)):
        gqa = [{k: r[k] for k in ("img_id", "question_id", "sent", "label")} for r in make(12, 4, seed=seed)]
        (root / "GQA" / f"{split}.json").write_text(json.dumps(gqa))
    return root


def _same_item(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key == "vis_feats":
            np.testing.assert_array_equal(a[key], b[key])
        else:
            assert a[key] == b[key], key


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SPLITS))
def test_cached_records_and_items_equal_a_fresh_parse(name, cache_dir, tok):
    root = resolve_data_root("toy")
    task = get_task(name)
    for split in SPLITS[name]:
        fresh = task.load(root, split)
        first = cache.load_records(task, root, split, tok)  # parses and writes the cache
        second = cache.load_records(task, root, split, tok)  # maps it
        assert isinstance(second, cache.CachedRecords) and len(list(cache_dir.iterdir())) >= 1
        assert list(first) == fresh and list(second) == fresh
        assert [second.token_ids(i) for i in range(len(fresh))] == [
            _hf_ids(tok, task.source_text(r), task.input_max_length) for r in fresh]
        kind = "train" if split == "train" else "eval"
        stores = open_task_features(fresh, root)
        plain, mapped = (TaskDataset(task, recs, stores, tok, split_kind=kind, seed=3) for recs in (fresh, second))
        assert mapped.records is second  # not copied into a list
        for i in range(0, len(fresh), max(1, len(fresh) // 150)):  # ~150 items per split keep it quick
            _same_item(plain.item(i, 1), mapped.item(i, 1))
        view = second[: len(fresh) // 2]
        assert isinstance(view, cache.CachedRecords) and list(view) == fresh[: len(fresh) // 2]
        assert pickle.loads(pickle.dumps(view))[-1] == fresh[len(fresh) // 2 - 1]


def test_any_key_part_change_misses_the_cache(cache_dir, tok, tmp_path, small_root):
    root = tmp_path / "root"
    shutil.copytree(small_root / "vqa", root / "vqa")
    task = get_task("vqa")
    base = cache.cache_key(task, root, "train", False, tok)
    assert cache.cache_key(task, root, "train", False, tok) == base
    assert cache.cache_key(get_task("vqa", {"vqa": "question: "}), root, "train", False, tok) != base
    assert cache.cache_key(task, root, "train", True, tok) != base
    other = build_model(resolve("vlpet-small", backbone=tok.name_or_path), weights=True)[1]
    assert cache.cache_key(task, root, "train", False, other) == base  # the same tokenizer
    other.add_tokens(["zebra-token"])
    assert cache.cache_key(task, root, "train", False, other) != base
    cache.load_records(task, root, "train", tok)
    path = root / "vqa" / "karpathy_train.json"
    records = json.loads(path.read_text())
    records[0]["sent"] = "Is this a changed question?"
    path.write_text(json.dumps(records))
    assert cache.cache_key(task, root, "train", False, tok) != base
    reloaded = cache.load_records(task, root, "train", tok)
    reloaded = cache.load_records(task, root, "train", tok)
    assert isinstance(reloaded, cache.CachedRecords) and reloaded[0].text == "Is this a changed question?"
    assert len(list(cache_dir.iterdir())) == 2


def test_cache_can_be_turned_off(cache_dir, tok, monkeypatch, small_root):
    """VLPET_RECORD_CACHE=0: the records come from the annotation files, and no cache file is read or written,
    not even one that holds the split under the current key."""
    task = get_task("gqa")
    fresh = task.load(small_root, "train")
    monkeypatch.setenv("VLPET_RECORD_CACHE", "0")
    assert cache.load_records(task, small_root, "train", tok) == fresh
    assert not cache_dir.exists()  # nothing written
    monkeypatch.delenv("VLPET_RECORD_CACHE")
    assert isinstance(cache.load_records(task, small_root, "train", tok), cache.CachedRecords)  # now cached
    files = {p: p.stat().st_mtime_ns for p in cache_dir.iterdir()}
    assert len(files) == 1

    def no_cache_io(*args, **kwargs):
        raise AssertionError("the turned-off cache was used")

    monkeypatch.setattr(cache, "_open", no_cache_io)  # reading a cache file
    monkeypatch.setattr(cache, "atomic_file", no_cache_io)  # writing one
    monkeypatch.setenv("VLPET_RECORD_CACHE", "0")
    assert cache.load_records(task, small_root, "train", tok) == fresh
    assert {p: p.stat().st_mtime_ns for p in cache_dir.iterdir()} == files


def test_load_warnings_are_said_again_from_the_cache(cache_dir, tok, tmp_path, small_root):
    root = tmp_path / "root"
    shutil.copytree(small_root / "GQA", root / "GQA")
    path = root / "GQA" / "train.json"
    records = json.loads(path.read_text())
    records[0]["sent"] = ""
    path.write_text(json.dumps(records))
    task = get_task("gqa")
    for _ in range(2):
        with pytest.warns(UserWarning, match="have an empty question"):
            cache.load_records(task, root, "train", tok)
    with pytest.warns(UserWarning):
        assert isinstance(cache.load_records(task, root, "train", tok), cache.CachedRecords)


@pytest.fixture(scope="module")
def tvqa_root(tmp_path_factory):
    return synthetic().make_tvqa_root(tmp_path_factory.mktemp("tvqa") / "root", 40, 12, n_eval=4, dim=8, frames=2,
                                      words=(5, 400))


@pytest.mark.parametrize("truncate", ["tail", "subtitles"])
@pytest.mark.parametrize("limit", [600, 200])
def test_video_ids_batched_equal_the_tasks_own(tvqa_root, tok, truncate, limit, monkeypatch):
    """The cache's batched ids of a video task are Task.source_ids's, record by record, in both truncation
    modes (texts below, at and above the limit; in 'subtitles' mode some shortened, some whole), over batches
    that do not divide the split."""
    monkeypatch.setattr(cache, "CHUNK", 7)
    from vlpet_cli.config import VideoData
    from vlpet_cli.tasks.video.qa import TvqaTask

    task = TvqaTask(video=VideoData(max_length=limit, truncate=truncate))
    records = task.load(tvqa_root, "train")
    flat, offsets = cache.source_ids(task, records, tok)
    got = [flat[offsets[i]:offsets[i + 1]].tolist() for i in range(len(records))]
    want = [task.source_ids([r], tok)[0] for r in records]
    assert got == want
    whole = [len(_hf_ids(tok, task.source_text(r), None)) for r in records]
    assert min(whole) < limit < max(whole)  # both sides of the limit are exercised
    if truncate == "tail":
        assert got == [_hf_ids(tok, task.source_text(r), limit) for r in records]


def test_tvqa_records_cached_and_memory_mapped(tvqa_root, tok, cache_dir):
    """A video task's split comes back from the cache as memory-mapped rows equal to a fresh parse."""
    from vlpet_cli.tasks.video.qa import TvqaTask

    task = TvqaTask()
    fresh = task.load(tvqa_root, "train")
    cache.load_records(task, tvqa_root, "train", tok)
    again = cache.load_records(task, tvqa_root, "train", tok)
    assert isinstance(again, cache.CachedRecords)
    assert list(again) == fresh
    assert [again.token_ids(i) for i in range(len(fresh))] == [task.source_ids([r], tok)[0] for r in fresh]
