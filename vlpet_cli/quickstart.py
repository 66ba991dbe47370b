"""`vlpet quickstart [--video]`: the whole job offline on the toy world, with a before/after summary.

A workflow above the commands (like `cli`): it composes extraction, `train` and `evaluate`, and no command imports
it. The import-linter contract in pyproject.toml puts it in its own layer between `cli` and the commands.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from vlpet_cli.evaluate import evaluate, evaluate_model
from vlpet_cli.features.extract.images import TINY_CLIP, extract_features
from vlpet_cli.features.extract.videos import TINY_CLIP_PROJ, extract_video_features
from vlpet_cli.features.images import locate_features, open_features
from vlpet_cli.features.videos import locate_video_features, open_video_features
from vlpet_cli.tasks import TASKS as TASK_TABLE
from vlpet_cli.tasks import primary_metrics
from vlpet_cli.threads import configure_threads
from vlpet_cli.toy.images import SOURCES, build_toy
from vlpet_cli.toy.videos import VIDEO_SOURCES, video_feature_dir
from vlpet_cli.train import TOY_DEFAULTS, resolve_train_preset, train
from vlpet_cli.vl.model import build_model

TASKS = [t for t, cls in TASK_TABLE.items() if cls.feature_kind == "image"]
VIDEO_TASKS = [t for t, cls in TASK_TABLE.items() if cls.feature_kind == "video"]
# VALUE's test labels are hidden (the toy world keeps them hidden too), so the video quick start scores val.
SPLIT = {False: "test", True: "val"}
# The toy clips have 6 frames (9 s at one per 1.5 s): 8 visual tokens keep them all at an eighth of the cost of 64.
# tiny-bart-video: tiny-bart's recipe pretrained on the toy videos' text too (scripts/pretrain_tiny_backbones.py); the
# image tasks keep tiny-bart, whose quick-start figures README.md quotes.
VIDEO_BACKBONES = {"tiny-bart": str(Path(__file__).parent / "assets" / "backbones" / "tiny-bart-video")}
VIDEO_OVERRIDES = ["train.epochs=20", "train.batch_size=16", "eval.every=0", "data.video.frames=8"]
PRIMARY_METRIC = primary_metrics()
PRIMARY_ONLY = {t: [m] for t, m in PRIMARY_METRIC.items()}
LABELS = {t: cls.label for t, cls in TASK_TABLE.items()}
TABLE_COLUMNS = ("task", "metric", "before", "after")
# The toy world's models: tiny-clip 0.12M and tiny-clip-proj 0.15M parameters, tiny-bart and tiny-t5 about 1M with a
# PET method; the thread count for extraction is chosen for this size (train and eval choose for their own model).
TOY_PARAMETERS = 1_000_000


def table_rows(summary: dict) -> list[tuple[str, str, str, str]]:
    """The quick start's table as `vlpet quickstart` prints it, and as README.md must show it (a test compares)."""
    return [(r["task"], r["metric"], f"{r['before']:.1f}", f"{r['after']:.1f}") for r in summary["rows"]]


def prepare_world(data_dir: Path, say, video: bool = False) -> Path:
    """The toy world's images (or videos) and annotations, with features extracted here by the tiny CLIP model
    (the tiny projected CLIP from the video files)."""
    if not (data_dir / "toy.json").exists():
        shutil.rmtree(data_dir, ignore_errors=True)
        say(f"building the toy world in {data_dir}")
        build_toy(data_dir, features=False)
    if video:
        for source in VIDEO_SOURCES:
            videos = {p.stem: p for p in sorted((data_dir / "video" / "videos" / source).glob("*.mp4"))}
            summary = extract_video_features(videos, TINY_CLIP_PROJ, video_feature_dir(data_dir, source),
                                             progress=False, workers=1)
            say(f"video features {source}: {summary.written} videos extracted ({summary.frames} frames), "
                f"{summary.skipped_existing} already there")
        return data_dir
    for source in SOURCES:
        images = {p.stem: p for p in sorted((data_dir / source / "images").glob("*.png"))}
        out = data_dir / source / "clip_features" / "data_clip_RN101_att.h5"
        summary = extract_features(images, TINY_CLIP, out, progress=False)
        say(f"features {source}: {summary.written} extracted, {summary.skipped_existing} already there "
            f"({summary.images_per_s:.0f} images/s)")
    return data_dir


def quickstart(runs_dir: Path = Path("runs"), preset: str = "vlpet-small", backbone: str = "tiny-bart",
               overrides: list[str] | None = None, say=print, video: bool = False) -> dict:
    """Extract, train on the four toy image tasks (or the four toy video tasks), evaluate before and after;
    returns the summary.

    Its CPU threads are chosen as every command chooses them (vlpet_cli/threads.py), restored afterwards: one for
    the tiny models (they gain nothing from more, and the scores, which README.md quotes, then do not depend on the
    machine's core count), unless VLPET_THREADS or train.threads says otherwise."""
    threads = torch.get_num_threads()
    try:
        return _quickstart(runs_dir, preset, backbone, overrides, say, video)
    finally:
        torch.set_num_threads(threads)


def _quickstart(runs_dir: Path, preset: str, backbone: str, overrides: list[str] | None, say,
                video: bool = False) -> dict:
    """The quick start's steps (see `quickstart`)."""
    started = time.time()
    say(f"computing on {configure_threads(TOY_PARAMETERS)}")
    data_dir = prepare_world(Path(runs_dir) / "quickstart-data", say, video)
    if video:
        tasks, split = VIDEO_TASKS, SPLIT[True]
        backbone = VIDEO_BACKBONES.get(backbone, backbone)
        dim = open_video_features(locate_video_features(data_dir, VIDEO_SOURCES[0])).dim
        defaults = [*TOY_DEFAULTS, *VIDEO_OVERRIDES, f"model.feat_dim={dim}"]
    else:
        tasks, split = TASKS, SPLIT[False]
        dim = open_features(locate_features(data_dir, "COCO")).dim
        defaults = [*TOY_DEFAULTS, "train.epochs=6", "eval.every=0", f"model.feat_dim={dim}"]
    resolved = resolve_train_preset(preset, tasks, str(data_dir), backbone, [*defaults, *(overrides or [])])
    torch.manual_seed(resolved.train.seed)
    untrained, tokenizer = build_model(resolved)
    say("scoring the untrained model")
    before = evaluate_model(untrained, tokenizer, resolved, split, PRIMARY_ONLY, progress=False)
    run_dir = Path(runs_dir) / ("quickstart-video" if video else "quickstart")
    result = train(resolved, run_dir, overwrite=True)
    say("scoring the trained adapter")
    after = evaluate(run_dir, split=split, metrics=None, progress=False)
    rows = [{"task": t, "metric": LABELS[t], "before": before[t]["metrics"][PRIMARY_METRIC[t]],
             "after": after[t]["metrics"][PRIMARY_METRIC[t]]} for t in tasks]
    return {"run": str(run_dir), "trainable": result.summary["trainable"], "total": result.summary["total"],
            "percent": result.summary["percent"], "train_seconds": result.summary["seconds"],
            "total_seconds": time.time() - started, "rows": rows, "split": split}
