"""YC2C (YouCook2 captioning, VALUE release, spec/pipeline.md §1.5): captioning of cooking clips from their
subtitles and frames; train and val rows per description, test rows per clip; CIDEr."""

from __future__ import annotations

from typing import ClassVar

from vlpet_cli.data.tasks.video import ANN_DIR, VideoCaptionTask


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
