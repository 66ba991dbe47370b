"""The task table: every task's declarations, aliases resolving alike for every command, and the settings a
preset leaves open (task list, batch ratios, decoding) resolved from the table."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from fractions import Fraction

import pytest

from vlpet_cli.config import GenerationSpec
from vlpet_cli.data.multitask import task_batch_sizes
from vlpet_cli.errors import VlpetError
from vlpet_cli.evaluate import score_predictions_file
from vlpet_cli.inference import score
from vlpet_cli.presets import resolve
from vlpet_cli.quickstart import TASKS as QUICKSTART_TASKS
from vlpet_cli.quickstart import VIDEO_TASKS as QUICKSTART_VIDEO_TASKS
from vlpet_cli.tasks import (
    ALIASES,
    TASKS,
    Generate,
    ScoreChoices,
    Task,
    annotation_images,
    default_tasks,
    get_task,
    primary_metrics,
    resolve_task,
    task_class,
)

IMAGE_TASKS = ["vqa", "gqa", "nlvr", "coco"]
VIDEO_TASKS = ["tvqa", "how2qa", "tvc", "yc2c"]


def test_table_lists_the_eight_tasks_with_their_aliases():
    assert list(TASKS) == IMAGE_TASKS + VIDEO_TASKS
    assert ALIASES == {"nlvr2": "nlvr", "caption": "coco", "captions": "coco", "coco_caption": "coco",
                       "how2": "how2qa", "yc2": "yc2c", "youcook2": "yc2c"}
    assert [n for n, c in TASKS.items() if c.feature_kind == "video"] == VIDEO_TASKS
    for name, cls in TASKS.items():
        assert issubclass(cls, Task) and cls.name == name
        assert not set(cls.aliases) & set(TASKS)


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_declares_metrics_decoding_ratio_and_label(name):
    cls = TASKS[name]
    assert cls.primary_metric in cls.valid_metrics
    assert set(cls.default_metrics) <= set(cls.valid_metrics) | {f"bleu{i}" for i in range(1, 5)}
    assert cls.validation_metrics is None or set(cls.validation_metrics) <= set(cls.valid_metrics)
    assert cls.resolve_metrics() == list(cls.default_metrics)
    assert isinstance(cls.decoding, (Generate, ScoreChoices))
    assert isinstance(cls.batch_ratio, Fraction) and cls.batch_ratio > 0
    assert cls.label and cls.folder and cls.splits.keys() >= {"train", "val", "test"}


def test_declared_values_are_the_references():
    assert primary_metrics() == {"vqa": "vqa", "gqa": "acc", "nlvr": "acc", "coco": "cider",
                                 "tvqa": "acc", "how2qa": "acc", "tvc": "cider", "yc2c": "cider"}
    assert {n: c.batch_ratio for n, c in TASKS.items()} == {
        "vqa": Fraction(1), "gqa": Fraction(100, 60), "nlvr": Fraction(20, 60), "coco": Fraction(50, 60),
        **{t: Fraction(1) for t in VIDEO_TASKS}}  # video tasks all use the batch size (spec §4)
    assert TASKS["tvqa"].decoding == TASKS["how2qa"].decoding == Generate(num_beams=4, max_length=20,
                                                                          greedy_on=("t5",))
    assert TASKS["tvc"].decoding == TASKS["yc2c"].decoding == Generate(num_beams=5, max_length=20)
    assert TASKS["tvc"].validation_metrics == TASKS["yc2c"].validation_metrics == ("cider",)
    assert TASKS["nlvr"].decoding == ScoreChoices(("true", "false"))
    assert TASKS["coco"].decoding == Generate(num_beams=5, max_length=20)
    assert TASKS["vqa"].decoding == TASKS["gqa"].decoding == Generate(num_beams=1, max_length=20)
    assert TASKS["coco"].validation_metrics == ("cider",)
    assert [n for n, c in TASKS.items() if c.split_option] == ["coco"]
    assert {n: c.image_fields for n, c in TASKS.items()} == {
        "vqa": ("img_id",), "gqa": ("img_id",), "nlvr": ("img0", "img1"), "coco": (),
        **{t: ("vid_name",) for t in VIDEO_TASKS}}


def test_presets_leave_the_task_settings_to_the_tasks():
    p = resolve("vlpet-small", [], "bart-base")
    assert p.data.tasks == default_tasks() == IMAGE_TASKS  # a resolved preset (and config.yaml) names its tasks
    assert p.train.task_ratios == {} and p.eval.generation == {}
    assert resolve("hyperformer", [], "bart-base").pet.hyperformer.tasks == IMAGE_TASKS
    on_bart = {n: c.decoding.spec("bart") for n, c in TASKS.items() if isinstance(c.decoding, Generate)}
    assert {n: (g.num_beams, g.max_length) for n, g in on_bart.items()} == {
        "vqa": (1, 20), "gqa": (1, 20), "coco": (5, 20), "tvqa": (4, 20), "how2qa": (4, 20), "tvc": (5, 20),
        "yc2c": (5, 20)}
    assert TASKS["tvqa"].decoding.spec("t5").num_beams == 1 and TASKS["tvc"].decoding.spec("t5").num_beams == 5
    given = GenerationSpec(max_length=30)  # a setting given replaces only itself
    assert TASKS["coco"].decoding.spec("bart", given) == GenerationSpec(num_beams=5, max_length=30)
    assert TASKS["tvqa"].decoding.spec("t5", GenerationSpec(num_beams=3)).num_beams == 3


def test_quickstart_reads_the_table():
    assert QUICKSTART_TASKS == IMAGE_TASKS and QUICKSTART_VIDEO_TASKS == VIDEO_TASKS
    assert {n: c.label for n, c in TASKS.items()} == {
        "vqa": "VQA accuracy", "gqa": "GQA accuracy", "nlvr": "NLVR2 accuracy", "coco": "COCO CIDEr",
        "tvqa": "TVQA accuracy", "how2qa": "How2QA accuracy", "tvc": "TVC CIDEr", "yc2c": "YC2C CIDEr"}
    assert TASKS["coco"].primary_metric == "cider"


@pytest.mark.parametrize("alias, name", [*ALIASES.items(), ("NLVR2", "nlvr"), (" Caption ", "coco"),
                                         *((n, n) for n in TASKS)])
def test_aliases_resolve_the_same_way_everywhere(alias, name):
    assert resolve_task(alias) == name
    assert task_class(alias) is TASKS[name]
    assert get_task(alias).name == name
    assert get_task(alias, prompts={name: "p: "}).prompt == "p: "


def test_an_alias_scores_like_its_task(tmp_path):
    nlvr = [{"identifier": "dev-1-0-0", "prediction": "true", "label": 1},
            {"identifier": "dev-1-1-0", "prediction": "true", "label": 0}]
    assert score("nlvr2", nlvr) == score("nlvr", nlvr) == {"acc": 50.0, "consistency": 0.0}
    (tmp_path / "p.csv").write_text("dev-1-0-0,True\ndev-1-1-0,True\n")
    (tmp_path / "a.json").write_text(json.dumps([{"identifier": "dev-1-0-0", "label": 1},
                                                 {"identifier": "dev-1-1-0", "label": 0}]))
    by_alias = score_predictions_file("NLVR2", tmp_path / "p.csv", tmp_path / "a.json")
    assert by_alias == score_predictions_file("nlvr", tmp_path / "p.csv", tmp_path / "a.json")


@pytest.mark.cli  # `python -m vlpet_cli` in a subprocess
def test_the_eval_command_takes_an_alias(tmp_path):
    (tmp_path / "p.csv").write_text("dev-1-0-0,True\ndev-1-1-0,True\n")
    (tmp_path / "a.json").write_text(json.dumps([{"identifier": "dev-1-0-0", "label": 1},
                                                 {"identifier": "dev-1-1-0", "label": 0}]))
    out = subprocess.run([sys.executable, "-m", "vlpet_cli", "eval", "--task", "nlvr2", "--predictions",
                          str(tmp_path / "p.csv"), "--annotations", str(tmp_path / "a.json"), "--json"],
                         capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["acc"] == 50.0


def test_unknown_task_is_one_message_for_every_command(tmp_path):
    for call in (lambda: get_task("vqa3"), lambda: resolve_task("vqa3"), lambda: score("vqa3", []),
                 lambda: score_predictions_file("vqa3", tmp_path / "p", tmp_path / "a")):
        with pytest.raises(VlpetError) as err:
            call()
        msg = str(err.value)
        assert "unknown task 'vqa3'" in msg and "Did you mean 'vqa'" in msg
        assert "valid tasks: vqa, gqa, nlvr, coco, tvqa, how2qa, tvc, yc2c." in msg and "nlvr2 (nlvr)" in msg


def test_submissions_are_the_official_formats():
    vqa = [{"question_id": 5, "prediction": "red"}]
    assert task_class("vqa")().submission(vqa) == ("json", json.dumps([{"question_id": 5, "answer": "red"}]))
    gqa = [{"question_id": 7, "prediction": "pipe"}]
    assert task_class("gqa")().submission(gqa) == ("json", json.dumps([{"questionId": "7", "prediction": "pipe"}]))
    nlvr = [{"identifier": "t-0", "prediction": "true"}, {"identifier": "t-1", "prediction": "false"}]
    suffix, content = task_class("nlvr")().submission(nlvr)
    assert suffix == "csv" and list(csv.reader(io.StringIO(content))) == [["t-0", "True"], ["t-1", "False"]]
    coco = [{"img_id": "COCO_val2014_000000000042", "cocoid": 42, "prediction": "a cat"},
            {"img_id": "x", "cocoid": None, "prediction": "a dog"}]
    assert json.loads(task_class("coco")().submission(coco)[1]) == [{"image_id": 42, "caption": "a cat"},
                                                                    {"image_id": "x", "caption": "a dog"}]


def test_feature_ids_come_from_the_tasks_declarations(tmp_path):
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps([{"img_id": "a"}, {"img0": "b", "img1": "c"}]))
    assert list(annotation_images(path)) == ["a", "b", "c"]
    assert task_class("coco").file_images([], path) is None
    assert task_class("vqa").file_images({"images": []}, path) is None


def test_batch_sizes_use_the_tasks_ratios():
    assert task_batch_sizes(60, list(TASKS)) == {"vqa": 60, "gqa": 100, "nlvr": 20, "coco": 50,
                                                 **{t: 60 for t in VIDEO_TASKS}}
    assert task_batch_sizes(500, ["gqa", "nlvr"], resolve("vlpet-small", [], "bart-base").train.task_ratios) == {
        "gqa": 833, "nlvr": 166}  # the default preset: the tasks' own ratios, as the reference's 100/60, 20/60
    assert task_batch_sizes(60, ["gqa", "coco"], {"gqa": 0.5}) == {"gqa": 30, "coco": 50}


@pytest.mark.parametrize("task, record, problem", [
    ("vqa", {"question_id": True, "img_id": "a", "sent": "q", "label": {}},
     "record 0: field 'question_id' should be an integer or a string, found bool True"),
    ("vqa", {"question_id": 3, "img_id": None, "sent": "q", "label": {}},
     "record 0 (question_id=3): field 'img_id' is missing"),
    ("gqa", {"question_id": "q", "img_id": "a", "sent": "s"}, "record 0 (question_id=q): field 'label' is missing"),
    ("nlvr", {"identifier": "d-0", "img0": "a", "img1": "b", "sent": "s", "label": 2},
     "record 0 (identifier=d-0): field 'label' should be 0 or 1, found 2"),
    ("nlvr", {"identifier": "d-0", "img0": "a", "img1": 5, "sent": "s", "label": 1},
     "record 0 (identifier=d-0): field 'img1' should be a string, found int 5"),
])
def test_annotation_records_are_validated_by_their_models(tmp_path, task, record, problem):
    from vlpet_cli.errors import DataError

    t = get_task(task)
    path = t.split_path(tmp_path, t.split_names("train")[0])
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps([record]))
    with pytest.raises(DataError) as err:
        t.read_split(tmp_path, t.split_names("train")[0], for_eval=False)
    assert str(err.value) == f"{path}: {problem}. Fix: correct the record or regenerate the file."
