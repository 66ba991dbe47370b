"""The toy world's videos: short synthetic clips written as real video files, with narrator subtitles and TVQA,
How2QA, TVC and YC2C annotations in VALUE's formats (spec/pipeline.md §1.5), and per-frame features extracted from
the files by the video extraction path with the shipped tiny projected CLIP (`video/vis_features/<source>/clip-vit/`).

A clip is 9 s at 2 fps, 112x112: one coloured shape that moves (left, right, up, down, or stays) and may change
colour halfway; in YouCook2-like clips a second shape may appear. The subtitles name the shape and its first
colour but never what it does, so every question (which way it moves, which colour it is at the end) and every
description needs the frames. The choices of a question kind are listed in one fixed order drawn from the seed
(balanced answer letters, which the frames alone decide). Texts are short: the tiny backbones read 128 tokens.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vlpet_cli.atomic import write_text
from vlpet_cli.errors import VlpetError
from vlpet_cli.extras import require_extra
from vlpet_cli.features.extract.clip import TINY_CLIP_PROJ
from vlpet_cli.features.kinds import VIDEO
from vlpet_cli.toy.palette import BACKGROUNDS, COLORS, SHAPES

FRAME_SIZE = 112
FPS = 2
DURATION_S = 9.0
HALF = 12  # half the side of a shape, in pixels
MOTIONS = ("left", "right", "up", "down", "still")
VIDEO_SOURCES = ("tv", "how2", "yc2")
TV_SHOWS = ("friends", "bbt", "house", "met", "castle", "grey")
# clips per source and split; TV clips serve TVQA and TVC, How2 clips How2QA, YouCook2 clips YC2C
CLIPS = {
    "tv": {"train": 120, "val": 24, "test_public": 8, "test_private": 8},
    "how2": {"train": 90, "val": 20, "test_public": 10},
    "yc2": {"train": 90, "val": 20, "test": 10},
}
DESCS = {"train": 1, "val": 2}  # descriptions per caption clip: val scores against two references per clip
GRID = 4  # the tiny projected CLIP is taught what lies in each cell of a GRID x GRID division of a frame

_MOVE_TEXT = {"left": "left", "right": "right", "up": "up", "down": "down", "still": "nowhere"}
_MOVE_DESC = {"left": "moves to the left", "right": "moves to the right", "up": "moves up", "down": "moves down",
              "still": "stays still"}


@dataclass(frozen=True)
class Sprite:
    """A shape shown from `start` to `end` seconds, moving linearly from (x0, y0) to (x1, y1), in `color` until
    `turn_at` and `color2` after it."""

    kind: str
    color: str
    x0: float
    y0: float
    x1: float
    y1: float
    start: float = 0.0
    end: float = DURATION_S
    color2: str | None = None
    turn_at: float = DURATION_S

    def at(self, t: float) -> tuple[str, float, float] | None:
        """(colour, centre x, centre y) at time t, or None when not on screen."""
        if not self.start <= t < self.end:
            return None
        f = min(1.0, max(0.0, t / DURATION_S))
        color = self.color2 if self.color2 and t >= self.turn_at else self.color
        return color, self.x0 + f * (self.x1 - self.x0), self.y0 + f * (self.y1 - self.y0)


@dataclass(frozen=True)
class Clip:
    """One toy video: its id, source, background, what it shows and how."""

    vid_name: str
    source: str
    split: str
    background: str
    motion: str
    main: Sprite
    extra: Sprite | None = None
    show_name: str = ""

    @property
    def final_color(self) -> str:
        return self.main.color2 or self.main.color


@dataclass
class VideoWorld:
    """Every clip and annotation of the video toy world, before anything is written."""

    clips: list[Clip] = field(default_factory=list)
    subtitles: dict[str, list[dict]] = field(default_factory=dict)  # source -> subtitle lines
    files: dict[str, list[dict]] = field(default_factory=dict)  # path under video/ann/ -> records


# ----------------------------------------------------------------------------------------------- frames


def draw_shapes(background: str, shapes: list[tuple[str, str, float, float]], tint: tuple = (0, 0, 0)) -> np.ndarray:
    """A FRAME_SIZE x FRAME_SIZE RGB frame with (kind, colour, cx, cy) shapes drawn in order; uint8 (H, W, 3)."""
    img = Image.new("RGB", (FRAME_SIZE, FRAME_SIZE), BACKGROUNDS[background])
    draw = ImageDraw.Draw(img)
    for kind, color, cx, cy in shapes:
        fill = tuple(min(255, max(0, c + d)) for c, d in zip(COLORS[color], tint))
        box = (cx - HALF, cy - HALF, cx + HALF, cy + HALF)
        if kind == "circle":
            draw.ellipse(box, fill=fill)
        elif kind == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - HALF), (cx - HALF, cy + HALF), (cx + HALF, cy + HALF)], fill=fill)
    return np.asarray(img, dtype=np.uint8)


def frame_shapes(clip: Clip, t: float) -> list[tuple[str, str, float, float]]:
    """The (kind, colour, cx, cy) of every shape on screen at time t."""
    out = []
    for sprite in (clip.main, clip.extra):
        state = sprite.at(t) if sprite else None
        if sprite and state:
            out.append((sprite.kind, state[0], state[1], state[2]))
    return out


def render_frame(clip: Clip, t: float) -> np.ndarray:
    """The clip's frame at time t."""
    return draw_shapes(clip.background, frame_shapes(clip, t))


def frame_tags(background: str, shapes: list[tuple[str, str, float, float]]) -> list[int]:
    """What a frame shows, as class indices: background, then for two shapes (left-most first) the colour, the
    kind, and the column and row of a GRID x GRID division its centre lies in (0 = no such shape); the tiny
    projected CLIP learns to put these in its image embedding."""
    tags = [list(BACKGROUNDS).index(background)]
    ordered = sorted(shapes, key=lambda s: s[2])
    for k in range(2):
        if k < len(ordered):
            kind, color, cx, cy = ordered[k]
            col = min(GRID - 1, max(0, int(cx * GRID / FRAME_SIZE)))
            row = min(GRID - 1, max(0, int(cy * GRID / FRAME_SIZE)))
            tags += [list(COLORS).index(color) + 1, SHAPES.index(kind) + 1, col + 1, row + 1]
        else:
            tags += [0, 0, 0, 0]
    return tags


def random_frame(rng: random.Random) -> tuple[np.ndarray, list[int]]:
    """A fresh random frame of one or two shapes anywhere (with a small colour jitter) and its `frame_tags`."""
    background = rng.choice(tuple(BACKGROUNDS))
    shapes = [(rng.choice(SHAPES), rng.choice(tuple(COLORS)), rng.uniform(HALF, FRAME_SIZE - HALF),
               rng.uniform(HALF, FRAME_SIZE - HALF)) for _ in range(rng.choice((1, 1, 2)))]
    tint = (rng.randint(-15, 15), rng.randint(-15, 15), rng.randint(-15, 15))
    return draw_shapes(background, shapes, tint), frame_tags(background, shapes)


# ------------------------------------------------------------------------------------------------ clips


def _path_of(rng: random.Random, motion: str) -> tuple[float, float, float, float]:
    """Start and end centre of a shape that moves that way (about 60 px) or stays."""
    lo, hi = HALF + 8, FRAME_SIZE - HALF - 8
    a, b = rng.uniform(lo, hi), rng.uniform(lo, hi)
    if motion == "still":
        return a, b, a, b
    far, near = rng.uniform(hi - 6, hi), rng.uniform(lo, lo + 6)
    return {"left": (far, a, near, a), "right": (near, a, far, a), "up": (a, far, a, near),
            "down": (a, near, a, far)}[motion]


def _clip(rng: random.Random, vid_name: str, source: str, split: str, show: str) -> Clip:
    """Draw one clip: motion, colour change (TV 60 %, others 50 %), an appearing shape (YouCook2, 50 %)."""
    colors = tuple(COLORS) if source != "how2" else tuple(COLORS)[:4]
    motion = rng.choice(MOTIONS if source != "how2" else MOTIONS[:4])
    color = rng.choice(colors)
    turns = rng.random() < (0.6 if source == "tv" else 0.5)
    color2 = rng.choice([c for c in colors if c != color]) if turns else None
    x0, y0, x1, y1 = _path_of(rng, motion)
    main = Sprite(rng.choice(SHAPES), color, x0, y0, x1, y1, color2=color2, turn_at=rng.choice((3.0, 4.5)))
    extra = None
    if source == "yc2" and rng.random() < 0.5:
        # the newcomer sits in the half of the frame the main shape is not in at the end
        ex = FRAME_SIZE * (0.25 if x1 > FRAME_SIZE / 2 else 0.75)
        ey = FRAME_SIZE * (0.25 if y1 > FRAME_SIZE / 2 else 0.75)
        extra = Sprite(rng.choice(SHAPES), rng.choice(tuple(COLORS)), ex, ey, ex, ey, start=rng.choice((3.0, 4.5)))
    return Clip(vid_name, source, split, rng.choice(tuple(BACKGROUNDS)), motion, main, extra, show)


def _vid_name(source: str, i: int, show: str = "") -> str:
    if source == "tv":
        return f"{show}_s01e{i // 10 + 1:02d}_seg02_clip_{i % 10:02d}"
    return f"toy{source}_{i:04d}"


def subtitle_lines(rng: random.Random, clip: Clip) -> list[dict]:
    """Timed narrator lines that say what the clip shows at its start, never what then happens."""
    k, c = clip.main.kind, clip.main.color
    first = rng.choice((f"Here is a {c} {k}.", f"Look at the {c} {k}.", f"A {c} {k}."))
    second = rng.choice(("Watch.", "Look.", "See?"))
    speaker = "Host" if clip.source != "tv" else rng.choice(("Ann", "Bob"))
    return [{"text": f" {speaker} : {first}", "start": 0.5, "end": 2.5},
            {"text": f" {speaker} : {second}", "start": 3.0, "end": 4.0}]


def descriptions(rng: random.Random, clip: Clip, n: int = 2) -> list[str]:
    """`n` different descriptions of what happens in the clip."""
    k, c, m = clip.main.kind, clip.main.color, _MOVE_DESC[clip.motion]
    turn = f" and turns {clip.main.color2}" if clip.main.color2 else ""
    pool = [f"The {c} {k} {m}{turn}.", f"A {c} {k} {m}{turn}."]
    if clip.main.color2:
        pool.append(f"The {k} {m} and turns from {c} to {clip.main.color2}.")
    else:
        pool.append(f"A {k} {m}.")
    if clip.extra:
        e = clip.extra
        pool = [f"{p[:-1]}, then a {e.color} {e.kind} appears." for p in pool]
    return rng.sample(pool, n)


def _orders(seed: int) -> dict[str, list[str]]:
    """The fixed choice order of each question kind, drawn once from the seed; How2QA's four choices are TVQA's
    first four (its clips never stay still or turn purple), so a letter means the same in both tasks."""
    rng = random.Random(f"{seed}:video-choices")
    moves, colors = rng.sample(MOTIONS[:4], 4), rng.sample(tuple(COLORS)[:4], 4)
    return {"move5": [*moves, MOTIONS[4]], "move4": moves, "color5": [*colors, tuple(COLORS)[4]], "color4": colors}


def questions(clip: Clip, n_choices: int, orders: dict[str, list[str]]) -> list[tuple[str, list[str], int]]:
    """(question, choices, answer index) per question kind: which way the shape moves, its colour at the end."""
    k, c = clip.main.kind, clip.main.color
    moves = orders[f"move{n_choices}"]
    colors = orders[f"color{n_choices}"]
    return [
        (f"Where does the {c} {k} go?", [_MOVE_TEXT[m] for m in moves], moves.index(clip.motion)),
        (f"What color is the {k} at the end?", list(colors), colors.index(clip.final_color)),
    ]


def _ts(clip: Clip) -> tuple[float, float]:
    return 0.0, DURATION_S


def make_video_world(seed: int) -> VideoWorld:
    """Generate every clip, subtitle and annotation of the video toy world (no pixels, no features)."""
    world = VideoWorld()
    orders = _orders(seed)
    rng = random.Random(f"{seed}:video")
    for source, splits in CLIPS.items():
        i = 0
        for split, count in splits.items():
            for _ in range(count):
                show = rng.choice(TV_SHOWS) if source == "tv" else ""
                clip = _clip(rng, _vid_name(source, i, show), source, split, show)
                world.clips.append(clip)
                world.subtitles.setdefault(source, []).append({"vid_name": clip.vid_name,
                                                               "sub": subtitle_lines(rng, clip)})
                i += 1
    _qa_files(world, rng, orders)
    _caption_files(world, rng)
    return world


def _qa_files(world: VideoWorld, rng: random.Random, orders: dict[str, list[str]]) -> None:
    """TVQA (5 choices, show_name, ts) and How2QA (4 choices) files; test files carry no answer_idx."""
    files = world.files
    for name in ("tvqa/tvqa_train", "tvqa/tvqa_val", "tvqa/tvqa_test_public", "tvqa/tvqa_test_release",
                 "how2qa/how2qa_train_release", "how2qa/how2qa_val_release", "how2qa/how2qa_test_public_release"):
        files[f"{name}.jsonl"] = []
    qid = {"tv": 100000, "how2": 500000}
    for clip in (c for c in world.clips if c.source in qid):
        n = 5 if clip.source == "tv" else 4
        s, e = _ts(clip)
        for q, choices, answer in questions(clip, n, orders):
            qid[clip.source] += rng.randint(1, 9)
            rec: dict = {f"a{j}": choice for j, choice in enumerate(choices)}
            rec.update({"answer_idx": answer, "q": q, "qid": qid[clip.source]})
            if clip.source == "tv":
                rec["show_name"] = clip.show_name
            rec.update({"ts": f"{s:.2f}-{e:.2f}", "vid_name": clip.vid_name})
            test = clip.split.startswith("test")
            if test:
                del rec["answer_idx"]
            if clip.source == "tv":
                split = {"train": "train", "val": "val"}.get(clip.split, "test_release")
                files[f"tvqa/tvqa_{split}.jsonl"].append(rec)
                if clip.split == "test_public":
                    files["tvqa/tvqa_test_public.jsonl"].append(rec)
            else:
                split = {"train": "train", "val": "val"}.get(clip.split, "test_public")
                files[f"how2qa/how2qa_{split}_release.jsonl"].append(rec)


def _caption_files(world: VideoWorld, rng: random.Random) -> None:
    """TVC (with ts) over the TV clips and YC2C over the YouCook2 clips; test files carry no descs."""
    for name in ("tvc/tvc_train", "tvc/tvc_val", "tvc/tvc_test", "yc2c/yc2c_train", "yc2c/yc2c_val",
                 "yc2c/yc2c_test"):
        world.files[f"{name}_release.jsonl"] = []
    desc_id = 0
    clip_id = {"tv": 0, "yc2": 0}
    for clip in (c for c in world.clips if c.source in clip_id):
        task = "tvc" if clip.source == "tv" else "yc2c"
        split = "test" if clip.split.startswith("test") else clip.split
        rec: dict = {"vid_name": clip.vid_name, "duration": DURATION_S}
        if task == "tvc":
            rec["ts"] = list(_ts(clip))
        rec["clip_id"] = clip_id[clip.source]
        clip_id[clip.source] += 1
        if split != "test":
            rec["descs"] = []
            for text in descriptions(rng, clip, DESCS[split]):
                rec["descs"].append({"desc": text, "desc_id": desc_id, "type": "v"})
                desc_id += 1
        world.files[f"{task}/{task}_{split}_release.jsonl"].append(rec)


def video_corpus(seed: int) -> list[str]:
    """Every distinct text of the video world (subtitle lines, questions, choices, descriptions), sorted."""
    world = make_video_world(seed)
    texts: set[str] = set()
    for lines in world.subtitles.values():
        texts.update(s["text"].strip() for line in lines for s in line["sub"])
    for records in world.files.values():
        for r in records:
            texts.update(str(r[k]) for k in r if k == "q" or (k.startswith("a") and k[1:].isdigit()))
            texts.update(d["desc"] for d in r.get("descs", ()))
    return sorted(texts)


def video_summary(world: VideoWorld) -> dict[str, int]:
    """Records per annotation file and clips per source, for the toy manifest."""
    out = {name: len(recs) for name, recs in world.files.items()}
    out.update({f"videos/{s}": n for s, n in Counter(c.source for c in world.clips).items()})
    return out


# ------------------------------------------------------------------------------------------------- disk


def write_video(path: Path, frames: list[np.ndarray], fps: int = FPS) -> None:
    """Write RGB frames as an MPEG-4 Part 2 .mp4 (high quality, every frame a key frame) with PyAV."""
    require_extra("video")
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.mp4")
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=Fraction(fps))
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "2", "g": "1"}
        for rgb in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(path)


def _jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def write_video_world(world: VideoWorld, dest: Path) -> dict[str, dict[str, Path]]:
    """Write videos, subtitles and annotation files under `dest/video`; return the video files per source."""
    videos: dict[str, dict[str, Path]] = {s: {} for s in VIDEO_SOURCES}
    n_frames = int(DURATION_S * FPS)
    for clip in world.clips:
        path = dest / "video" / "videos" / clip.source / f"{clip.vid_name}.mp4"
        write_video(path, [render_frame(clip, i / FPS) for i in range(n_frames)])
        videos[clip.source][clip.vid_name] = path
    for source, lines in world.subtitles.items():
        _jsonl(dest / "video" / "ann" / f"{source}_subtitles.jsonl", lines)
    for name, records in world.files.items():
        _jsonl(dest / "video" / "ann" / name, records)
    return videos


def build_video(dest: Path, seed: int, features: bool = True, model: Path | None = None) -> dict:
    """Write the video world under `dest/video` and extract its features from the video files with the tiny
    projected CLIP (VALUE's npz layout); returns the manifest's `video` entry."""
    world = make_video_world(seed)
    videos = write_video_world(world, dest)
    entry: dict = {"summary": video_summary(world), "features": None}
    if features:
        model = Path(model) if model is not None else TINY_CLIP_PROJ
        name = "tiny-clip-proj" if model == TINY_CLIP_PROJ and not Path("tiny-clip-proj").exists() else model
        for source, paths in videos.items():
            summary = VIDEO.extraction().extract(paths, name, VIDEO.default_out(dest, source), layout="npz",
                                                 progress=False, workers=1)
            if summary.failed:
                _, path, reason = summary.failed[0]
                raise VlpetError(f"toy world: video feature extraction failed for {path} ({reason})")
        entry["features"] = {"model": model.name, "dir": "video/vis_features/<source>/clip-vit"}
    return entry
