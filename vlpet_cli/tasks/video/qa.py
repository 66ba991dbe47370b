"""The VALUE multiple-choice video QA tasks (spec/pipeline.md §1.5).

TVQA: TV-show clips with subtitles, 5 choices, accuracy per show; test = test_public and test_release, both loaded
as the reference does. How2QA: instructional videos with subtitles, 4 choices, every question of type 'how2qa'."""

from __future__ import annotations

from typing import ClassVar

from vlpet_cli.tasks.base import Inputs
from vlpet_cli.tasks.video.base import ANN_DIR, VideoQaTask


class TvqaTask(VideoQaTask):
    """TVQA: '[Subs] … [Q] … [TS] (ts) [Choices] a0: … a4: …. tvqa: ' -> 'a{idx}'; type = show_name."""

    name = "tvqa"
    folder = (ANN_DIR / "tvqa").as_posix()
    source = "tv"
    default_prompt = "tvqa: "
    splits: ClassVar[dict[str, str]] = {"train": "train", "val": "val", "test": "test_public,test_release"}
    inputs = Inputs(video=True, text="question", choices=5, moment=True)
    label = "TVQA accuracy"
    submission_file = "tvqa_test_predictions.json"


class How2qaTask(VideoQaTask):
    """How2QA: '[Subs] … [Q] … [TS] (ts) [Choices] a0: … a3: …. how2qa: ' -> 'a{idx}'."""

    name = "how2qa"
    aliases = ("how2",)
    folder = (ANN_DIR / "how2qa").as_posix()
    source = "how2"
    default_prompt = "how2qa: "
    splits: ClassVar[dict[str, str]] = {"train": "train_release", "val": "val_release",
                                        "test": "test_public_release"}
    inputs = Inputs(video=True, text="question", choices=4, moment=True)
    qa_type = "how2qa"
    label = "How2QA accuracy"
    submission_file = "how2qa_test_public_predictions.json"
