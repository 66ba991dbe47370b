"""The multi-task schedule: batch sizes, DistributedSampler-like shards, task order, resume, ranks, workers."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch.utils.data.distributed import DistributedSampler
from transformers import PreTrainedTokenizerFast

from vlpet_cli.data.loading import open_task_features
from vlpet_cli.data.multitask import (
    MultitaskLoader,
    eval_batches,
    shard_indices,
    task_batch_sizes,
    task_order,
)
from vlpet_cli.errors import VlpetError
from vlpet_cli.tasks import TaskDataset, get_task

D = 4
SIZES = {"vqa": 23, "gqa": 31, "nlvr": 9, "coco": 6}  # coco: 6 images x 2 captions = 12 rows


def make_tokenizer() -> PreTrainedTokenizerFast:
    """BART-style word-level tokenizer ('<s> … </s>', pad id 1)."""
    words = ["vqa", "gpa", "nlvr", "caption", ":", "question", "answer", "sentence", "true", "false", "a", "b", "c"]
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0),
                                                                                             ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
                                   bos_token="<s>")


def write_features(root: Path, source: str, ids: list[str]) -> None:
    """Packed features; image k is filled with k."""
    path = root / source / "clip_features" / "data_clip_RN101_att.h5"
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=np.stack([np.full((49, D), k, np.float16) for k in range(len(ids))]))
        f.create_dataset("ids", data=ids, dtype=h5py.string_dtype("utf-8"))


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A tiny data root with all four tasks' training files and features."""
    root = tmp_path_factory.mktemp("data")
    coco_imgs = [f"COCO_train2014_{k:012d}" for k in range(12)]
    write_json(root / "vqa" / "karpathy_train.json", [
        {"img_id": coco_imgs[k % 12], "question_id": 1000 + k, "sent": "question a",
         "label": {"a": 1.0, "b": 0.3} if k % 2 else {"c": 0.6}} for k in range(SIZES["vqa"])])
    gqa = [{"img_id": f"vg{k}", "question_id": f"g{k}", "sent": "question b", "label": {"a": 1.0}}
           for k in range(SIZES["gqa"])]
    write_json(root / "GQA" / "train.json", gqa[:20])
    write_json(root / "GQA" / "valid.json", gqa[20:])
    write_json(root / "nlvr" / "train.json", [
        {"identifier": f"train-{k}-0-0", "img0": f"n{k}-img0", "img1": f"n{k}-img1", "label": k % 2,
         "sent": "sentence c", "uid": f"u{k}"} for k in range(SIZES["nlvr"])])
    write_json(root / "COCO" / "dataset_coco.json", {"images": [
        {"filename": f"{coco_imgs[k]}.jpg", "split": "train" if k % 3 else "restval", "cocoid": k,
         "sentences": [{"raw": "a b"}, {"raw": "b c "}]} for k in range(SIZES["coco"])]})
    write_features(root, "COCO", coco_imgs)
    write_features(root, "VG", [f"vg{k}" for k in range(SIZES["gqa"])])
    write_features(root, "nlvr", [f"n{k}-img{j}" for k in range(SIZES["nlvr"]) for j in (0, 1)])
    return root


def datasets(root: Path, seed: int = 0) -> dict[str, TaskDataset]:
    tok = make_tokenizer()
    out = {}
    for name in ("coco", "nlvr", "gqa", "vqa"):  # deliberately not the reference order
        task = get_task(name)
        records = task.load(root, "train")
        out[name] = TaskDataset(task, records, open_task_features(records, root), tok, "train", seed)
    return out


BATCH = {"vqa": 5, "gqa": 8, "nlvr": 2, "coco": 4}


def uid(task: str, meta: dict) -> str:
    """A row's identity; COCO train rows are (image, caption) pairs, so the meta alone is not unique."""
    return str(meta.get("question_id", meta.get("identifier", meta.get("img_id"))))


def same_batch(a: dict, b: dict) -> bool:
    keys = ("input_ids", "attention_mask", "vis_feats", "loss_weights")
    labels_same = torch.equal(a["labels"], b["labels"])
    return a["task"] == b["task"] and a["meta"] == b["meta"] and labels_same and all(
        torch.equal(a[k], b[k]) for k in keys)


# ---- batch sizes, shards and task order ---------------------------------------------------------------------
def test_task_batch_sizes_reference_ratios():
    tasks = ["vqa", "gqa", "nlvr", "coco"]
    assert task_batch_sizes(500, tasks) == {"vqa": 500, "gqa": 833, "nlvr": 166, "coco": 416}
    assert task_batch_sizes(300, tasks) == {"vqa": 300, "gqa": 500, "nlvr": 100, "coco": 250}
    assert task_batch_sizes(60, tasks) == {"vqa": 60, "gqa": 100, "nlvr": 20, "coco": 50}
    as_floats = {"vqa": 1.0, "gqa": 100 / 60, "nlvr": 20 / 60, "coco": 50 / 60}  # what a preset holds
    assert task_batch_sizes(60, tasks, as_floats) == task_batch_sizes(60, tasks)
    assert task_batch_sizes(2, tasks) == {"vqa": 2, "gqa": 3, "nlvr": 1, "coco": 1}  # at least 1
    assert task_batch_sizes(10, ["gqa"], {"gqa": "3/2"}) == {"gqa": 15}
    with pytest.raises(VlpetError, match="no batch-size ratio for task 'imagenet'"):
        task_batch_sizes(10, ["imagenet"])


@pytest.mark.parametrize("n, world, seed, epoch", [(23, 1, 0, 0), (23, 2, 0, 3), (10, 3, 5, 1), (2, 4, 0, 2)])
def test_shards_match_distributed_sampler(n, world, seed, epoch):
    for rank in range(world):
        sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, seed=seed)
        sampler.set_epoch(epoch)
        assert shard_indices(n, epoch, seed, rank, world) == list(sampler)


def test_task_order_reference_construction():
    counts = {"vqa": 5, "gqa": 4, "nlvr": 2, "coco": 3}
    order = task_order(counts, epoch=4)
    assert Counter(order) == Counter(counts)
    expected = ["vqa"] * 5 + ["gqa"] * 4 + ["nlvr"] * 2 + ["coco"] * 3
    random.Random(4).shuffle(expected)
    assert order == [expected.pop() for _ in range(len(expected))]


def test_epoch_task_order_independent_of_seed(root):
    a = MultitaskLoader(datasets(root), BATCH, data_seed=0)
    b = MultitaskLoader(datasets(root, seed=9), BATCH, data_seed=123)
    n = a.n_batches()
    assert n == {"vqa": 5, "gqa": 4, "nlvr": 5, "coco": 3} and len(a) == 17
    assert a.tasks == ["vqa", "gqa", "nlvr", "coco"]
    for e in range(3):
        tasks_a = [t for t, _ in a.schedule(e)]
        assert Counter(tasks_a) == Counter(n)
        assert tasks_a == [t for t, _ in b.schedule(e)] == task_order(n, e)
    assert [t for t, _ in a.schedule(0)] != [t for t, _ in a.schedule(1)]
    assert a.schedule(0) != b.schedule(0)  # the permutations do follow the data seed


# ---- full passes, resume, ranks and workers -----------------------------------------------------------------
def test_full_pass_covers_every_record_once(root):
    loader = MultitaskLoader(datasets(root), BATCH, data_seed=0)
    seen: dict[str, Counter] = {t: Counter() for t in BATCH}
    steps = list(loader.epoch(1))
    assert len(steps) == len(loader)
    for task, batch in steps:
        assert batch["task"] == task and len(batch["meta"]) <= BATCH[task]
        assert batch["vis_feats"].shape[1] == (2 if task == "nlvr" else 1)
        seen[task].update(uid(task, m) for m in batch["meta"])
    assert sum(seen["vqa"].values()) == SIZES["vqa"] and len(seen["vqa"]) == SIZES["vqa"]
    assert len(seen["gqa"]) == SIZES["gqa"] and len(seen["nlvr"]) == SIZES["nlvr"]
    assert sum(seen["coco"].values()) == 2 * SIZES["coco"] and set(seen["coco"].values()) == {2}


def test_resume_yields_the_same_batches_without_loading_skipped(root):
    full = list(MultitaskLoader(datasets(root), BATCH, data_seed=3).epoch(2))
    resumed_ds = datasets(root)
    loaded = Counter()
    for name, ds in resumed_ds.items():
        original = ds.item

        def counting(i, epoch, _original=original, _name=name):
            loaded[_name] += 1
            return _original(i, epoch)

        ds.item = counting
    k = 7
    resumed = list(MultitaskLoader(resumed_ds, BATCH, data_seed=3).epoch(2, start_step=k))
    assert len(resumed) == len(full) - k
    assert all(ta == tb and same_batch(a, b) for (ta, a), (tb, b) in zip(full[k:], resumed))
    assert sum(loaded.values()) == sum(len(b["meta"]) for _, b in full[k:])
    assert list(MultitaskLoader(datasets(root), BATCH).epoch(0, start_step=17)) == []
    with pytest.raises(VlpetError, match="start step 18"):
        MultitaskLoader(datasets(root), BATCH).epoch(0, start_step=18)


def test_vqa_targets_change_with_epoch_but_repeat_per_epoch(root):
    loader = MultitaskLoader({"vqa": datasets(root)["vqa"]}, {"vqa": 23}, data_seed=0)
    targets = {}
    for e in range(6):
        (_, batch), = list(loader.epoch(e))
        order = sorted(range(23), key=lambda j: batch["meta"][j]["question_id"])
        targets[e] = [batch["labels"][j].tolist() for j in order]
    assert len({json.dumps(t) for t in targets.values()}) > 1
    (_, again), = list(MultitaskLoader({"vqa": datasets(root)["vqa"]}, {"vqa": 23}).epoch(5))
    order = sorted(range(23), key=lambda j: again["meta"][j]["question_id"])
    assert [again["labels"][j].tolist() for j in order] == targets[5]


def test_two_ranks_cover_the_dataset(root):
    ranks = [MultitaskLoader(datasets(root), BATCH, data_seed=1, rank=r, world_size=2) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1])
    passes = [list(loader.epoch(0)) for loader in ranks]
    assert [t for t, _ in passes[0]] == [t for t, _ in passes[1]]  # same task at every step
    for task in BATCH:
        ids = [uid(task, m) for p in passes for t, b in p if t == task for m in b["meta"]]
        n_rows = 2 * SIZES["coco"] if task == "coco" else SIZES[task]
        assert len(ids) == n_rows + (n_rows % 2)  # DistributedSampler pads to a multiple of the world size
        expected = {uid(task, get_task(task).eval_info(r)) for r in datasets(root)[task].records}
        assert set(ids) == expected


def test_workers_give_the_same_batches(root):
    plain = list(MultitaskLoader(datasets(root), BATCH, data_seed=0).epoch(1))
    loader = MultitaskLoader(datasets(root), BATCH, data_seed=0, num_workers=2)
    parallel = list(loader.epoch(1))
    assert all(ta == tb and same_batch(a, b) for (ta, a), (tb, b) in zip(plain, parallel))
    assert len(parallel) == len(plain)
    resumed = list(loader.epoch(1, start_step=5))  # persistent workers, next pass
    assert len(resumed) == len(plain) - 5
    assert all(same_batch(a, b) for (_, a), (_, b) in zip(plain[5:], resumed))
    abandoned = loader.epoch(0)
    next(abandoned), next(abandoned)
    again = list(loader.epoch(1))  # a pass left half-way does not leak into the next one
    assert len(again) == len(plain) and all(same_batch(a, b) for (_, a), (_, b) in zip(plain, again))


def test_eval_batches_in_order_without_duplicates(root):
    ds = datasets(root)["vqa"]
    batches = list(eval_batches(ds, 10))
    assert [len(b["meta"]) for b in batches] == [10, 10, 3]
    assert [m["question_id"] for b in batches for m in b["meta"]] == list(range(1000, 1023))
    shards = [[m["question_id"] for b in eval_batches(ds, 4, rank=r, world_size=3) for m in b["meta"]]
              for r in range(3)]
    assert sorted(q for shard in shards for q in shard) == list(range(1000, 1023))
    assert shards[0] == list(range(1000, 1023, 3))
    with_workers = list(eval_batches(ds, 10, num_workers=2))
    assert all(same_batch(a, b) for a, b in zip(batches, with_workers))


def test_loader_validates_inputs(root):
    ds = datasets(root)
    with pytest.raises(VlpetError, match="batch size must be >= 1"):
        MultitaskLoader(ds, {**BATCH, "nlvr": 0})
    with pytest.raises(VlpetError, match="rank 2 is outside world size 2"):
        MultitaskLoader(ds, BATCH, rank=2, world_size=2)
    with pytest.raises(VlpetError, match="batch size must be >= 1"):
        eval_batches(ds["vqa"], 0)
    empty = TaskDataset(get_task("vqa"), [], {}, make_tokenizer())
    with pytest.raises(VlpetError, match="no records"):
        MultitaskLoader({"vqa": empty}, {"vqa": 2})


def test_generator_state_is_read_and_restored(root):
    """Checkpoints save `generator`'s state; a fresh loader given it continues as the original does."""
    loader = MultitaskLoader(datasets(root), BATCH, data_seed=3)
    seeded = loader.generator.get_state()
    assert torch.equal(seeded, torch.Generator().manual_seed(3).get_state())
    list(loader.epoch(0))
    saved = loader.generator.get_state()
    assert not torch.equal(saved, seeded), "each pass draws its workers' base seed from the generator"
    other = MultitaskLoader(datasets(root), BATCH, data_seed=0)
    other.generator.set_state(saved)
    list(loader.epoch(1))
    list(other.epoch(1))
    assert torch.equal(other.generator.get_state(), loader.generator.get_state())
