"""Tasks, records, prompts, targets, truncation, TaskDataset, collate and the feature check (tiny data)."""

from __future__ import annotations

import json
import pickle
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from vlpet_cli.data.loading import check_features, open_task_features
from vlpet_cli.errors import DataError, VlpetError
from vlpet_cli.features.kinds import IMAGE
from vlpet_cli.tasks import (
    TASKS,
    CocoTask,
    GqaTask,
    NlvrTask,
    TaskDataset,
    VqaTask,
    collate,
    get_task,
)

D = 8  # feature dim of the tiny stores
WORDS = [
    "what", "is", "on", "the", "wall", "color", "of", "cat", "net", "mesh", "pipe", "white", "red", "two",
    "dogs", "sit", "a", "there", "are", "true", "false", "caption", "vqa", "gpa", "nlvr", ":", "?", ".", ",",
    "left", "image", "has", "one", "more", "than", "right", "dog", "runs", "on", "grass", "very", "long",
    "sentence", "words", "x", "y", "z",
]


# ---- helpers ------------------------------------------------------------------------------------------------
def make_tokenizer(style: str = "bart") -> PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS: BART-style '<s> … </s>' or T5-style '… </s>'."""
    if style == "bart":
        specials = ["<s>", "<pad>", "</s>", "<unk>"]
        template = "<s> $A </s>"
    else:
        specials = ["<pad>", "</s>", "<unk>"]
        template = "$A </s>"
    vocab = {t: i for i, t in enumerate(specials + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(s, vocab[s]) for s in ("<s>", "</s>") if s in vocab])
    extra = {"bos_token": "<s>"} if style == "bart" else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
                                   **extra)


def write_features(root: Path, source: str, ids: list[str], n_tokens: int = 49) -> Path:
    """A packed feature file <root>/<source>/clip_features/data_clip_RN101_att.h5; image k is filled with k."""
    path = root / source / "clip_features" / "data_clip_RN101_att.h5"
    path.parent.mkdir(parents=True, exist_ok=True)
    feats = np.stack([np.full((n_tokens, D), k, dtype=np.float16) for k in range(len(ids))])
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats)
        f.create_dataset("ids", data=ids, dtype=h5py.string_dtype("utf-8"))
    return path


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def vqa_record(qid: int, img: str, sent: str, label: dict) -> dict:
    return {"img_id": img, "question_id": qid, "sent": sent, "label": label, "answer_type": "other",
            "question_type": "what is"}


def stores_for(root: Path, records) -> dict:
    return open_task_features(records, root)


@pytest.fixture
def bart():
    return make_tokenizer("bart")


@pytest.fixture
def t5():
    return make_tokenizer("t5")


# ---- registry -----------------------------------------------------------------------------------------------
def test_registry_and_did_you_mean():
    assert set(TASKS) == {"vqa", "gqa", "nlvr", "coco", "tvqa", "how2qa", "tvc", "yc2c"}
    assert isinstance(get_task("vqa"), VqaTask)
    assert isinstance(get_task("nlvr2"), NlvrTask) and isinstance(get_task("caption"), CocoTask)
    with pytest.raises(VlpetError, match="Did you mean 'vqa'"):
        get_task("vqq")
    with pytest.raises(VlpetError, match="Known tasks"):
        get_task("imagenet")


def test_prompts_default_override_disabled():
    assert [get_task(t).prompt for t in TASKS] == ["vqa: ", "gpa: ", "nlvr: ", "caption: ",
                                                   "tvqa: ", "how2qa: ", "tvc: ", "yc2c: "]
    assert get_task("gqa", prompts={"gqa": "gqa: "}).prompt == "gqa: "
    assert get_task("vqa", prompts={"gqa": "gqa: "}).prompt == "vqa: "
    assert get_task("coco", use_prompts=False).prompt == ""
    assert get_task("nlvr", prompts={"nlvr": "x"}, use_prompts=False).prompt == ""


def test_task_facts():
    vqa, gqa, nlvr, coco = (get_task(t) for t in ("vqa", "gqa", "nlvr", "coco"))
    assert (vqa.input_max_length, vqa.target_max_length, vqa.loss_reduction) == (20, 10, "example")
    assert (gqa.input_max_length, gqa.target_max_length, gqa.loss_reduction) == (20, None, "example")
    assert (nlvr.input_max_length, nlvr.target_max_length, nlvr.inputs.images) == (None, None, 2)
    assert (coco.input_max_length, coco.target_max_length, coco.loss_reduction) == (40, 40, "token")
    assert vqa.split_names("train") == ["karpathy_train"] and vqa.split_names("test") == ["karpathy_test"]
    assert gqa.split_names("train") == ["train", "valid"]
    assert gqa.split_names("val") == gqa.split_names("test") == ["testdev"]
    assert nlvr.split_names("val") == ["valid"]
    assert [gqa.feature_source(s) for s in ("train", "valid", "testdev", "submit")] == ["VG", "VG", "GQA", "GQA"]
    assert vqa.feature_source("karpathy_val") == coco.feature_source("karpathy_test") == "COCO"
    assert nlvr.feature_source("test") == "nlvr"


# ---- VQA ----------------------------------------------------------------------------------------------------
@pytest.fixture
def vqa_root(tmp_path):
    long_q = "what " * 30 + "?"
    write_json(tmp_path / "vqa" / "karpathy_train.json", [
        vqa_record(1, "img_a", "what is on the wall ?", {"net": 1.0, "mesh": 0.3}),
        vqa_record(2, "img_b", long_q, {" ".join(["red"] * 15): 0.6}),
        vqa_record(3, "img_a", "what color ?", {}),
    ])
    write_features(tmp_path, "COCO", ["img_a", "img_b"])
    return tmp_path


def test_vqa_prompt_truncation_and_targets(vqa_root, bart):
    task = get_task("vqa")
    records = task.load(vqa_root, "train")
    assert [r.id for r in records] == [1, 2, 3] and records[0].source == "COCO"
    ds = TaskDataset(task, records, stores_for(vqa_root, records), bart, "train", seed=0)
    it = ds[0]
    assert it["input_ids"] == bart("vqa: what is on the wall ?")["input_ids"]
    assert it["input_ids"][0] == bart.bos_token_id and it["input_ids"][-1] == bart.eos_token_id
    assert it["target"] in ("net", "mesh")
    assert it["weight"] == {"net": 1.0, "mesh": 0.3}[it["target"]]
    assert it["target_ids"] == bart(it["target"])["input_ids"]
    assert it["vis_feats"].shape == (1, 49, D) and it["vis_feats"].dtype == np.float32
    assert it["meta"]["question_id"] == 1 and it["meta"]["img_id"] == "img_a"

    long_item = ds[1]
    assert len(long_item["input_ids"]) == 20 and long_item["input_ids"][-1] == bart.eos_token_id
    assert len(long_item["target_ids"]) == 10 and long_item["target_ids"][-1] == bart.eos_token_id
    assert long_item["weight"] == pytest.approx(0.6)

    empty = ds[2]
    assert empty["target"] == "" and empty["weight"] == 0.0
    assert empty["target_ids"] == [bart.bos_token_id, bart.eos_token_id]


def test_vqa_sampling_proportional_to_score_and_deterministic(vqa_root, bart):
    task = get_task("vqa")
    records = task.load(vqa_root, "train")
    ds = TaskDataset(task, records, stores_for(vqa_root, records), bart, "train", seed=7)
    draws = Counter(task.target(records[0], ds.rng(0, e), True)[0] for e in range(4000))
    assert draws["net"] / 4000 == pytest.approx(1.0 / 1.3, abs=0.03)

    twin = TaskDataset(task, records, stores_for(vqa_root, records), bart, "train", seed=7)
    for e in range(5):
        assert ds.item(0, e)["target"] == twin.item(0, e)["target"]
    ds.set_epoch(3)
    assert ds[0]["target"] == twin.item(0, 3)["target"]
    by_epoch = [ds.item(0, e)["target"] for e in range(40)]
    other_seed = TaskDataset(task, records, ds.features, bart, "train", seed=8)
    assert by_epoch != [other_seed.item(0, e)["target"] for e in range(40)]
    assert len(set(by_epoch)) == 2


def test_vqa_eval_kind_takes_best_answer(vqa_root, bart):
    task = get_task("vqa")
    records = task.load(vqa_root, "karpathy_train")
    ds = TaskDataset(task, records, stores_for(vqa_root, records), bart, "eval", seed=0)
    assert {ds.item(0, e)["target"] for e in range(20)} == {"net"}


def test_vqa_eval_joins_official_answers(tmp_path, bart):
    write_json(tmp_path / "vqa" / "karpathy_val.json", [
        vqa_record(10, "img_a", "what is on the wall ?", {"pipe": 1.0}),
        {**vqa_record(11, "img_a", "what color ?", {"red": 1.0}), "answers": [{"answer": "red"}] * 10},
    ])
    official = [{"question_id": 10, "answers": [{"answer": "pipe", "answer_id": k} for k in range(10)],
                 "answer_type": "other", "question_type": "what is on the"}]
    write_json(tmp_path / "vqa" / "v2_mscoco_val2014_annotations.json", {"annotations": official})
    records = get_task("vqa").load(tmp_path, "val")
    info = [get_task("vqa").eval_info(r) for r in records]
    assert info[0]["answers"] == ["pipe"] * 10 and info[0]["question_type"] == "what is on the"
    assert info[1]["answers"] == ["red"] * 10 and info[1]["answer_type"] == "other"
    assert info[0]["label"] == {"pipe": 1.0}

    write_json(tmp_path / "vqa" / "karpathy_test.json", [vqa_record(12, "img_a", "what ?", {"x": 1.0})])
    with pytest.raises(DataError, match=r"karpathy_test\.json: record 0 \(question_id=12\).*official answers"):
        get_task("vqa").load(tmp_path, "test")


# ---- GQA ----------------------------------------------------------------------------------------------------
def test_gqa_splits_sources_and_targets(tmp_path, bart):
    long_answer = " ".join(["white"] * 14)
    write_json(tmp_path / "GQA" / "train.json", [
        {"img_id": "2375429", "question_id": "07333408", "sent": "what is on the white wall ?",
         "label": {"pipe": 1.0}}])
    write_json(tmp_path / "GQA" / "valid.json", [
        {"img_id": "2375430", "question_id": "07333409", "sent": "what " * 30, "label": {long_answer: 0.5}}])
    write_json(tmp_path / "GQA" / "testdev.json", [
        {"img_id": "n12345", "question_id": "201", "sent": "what color ?", "label": {"red": 1.0}}])
    write_features(tmp_path, "VG", ["2375429", "2375430"])
    write_features(tmp_path, "GQA", ["n12345"])
    task = get_task("gqa")
    train = task.load(tmp_path, "train")
    assert [(r.id, r.source) for r in train] == [("07333408", "VG"), ("07333409", "VG")]
    test = task.load(tmp_path, "test")
    assert [(r.id, r.source) for r in test] == [("201", "GQA")]

    ds = TaskDataset(task, train, stores_for(tmp_path, train), bart, "train", seed=0)
    first, second = ds[0], ds[1]
    assert first["input_ids"] == bart("gpa: what is on the white wall ?")["input_ids"]
    assert first["target"] == "pipe" and first["weight"] == 1.0
    assert len(second["input_ids"]) == 20
    assert second["weight"] == 1.0 and len(second["target_ids"]) == 16  # no target truncation
    assert second["meta"] == {"question_id": "07333409", "img_id": "2375430", "sent": "what " * 30,
                              "label": {long_answer: 0.5}}


# ---- NLVR2 --------------------------------------------------------------------------------------------------
def test_nlvr_pair_targets_and_no_truncation(tmp_path, bart):
    long_sent = "the left image has one more dog than the right image " * 4
    write_json(tmp_path / "nlvr" / "train.json", [
        {"identifier": "train-1-0-0", "img0": "train-1-0-img0", "img1": "train-1-0-img1", "label": 1,
         "sent": long_sent, "uid": "nlvr2_train_0"},
        {"identifier": "train-1-1-0", "img0": "train-1-1-img0", "img1": "train-1-1-img1", "label": 0,
         "sent": "two dogs .", "uid": "nlvr2_train_1"},
    ])
    write_features(tmp_path, "nlvr", ["train-1-0-img0", "train-1-0-img1", "train-1-1-img0", "train-1-1-img1"])
    task = get_task("nlvr")
    records = task.load(tmp_path, "train")
    assert records[0].image_ids == ("train-1-0-img0", "train-1-0-img1")
    ds = TaskDataset(task, records, stores_for(tmp_path, records), bart, "train", seed=0)
    a, b = ds[0], ds[1]
    assert len(a["input_ids"]) > 20 and a["input_ids"] == bart("nlvr: " + long_sent)["input_ids"]
    assert (a["target"], b["target"]) == ("true", "false") and a["weight"] == b["weight"] == 1.0
    assert a["vis_feats"].shape == (2, 49, D)
    assert a["vis_feats"][0, 0, 0] == 0 and a["vis_feats"][1, 0, 0] == 1  # img0 then img1
    batch = collate([a, b], bart.pad_token_id)
    assert batch["vis_feats"].shape == (2, 2, 49, D)
    assert batch["meta"][1] == {"identifier": "train-1-1-0", "img0": "train-1-1-img0", "img1": "train-1-1-img1",
                                "sent": "two dogs .", "label": 0, "uid": "nlvr2_train_1"}


# ---- COCO ---------------------------------------------------------------------------------------------------
def coco_file(root: Path) -> Path:
    def image(name: str, split: str, cocoid: int, caps: list[str]) -> dict:
        return {"filepath": "val2014", "filename": f"{name}.jpg", "split": split, "cocoid": cocoid,
                "sentences": [{"raw": c, "tokens": c.split()} for c in caps]}

    long_cap = " ".join(["dog"] * 60)
    return write_json(root / "COCO" / "dataset_coco.json", {"images": [
        image("COCO_val2014_000000000001", "train", 1, [" a dog runs on grass . ", "two dogs"]),
        image("COCO_val2014_000000000002", "restval", 2, [long_cap]),
        image("COCO_val2014_000000000003", "val", 3, ["a cat . ", " two cat", "a red cat"]),
        image("COCO_val2014_000000000004", "test", 4, ["a dog"]),
    ]})


def test_coco_rows_per_caption_and_references(tmp_path, bart):
    coco_file(tmp_path)
    write_features(tmp_path, "COCO", [f"COCO_val2014_00000000000{k}" for k in range(1, 5)])
    task = get_task("coco")
    train = task.load(tmp_path, "train")
    assert [(r.id, r.label) for r in train] == [
        ("COCO_val2014_000000000001", "a dog runs on grass ."), ("COCO_val2014_000000000001", "two dogs"),
        ("COCO_val2014_000000000002", " ".join(["dog"] * 60))]
    ds = TaskDataset(task, train, stores_for(tmp_path, train), bart, "train", seed=0)
    items = [ds[i] for i in range(3)]
    assert items[0]["input_ids"] == bart("caption: ")["input_ids"]
    assert items[0]["target_ids"] == bart("a dog runs on grass .")["input_ids"]
    assert len(items[2]["target_ids"]) == 40 and items[2]["target_ids"][-1] == bart.eos_token_id
    batch = collate(items, bart.pad_token_id)
    assert batch["loss_reduction"] == "token" and batch["labels"].shape == (3, 40)

    val = task.load(tmp_path, "val")
    assert len(val) == 1
    assert task.eval_info(val[0]) == {"img_id": "COCO_val2014_000000000003", "cocoid": 3,
                                      "references": ["a cat .", "two cat", "a red cat"]}
    vds = TaskDataset(task, val, stores_for(tmp_path, val), bart, "eval", seed=0)
    vbatch = collate([vds[0]], bart.pad_token_id)
    assert vbatch["labels"] is None and vbatch["meta"][0]["references"][0] == "a cat ."
    assert [r.id for r in task.load(tmp_path, "karpathy_test")] == ["COCO_val2014_000000000004"]


# ---- tokenizers and the batch contract ----------------------------------------------------------------------
def test_t5_style_tokenizer_appends_eos_only(vqa_root, t5):
    task = get_task("vqa")
    records = task.load(vqa_root, "train")
    ds = TaskDataset(task, records, stores_for(vqa_root, records), t5, "eval", seed=0)
    it = ds[0]
    assert it["input_ids"][-1] == t5.eos_token_id and t5.eos_token_id not in it["input_ids"][:-1]
    assert it["target_ids"] == t5("net")["input_ids"] and len(it["target_ids"]) == 2
    assert len(ds[1]["input_ids"]) == 20


def test_collate_batch_contract(vqa_root, bart):
    task = get_task("vqa")
    records = task.load(vqa_root, "train")
    ds = TaskDataset(task, records, stores_for(vqa_root, records), bart, "train", seed=0)
    items = [ds[i] for i in range(3)]
    batch = collate(items, pad_id=bart.pad_token_id)
    assert set(batch) == {"task", "input_ids", "attention_mask", "vis_feats", "labels", "loss_weights",
                          "loss_reduction", "meta"}
    assert batch["task"] == "vqa" and batch["loss_reduction"] == "example"
    lengths = [len(it["input_ids"]) for it in items]
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].dtype == torch.long
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["input_ids"][batch["attention_mask"] == 0] == bart.pad_token_id).all()
    assert batch["vis_feats"].dtype == torch.float32 and batch["vis_feats"].shape == (3, 1, 49, D)
    s_len = max(len(it["target_ids"]) for it in items)
    assert batch["labels"].shape == (3, s_len) and batch["labels"].dtype == torch.long
    for b, it in enumerate(items):
        row = batch["labels"][b].tolist()
        assert row[: len(it["target_ids"])] == it["target_ids"]
        assert all(v == -100 for v in row[len(it["target_ids"]):])
    assert batch["loss_weights"].dtype == torch.float32
    assert batch["loss_weights"].tolist() == pytest.approx([it["weight"] for it in items])
    assert [m["question_id"] for m in batch["meta"]] == [1, 2, 3]
    with pytest.raises(VlpetError, match="one task"):
        collate([items[0], {**items[1], "task": "gqa"}], 1)


def test_dataset_pickles_for_workers(vqa_root, bart):
    task = get_task("vqa")
    records = task.load(vqa_root, "train")
    ds = TaskDataset(task, records, stores_for(vqa_root, records), bart, "train", seed=3)
    ds[0]  # opens the HDF5 file in this process
    clone = pickle.loads(pickle.dumps(ds))
    a, b = ds.item(1, 2), clone.item(1, 2)
    assert a["input_ids"] == b["input_ids"] and a["target_ids"] == b["target_ids"]
    assert np.array_equal(a["vis_feats"], b["vis_feats"])


# ---- malformed files and records ----------------------------------------------------------------------------
@pytest.mark.parametrize("records, pattern", [
    ([{"img_id": "a", "question_id": 5, "label": {"x": 1}}], r"record 0 \(question_id=5\): field 'sent'"),
    ([vqa_record(1, "a", "q", {"x": 1}), {"img_id": "a", "question_id": 6, "sent": "q", "label": ["x"]}],
     r"record 1 \(question_id=6\): field 'label' should be an object"),
    ([vqa_record(1, "a", "q", {"x": "high"})], r"record 0 \(question_id=1\): field 'label' maps 'x'"),
    ([{"question_id": 7, "sent": "q", "label": {}}], r"record 0 \(question_id=7\): field 'img_id' is missing"),
    (["not a record"], r"record 0: expected an object"),
])
def test_vqa_malformed_record(tmp_path, records, pattern):
    path = write_json(tmp_path / "vqa" / "karpathy_train.json", records)
    with pytest.raises(DataError, match=pattern) as err:
        get_task("vqa").load(tmp_path, "train")
    assert str(path) in str(err.value) and "Fix:" in str(err.value)


def test_malformed_files(tmp_path):
    with pytest.raises(DataError, match=r"not found: .*nlvr[/\\]valid\.json.*--data-root"):
        get_task("nlvr").load(tmp_path, "val")
    path = tmp_path / "nlvr" / "train.json"
    path.parent.mkdir(parents=True)
    path.write_text('[{"identifier": "x",', encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.json: not valid JSON \(line 1"):
        get_task("nlvr").load(tmp_path, "train")
    write_json(path, {"data": []})
    with pytest.raises(DataError, match="expected a JSON list"):
        get_task("nlvr").load(tmp_path, "train")
    write_json(path, [{"identifier": "train-1-0-0", "img0": "a", "img1": "b", "sent": "s", "label": 2}])
    with pytest.raises(DataError, match=r"record 0 \(identifier=train-1-0-0\): field 'label' should be 0 or 1"):
        get_task("nlvr").load(tmp_path, "train")
    write_json(tmp_path / "COCO" / "dataset_coco.json", {"images": [
        {"filename": "x.jpg", "split": "train", "cocoid": 1, "sentences": [{"raw": "a"}]},
        {"filename": "y.jpg", "split": "train", "cocoid": 2, "sentences": [{"tokens": []}]}]})
    with pytest.raises(DataError, match=r"dataset_coco\.json: record 1 \(filename=y\.jpg\): sentences\[0\]"):
        get_task("coco").load(tmp_path, "train")
    write_json(tmp_path / "GQA" / "testdev.json", [{"img_id": "1", "question_id": "q1", "label": {}}])
    with pytest.raises(DataError, match=r"testdev\.json: record 0 \(question_id=q1\): field 'sent'"):
        get_task("gqa").load(tmp_path, "val")


# ---- missing features ---------------------------------------------------------------------------------------
def test_missing_features_reported_once(vqa_root, bart):
    task = get_task("vqa")
    write_json(vqa_root / "vqa" / "karpathy_val.json", [
        {**vqa_record(k, img, "q", {"x": 1.0}), "answers": ["x"] * 10}
        for k, img in enumerate(["img_a", "img_gone1", "img_b", "img_gone2", "img_gone1"])])
    records = task.load(vqa_root, "val")
    stores = stores_for(vqa_root, records)
    with pytest.raises(DataError) as err:
        check_features(task, records, stores)
    msg = str(err.value)
    assert "3 of 5 records" in msg and "img_gone1, img_gone2" in msg
    assert str(IMAGE.locate(vqa_root, "COCO")) in msg
    check_features(task, records[:1] + records[2:3], stores)  # all present: no error
    check_features(task, records[:1], IMAGE.open(IMAGE.locate(vqa_root, "COCO")))  # one store

    ds = TaskDataset(task, records, stores, bart, "eval", seed=0)
    with pytest.raises(DataError, match=r"karpathy_val\.json: record 1 \(1\).*img_gone1"):
        ds[1]


def test_missing_store_for_source(vqa_root):
    task = get_task("gqa")
    write_json(vqa_root / "GQA" / "testdev.json", [
        {"img_id": "n1", "question_id": "1", "sent": "q", "label": {"x": 1.0}}])
    records = task.load(vqa_root, "val")
    with pytest.raises(DataError, match=r"1 of 1 records .*first missing ids: n1.*no store for source 'GQA'"):
        check_features(task, records, {"COCO": IMAGE.open(IMAGE.locate(vqa_root, "COCO"))})
    with pytest.raises(DataError, match="no features for source 'GQA'"):
        open_task_features(records, vqa_root)


def test_coco_refuses_an_unknown_split_and_names_the_known_ones(tmp_path):
    coco_file(tmp_path)
    with pytest.raises(VlpetError, match=r"coco: unknown split 'karpathy_dev'\. Fix: use karpathy_train, "
                                         r"karpathy_val or karpathy_test"):
        get_task("coco").load(tmp_path, "karpathy_dev")


def test_dataset_refuses_a_split_kind_other_than_train_or_eval(bart):
    with pytest.raises(VlpetError, match=r"split_kind must be 'train' or 'eval', not 'valid'"):
        TaskDataset(get_task("coco"), [], {}, bart, "valid")


def test_each_get_task_gives_a_new_task_so_a_prompt_does_not_leak():
    custom = get_task("gqa", prompts={"gqa": "question: "})
    task = get_task("gqa")
    assert type(task) is GqaTask and task is not custom
    assert (custom.prompt, task.prompt) == ("question: ", "gpa: ")
