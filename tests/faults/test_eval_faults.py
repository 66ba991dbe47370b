"""Faults of `vlpet eval` and `vlpet report`, through the CLI (issue 13, items 6-9).

Bad arguments stop with exit code 2 and one line that names them, before the model is built and with nothing
written; files that are not UTF-8 are named; empty questions and captions are warned about once per file;
incomparable scores (a --limit evaluation, a task the run never trained, validation scores) are marked and
kept out of averages.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vlpet_cli.cli import app
from vlpet_cli.toy.root import resolve_data_root
from vlpet_cli.train import resolve_train_preset, train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run trained on VQA only (8 records, one epoch): enough to evaluate."""
    root = tmp_path_factory.mktemp("runs")
    preset = resolve_train_preset("vlpet-small", ["vqa"], "toy", "tiny-bart",
                                  ["data.limit=8", "train.epochs=1", "eval.every=0"])
    train(preset, root / "vqa-only")
    return root / "vqa-only"


def vlpet(*args):
    """Run the CLI in-process, as a user would call it."""
    return CliRunner().invoke(app, [str(a) for a in args])


def listing(path: Path) -> list[tuple[str, int]]:
    """Every file under path with its size: what a failed command must leave as it was."""
    return sorted((str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*") if p.is_file())


def one_line_error(result) -> str:
    """The single error line of a run that must have failed with exit code 2 (and no traceback)."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


# ---- item 7: arguments are checked before any work ---------------------------------------------------------
BAD_ARGUMENTS = {
    "negative limit": (["--limit", "-3"], ["--limit -3", "at least 1"]),
    "zero limit": (["--limit", "0"], ["--limit 0", "at least 1"]),
    "zero batch size": (["--batch-size", "0"], ["--batch-size 0", "at least 1"]),
    "negative batch size override": (["eval.batch_size=-2"], ["eval.batch_size -2", "at least 1"]),
    "unknown split": (["--split", "dev"], ["unknown split 'dev'", "vqa", "test, val, train"]),
    "metric of another task": (["--task", "coco", "--metric", "accuracy"], ["'accuracy'", "'coco'", "cider"]),
    "metric for one of two tasks": (["--task", "vqa,coco", "--metric", "cider"], ["'cider'", "'vqa'"]),
    "unknown task": (["--task", "vqa,nope"], ["unknown task 'nope'"]),
    "missing data root": (["--data-root", "/nonexistent/datasets"], ["--data-root /nonexistent/datasets",
                                                                      "not a directory"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("args, named", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_eval_arguments_stop_before_any_work(run_dir, tmp_path, monkeypatch, args, named):
    def no_model(*_, **__):
        raise AssertionError("the model was built before the arguments were checked")

    monkeypatch.setattr("vlpet_cli.artifacts.load_any", no_model)
    before = listing(run_dir)
    line = one_line_error(vlpet("eval", run_dir, "--out", tmp_path / "out", *args))
    for word in named:
        assert word in line, line
    assert not (tmp_path / "out").exists() and listing(run_dir) == before


# ---- item 8: files that are not UTF-8 ----------------------------------------------------------------------
# Valid predictions and annotations per task, with a non-ASCII character; the side under test is written in
# Latin-1, which is not UTF-8.
FILES = {
    "vqa": ([{"question_id": 1, "answer": "café"}],
            {"annotations": [{"question_id": 1, "answers": [{"answer": "café"}] * 10, "answer_type": "other",
                              "question_type": "what"}]}),
    "gqa": ([{"questionId": "1", "prediction": "café"}], [{"question_id": "1", "label": {"café": 1.0}}]),
    "nlvr": ([{"identifier": "café-0", "prediction": "true"}], [{"identifier": "café-0", "label": 1}]),
    "coco": ([{"image_id": 1, "caption": "a café"}], {"annotations": [{"image_id": 1, "caption": "a café"}]}),
}
NOT_UTF8 = [(task, side, ".json") for task in FILES for side in ("predictions", "annotations")]
NOT_UTF8.append(("nlvr", "predictions", ".csv"))


@pytest.mark.parametrize("task, side, suffix", NOT_UTF8, ids=[f"{t}-{s}{x}" for t, s, x in NOT_UTF8])
def test_a_file_that_is_not_utf8_is_named(tmp_path, task, side, suffix):
    predictions, annotations = FILES[task]
    paths = {"predictions": tmp_path / f"pred{suffix if side == 'predictions' else '.json'}",
             "annotations": tmp_path / "ann.json"}
    texts = {"predictions": "café-0,True\n" if suffix == ".csv" else json.dumps(predictions, ensure_ascii=False),
             "annotations": json.dumps(annotations, ensure_ascii=False)}
    for which, path in paths.items():
        path.write_bytes(texts[which].encode("latin-1" if which == side else "utf-8"))
    line = one_line_error(vlpet("eval", "--task", task, "--predictions", paths["predictions"],
                                "--annotations", paths["annotations"]))
    assert str(paths[side]) in line and "not UTF-8" in line and "0xe9" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values())


# ---- item 9: empty questions and captions are warned about, once per file ------------------------------------
def blank(records: list, count: int, key: str) -> list:
    """Blank the question or sentence ('sent') of the first `count` records; their ids."""
    for record in records[:count]:
        record["sent"] = " "
    return [record[key] for record in records[:count]]


EMPTY_TEXT = {  # task: (file under the data root, what the warning calls the text)
    "vqa": ("vqa/karpathy_test.json", "question"),
    "gqa": ("GQA/testdev.json", "question"),
    "nlvr": ("nlvr/test.json", "sentence"),
    "coco": ("COCO/dataset_coco.json", "caption in split karpathy_test"),
}


@pytest.mark.slow
@pytest.mark.parametrize("task", EMPTY_TEXT)
def test_empty_questions_and_captions_are_warned_once_per_file(run_dir, tmp_path, task):
    data = tmp_path / "data"
    shutil.copytree(resolve_data_root("toy"), data, ignore=shutil.ignore_patterns("images"))
    name, what = EMPTY_TEXT[task]
    path = data / name
    content = json.loads(path.read_text())
    if task == "coco":
        tests = [im for im in content["images"] if im["split"] == "test"][:3]
        for image in tests:
            image["sentences"][0]["raw"] = "  "
        ids = [repr(im["filename"].rsplit(".", 1)[0]) for im in tests]
        total = f"3 of {sum(im['split'] == 'test' for im in content['images'])} images"
    else:
        key = "identifier" if task == "nlvr" else "question_id"
        ids = [repr(i) for i in blank(content, 3, key)]
        total = f"3 of {len(content)} records"
    path.write_text(json.dumps(content))
    result = vlpet("eval", run_dir, "--task", task, "--data-root", data, "--limit", "2", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    warned = [line for line in result.stderr.splitlines() if f"empty {what}" in line]
    assert len(warned) == 1, result.stderr
    assert warned[0].startswith(f"warning: {path}: {total} have an empty {what}") and all(i in warned[0] for i in ids)


# ---- item 6: incomparable scores are recorded, marked and kept out of averages --------------------------------
@pytest.mark.slow
def test_eval_records_the_limit_and_warns_about_an_untrained_task(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    result = vlpet("eval", run, "--task", "gqa,vqa", "--limit", "4")
    assert result.exit_code == 0, result.output
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and "trained on vqa, not on gqa" in warned[0], result.stderr
    gqa = json.loads((run / "eval" / "gqa-test.json").read_text())
    vqa = json.loads((run / "eval" / "vqa-test.json").read_text())
    assert (gqa["limit"], gqa["trained"], gqa["n"]) == (4, False, 4)
    assert (vqa["limit"], vqa["trained"], vqa["trained_tasks"]) == (4, True, ["vqa"])
    whole = vlpet("eval", run, "--task", "vqa")
    assert whole.exit_code == 0 and "warning" not in whole.stderr, whole.output
    assert json.loads((run / "eval" / "vqa-test.json").read_text())["limit"] is None


def fake_run(root: Path, tasks: list[str], evals: dict[str, dict], val: dict[str, float] | None = None) -> Path:
    """A run directory trained on `tasks` with eval/<task>-test.json records and an optional validation event."""
    run = root / "myrun"
    (run / "eval").mkdir(parents=True)
    (run / "config.yaml").write_text(json.dumps({"name": "vlpet-small", "method": "VL-PET-small",
                                                 "model": {"backbone": "tiny-bart"}, "data": {"tasks": tasks}}))
    events = [{"event": "start", "trainable": 10, "total": 1000, "percent": 1.0}]
    metric = {"vqa": "vqa", "gqa": "acc", "nlvr": "acc", "coco": "cider"}
    if val:
        events.append({"event": "val", "epoch": 0, "metrics": {t: {metric[t]: v} for t, v in val.items()}})
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    for task, fields in evals.items():
        record = {"task": task, "split": "test", "metrics": {metric[task]: fields.pop("score")}, "n": 90, **fields}
        (run / "eval" / f"{task}-test.json").write_text(json.dumps(record))
    return run


INCOMPARABLE = {  # what the run holds besides a whole-split VQA score of 50 -> its mark and caption words
    "limited": ({"gqa": {"score": 90.0, "limit": 10, "trained": True}}, None, "90.00~", "--limit"),
    "untrained": ({"gqa": {"score": 90.0, "limit": None, "trained": False}}, None, "90.00!", "did not train"),
    "untrained, old eval file": ({"coco": {"score": 90.0}}, None, "90.00!", "did not train"),
}


@pytest.mark.parametrize("evals, val, cell, words", INCOMPARABLE.values(), ids=INCOMPARABLE.keys())
def test_report_marks_incomparable_scores_and_leaves_them_out_of_the_average(tmp_path, evals, val, cell, words):
    evals = {"vqa": {"score": 50.0, "limit": None, "trained": True}, **evals}
    run = fake_run(tmp_path, ["vqa", "gqa"] if "gqa" in evals and evals["gqa"].get("trained") else ["vqa"],
                   evals, val)
    result = CliRunner(env={"COLUMNS": "80"}).invoke(app, ["report", str(run), "--out", str(tmp_path / "r.png")])
    assert result.exit_code == 0, result.output
    assert cell in result.stdout and words in " ".join(result.stdout.split()), result.stdout
    row = [line for line in result.stdout.splitlines() if line.startswith("myrun ")][0]
    assert row.split()[-1] == "50.00", result.stdout  # the average is VQA's alone
    assert (tmp_path / "r.png").is_file()


def test_report_says_when_averages_mix_splits_or_task_sets(tmp_path):
    a = fake_run(tmp_path / "a", ["vqa", "gqa"], {"vqa": {"score": 50.0, "limit": None, "trained": True}},
                 val={"vqa": 40.0, "gqa": 70.0})  # vqa from test, gqa from validation
    b = fake_run(tmp_path / "b", ["vqa"], {"vqa": {"score": 30.0, "limit": None, "trained": True}})
    result = CliRunner().invoke(app, ["report", str(a), str(b), "--out", str(tmp_path / "r.png")])
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "60.00*" in text  # (50 + 70) / 2, marked as holding a validation score
    assert "avg is over different tasks or splits: a/myrun (test and val: vqa, gqa); b/myrun (test: vqa)" in text
