"""TVQA (VALUE release, spec/pipeline.md §1.5): multiple-choice QA on TV-show clips with subtitles, 5 choices,
accuracy per show; test = test_public and test_release, both loaded as the reference does."""

from __future__ import annotations

from typing import ClassVar

from vlpet_cli.data.tasks.video import ANN_DIR, VideoQaTask


class TvqaTask(VideoQaTask):
    """TVQA: '[Subs] … [Q] … [TS] (ts) [Choices] a0: … a4: …. tvqa: ' -> 'a{idx}'; type = show_name."""

    name = "tvqa"
    folder = (ANN_DIR / "tvqa").as_posix()
    source = "tv"
    default_prompt = "tvqa: "
    splits: ClassVar[dict[str, str]] = {"train": "train", "val": "val", "test": "test_public,test_release"}
    n_choices = 5
    label = "TVQA accuracy"
    submission_file = "tvqa_test_predictions.json"
