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
from vlpet_cli.features.extract.clip import TINY_CLIP, TINY_CLIP_PROJ
from vlpet_cli.features.kinds import IMAGE, VIDEO
from vlpet_cli.tasks import task_class, tasks_of_kind
from vlpet_cli.toy.images import SOURCES, build_toy
from vlpet_cli.toy.videos import VIDEO_SOURCES
from vlpet_cli.train import TOY_DEFAULTS, resolve_train_preset, train
from vlpet_cli.vl.model import build_model

TASKS = tasks_of_kind(IMAGE.name)
VIDEO_TASKS = tasks_of_kind(VIDEO.name)
# VALUE's test labels are hidden (the toy world keeps them hidden too), so the video quick start scores val.
SPLIT = {False: "test", True: "val"}
# The toy clips have 6 frames (9 s at one per 1.5 s): 8 visual tokens keep them all at an eighth of the cost of 64.
# tiny-bart-video: tiny-bart's recipe pretrained on the toy videos' text too (scripts/pretrain_tiny_backbones.py); the
# image tasks keep tiny-bart, whose quick-start figures README.md quotes.
VIDEO_BACKBONES = {"tiny-bart": str(Path(__file__).parent / "assets" / "backbones" / "tiny-bart-video")}
VIDEO_OVERRIDES = ["train.epochs=20", "train.batch_size=16", "eval.every=0", "data.video.frames=8"]
TABLE_COLUMNS = ("task", "metric", "before", "after")


def table_rows(summary: dict) -> list[tuple[str, str, str, str]]:
    """The quick start's table as `vlpet quickstart` prints it, and as README.md must show it (a test compares)."""
    return [(r["task"], r["metric"], f"{r['before']:.1f}", f"{r['after']:.1f}") for r in summary["rows"]]


def prepare_world(data_dir: Path, say, video: bool = False) -> Path:
    """The toy world's images (or videos) and annotations, with features extracted here by the tiny CLIP model
    (the tiny projected CLIP from the video files)."""
    if not (data_dir / "toy.json").exists() or (video and not (data_dir / "video").is_dir()):  # built without av
        shutil.rmtree(data_dir, ignore_errors=True)
        say(f"building the toy world in {data_dir}")
        build_toy(data_dir, features=False)
    if video:
        for source in VIDEO_SOURCES:
            videos = {p.stem: p for p in sorted((data_dir / "video" / "videos" / source).glob("*.mp4"))}
            summary = VIDEO.extraction().extract(videos, TINY_CLIP_PROJ, VIDEO.default_out(data_dir, source),
                                                 progress=False, workers=1)
            say(f"video features {source}: {summary.written} videos extracted ({summary.units} frames), "
                f"{summary.skipped_existing} already there")
        return data_dir
    for source in SOURCES:
        images = {p.stem: p for p in sorted((data_dir / source / "images").glob("*.png"))}
        summary = IMAGE.extraction().extract(images, TINY_CLIP, IMAGE.default_out(data_dir, source), progress=False)
        say(f"features {source}: {summary.written} extracted, {summary.skipped_existing} already there "
            f"({summary.rate:.0f} images/s)")
    return data_dir


def quickstart(runs_dir: Path = Path("runs"), preset: str = "vlpet-small", backbone: str = "tiny-bart",
               overrides: list[str] | None = None, say=print, video: bool = False) -> dict:
    """Extract, train on the four toy image tasks (or the four toy video tasks), evaluate before and after;
    returns the summary.

    It computes on one CPU thread (restored afterwards): the tiny models gain nothing from more, and the scores,
    which README.md quotes, then do not depend on the machine's core count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _quickstart(runs_dir, preset, backbone, overrides, say, video)
    finally:
        torch.set_num_threads(threads)


def _quickstart(runs_dir: Path, preset: str, backbone: str, overrides: list[str] | None, say,
                video: bool = False) -> dict:
    """The quick start's steps (see `quickstart`)."""
    started = time.time()
    data_dir = prepare_world(Path(runs_dir) / "quickstart-data", say, video)
    kind, source = (VIDEO, VIDEO_SOURCES[0]) if video else (IMAGE, "COCO")
    dim = kind.open(kind.locate(data_dir, source)).dim
    if video:
        tasks, split = VIDEO_TASKS, SPLIT[True]
        backbone = VIDEO_BACKBONES.get(backbone, backbone)
        defaults = [*TOY_DEFAULTS, *VIDEO_OVERRIDES, f"model.feat_dim={dim}"]
    else:
        tasks, split = TASKS, SPLIT[False]
        defaults = [*TOY_DEFAULTS, "train.epochs=6", "eval.every=0", f"model.feat_dim={dim}"]
    resolved = resolve_train_preset(preset, tasks, str(data_dir), backbone, [*defaults, *(overrides or [])])
    torch.manual_seed(resolved.train.seed)
    untrained, tokenizer = build_model(resolved)
    say("scoring the untrained model")
    primary = {t: task_class(t).primary_metric for t in tasks}
    before = evaluate_model(untrained, tokenizer, resolved, split, {t: [m] for t, m in primary.items()},
                            progress=False)
    run_dir = Path(runs_dir) / ("quickstart-video" if video else "quickstart")
    result = train(resolved, run_dir, overwrite=True)
    say("scoring the trained adapter")
    after = evaluate(run_dir, split=split, metrics=None, progress=False)
    rows = [{"task": t, "metric": task_class(t).label, "before": before[t]["metrics"][primary[t]],
             "after": after[t]["metrics"][primary[t]]} for t in tasks]
    return {"run": str(run_dir), "trainable": result.summary["trainable"], "total": result.summary["total"],
            "percent": result.summary["percent"], "train_seconds": result.summary["seconds"],
            "total_seconds": time.time() - started, "rows": rows, "split": split}
