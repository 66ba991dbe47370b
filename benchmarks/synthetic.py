"""Synthetic inputs for the benchmarks, in the real on-disk formats: a VQA data root (vqa/karpathy_*.json in
VL-T5's record format, COCO features in one packed HDF5 file) and a bart-base-size backbone directory.

The backbone has bart-base's shape (6+6 layers, d 768, 12 heads, FFN 3072) and random weights, with the tiny-bart
word-level tokenizer: vlpet resizes the vocabulary to the tokenizer, so its LM head is smaller than bart-base's
(which makes the PET overheads relatively larger, not smaller).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

WORDS = ("what", "color", "is", "the", "shape", "how", "many", "are", "there", "on", "left", "right", "of",
         "circle", "square", "triangle", "red", "blue", "green", "big", "small", "near", "a", "picture", "in")
ANSWERS = ("yes", "no", "red", "blue", "green", "2", "3", "circle", "square", "triangle")
FEATURE_FILE = "clip_features/data_clip_RN101_att.h5"


def question(rng: random.Random, words: int) -> str:
    """A question of `words` words from a small vocabulary the tiny tokenizer knows."""
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "?"


def vqa_records(n: int, n_images: int, seed: int, words: tuple[int, int] = (4, 12),
                answers: bool = False) -> list[dict]:
    """n Karpathy-split VQA records (VL-T5 format: soft label; the 10 annotators' answers when `answers`, as
    evaluation needs) over n_images images."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        a, b = rng.sample(ANSWERS, 2)
        records.append({"question_id": seed * 100_000_000 + i, "img_id": f"COCO_train2014_{i % n_images:012d}",
                        "sent": question(rng, rng.randint(*words)), "label": {a: 1.0, b: 0.3},
                        "answer_type": "other", "question_type": "what", "is_topk_optimal": True})
        if answers:
            records[-1]["answers"] = [{"answer": a if k < 7 else b, "answer_confidence": "yes", "answer_id": k + 1}
                                      for k in range(10)]
    return records


def coco_karpathy(n_train: int, n_test: int, n_images: int, seed: int = 4) -> dict:
    """Karpathy's dataset_coco.json: n_test test images (one record each) and n_train train images."""
    rng = random.Random(seed)
    images = []
    for k in range(n_train + n_test):
        i = k % n_images
        sentences = []
        for s in range(5):
            raw = question(rng, rng.randint(6, 14)).rstrip("?") + "."
            sentences.append({"raw": raw, "tokens": raw.lower().rstrip(".").split(), "sentid": 5 * k + s})
        images.append({"filepath": "train2014", "filename": f"COCO_train2014_{i:012d}.jpg", "imgid": k,
                       "split": "test" if k >= n_train else "train", "sentences": sentences, "cocoid": k,
                       "sentids": [x["sentid"] for x in sentences]})
    return {"images": images, "dataset": "coco"}


def write_features(path: Path, n_images: int, tokens: int = 49, dim: int = 2048, seed: int = 0) -> None:
    """A packed feature file (vlpet's layout) with one random float16 grid per image."""
    import numpy as np

    from vlpet_cli.features.images import PackedImageWriter

    rng = np.random.default_rng(seed)
    writer = PackedImageWriter(path, (tokens, dim), "float16", {"model": "synthetic"})
    try:
        for start in range(0, n_images, 64):
            ids = [f"COCO_train2014_{i:012d}" for i in range(start, min(start + 64, n_images))]
            writer.add(ids, rng.standard_normal((len(ids), tokens, dim), dtype=np.float32))
    finally:
        writer.close()


def make_root(dest: Path, n_train: int, n_images: int, n_val: int = 64, dim: int = 2048) -> Path:
    """A VQA data root under `dest` (reused when it exists with the same sizes)."""
    dest = Path(dest)
    stamp = dest / "synthetic.json"
    want = {"n_train": n_train, "n_images": n_images, "n_val": n_val, "dim": dim, "format": 2}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "vqa").mkdir(parents=True)
    (dest / "vqa" / "karpathy_train.json").write_text(json.dumps(vqa_records(n_train, n_images, 1)))
    for name, seed in (("karpathy_val", 2), ("karpathy_test", 3)):
        (dest / "vqa" / f"{name}.json").write_text(json.dumps(vqa_records(n_val, n_images, seed, answers=True)))
    (dest / "COCO").mkdir(parents=True)
    (dest / "COCO" / "dataset_coco.json").write_text(json.dumps(coco_karpathy(n_val, n_val, n_images)))
    write_features(dest / "COCO" / FEATURE_FILE, n_images, dim=dim)
    stamp.write_text(json.dumps(want))
    return dest


def make_backbone(dest: Path) -> Path:
    """A bart-base-size BART directory (config, random weights, the tiny-bart tokenizer); reused if present."""
    dest = Path(dest)
    if (dest / "model.safetensors").is_file():
        return dest
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    from vlpet_cli import backbones

    spec = dict(backbones.BUILTIN["bart-base"]["config"])
    spec.pop("model_type")
    torch.manual_seed(0)
    model = BartForConditionalGeneration(BartConfig(**spec))
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tiny = backbones.resolve("tiny-bart").directory
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tiny / name, tmp / name)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


TV_SHOWS = ("friends", "castle", "house", "met", "grey", "bbt")


def tvqa_line(rng: random.Random, qid: int, vid: str, show: str, answer: bool) -> dict:
    """One TVQA line in VALUE's format (5 choices, a moment, the show; no answer_idx in test)."""
    rec: dict = {f"a{j}": question(rng, rng.randint(3, 8)).rstrip("?") + "." for j in range(5)}
    if answer:
        rec["answer_idx"] = rng.randrange(5)
    rec.update({"q": question(rng, rng.randint(6, 14)), "qid": qid, "show_name": show,
                "ts": f"{rng.uniform(0, 30):.2f}-{rng.uniform(30, 60):.2f}", "vid_name": vid})
    return rec


def make_tvqa_root(dest: Path, n_train: int, n_videos: int, n_eval: int = 64, dim: int = 64,
                   frames: int = 8, words: tuple[int, int] = (220, 420)) -> Path:
    """A TVQA-with-subtitles data root under `dest` (reused when it exists with the same sizes): VALUE's
    video/ann/tvqa/tvqa_{train,val,test_public,test_release}.jsonl over `n_videos` clips, their subtitles in
    video/ann/tv_subtitles.jsonl (`words` subtitle words a clip, so that most encoder texts reach the 600-token
    limit, as TVQA's do with subtitles) and packed CLIP-ViT frame features in video/vis_features/tv/clip-vit.h5."""
    import numpy as np

    from vlpet_cli.features.kinds import VIDEO
    from vlpet_cli.features.videos import PACKED

    dest = Path(dest)
    stamp = dest / "synthetic.json"
    want = {"kind": "tvqa", "n_train": n_train, "n_videos": n_videos, "n_eval": n_eval, "dim": dim,
            "frames": frames, "words": list(words), "format": 1}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    ann = dest / "video" / "ann"
    (ann / "tvqa").mkdir(parents=True)
    rng = random.Random(5)
    vids = [(f"{TV_SHOWS[i % len(TV_SHOWS)]}_s01e{i // 10 + 1:02d}_seg02_clip_{i % 10:02d}",
             TV_SHOWS[i % len(TV_SHOWS)]) for i in range(n_videos)]
    with open(ann / "tv_subtitles.jsonl", "w") as f:
        for vid, _ in vids:
            total, lines = rng.randint(*words), []
            while total > 0:
                n = min(total, rng.randint(6, 16))
                lines.append({"text": f" {rng.choice(('Ann', 'Bob'))} : {question(rng, n)}", "start": 0.0,
                              "end": 1.0})
                total -= n
            f.write(json.dumps({"vid_name": vid, "sub": lines}) + "\n")
    qid = 0
    for split, n in (("train", n_train), ("val", n_eval), ("test_public", n_eval), ("test_release", n_eval)):
        with open(ann / "tvqa" / f"tvqa_{split}.jsonl", "w") as f:
            for i in range(n):
                vid, show = vids[i % n_videos]
                f.write(json.dumps(tvqa_line(rng, qid, vid, show, not split.startswith("test"))) + "\n")
                qid += 1
    frng = np.random.default_rng(0)
    writer = VIDEO.writer(dest / "video" / "vis_features" / "tv" / "clip-vit.h5", PACKED, (dim,),
                          attrs={"model": "synthetic"})
    try:
        for vid, _ in vids:
            writer.add(vid, frng.standard_normal((frames, dim), dtype=np.float32))
    finally:
        writer.close()
    stamp.write_text(json.dumps(want))
    return dest


def make_long_tiny_backbone(dest: Path, positions: int = 1024) -> Path:
    """tiny-bart's shape, tokenizer and config with `positions` position embeddings (tiny-bart has 128; video
    encoder texts reach 600 tokens), random weights; reused if present."""
    dest = Path(dest)
    if (dest / "model.safetensors").is_file():
        return dest
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    from vlpet_cli import backbones

    tiny = backbones.resolve("tiny-bart").directory
    spec = json.loads((tiny / "config.json").read_text())
    spec["max_position_embeddings"] = positions
    torch.manual_seed(0)
    model = BartForConditionalGeneration(BartConfig.from_dict(spec))
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tiny / name, tmp / name)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest
