"""The VALUE video captioning tasks (spec/pipeline.md §1.5); train and val rows per description, test rows per
clip; CIDEr.

TVC: a moment of a TV-show clip, the moment given as text. YC2C (YouCook2): cooking clips from their subtitles
and frames."""

from __future__ import annotations

from typing import ClassVar

from vlpet_cli.tasks.base import Inputs
from vlpet_cli.tasks.video.base import ANN_DIR, VideoCaptionTask


class TvcTask(VideoCaptionTask):
    """TVC: '[Subs] … [TS] ([s, e]) tvc: ' -> the description."""

    name = "tvc"
    folder = (ANN_DIR / "tvc").as_posix()
    source = "tv"
    default_prompt = "tvc: "
    splits: ClassVar[dict[str, str]] = {"train": "train_release", "val": "val_release", "test": "test_release"}
    inputs = Inputs(video=True, moment=True)
    label = "TVC CIDEr"
    submission_file = "tvc_test_predictions.jsonl"


class Yc2cTask(VideoCaptionTask):
    """YC2C: '[Subs] … yc2c: ' -> the description."""

    name = "yc2c"
    aliases = ("yc2", "youcook2")
    folder = (ANN_DIR / "yc2c").as_posix()
    source = "yc2"
    default_prompt = "yc2c: "
    splits: ClassVar[dict[str, str]] = {"train": "train_release", "val": "val_release", "test": "test_release"}
    label = "YC2C CIDEr"
    submission_file = "yc2c_test_predictions.jsonl"
