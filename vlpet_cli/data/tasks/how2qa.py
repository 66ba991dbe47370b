"""How2QA (VALUE release, spec/pipeline.md §1.5): multiple-choice QA on instructional videos with subtitles,
4 choices, every question of type 'how2qa'."""

from __future__ import annotations

from typing import ClassVar

from vlpet_cli.data.tasks.video import ANN_DIR, VideoQaTask


class How2qaTask(VideoQaTask):
    """How2QA: '[Subs] … [Q] … [TS] (ts) [Choices] a0: … a3: …. how2qa: ' -> 'a{idx}'."""

    name = "how2qa"
    aliases = ("how2",)
    folder = (ANN_DIR / "how2qa").as_posix()
    source = "how2"
    default_prompt = "how2qa: "
    splits: ClassVar[dict[str, str]] = {"train": "train_release", "val": "val_release",
                                        "test": "test_public_release"}
    n_choices = 4
    qa_type = "how2qa"
    label = "How2QA accuracy"
    submission_file = "how2qa_test_public_predictions.json"
