"""The built-in toy world: synthetic shape pictures with VQA, GQA, NLVR2 and COCO annotations in the
reference on-disk formats (spec/pipeline.md §1), plus packed tiny-CLIP features, and short videos with TVQA,
How2QA, TVC and YC2C annotations (`videos.py`), built once into the cache; both draw with `palette.py`."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from PIL import Image, ImageDraw

from vlpet_cli.atomic import write_text
from vlpet_cli.errors import VlpetError
from vlpet_cli.extras import has_extra
from vlpet_cli.features.kinds import IMAGE
from vlpet_cli.toy.palette import BACKGROUNDS, COLORS, SHAPES

TOY_VERSION = "toy-v1"
SEED = 20230817
IMAGE_SIZE = 112
FEATURE_FILE = "clip_features/data_clip_RN101_att.h5"

SIZES = ("small", "large")
POSITIONS = ("left", "center", "right")
SOURCES = ("COCO", "VG", "GQA", "nlvr")

# How many images (COCO, VG, GQA) or sentence sets (NLVR2: 2 sentences x 4 image pairs each) per split.
COCO_SPLITS = {"train": 160, "restval": 40, "val": 30, "test": 30}
VG_SPLITS = {"train": 170, "valid": 30}
GQA_TESTDEV_IMAGES = 40
NLVR_SETS = {"train": 200, "valid": 10, "test": 20}
VQA_TEST_IMAGES = {"test2015": 30, "test-dev2015": 12}
"""COCO test2015 images of the VQA server's question files (test-dev2015's are some of test2015's)."""
QUESTIONS_PER_IMAGE = 3
PAIRS_PER_SET = 4

_SLOT_X = {"left": 20, "center": 56, "right": 92}
_HALF_SIZE = {"small": 10, "large": 17}
_PLACE = {"left": "on the left", "center": "in the middle", "right": "on the right"}
_WHERE = {"left": "left", "center": "middle", "right": "right"}


@dataclass(frozen=True)
class Shape:
    """One coloured shape of a scene, with its small rendering jitter."""

    kind: str
    color: str
    size: str
    pos: str
    dx: int = 0
    dy: int = 0
    tint: tuple[int, int, int] = (0, 0, 0)

    def name(self, with_size: bool = False) -> str:
        """Noun phrase without article, e.g. 'red circle' or 'large red circle'."""
        return f"{self.size} {self.color} {self.kind}" if with_size else f"{self.color} {self.kind}"


@dataclass(frozen=True)
class Scene:
    """A picture: one or two shapes on a plain background, shapes ordered from left to right."""

    img_id: str
    source: str
    background: str
    shapes: tuple[Shape, ...]


@dataclass
class ToyWorld:
    """Everything the toy world holds, before anything is written to disk."""

    scenes: list[Scene] = field(default_factory=list)
    coco: list[dict] = field(default_factory=list)
    vqa: dict[str, list[dict]] = field(default_factory=dict)
    vqa_official: dict[str, list[dict]] = field(default_factory=dict)
    gqa: dict[str, list[dict]] = field(default_factory=dict)
    nlvr: dict[str, list[dict]] = field(default_factory=dict)
    vqa_questions: dict[str, list[dict]] = field(default_factory=dict)
    """The VQA server's official question files (test2015, test-dev2015): questions without answers."""


# ----------------------------------------------------------------------------------------------- scenes


def _rng(name: str, seed: int) -> random.Random:
    """A generator of its own per part of the world, so parts do not shift each other when resized."""
    return random.Random(f"{seed}:{name}")


def _layout(rng: random.Random) -> tuple[tuple[str, str, str, str], ...]:
    """Draw what a scene shows: one or two (kind, color, size, position) at distinct positions."""
    positions = sorted(rng.sample(POSITIONS, rng.choice((1, 2))), key=POSITIONS.index)
    return tuple((rng.choice(SHAPES), rng.choice(tuple(COLORS)), rng.choice(SIZES), pos) for pos in positions)


def _tint(rng: random.Random) -> tuple[int, int, int]:
    """A small random colour shift, so no two shapes of a colour are pixel-identical."""
    return (rng.randint(-18, 18), rng.randint(-18, 18), rng.randint(-18, 18))


def _dress(rng: random.Random, layout: tuple, img_id: str, source: str) -> Scene:
    """Give a layout its background and small rendering jitter."""
    shapes = tuple(
        Shape(kind, color, size, pos, dx=rng.randint(-3, 3), dy=rng.randint(-14, 14), tint=_tint(rng))
        for kind, color, size, pos in layout
    )
    return Scene(img_id, source, rng.choice(tuple(BACKGROUNDS)), shapes)


def random_scene(rng: random.Random, img_id: str, source: str) -> Scene:
    """Draw a scene of one or two shapes at distinct positions."""
    return _dress(rng, _layout(rng), img_id, source)


def render_scene(scene: Scene, mask: bool = False):
    """Draw a scene as a 112x112 RGB PIL image; mask=True draws a grayscale map instead, where pixel value
    i + 1 marks shape i and 0 the background."""
    if mask:
        img = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    else:
        img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for i, s in enumerate(scene.shapes):
        cx, cy, h = _SLOT_X[s.pos] + s.dx, IMAGE_SIZE // 2 + s.dy, _HALF_SIZE[s.size]
        fill = i + 1 if mask else tuple(min(255, max(0, c + t)) for c, t in zip(COLORS[s.color], s.tint))
        if s.kind == "circle":
            draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=fill)
        elif s.kind == "square":
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
        else:
            draw.polygon([(cx, cy - h), (cx - h, cy + h), (cx + h, cy + h)], fill=fill)
    return img


def _unique(scene: Scene, attr: str) -> list[Shape]:
    """Shapes whose value of `attr` no other shape of the scene shares."""
    counts = Counter(getattr(s, attr) for s in scene.shapes)
    return [s for s in scene.shapes if counts[getattr(s, attr)] == 1]


def _cap(text: str) -> str:
    """Upper-case the first letter."""
    return text[:1].upper() + text[1:]


# ---------------------------------------------------------------------------------------------- captions


def captions(rng: random.Random, scene: Scene, n: int = 5) -> list[str]:
    """`n` different captions of a scene, worded the way several annotators might."""
    bg = scene.background
    if len(scene.shapes) == 1:
        s = scene.shapes[0]
        pool = [
            f"a {s.name()} on a {bg} background",
            f"a {s.name(True)}",
            f"there is a {s.name()} {_PLACE[s.pos]}.",
            f"a single {s.name()}.",
            f"one {s.name(True)} {_PLACE[s.pos]} of the picture",
            f"a picture of a {s.name()}",
            f"a {s.kind} colored {s.color}.",
            f"a {s.size} {s.kind} on a {bg} background",
        ]
    else:
        a, b = scene.shapes
        pool = [
            f"a {a.name()} to the left of a {b.name()}",
            f"a {b.name()} to the right of a {a.name()}.",
            f"two shapes: a {a.name()} and a {b.name()}.",
            f"a {a.name(True)} next to a {b.name(True)}",
            f"a {a.name()} and a {b.name()} on a {bg} background",
            f"two shapes side by side, a {a.name()} and a {b.name()}",
        ]
        if a.kind == b.kind and a.color != b.color:
            pool.append(f"two {a.kind}s, one {a.color} and one {b.color}")
        if a.color == b.color and a.kind != b.kind:
            pool.append(f"two {a.color} shapes: a {a.kind} and a {b.kind}.")
        if a.color == b.color and a.kind == b.kind:
            pool.append(f"two {a.color} {a.kind}s")
    return [_cap(c) for c in rng.sample(pool, n)]


def _coco_images(world: ToyWorld, seed: int) -> None:
    """COCO Karpathy split entries and their scenes."""
    rng = _rng("coco", seed)
    total = sum(COCO_SPLITS.values())
    cocoids = rng.sample(range(1, 600_000), total)
    sent_id = 0
    k = 0
    for split, count in COCO_SPLITS.items():
        folder = "train2014" if split == "train" else "val2014"
        for _ in range(count):
            cocoid = cocoids[k]
            k += 1
            img_id = f"COCO_{folder}_{cocoid:012d}"
            scene = random_scene(rng, img_id, "COCO")
            world.scenes.append(scene)
            sentences = []
            for raw in captions(rng, scene):
                tokens = raw.lower().replace(",", " ").replace(":", " ").replace(".", " ").split()
                sentences.append({"tokens": tokens, "raw": raw, "imgid": len(world.coco), "sentid": sent_id})
                sent_id += 1
            world.coco.append(
                {
                    "filepath": folder,
                    "sentids": [s["sentid"] for s in sentences],
                    "filename": f"{img_id}.png",
                    "imgid": len(world.coco),
                    "split": split,
                    "sentences": sentences,
                    "cocoid": cocoid,
                }
            )


# ------------------------------------------------------------------------------------------------- VQA

QA = tuple[str, str, str, str]  # question, answer, answer_type, question_type


def _vqa_candidates(rng: random.Random, scene: Scene) -> dict[str, QA]:
    """One question per VQA template that fits the scene, keyed by template."""
    out: dict[str, QA] = {}
    n = len(scene.shapes)
    out["count"] = ("How many shapes are there?", str(n), "number", "how many")
    color = rng.choice([s.color for s in scene.shapes] + list(COLORS))
    n_color = sum(s.color == color for s in scene.shapes)
    out["count_color"] = (f"How many {color} shapes are there?", str(n_color), "number", "how many")
    if rng.random() < 0.5:
        c, k = rng.choice([(s.color, s.kind) for s in scene.shapes])
    else:
        c, k = rng.choice(tuple(COLORS)), rng.choice(SHAPES)
    present = any(s.color == c and s.kind == k for s in scene.shapes)
    out["is_there"] = (f"Is there a {c} {k}?", "yes" if present else "no", "yes/no", "is there a")
    kinds = _unique(scene, "kind")
    if kinds:
        s = rng.choice(kinds)
        out["color_of"] = (f"What color is the {s.kind}?", s.color, "other", "what color is the")
        size = s.size if rng.random() < 0.5 else rng.choice(SIZES)
        out["is_size"] = (f"Is the {s.kind} {size}?", "yes" if size == s.size else "no", "yes/no", "is the")
    colors = _unique(scene, "color")
    if colors:
        s = rng.choice(colors)
        out["shape_of"] = (f"What shape is the {s.color} object?", s.kind, "other", "what")
    out["background"] = ("What color is the background?", scene.background, "other", "what color is the")
    return out


def _wrong_answer(rng: random.Random, answer: str, answer_type: str) -> str:
    """A plausible wrong answer of the same kind, as a careless annotator would give."""
    if answer in ("yes", "no"):
        return "no" if answer == "yes" else "yes"
    if answer_type == "number":
        return rng.choice([x for x in ("0", "1", "2", "3") if x != answer])
    for group in (tuple(COLORS), SHAPES, tuple(BACKGROUNDS)):
        if answer in group:
            return rng.choice([x for x in group if x != answer] or ["blue"])
    return "blue"


def annotator_answers(rng: random.Random, answer: str, answer_type: str) -> list[dict]:
    """Ten annotator answers: mostly the truth, sometimes one or two wrong ones."""
    answers = [answer] * 10
    if rng.random() < 0.3:
        wrong = _wrong_answer(rng, answer, answer_type)
        for i in rng.sample(range(10), rng.choice((1, 1, 2))):
            answers[i] = wrong
    return [
        {
            "answer": a,
            "answer_confidence": "yes" if a == answer else rng.choice(("maybe", "yes")),
            "answer_id": i + 1,
        }
        for i, a in enumerate(answers)
    ]


def soft_label(answers: list[dict]) -> dict[str, float]:
    """LXMERT soft scores: 0.3 per annotator giving the answer, capped at 1."""
    scores = {1: 0.3, 2: 0.6, 3: 0.9}
    counts = Counter(a["answer"] for a in answers)
    return {a: scores.get(c, 1.0) for a, c in counts.items()}


def _vqa(world: ToyWorld, seed: int) -> None:
    """VQA Karpathy records over the COCO images, and the two official annotation files."""
    rng = _rng("vqa", seed)
    split_of = {e["filename"].rsplit(".", 1)[0]: e["split"] for e in world.coco}
    karpathy = {
        "train": "karpathy_train",
        "restval": "karpathy_train",
        "val": "karpathy_val",
        "test": "karpathy_test",
    }
    world.vqa = {"karpathy_train": [], "karpathy_val": [], "karpathy_test": []}
    world.vqa_official = {"train2014": [], "val2014": []}
    for scene in (s for s in world.scenes if s.source == "COCO"):
        cocoid = int(scene.img_id.rsplit("_", 1)[1])
        cands = _vqa_candidates(rng, scene)
        for k, key in enumerate(rng.sample(sorted(cands), QUESTIONS_PER_IMAGE)):
            question, answer, atype, qtype = cands[key]
            qid = cocoid * 1000 + k
            answers = annotator_answers(rng, answer, atype)
            majority = Counter(a["answer"] for a in answers).most_common(1)[0][0]
            world.vqa[karpathy[split_of[scene.img_id]]].append(
                {
                    "answer_type": atype,
                    "img_id": scene.img_id,
                    "label": soft_label(answers),
                    "question_id": qid,
                    "question_type": qtype,
                    "sent": question,
                    "is_topk_optimal": True,
                    "answers": answers,
                }
            )
            folder = scene.img_id.split("_")[1]
            world.vqa_official[folder].append(
                {
                    "question_type": qtype,
                    "multiple_choice_answer": majority,
                    "answers": answers,
                    "image_id": cocoid,
                    "answer_type": atype,
                    "question_id": qid,
                }
            )


def _vqa_test(world: ToyWorld, seed: int) -> None:
    """The VQA server's question files over COCO test2015 images, drawn last with a generator of their own (so
    the other parts of the world are as before): test2015 and its test-dev2015 subset, in the official format."""
    rng = _rng("vqa-test2015", seed)
    image_ids = sorted(rng.sample(range(1, 600_000), VQA_TEST_IMAGES["test2015"]))
    dev = set(rng.sample(image_ids, VQA_TEST_IMAGES["test-dev2015"]))
    world.vqa_questions = {"test2015": [], "test-dev2015": []}
    for image_id in image_ids:
        scene = random_scene(rng, f"COCO_test2015_{image_id:012d}", "COCO")
        world.scenes.append(scene)
        cands = _vqa_candidates(rng, scene)
        for k, key in enumerate(rng.sample(sorted(cands), QUESTIONS_PER_IMAGE)):
            question = {"image_id": image_id, "question": cands[key][0], "question_id": image_id * 1000 + k}
            world.vqa_questions["test2015"].append(question)
            if image_id in dev:
                world.vqa_questions["test-dev2015"].append(question)


# ------------------------------------------------------------------------------------------------- GQA


def _gqa_candidates(rng: random.Random, scene: Scene) -> dict[str, tuple[str, str]]:
    """One (question, answer) per GQA template that fits the scene, keyed by template."""
    out: dict[str, tuple[str, str]] = {}
    by_pos = {s.pos: s for s in scene.shapes}
    pos = rng.choice(sorted(by_pos))
    out["shape_at"] = (f"What shape is {_PLACE[pos]}?", by_pos[pos].kind)
    pos = rng.choice(sorted(by_pos))
    out["color_at"] = (f"What color is the shape {_PLACE[pos]}?", by_pos[pos].color)
    sizes = _unique(scene, "size")
    if sizes:
        s = rng.choice(sizes)
        out["color_of_size"] = (f"What color is the {s.size} shape?", s.color)
    kinds = _unique(scene, "kind")
    if kinds:
        s = rng.choice(kinds)
        color = s.color if rng.random() < 0.5 else rng.choice(tuple(COLORS))
        out["is_color"] = (f"Is the {s.kind} {color}?", "yes" if color == s.color else "no")
    named = [
        s for s in scene.shapes if sum(t.kind == s.kind and t.color == s.color for t in scene.shapes) == 1
    ]
    if named:
        s = rng.choice(named)
        out["where"] = (f"Where is the {s.name()}?", _WHERE[s.pos])
    out["only_one"] = ("Is there only one shape?", "yes" if len(scene.shapes) == 1 else "no")
    if len(scene.shapes) == 2 and scene.shapes[0].kind != scene.shapes[1].kind:
        a, b = scene.shapes if rng.random() < 0.5 else scene.shapes[::-1]
        out["left_of"] = (
            f"Is the {a.kind} to the left of the {b.kind}?",
            "yes" if POSITIONS.index(a.pos) < POSITIONS.index(b.pos) else "no",
        )
        if a.size != b.size:
            big = a if a.size == "large" else b
            out["bigger"] = (f"Which shape is bigger, the {a.kind} or the {b.kind}?", big.kind)
    return out


def _gqa(world: ToyWorld, seed: int) -> None:
    """GQA records: train/valid over VG images, testdev over GQA images."""
    rng = _rng("gqa", seed)
    vg_ids = rng.sample(range(1, 2_420_000), sum(VG_SPLITS.values()))
    dev_ids = rng.sample(range(1, 600_000), GQA_TESTDEV_IMAGES)
    plan = []
    for split, count in VG_SPLITS.items():
        plan += [(split, "VG", str(vg_ids.pop(0))) for _ in range(count)]
    plan += [("testdev", "GQA", f"n{i}") for i in dev_ids]
    world.gqa = {"train": [], "valid": [], "testdev": []}
    qid = rng.randint(1_000_000, 2_000_000)
    for split, source, img_id in plan:
        scene = random_scene(rng, img_id, source)
        world.scenes.append(scene)
        cands = _gqa_candidates(rng, scene)
        for key in rng.sample(sorted(cands), QUESTIONS_PER_IMAGE):
            question, answer = cands[key]
            qid += rng.randint(1, 40)
            world.gqa[split].append(
                {"img_id": img_id, "question_id": f"{qid:08d}", "sent": question, "label": {answer: 1.0}}
            )


# ----------------------------------------------------------------------------------------------- NLVR2

Pred = Callable[[Scene, Scene], bool]


def _has(scene: Scene, kind: str | None = None, color: str | None = None, size: str | None = None) -> bool:
    """Whether the scene has a shape matching every given attribute."""
    return any(
        (kind is None or s.kind == kind)
        and (color is None or s.color == color)
        and (size is None or s.size == size)
        for s in scene.shapes
    )


def _statement(rng: random.Random) -> tuple[str, Pred]:
    """Draw one NLVR2 statement and its truth function over (left image, right image): whether one image or
    both show a kind of shape, a colour, or both."""
    k, c = rng.choice(SHAPES), rng.choice(tuple(COLORS))
    side = rng.choice(("left", "right"))
    pick = (lambda L, R: L) if side == "left" else (lambda L, R: R)
    table: list[tuple[str, Pred]] = [
        (f"The {side} image contains a {c} {k}.", lambda L, R: _has(pick(L, R), k, c)),
        (f"The {side} image contains a {k}.", lambda L, R: _has(pick(L, R), k)),
        (f"The {side} image contains a {c} shape.", lambda L, R: _has(pick(L, R), color=c)),
        (f"Both images contain a {k}.", lambda L, R: _has(L, k) and _has(R, k)),
        (f"Both images contain a {c} shape.", lambda L, R: _has(L, color=c) and _has(R, color=c)),
    ]
    return rng.choice(table)


def _pair_for(rng: random.Random, preds: list[Pred], want: tuple[bool, ...], tries: int = 3000):
    """Draw an image pair on which each statement has the wanted truth value, or None."""
    for _ in range(tries):
        L, R = (Scene("", "nlvr", "", tuple(Shape(*x) for x in _layout(rng))) for _ in range(2))
        if all(p(L, R) == w for p, w in zip(preds, want)):
            return _dress(rng, _layout_of(L), "", "nlvr"), _dress(rng, _layout_of(R), "", "nlvr")
    return None


def _layout_of(scene: Scene) -> tuple:
    """The (kind, color, size, position) layout of a scene."""
    return tuple((s.kind, s.color, s.size, s.pos) for s in scene.shapes)


def _nlvr_set(rng: random.Random) -> tuple[list[str], list[tuple[Scene, Scene]], list[tuple[bool, bool]]]:
    """Two statements over four image pairs with every truth combination once (so labels are balanced)."""
    while True:
        (ta, pa), (tb, pb) = _statement(rng), _statement(rng)
        if ta == tb:
            continue
        combos = [(True, True), (True, False), (False, True), (False, False)]
        rng.shuffle(combos)
        pairs = []
        for want in combos:
            pair = _pair_for(rng, [pa, pb], want)
            if pair is None:
                break
            pairs.append(pair)
        else:
            return [ta, tb], pairs, combos


def _nlvr(world: ToyWorld, seed: int) -> None:
    """NLVR2 records: each statement judged over several image pairs (consistency groups of 4)."""
    rng = _rng("nlvr", seed)
    world.nlvr = {}
    for split, n_sets in NLVR_SETS.items():
        records: list[dict] = []
        set_ids = sorted(rng.sample(range(n_sets * 30), n_sets))
        for setid in set_ids:
            sents, pairs, combos = _nlvr_set(rng)
            for pairid, (L, R) in enumerate(pairs):
                for side, scene in (("img0", L), ("img1", R)):
                    img_id = f"{split}-{setid}-{pairid}-{side}"
                    world.scenes.append(Scene(img_id, "nlvr", scene.background, scene.shapes))
            for sentid, sent in enumerate(sents):
                for pairid, combo in enumerate(combos):
                    records.append(
                        {
                            "identifier": f"{split}-{setid}-{pairid}-{sentid}",
                            "img0": f"{split}-{setid}-{pairid}-img0",
                            "img1": f"{split}-{setid}-{pairid}-img1",
                            "label": int(combo[sentid]),
                            "sent": sent,
                            "uid": f"nlvr2_{split}_{len(records)}",
                        }
                    )
        world.nlvr[split] = records


# ----------------------------------------------------------------------------------------------- world


def make_world(seed: int = SEED) -> ToyWorld:
    """Generate every scene and annotation of the toy world (no pixels, no features)."""
    world = ToyWorld()
    _coco_images(world, seed)
    _vqa(world, seed)
    _gqa(world, seed)
    _nlvr(world, seed)
    _vqa_test(world, seed)
    return world


@functools.lru_cache(maxsize=2)
def _shared_world(seed: int) -> ToyWorld:
    """One generated world per seed for the read-only helpers below."""
    return make_world(seed)


def toy_corpus(seed: int = SEED) -> list[str]:
    """Every distinct text of the toy world (captions, questions, answers, statements, true/false), sorted."""
    world = _shared_world(seed)
    texts = {"true", "false"}
    for entry in world.coco:
        texts.update(s["raw"] for s in entry["sentences"])
    for records in list(world.vqa.values()) + list(world.gqa.values()):
        for r in records:
            texts.add(r["sent"])
            texts.update(r["label"])
    for records in world.nlvr.values():
        texts.update(r["sent"] for r in records)
    return sorted(texts)


def _summary_of(world: ToyWorld) -> dict[str, dict[str, int]]:
    """Counts per task and split, and images per source."""
    coco_rows: Counter[str] = Counter()
    for e in world.coco:
        split = "train" if e["split"] in ("train", "restval") else e["split"]
        coco_rows[split] += len(e["sentences"]) if split == "train" else 1
    return {
        "vqa": {**{k.replace("karpathy_", ""): len(v) for k, v in world.vqa.items()},
                **{k: len(v) for k, v in world.vqa_questions.items()}},
        "gqa": {k: len(v) for k, v in world.gqa.items()},
        "nlvr": {k: len(v) for k, v in world.nlvr.items()},
        "coco": dict(coco_rows),
        "images": dict(Counter(s.source for s in world.scenes)),
    }


def toy_summary(seed: int = SEED) -> dict[str, dict[str, int]]:
    """Counts per task and split (COCO train counts caption rows) and images per source, for display."""
    return _summary_of(_shared_world(seed))


# ------------------------------------------------------------------------------------------------ disk


def _write_json(path: Path, obj) -> None:
    """Write compact JSON atomically, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(obj, sort_keys=False))


def _tiny_clip() -> Path:
    """The shipped tiny CLIP vision model used to extract the toy features."""
    return Path(__file__).resolve().parent.parent / "assets" / "tiny-clip"


def _fingerprint(model_dir: Path) -> str:
    """A short hash of a model directory's files, so features are rebuilt when the model changes."""
    h = hashlib.sha256()
    for p in sorted(model_dir.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(model_dir).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _generator_hash() -> str:
    """A short hash of the toy world's source (this module, the video world, the palette): a world built by other
    code is rebuilt."""
    h = hashlib.sha256(Path(__file__).read_bytes())
    for name in ("videos.py", "palette.py"):
        h.update((Path(__file__).parent / name).read_bytes())
    return h.hexdigest()[:16]


def _tiny_clip_proj() -> Path:
    """The shipped tiny projected CLIP used to extract the toy video features."""
    return Path(__file__).resolve().parent.parent / "assets" / "tiny-clip-proj"


def write_world(world: ToyWorld, dest: Path) -> dict[str, dict[str, Path]]:
    """Write images and annotation files under `dest`; return the image paths per source."""
    images: dict[str, dict[str, Path]] = {s: {} for s in SOURCES}
    for scene in world.scenes:
        path = dest / scene.source / "images" / f"{scene.img_id}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        render_scene(scene).save(path, format="PNG", optimize=False)
        images[scene.source][scene.img_id] = path
    _write_json(dest / "COCO" / "dataset_coco.json", {"images": world.coco, "dataset": "coco"})
    for name, records in world.vqa.items():
        _write_json(dest / "vqa" / f"{name}.json", records)
    for folder, anns in world.vqa_official.items():
        _write_json(
            dest / "vqa" / f"v2_mscoco_{folder}_annotations.json",
            {"info": {"description": "vlpet toy world"}, "data_subtype": folder, "annotations": anns},
        )
    for subset, questions in world.vqa_questions.items():
        _write_json(
            dest / "vqa" / f"v2_OpenEnded_mscoco_{subset}_questions.json",
            {"info": {"description": "vlpet toy world"}, "task_type": "Open-Ended", "data_type": "mscoco",
             "data_subtype": subset, "questions": questions, "license": {"name": "vlpet toy world"}},
        )
    answers = sorted({a for r in world.vqa["karpathy_train"] + world.vqa["karpathy_val"] for a in r["label"]})
    _write_json(dest / "vqa" / "trainval_ans2label.json", {a: i for i, a in enumerate(answers)})
    _write_json(dest / "vqa" / "trainval_label2ans.json", answers)
    for split, records in world.gqa.items():
        _write_json(dest / "GQA" / f"{split}.json", records)
    for split, records in world.nlvr.items():
        _write_json(dest / "nlvr" / f"{split}.json", records)
    return images


def build_toy(dest: Path, seed: int = SEED, features: bool = True, model: Path | None = None) -> Path:
    """Build the toy world into `dest` (created; must not hold a world already): images, annotations,
    packed features per source, and a `toy.json` manifest written last."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    world = make_world(seed)
    images = write_world(world, dest)
    manifest: dict[str, Any] = {
        "version": TOY_VERSION,
        "generator": _generator_hash(),
        "seed": seed,
        "summary": _summary_of(world),
        "features": None,
    }
    if features:
        model = Path(model) if model is not None else _tiny_clip()
        # The built-in name keeps the install location out of the files' attributes.
        name = "tiny-clip" if model == _tiny_clip() and not Path("tiny-clip").exists() else model
        for source, paths in images.items():
            out = dest / source / FEATURE_FILE
            out.parent.mkdir(parents=True, exist_ok=True)
            # the test2015 images are appended in a second pass, so the other images keep the batches (and so
            # the features, to the last bit) they had before the world held test2015
            later = {k: v for k, v in paths.items() if k.startswith("COCO_test2015_")}
            for part in ({k: v for k, v in paths.items() if k not in later}, later):
                summary = IMAGE.extraction().extract(part, name, out, layout="packed", progress=False) if part else None
                if summary is not None and summary.failed:
                    _, path, reason = summary.failed[0]
                    raise VlpetError(f"toy world: feature extraction failed for {path} ({reason})")
        manifest["features"] = {"model": model.name, "fingerprint": _fingerprint(model), "file": FEATURE_FILE}
    manifest["video"] = None  # without PyAV (vlpet[video]) the world has no videos, until av is installed
    if has_extra("video"):
        from vlpet_cli.toy.videos import build_video  # imports this module's constants

        manifest["video"] = build_video(dest, seed, features=features)
        if features:
            manifest["video"]["features"]["fingerprint"] = _fingerprint(_tiny_clip_proj())
    manifest["build_seconds"] = round(time.perf_counter() - start, 2)
    _write_json(dest / "toy.json", manifest)
    return dest


def cache_dir() -> Path:
    """vlpet's cache folder: $VLPET_CACHE, else ~/.cache/vlpet."""
    env = os.environ.get("VLPET_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vlpet"


def _is_current(root: Path) -> bool:
    """Whether `root` holds a complete toy world built by this code, with features from the shipped tiny CLIP."""
    try:
        manifest = json.loads((root / "toy.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    feats = manifest.get("features") or {}
    video = manifest.get("video")  # None: built without PyAV (vlpet[video]), current until av imports
    video_feats = (video or {}).get("features") or {}
    model, video_model = _tiny_clip(), _tiny_clip_proj()
    return (
        manifest.get("version") == TOY_VERSION
        and manifest.get("generator") == _generator_hash()
        and manifest.get("seed") == SEED
        and (not model.is_dir() or feats.get("fingerprint") == _fingerprint(model))
        and (not has_extra("video") if video is None
             else not video_model.is_dir() or video_feats.get("fingerprint") == _fingerprint(video_model))
    )


def _remove_leftovers(parent: Path, min_age_s: float = 600.0) -> None:
    """Delete temporary folders that killed builds left behind (old enough not to belong to a live one)."""
    for p in parent.glob(f".{TOY_VERSION}.*-*"):
        with contextlib.suppress(OSError):
            if p.is_dir() and time.time() - p.stat().st_mtime > min_age_s:
                shutil.rmtree(p, ignore_errors=True)


def _clean_stale(parent: Path) -> None:
    """Remove what killed builds left (a 13 MB `.toy-v1.building-*` each) when no build holds the lock; a world
    that is already current is never rebuilt, so this is the only place they would go."""
    if not any(parent.glob(f".{TOY_VERSION}.*-*")):
        return
    with contextlib.suppress(Timeout, OSError), FileLock(parent / f"{TOY_VERSION}.lock", timeout=0):
        _remove_leftovers(parent, min_age_s=0.0)


def toy_root(rebuild: bool = False) -> Path:
    """The toy world's folder, `$VLPET_CACHE/toy-v1`, built on first use (about 10-20 s on a laptop CPU).

    The world is built in a temporary sibling folder and renamed into place, so an interrupted or concurrent
    build never leaves half a world behind."""
    root = cache_dir() / TOY_VERSION
    if not rebuild and _is_current(root):
        _clean_stale(root.parent)
        return root
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VlpetError(
            f"cannot create the vlpet cache folder {root.parent}: {e}; set VLPET_CACHE to a writable folder"
        ) from e
    with FileLock(root.parent / f"{TOY_VERSION}.lock"):
        if not rebuild and _is_current(root):
            return root
        _remove_leftovers(root.parent, min_age_s=0.0)  # under the lock no build is running: every one is stale
        tmp = Path(tempfile.mkdtemp(prefix=f".{TOY_VERSION}.building-", dir=root.parent))
        try:
            build_toy(tmp)
            if root.exists():
                old = root.with_name(f".{TOY_VERSION}.old-{os.getpid()}")
                os.replace(root, old)
                shutil.rmtree(old, ignore_errors=True)
            try:
                os.replace(tmp, root)
            except OSError:
                if not _is_current(root):  # lost a rename race only if the winner left a full world
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root
