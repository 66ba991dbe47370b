"""The built-in toy world: formats of spec/pipeline.md §1, id consistency, determinism, safe caching."""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from pathlib import Path

import pytest

from vlpet_cli.toy import images as toy

SCORES = {0.3, 0.6, 0.9, 1.0}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Build the toy world once, from two threads at the same time, into a fresh cache."""
    cache = tmp_path_factory.mktemp("cache")
    builds: list[Path] = []
    real_build = toy.build_toy

    def counting_build(dest: Path, *args, **kwargs) -> Path:
        builds.append(dest)
        return real_build(dest, *args, **kwargs)

    results: list[Path] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLPET_CACHE", str(cache))
        mp.setattr(toy, "build_toy", counting_build)
        threads = [threading.Thread(target=lambda: results.append(toy.toy_root())) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return {"root": cache / toy.TOY_VERSION, "cache": cache, "results": results, "builds": builds}


@pytest.fixture(scope="module")
def root(built) -> Path:
    return built["root"]


def load(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def feature_ids(root: Path, source: str) -> set[str]:
    from vlpet_cli.features.kinds import IMAGE

    return set(IMAGE.open(root / source / toy.FEATURE_FILE).ids())


@pytest.mark.slow
def test_concurrent_first_use_builds_once_and_leaves_no_temp(built):
    assert built["results"] == [built["root"], built["root"]]
    assert len(built["builds"]) == 1
    leftovers = [
        p.name for p in built["cache"].iterdir() if p.name not in (toy.TOY_VERSION, f"{toy.TOY_VERSION}.lock")
    ]
    assert leftovers == []
    manifest = load(built["root"] / "toy.json")
    assert manifest["version"] == toy.TOY_VERSION and manifest["features"]["model"] == "tiny-clip"


@pytest.mark.slow
def test_second_call_reuses_cache(built, monkeypatch):
    monkeypatch.setenv("VLPET_CACHE", str(built["cache"]))
    monkeypatch.setattr(toy, "build_toy", lambda *a, **k: pytest.fail("rebuilt a current toy world"))
    assert toy.toy_root() == built["root"]


@pytest.mark.slow
def test_world_from_other_code_or_features_model_is_stale(root, tmp_path):
    manifest = load(root / "toy.json")
    assert toy._is_current(root)
    for key, value in (
        ("generator", "0" * 16),
        ("features", {"fingerprint": "0" * 16}),
        ("version", "toy-v0"),
    ):
        (tmp_path / "toy.json").write_text(json.dumps({**manifest, key: value}))
        assert not toy._is_current(tmp_path), key


def test_failed_or_killed_build_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("VLPET_CACHE", str(tmp_path))

    def broken(dest: Path, *a, **k):
        (dest / "half.json").write_text("{")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(toy, "build_toy", broken)
    stale = tmp_path / f".{toy.TOY_VERSION}.building-killed"
    stale.mkdir()
    os.utime(stale, (1, 1))
    with pytest.raises(RuntimeError):
        toy.toy_root()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{toy.TOY_VERSION}.lock"]


@pytest.mark.slow
def test_coco_karpathy_format(root):
    data = load(root / "COCO" / "dataset_coco.json")
    images = data["images"]
    splits = Counter(e["split"] for e in images)
    assert splits == toy.COCO_SPLITS
    for e in images:
        assert set(e) >= {"filepath", "filename", "split", "cocoid", "sentences"}
        stem = e["filename"].rsplit(".", 1)[0]
        assert stem == f"COCO_{e['filepath']}_{e['cocoid']:012d}"
        assert (e["filepath"] == "train2014") == (e["split"] == "train")
        assert (root / "COCO" / "images" / e["filename"]).is_file()
        assert len(e["sentences"]) == 5 and len({s["raw"] for s in e["sentences"]}) == 5
        for s in e["sentences"]:
            assert s["raw"] == s["raw"].strip() and s["tokens"] and all(t == t.lower() for t in s["tokens"])
    assert {e["filename"].rsplit(".", 1)[0] for e in images} <= feature_ids(root, "COCO")


@pytest.mark.slow
def test_vqa_karpathy_and_official_annotations(root):
    coco = {
        e["filename"].rsplit(".", 1)[0]: e["split"]
        for e in load(root / "COCO" / "dataset_coco.json")["images"]
    }
    official = {}
    for folder in ("train2014", "val2014"):
        for a in load(root / "vqa" / f"v2_mscoco_{folder}_annotations.json")["annotations"]:
            assert set(a) >= {
                "question_id",
                "image_id",
                "answers",
                "answer_type",
                "question_type",
                "multiple_choice_answer",
            }
            assert len(a["answers"]) == 10
            assert [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
            assert all(set(x) == {"answer", "answer_confidence", "answer_id"} for x in a["answers"])
            official[a["question_id"]] = (folder, a)
    want_split = {"karpathy_train": {"train", "restval"}, "karpathy_val": {"val"}, "karpathy_test": {"test"}}
    feats = feature_ids(root, "COCO")
    noisy = 0
    seen = 0
    for name, splits in want_split.items():
        records = load(root / "vqa" / f"{name}.json")
        assert records
        for r in records:
            assert (
                isinstance(r["question_id"], int) and isinstance(r["sent"], str) and r["sent"].endswith("?")
            )
            assert r["answer_type"] in ("yes/no", "number", "other") and r["question_type"]
            assert coco[r["img_id"]] in splits and r["img_id"] in feats
            folder, ann = official[r["question_id"]]
            assert r["img_id"].startswith(f"COCO_{folder}_") and ann["image_id"] == int(r["img_id"][-12:])
            assert len(r["answers"]) == 10 and r["answers"] == ann["answers"]
            counts = Counter(a["answer"] for a in ann["answers"])
            assert r["label"] == {a: min(1.0, round(0.3 * c, 1)) for a, c in counts.items()}
            assert set(r["label"].values()) <= SCORES
            assert ann["multiple_choice_answer"] == counts.most_common(1)[0][0]
            noisy += len(counts) > 1
            seen += 1
    assert seen == len(official)
    assert 0.1 < noisy / seen < 0.5  # some annotator noise, but mostly consistent


@pytest.mark.slow
def test_gqa_records(root):
    vg, gqa = feature_ids(root, "VG"), feature_ids(root, "GQA")
    qids = set()
    for split in ("train", "valid", "testdev"):
        records = load(root / "GQA" / f"{split}.json")
        assert records
        for r in records:
            assert set(r) == {"img_id", "question_id", "sent", "label"}
            assert isinstance(r["question_id"], str) and r["question_id"] not in qids
            qids.add(r["question_id"])
            assert len(r["label"]) == 1 and list(r["label"].values()) == [1.0]
            if split == "testdev":
                assert r["img_id"].startswith("n") and r["img_id"] in gqa
            else:
                assert r["img_id"].isdigit() and r["img_id"] in vg
                assert (root / "VG" / "images" / f"{r['img_id']}.png").is_file()


@pytest.mark.slow
def test_nlvr_records_balanced_with_consistency_groups(root):
    feats = feature_ids(root, "nlvr")
    for split in ("train", "valid", "test"):
        records = load(root / "nlvr" / f"{split}.json")
        labels = Counter(r["label"] for r in records)
        assert labels[0] == labels[1] > 0 and set(labels) == {0, 1}
        groups: dict[str, list[dict]] = {}
        for r in records:
            parts = r["identifier"].split("-")
            assert len(parts) == 4 and parts[0] == split
            assert r["img0"] == "-".join(parts[:3]) + "-img0" and r["img1"] == "-".join(parts[:3]) + "-img1"
            assert r["img0"] in feats and r["img1"] in feats
            assert r["uid"].startswith(f"nlvr2_{split}_")
            groups.setdefault("-".join(parts[:2] + [""] + parts[3:]), []).append(r)
        assert len({r["uid"] for r in records}) == len(records)
        for members in groups.values():
            assert len(members) == toy.PAIRS_PER_SET and len({m["sent"] for m in members}) == 1
            assert {m["label"] for m in members} == {0, 1}


@pytest.mark.slow
def test_features_cover_every_image_with_the_grid_shape(root):
    from vlpet_cli.features.kinds import IMAGE

    for source in toy.SOURCES:
        images = {p.stem for p in (root / source / "images").glob("*.png")}
        store = IMAGE.open(root / source / toy.FEATURE_FILE)
        assert set(store.ids()) == images
        x = store.get(min(images))
        assert x.shape == (49, 64) and store.dtype == "float16"
        assert float(abs(x).sum()) > 0


@pytest.mark.slow
def test_tasks_are_not_solved_by_the_majority_answer(root):
    for path in (root / "vqa" / "karpathy_train.json", root / "GQA" / "train.json"):
        answers = Counter(max(r["label"], key=r["label"].get) for r in load(path))
        assert answers.most_common(1)[0][1] / sum(answers.values()) < 0.3
        assert len(answers) >= 10


@pytest.mark.slow
def test_build_is_deterministic(root, tmp_path):
    import numpy as np

    from vlpet_cli.features.extract.images import extract as extract_features
    from vlpet_cli.features.kinds import IMAGE

    assert toy.make_world() == toy.make_world()
    toy.write_world(toy.make_world(), tmp_path)
    files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert len(files) == sum(toy.toy_summary()["images"].values()) + 1 + 3 + 2 + 2 + 2 + 3 + 3
    for rel in files:
        assert (root / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel
    some = {p.stem: p for p in sorted((tmp_path / "nlvr" / "images").glob("*.png"))[:4]}
    extract_features(some, toy._tiny_clip(), tmp_path / "again.h5", progress=False)
    again, first = IMAGE.open(tmp_path / "again.h5"), IMAGE.open(root / "nlvr" / toy.FEATURE_FILE)
    for img_id in some:
        assert np.array_equal(again.get(img_id), first.get(img_id))


@pytest.mark.slow
def test_other_seeds_give_other_worlds():
    assert toy.make_world(1).coco != toy.make_world(2).coco


@pytest.mark.slow
def test_corpus_and_summary_need_no_images(root):
    corpus = toy.toy_corpus()
    assert corpus == sorted(set(corpus)) and {"true", "false", "yes", "no", "red", "circle"} <= set(corpus)
    captions = [s["raw"] for e in load(root / "COCO" / "dataset_coco.json")["images"] for s in e["sentences"]]
    questions = [r["sent"] for r in load(root / "GQA" / "testdev.json")]
    statements = [r["sent"] for r in load(root / "nlvr" / "test.json")]
    assert set(captions + questions + statements) <= set(corpus)
    summary = toy.toy_summary()
    assert summary == load(root / "toy.json")["summary"]
    assert summary["vqa"]["train"] == len(load(root / "vqa" / "karpathy_train.json"))
    assert summary["nlvr"]["valid"] == len(load(root / "nlvr" / "valid.json"))
    assert summary["coco"]["train"] == 5 * (toy.COCO_SPLITS["train"] + toy.COCO_SPLITS["restval"])
    assert summary["images"] == {s: len(list((root / s / "images").glob("*.png"))) for s in toy.SOURCES}


@pytest.mark.parametrize("family", ["bart", "t5"])
@pytest.mark.slow  # generates with a shipped backbone: 0.5-0.9 s
def test_shipped_tiny_backbones_know_the_toy_text(family):
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    path = Path(toy.__file__).resolve().parent.parent / "assets" / "backbones" / f"tiny-{family}"
    assert sum(p.stat().st_size for p in path.iterdir()) < 4_000_000
    record = load(path / "pretraining.json")
    assert record["loss_last"] < record["loss_first"] / 4
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    specials = (
        {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
        if family == "bart"
        else {"<pad>": 0, "</s>": 1, "<unk>": 2}
    )
    assert {t: tok.convert_tokens_to_ids(t) for t in specials} == specials
    if family == "t5":
        assert tok.convert_tokens_to_ids("<extra_id_0>") == len(tok) - 1
    else:
        assert tok.mask_token == "<mask>"
    for text in toy.toy_corpus()[::50]:
        ids = tok.encode(text)
        assert ids[-1] == tok.eos_token_id and (family == "t5" or ids[0] == tok.bos_token_id)
        assert tok.unk_token_id not in ids and tok.decode(ids, skip_special_tokens=True) == text
    for word in ("true", "false", "yes", "red", "triangle", "2"):
        assert len(tok.encode(word, add_special_tokens=False)) == 1
    model = AutoModelForSeq2SeqLM.from_pretrained(path, local_files_only=True)
    assert model.config.d_model == 128 and model.config.vocab_size == len(tok)
    assert model.config.decoder_start_token_id == (2 if family == "bart" else 0)
    batch = tok(["The left image contains a red circle."], return_tensors="pt")
    with torch.no_grad():
        loss = model(**batch, labels=batch.input_ids).loss
    assert torch.isfinite(loss)


def test_shape_mask_marks_each_shape_where_it_is_drawn():
    import random

    import numpy as np

    rng = random.Random(5)
    for _ in range(20):
        scene = toy.random_scene(rng, "x", "COCO")
        mask = np.asarray(toy.render_scene(scene, mask=True))
        pixels = np.asarray(toy.render_scene(scene)).astype(int)
        background = np.array(toy.BACKGROUNDS[scene.background])
        assert set(np.unique(mask)) == set(range(len(scene.shapes) + 1))
        assert (np.abs(pixels[mask == 0] - background).sum(1) == 0).all()
        assert (np.abs(pixels[mask > 0] - background).sum(1) > 0).all()


@pytest.mark.parametrize("family", ["bart", "t5"])
@pytest.mark.slow  # generates with a shipped backbone: 0.4-0.5 s
def test_shipped_tiny_backbones_read_scene_descriptions(family):
    """Pretrained on reading tasks, a backbone answers GQA questions about freshly drawn scenes from their written
    description (a denoising-only backbone cannot)."""
    import importlib.util
    import random

    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    script = Path(__file__).resolve().parents[2] / "scripts" / "pretrain_tiny_backbones.py"
    spec = importlib.util.spec_from_file_location("pretrain_tiny_backbones", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = Path(toy.__file__).resolve().parent.parent / "assets" / "backbones" / f"tiny-{family}"
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForSeq2SeqLM.from_pretrained(path, local_files_only=True).eval()
    gqa = [e for e in module.reading_examples(random.Random("test-reading"), 240) if e[0].startswith("gpa: ")]
    right = 0
    for text, scene, answer in gqa:
        ids = torch.tensor([tok.encode(text) + tok.encode(scene, add_special_tokens=False)])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=4, num_beams=1, do_sample=False)
        right += tok.decode(out[0], skip_special_tokens=True).strip() == answer
    assert right / len(gqa) >= 0.6, right / len(gqa)
