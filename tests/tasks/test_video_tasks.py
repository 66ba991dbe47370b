"""The four VALUE video-text tasks (spec/pipeline.md §1.5, §3.1, §3.3): files, exact prompts, truncation at 600
tokens both ways with the shipped tiny-bart tokenizer, targets, row expansion, splits, de-duplication, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vlpet_cli import presets
from vlpet_cli.backbones import load_tokenizer, resolve
from vlpet_cli.config import VideoData
from vlpet_cli.data.loading import check_annotations
from vlpet_cli.errors import DataError
from vlpet_cli.features.kinds import VIDEO
from vlpet_cli.tasks import TaskDataset, annotation_images, get_task, task_class
from vlpet_cli.tasks.video.base import load_subtitles

SUBS = {
    "tv": {"s01e01_clip_1": [" Chase : That's all. ", "House : No. "], "s01e01_clip_2": ["Wilson : Hi."],
           "s02e03_clip_7": []},
    "how2": {"how2_v1": ["first, take the pan."], "how2_v2": ["stir it."]},
    "yc2": {"yc2_v1": [" add the salt ", "mix well"], "yc2_v2": ["cut"]},
}


def write_jsonl(path: Path, rows: list) -> Path:
    """A JSON-lines file of the given objects."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tvqa_line(qid: int, vid: str, answer: int | None = 1, show: str = "House M.D.") -> dict:
    line = {"qid": qid, "q": f" What is said {qid}? ", "vid_name": vid, "ts": "20.16-25.12", "show_name": show,
            "a0": "Yes.", "a1": " no ", "a2": "maybe..", "a3": "a cat", "a4": "never."}
    if answer is not None:
        line["answer_idx"] = answer
    return line


def how2qa_line(qid: str, vid: str, answer: int | None = 2) -> dict:
    line = {"qid": qid, "q": "What first?", "vid_name": vid, "ts": "1.0-3.5",
            "a0": "pan", "a1": "pot", "a2": "take the pan.", "a3": "salt"}
    if answer is not None:
        line["answer_idx"] = answer
    return line


def clip_line(vid: str, clip: int, descs: list[str] | None, ts: list | None = None) -> dict:
    line: dict = {"vid_name": vid, "duration": 60.5, "clip_id": clip}
    if ts is not None:
        line["ts"] = ts
    if descs is not None:
        line["descs"] = [{"desc": d, "desc_id": clip * 10 + k, "type": "v"} for k, d in enumerate(descs)]
    return line


def value_world(root: Path) -> Path:
    """A small VALUE release: subtitles and every task's split files (features are not needed here)."""
    ann = root / "video" / "ann"
    for source, videos in SUBS.items():
        write_jsonl(ann / f"{source}_subtitles.jsonl",
                    [{"vid_name": v, "sub": [{"text": t, "start": 0.5 * i, "end": 0.5 * i + 1}
                                             for i, t in enumerate(lines)]} for v, lines in videos.items()])
    write_jsonl(ann / "tvqa" / "tvqa_train.jsonl", [tvqa_line(1, "s01e01_clip_1"), tvqa_line(2, "s01e01_clip_2", 3)])
    write_jsonl(ann / "tvqa" / "tvqa_val.jsonl", [tvqa_line(3, "s01e01_clip_1", 0),
                                                 tvqa_line(4, "s02e03_clip_7", 4, show="Friends")])
    write_jsonl(ann / "tvqa" / "tvqa_test_public.jsonl", [tvqa_line(5, "s01e01_clip_1", None)])
    write_jsonl(ann / "tvqa" / "tvqa_test_release.jsonl", [tvqa_line(5, "s01e01_clip_1", None),
                                                          tvqa_line(6, "s01e01_clip_2", None)])
    for split, answer in (("train", 2), ("val", 1), ("test_public", None)):
        write_jsonl(ann / "how2qa" / f"how2qa_{split}_release.jsonl",
                    [how2qa_line(f"{split}-1", "how2_v1", answer), how2qa_line(f"{split}-2", "how2_v2", answer)])
    write_jsonl(ann / "tvc" / "tvc_train_release.jsonl", [
        clip_line("s01e01_clip_1", 1, ["House says no.", "Chase talks."], [35.73, 40.9]),
        clip_line("s01e01_clip_2", 2, ["Wilson greets."], [1, 2.5])])
    write_jsonl(ann / "tvc" / "tvc_val_release.jsonl", [
        clip_line("s01e01_clip_1", 3, ["A man talks.", "Two men talk.", "House speaks."], [0.0, 4.0])])
    write_jsonl(ann / "tvc" / "tvc_test_release.jsonl", [clip_line("s01e01_clip_2", 4, None, [3.2, 9.0])])
    write_jsonl(ann / "yc2c" / "yc2c_train_release.jsonl", [clip_line("yc2_v1", 5, ["add salt", "mix it"])])
    write_jsonl(ann / "yc2c" / "yc2c_val_release.jsonl", [clip_line("yc2_v1", 6, ["salt is added", "mixing"])])
    write_jsonl(ann / "yc2c" / "yc2c_test_release.jsonl", [clip_line("yc2_v2", 7, None)])
    return root


@pytest.fixture
def world(tmp_path) -> Path:
    return value_world(tmp_path)


@pytest.fixture(scope="module")
def bart():
    return load_tokenizer(resolve("tiny-bart"))


# ---- declarations -------------------------------------------------------------------------------------------
def test_video_task_facts():
    tvqa, how2qa, tvc, yc2c = (get_task(t) for t in ("tvqa", "how2", "tvc", "youcook2"))
    assert [t.name for t in (tvqa, how2qa, tvc, yc2c)] == ["tvqa", "how2qa", "tvc", "yc2c"]
    for task in (tvqa, how2qa, tvc, yc2c):
        assert task.feature_kind == "video" and task.image_fields == ("vid_name",)
        assert (task.target_max_length, task.loss_reduction, task.video.max_length) == (20, "example", 600)
    assert [t.feature_source("x") for t in (tvqa, how2qa, tvc, yc2c)] == ["tv", "how2", "tv", "yc2"]
    assert tvqa.split_names("test") == ["test_public", "test_release"]
    assert how2qa.split_names("train") == ["train_release"] and how2qa.split_names("test") == ["test_public_release"]
    assert tvc.split_names("val") == ["val_release"] and yc2c.split_names("test") == ["test_release"]
    assert tvqa.split_path(Path("R"), "val") == Path("R/video/ann/tvqa/tvqa_val.jsonl")
    assert how2qa.split_path(Path("R"), "train_release") == Path("R/video/ann/how2qa/how2qa_train_release.jsonl")
    assert yc2c.split_path(Path("R"), "test_release") == Path("R/video/ann/yc2c/yc2c_test_release.jsonl")


def test_prompts_are_the_references_exact_strings(world):
    tvqa = get_task("tvqa").load(world, "train")[0]
    assert get_task("tvqa").source_text(tvqa) == (
        "[Subs] Chase : That's all. House : No. [Q] What is said 1? [TS] (20.16-25.12) "
        "[Choices] a0: Yes. a1: no. a2: maybe. a3: a cat. a4: never. tvqa: ")
    how2 = get_task("how2qa").load(world, "val")[0]
    assert get_task("how2qa").source_text(how2) == (
        "[Subs] first, take the pan. [Q] What first? [TS] (1.0-3.5) "
        "[Choices] a0: pan. a1: pot. a2: take the pan. a3: salt. how2qa: ")
    tvc = get_task("tvc").load(world, "train")
    assert get_task("tvc").source_text(tvc[0]) == "[Subs] Chase : That's all. House : No. [TS] ([35.73, 40.9]) tvc: "
    assert get_task("tvc").source_text(tvc[2]) == "[Subs] Wilson : Hi. [TS] ([1, 2.5]) tvc: "
    yc2c = get_task("yc2c").load(world, "train")[0]
    assert get_task("yc2c").source_text(yc2c) == "[Subs] add the salt mix well yc2c: "
    empty = get_task("tvqa").load(world, "val")[1]  # a video whose subtitles list is empty
    assert get_task("tvqa").source_text(empty).startswith("[Subs]  [Q] What is said 4?")
    assert get_task("yc2c", use_prompts=False).source_text(yc2c) == "[Subs] add the salt mix well "
    assert get_task("tvc", prompts={"tvc": "caption: "}).source_text(tvc[0]).endswith("([35.73, 40.9]) caption: ")


def test_subtitles_are_joined_stripped_per_video(world):
    subs = load_subtitles(world / "video" / "ann" / "tv_subtitles.jsonl")
    assert subs == {"s01e01_clip_1": "Chase : That's all. House : No.", "s01e01_clip_2": "Wilson : Hi.",
                    "s02e03_clip_7": ""}


# ---- truncation ---------------------------------------------------------------------------------------------
def long_tvqa(world: Path, n_words: int = 400) -> Path:
    """tvqa train with a video whose subtitles are far longer than 600 tokens."""
    lines = [f"Speaker{i % 3} : word{i} again." for i in range(n_words)]
    write_jsonl(world / "video" / "ann" / "tv_subtitles.jsonl",
                [{"vid_name": "long", "sub": [{"text": t} for t in lines]}])
    write_jsonl(world / "video" / "ann" / "tvqa" / "tvqa_train.jsonl", [tvqa_line(9, "long", 2)])
    return world


def test_tail_truncation_is_the_references(world, bart):
    task = get_task("tvqa")
    record = task.load(long_tvqa(world), "train")[0]
    text = task.source_text(record)
    full = bart(text)["input_ids"]
    assert len(full) > 600
    ids = task.source_ids([record], bart)[0]
    assert ids == bart(text, max_length=600, truncation=True)["input_ids"]
    assert len(ids) == 600 and ids[-1] == bart.eos_token_id and ids[0] == bart.bos_token_id
    kept = bart.decode(ids, skip_special_tokens=True)
    assert "[Q]" not in kept and "tvqa:" not in kept  # the reference loses question, choices and prompt
    short = get_task("tvqa", video=VideoData(max_length=40))
    assert short.source_ids([record], bart)[0] == full[:39] + [bart.eos_token_id]


def test_subtitle_truncation_keeps_question_choices_and_prompt(world, bart):
    task = get_task("tvqa", video=VideoData(truncate="subtitles"))
    record = task.load(long_tvqa(world), "train")[0]
    ids = task.source_ids([record], bart)[0]
    assert len(ids) <= 600 and ids[0] == bart.bos_token_id and ids[-1] == bart.eos_token_id
    text = bart.decode(ids, skip_special_tokens=True)
    assert text.startswith("[Subs] Speaker0 : word0 again.")
    assert text.endswith("[Q] What is said 9? [TS] (20.16-25.12) [Choices] a0: Yes. a1: no. a2: maybe. "
                         "a3: a cat. a4: never. tvqa: ")
    # as many subtitle words as fit: one more word would pass 600 tokens
    words = record.extra["subs"].split(" ")
    kept = text[len("[Subs] "):text.index(" [Q] ")].split(" ")
    assert kept == words[:len(kept)]
    longer = task.compose(record, " ".join(words[:len(kept) + 1]))
    assert len(bart(longer)["input_ids"]) > 600
    # a short text is the same either way
    short = get_task("tvqa", video=VideoData(truncate="subtitles")).load(value_world(world), "train")[0]
    assert task.source_ids([short], bart)[0] == get_task("tvqa").source_ids([short], bart)[0] == bart(
        task.source_text(short))["input_ids"]


def test_subtitle_truncation_when_even_the_question_is_too_long(world, bart):
    task = get_task("yc2c", video=VideoData(truncate="subtitles", max_length=8))
    record = task.load(world, "train")[0]
    ids = task.source_ids([record], bart)[0]
    assert ids == bart(task.compose(record, ""), max_length=8, truncation=True)["input_ids"]


def test_dataset_items_use_the_tasks_truncation(world, bart):
    task = get_task("tvqa", video=VideoData(truncate="subtitles"))
    records = task.load(long_tvqa(world), "train")
    ds = TaskDataset(task, records, {"tv": VIDEO.memory({"long": np.ones((10, 512), np.float16)})}, bart)
    item = ds[0]
    assert item["input_ids"] == task.source_ids([records[0]], bart)[0]
    assert item["target"] == "a2" and item["target_ids"] == bart("a2", max_length=20, truncation=True)["input_ids"]
    assert item["weight"] == 1.0 and item["loss_reduction"] == "example"
    assert item["meta"] == {"question_id": 9, "vid_name": "long", "type": "House M.D.", "answer": "a2",
                            "sent": item["meta"]["sent"]}
    assert item["meta"]["sent"].startswith("[Q] ")


# ---- targets, rows and splits -------------------------------------------------------------------------------
def test_qa_targets_and_records(world):
    task = get_task("tvqa")
    train = task.load(world, "train")
    assert [(r.id, r.label, r.image_ids, r.source) for r in train] == [
        (1, "a1", ("s01e01_clip_1",), "tv"), (2, "a3", ("s01e01_clip_2",), "tv")]
    assert task.target(train[1], None, True) == ("a3", 1.0)
    how2 = get_task("how2qa").load(world, "train")
    assert [task_class("how2qa")().eval_info(r)["type"] for r in how2] == ["how2qa", "how2qa"]
    assert [r.source for r in how2] == ["how2", "how2"]


def test_caption_rows_expand_per_description_in_train_and_val(world):
    tvc = get_task("tvc")
    train = tvc.load(world, "train")
    assert [(r.id, r.label) for r in train] == [(10, "House says no."), (11, "Chase talks."), (20, "Wilson greets.")]
    assert tvc.target(train[0], None, True) == ("House says no.", 1.0)
    val = tvc.load(world, "val")
    assert [r.id for r in val] == [30, 31, 32]
    assert tvc.eval_info(val[1]) == {"question_id": 31, "clip_id": 3, "vid_name": "s01e01_clip_1",
                                     "reference": "Two men talk.", "ts": [0.0, 4.0],
                                     "references": ["A man talks.", "Two men talk.", "House speaks."]}
    test = tvc.load(world, "test")
    assert [(r.id, r.label) for r in test] == [(4, None)] and tvc.target(test[0], None, False) is None
    yc2 = get_task("yc2c")
    assert [r.id for r in yc2.load(world, "val")] == [60, 61]
    assert "ts" not in yc2.eval_info(yc2.load(world, "test")[0])


def test_tvqa_test_loads_both_files_and_dedup_is_opt_in(world):
    both = get_task("tvqa").load(world, "test")
    assert [r.id for r in both] == [5, 5, 6]  # the reference's: test_public again inside test_release
    assert all(r.label is None for r in both)
    dedup = get_task("tvqa", video=VideoData(dedup_test=True)).load(world, "test")
    assert [r.id for r in dedup] == [5, 6]
    assert [r.id for r in get_task("tvqa", video=VideoData(dedup_test=True)).load(world, "train")] == [1, 2]


def test_extract_features_lists_the_videos_of_a_value_file(world):
    ann = world / "video" / "ann"
    assert list(annotation_images(ann / "tvqa" / "tvqa_val.jsonl")) == ["s01e01_clip_1", "s02e03_clip_7"]
    assert list(annotation_images(ann / "yc2c" / "yc2c_train_release.jsonl")) == ["yc2_v1"]
    assert list(annotation_images(ann / "how2_subtitles.jsonl")) == ["how2_v1", "how2_v2"]


# ---- errors -------------------------------------------------------------------------------------------------
def test_missing_subtitle_entry_names_the_video_and_the_subtitles_file(world):
    path = write_jsonl(world / "video" / "ann" / "tvqa" / "tvqa_train.jsonl", [tvqa_line(1, "s01e01_clip_1"),
                                                                              tvqa_line(7, "nowhere")])
    with pytest.raises(DataError) as err:
        get_task("tvqa").load(world, "train")
    subs = world / "video" / "ann" / "tv_subtitles.jsonl"
    assert str(err.value) == (f"{path}: line 2 (qid=7): video 'nowhere' has no entry in {subs}. Fix: add its "
                              f"line to the subtitles file (with an empty 'sub' list if it has no subtitles) or "
                              f"use the subtitles file of the same VALUE release.")


def test_malformed_lines_name_file_and_line(world):
    path = world / "video" / "ann" / "tvc" / "tvc_train_release.jsonl"
    path.write_text(json.dumps(clip_line("s01e01_clip_1", 1, ["a"], [1, 2])) + "\n\n{not json\n")
    with pytest.raises(DataError, match=rf"^{path}: line 3: not valid JSON .*Fix: repair the line"):
        get_task("tvc").load(world, "train")
    subs = world / "video" / "ann" / "yc2_subtitles.jsonl"
    subs.write_text('{"vid_name": "yc2_v1", "sub": [{"text": 5}]}\n')
    with pytest.raises(DataError) as err:
        get_task("yc2c").load(world, "train")
    assert str(err.value) == (f"{subs}: line 1 (vid_name=yc2_v1): field 'sub[0].text' should be a string, "
                              f"found int 5. Fix: correct the record or regenerate the file.")


@pytest.mark.parametrize("task, line, problem", [
    ("tvqa", {**tvqa_line(1, "s01e01_clip_1"), "answer_idx": 5}, "line 1 (qid=1): field 'answer_idx' is 5; "
                                                                 "expected 0..4"),
    ("tvqa", {k: v for k, v in tvqa_line(1, "s01e01_clip_1").items() if k != "a3"},
     "line 1 (qid=1): field 'a3' is missing"),
    ("tvqa", tvqa_line(1, "s01e01_clip_1", None), "line 1 (qid=1): field 'answer_idx' is missing (a training "
                                                  "line needs its answer)"),
    ("tvqa", {k: v for k, v in tvqa_line(1, "s01e01_clip_1").items() if k != "show_name"},
     "line 1 (qid=1): field 'show_name' is missing"),
    ("how2qa", {**how2qa_line("q", "how2_v1"), "q": 3}, "line 1 (qid=q): field 'q' should be a string, found int 3"),
    ("tvc", clip_line("s01e01_clip_1", 1, ["x"]), "line 1 (clip_id=1): field 'ts' is missing"),
    ("tvc", clip_line("s01e01_clip_1", 1, None, [1, 2]), "line 1 (clip_id=1): field 'descs' is missing (a "
                                                         "training line needs its descriptions)"),
    ("yc2c", {"vid_name": "yc2_v1", "clip_id": 2, "descs": [{"desc_id": 1}]},
     "line 1 (clip_id=2): field 'descs[0].desc' is missing"),
])
def test_bad_lines_are_one_error_each(world, task, line, problem):
    t = get_task(task)
    path = write_jsonl(t.split_path(world, t.split_names("train")[0]), [line])
    with pytest.raises(DataError) as err:
        t.load(world, "train")
    assert str(err.value).startswith(f"{path}: {problem}")


def test_missing_files_say_what_to_put_where(tmp_path):
    with pytest.raises(DataError, match=r"tvqa annotation file not found: .*tvqa_train.jsonl. Fix: check "
                                        r"--data-root: it must contain video/ann/tvqa/"):
        get_task("tvqa").load(tmp_path, "train")
    write_jsonl(tmp_path / "video" / "ann" / "yc2c" / "yc2c_train_release.jsonl", [clip_line("v", 1, ["d"])])
    with pytest.raises(DataError, match=r"subtitles file not found: .*yc2_subtitles.jsonl"):
        get_task("yc2c").load(tmp_path, "train")


def test_a_missing_video_split_is_refused_with_its_fix_before_the_model_loads(tmp_path):
    """check_annotations (train, eval) prints the video task's fix as text, not as a bound method."""
    preset = presets.resolve("vlpet-small", ["data.tasks=[tvqa]"], "tiny-bart")
    with pytest.raises(DataError, match=r"^tvqa: annotation file not found: .*tvqa_train.jsonl. Fix: check "
                                        r"--data-root: it must contain video/ann/tvqa/ with VALUE's tvqa_train.jsonl"):
        check_annotations(tmp_path, preset)
