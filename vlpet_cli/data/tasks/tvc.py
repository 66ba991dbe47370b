"""TVC (VALUE release, spec/pipeline.md §1.5): captioning of a moment of a TV-show clip, the moment given as
text; train and val rows per description, test rows per clip; CIDEr."""

from __future__ import annotations

from typing import ClassVar

from vlpet_cli.data.tasks.video import ANN_DIR, VideoCaptionTask


class TvcTask(VideoCaptionTask):
    """TVC: '[Subs] … [TS] ([s, e]) tvc: ' -> the description."""

    name = "tvc"
    folder = (ANN_DIR / "tvc").as_posix()
    source = "tv"
    default_prompt = "tvc: "
    splits: ClassVar[dict[str, str]] = {"train": "train_release", "val": "val_release", "test": "test_release"}
    uses_ts = True
    label = "TVC CIDEr"
    submission_file = "tvc_test_predictions.jsonl"
