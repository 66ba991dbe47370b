"""The toy world's videos: VALUE's files and fields (spec/pipeline.md §1.5), real video files, features extracted
from them, and questions whose answers the frames decide and the text does not."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from vlpet_cli.features.extract.videos import decode_frames
from vlpet_cli.features.kinds import VIDEO
from vlpet_cli.toy import images as toy
from vlpet_cli.toy import videos as toy_video

QA_FILES = {
    "tvqa": ["tvqa_train", "tvqa_val", "tvqa_test_public", "tvqa_test_release"],
    "how2qa": ["how2qa_train_release", "how2qa_val_release", "how2qa_test_public_release"],
}
CAPTION_FILES = {"tvc": ["tvc_train_release", "tvc_val_release", "tvc_test_release"],
                 "yc2c": ["yc2c_train_release", "yc2c_val_release", "yc2c_test_release"]}
SOURCE = {"tvqa": "tv", "how2qa": "how2", "tvc": "tv", "yc2c": "yc2"}


@pytest.fixture(scope="module")
def root() -> Path:
    return toy.toy_root()


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def ann(root: Path, task: str, name: str) -> list[dict]:
    return read(root / "video" / "ann" / task / f"{name}.jsonl")


@pytest.mark.slow
def test_qa_files_have_values_fields(root):
    for task, names in QA_FILES.items():
        n = 5 if task == "tvqa" else 4
        choices = {f"a{i}" for i in range(n)}
        for name in names:
            records = ann(root, task, name)
            assert records, name
            keys = choices | {"q", "qid", "ts", "vid_name"} | ({"show_name"} if task == "tvqa" else set())
            test = "test" in name
            for r in records:
                assert set(r) == keys | (set() if test else {"answer_idx"}), (name, r)
                assert isinstance(r["qid"], int) and all(isinstance(r[c], str) for c in choices)
                start, end = (float(x) for x in r["ts"].split("-"))
                assert 0 <= start < end
                if not test:
                    assert r["answer_idx"] in range(n)
    public, release = (ann(root, "tvqa", n) for n in ("tvqa_test_public", "tvqa_test_release"))
    # VALUE's release file merges public and private test questions
    assert {r["qid"] for r in public} < {r["qid"] for r in release}
    qids = [r["qid"] for t, ns in QA_FILES.items() for n in ns[:2] for r in ann(root, t, n)]
    assert len(qids) == len(set(qids))


@pytest.mark.slow
def test_caption_files_have_values_fields(root):
    for task, names in CAPTION_FILES.items():
        for name in names:
            records = ann(root, task, name)
            assert records, name
            for r in records:
                keys = {"vid_name", "duration", "clip_id"} | ({"ts"} if task == "tvc" else set())
                if "test" in name:
                    assert set(r) == keys
                    continue
                assert set(r) == keys | {"descs"}
                assert r["descs"] and all(set(d) == {"desc", "desc_id", "type"} for d in r["descs"])
                if task == "tvc":
                    assert isinstance(r["ts"], list) and len(r["ts"]) == 2
    desc_ids = [d["desc_id"] for t, ns in CAPTION_FILES.items() for n in ns[:2] for r in ann(root, t, n)
                for d in r["descs"]]
    assert len(desc_ids) == len(set(desc_ids))


@pytest.mark.slow
def test_every_video_has_a_file_subtitles_and_features(root):
    names = {t: {r["vid_name"] for n in ns for r in ann(root, t, n)} for t, ns in {**QA_FILES, **CAPTION_FILES}.items()}
    for task, vids in names.items():
        source = SOURCE[task]
        subs = {line["vid_name"]: line["sub"] for line in read(root / "video" / "ann" / f"{source}_subtitles.jsonl")}
        store = VIDEO.open(root / "video" / "vis_features" / source / "clip-vit")
        for vid in vids:
            assert (root / "video" / "videos" / source / f"{vid}.mp4").is_file(), vid
            assert subs[vid] and all(set(s) == {"text", "start", "end"} and s["start"] < s["end"] for s in subs[vid])
            assert " : " in subs[vid][0]["text"]  # "Speaker : words", as in TV subtitles
        assert vids <= set(store.ids())
        feats = store.get(sorted(vids)[0])
        assert feats.shape == (6, 512) and feats.dtype == np.float16
    manifest = json.loads((root / "toy.json").read_text())
    assert manifest["video"]["features"]["model"] == "tiny-clip-proj"


def _centre_and_colour(rgb: np.ndarray) -> tuple[np.ndarray, str]:
    """Where the (single) shape of a decoded frame is, and its nearest named colour."""
    background = rgb[2, 2].astype(int)
    mask = np.abs(rgb.astype(int) - background).sum(-1) > 60
    ys, xs = np.nonzero(mask)
    colour = rgb[mask].mean(0)
    name = min(toy_video.COLORS, key=lambda c: np.abs(np.array(toy_video.COLORS[c]) - colour).sum())
    return np.array([xs.mean(), ys.mean()]), name


def _read_off(root: Path, source: str, record: dict) -> str:
    """The answer a pixel rule reads from the first and last frame of the video file."""
    frames = decode_frames(root / "video" / "videos" / source / f"{record['vid_name']}.mp4")
    (p0, _), (p1, colour) = _centre_and_colour(frames[0]), _centre_and_colour(frames[-1])
    if record["q"].startswith("What color"):
        return colour
    dx, dy = p1 - p0
    if max(abs(dx), abs(dy)) < 10:
        return "nowhere"
    if abs(dx) > abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


@pytest.mark.slow
@pytest.mark.parametrize("task", ["tvqa", "how2qa"])
def test_the_frames_decide_every_answer(root, task):
    for r in ann(root, task, QA_FILES[task][1]):
        assert r[f"a{r['answer_idx']}"] == _read_off(root, SOURCE[task], r), r


@pytest.mark.slow
@pytest.mark.parametrize("task", ["tvqa", "how2qa"])
def test_the_text_alone_does_not_decide_the_answers(root, task):
    n = 5 if task == "tvqa" else 4
    train, val = (ann(root, task, name) for name in QA_FILES[task][:2])
    letters = Counter(r["answer_idx"] for r in train)
    assert set(letters) == set(range(n)) and min(letters.values()) > 0.4 * len(train) / n  # balanced letters
    subs = {s["vid_name"]: " ".join(x["text"] for x in s["sub"])
            for s in read(root / "video" / "ann" / f"{SOURCE[task]}_subtitles.jsonl")}

    def text(r: dict) -> str:
        return subs[r["vid_name"]] + r["q"] + "".join(r[f"a{i}"] for i in range(n))

    by_text: dict[str, Counter] = {}
    for r in train:
        by_text.setdefault(text(r), Counter())[r["answer_idx"]] += 1
    overall = letters.most_common(1)[0][0]
    hits = sum((by_text[text(r)].most_common(1)[0][0] if text(r) in by_text else overall) == r["answer_idx"]
               for r in val)
    assert hits / len(val) < 1 / n + 0.2  # the best text-only guess is near chance


@pytest.mark.slow
def test_descriptions_say_what_happens(root):
    for task in CAPTION_FILES:
        for r in ann(root, task, CAPTION_FILES[task][0]):
            for d in r["descs"]:
                assert any(w in d["desc"] for w in ("moves", "stays still")), d


def test_world_is_deterministic_and_small():
    a, b = toy_video.make_video_world(toy.SEED), toy_video.make_video_world(toy.SEED)
    assert a == b and a != toy_video.make_video_world(1)
    assert len(a.clips) == sum(sum(s.values()) for s in toy_video.CLIPS.values()) < 500
    corpus = toy_video.video_corpus(toy.SEED)
    assert corpus == sorted(set(corpus)) and "Where does the red circle go?" in corpus
