"""Leaderboard submissions: the VQA server's official question files (test2015, test-dev2015) and GQA's challenge
questions read as splits, the submission files `vlpet eval` writes for them, and `vlpet eval --check-submission`."""

import json
import os
import re
from pathlib import Path

import pytest

from vlpet_cli.errors import DataError, VlpetError
from vlpet_cli.evaluate import check_submission_file, submission_covers
from vlpet_cli.inference import score
from vlpet_cli.tasks import annotation_images, get_task
from vlpet_cli.tasks.submissions import VQA_QUESTION_FILES


def write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def vqa_questions(subset: str, image_ids, per_image: int = 2) -> dict:
    questions = [{"image_id": i, "question": f"What is {k}?", "question_id": i * 1000 + k}
                 for i in image_ids for k in range(per_image)]
    return {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": subset,
            "questions": questions, "license": {}}


@pytest.fixture
def root(tmp_path) -> Path:
    """A data root with the two official question files: test2015 over images 1-3, test-dev2015 over image 2."""
    write(tmp_path / "vqa" / f"{VQA_QUESTION_FILES['test2015']}.json", vqa_questions("test2015", [1, 2, 3]))
    write(tmp_path / "vqa" / f"{VQA_QUESTION_FILES['test-dev2015']}.json", vqa_questions("test-dev2015", [2]))
    return tmp_path


def full(root: Path) -> Path:
    return root / "vqa" / f"{VQA_QUESTION_FILES['test2015']}.json"


def test_official_question_files_are_vqa_splits_of_coco_test2015_images(root):
    vqa = get_task("vqa")
    records = vqa.load(root, "test-dev2015")
    assert [r.id for r in records] == [2000, 2001] and records[0].text == "What is 0?"
    # test-dev2015's images are test2015 images: features are looked up under COCO's file stems
    assert records[0].image_ids == ("COCO_test2015_000000000002",) and records[0].source == "COCO"
    assert len(vqa.load(root, "test2015")) == 6 and records[0].label is None
    # answers are hidden: evaluation reports the count only
    preds = [{**vqa.eval_info(r), "prediction": "yes"} for r in records]
    assert score("vqa", preds) == {"n": 2, "scored": 0}
    # extract-features --annotations selects the images a question file asks about
    found = annotation_images(root / "vqa" / f"{VQA_QUESTION_FILES['test-dev2015']}.json")
    assert found == {"COCO_test2015_000000000002": "COCO_test2015_000000000002.jpg"}


def test_test_dev_submission_answers_every_test2015_question(root, tmp_path):
    vqa = get_task("vqa")
    covers = submission_covers(root, ["vqa", "gqa"], "test-dev2015")
    assert list(covers) == ["vqa"] and covers["vqa"].ids == [1000, 1001, 2000, 2001, 3000, 3001]
    assert submission_covers(root, ["vqa"], "test") == {}  # Karpathy splits: the predictions are the submission
    preds = [{"question_id": 2000, "prediction": "red"}, {"question_id": 2001, "prediction": "2"}]
    with pytest.warns(UserWarning, match="4 of the 6 test2015 questions were not predicted.*test-dev phase only"):
        suffix, content, filled = vqa.complete_submission(preds, covers["vqa"])
    rows = json.loads(content)
    assert suffix == "json" and filled == 4 and [r["question_id"] for r in rows] == covers["vqa"].ids
    assert {r["question_id"]: r["answer"] for r in rows}[2000] == "red" and rows[0]["answer"] == ""
    out = write(tmp_path / "sub.json", rows)
    assert check_submission_file("vqa", out, full(root)) == {"task": "vqa", "file": str(out), "questions": 6,
                                                             "split": "test2015"}


def test_submission_questions_are_checked_before_the_model(root):
    vqa = get_task("vqa")
    write(root / "vqa" / f"{VQA_QUESTION_FILES['test-dev2015']}.json", vqa_questions("test-dev2015", [9]))
    with pytest.raises(DataError, match=r"test-dev2015_questions\.json: question_id 9000 \(and 1 more\) is not a "
                                        r"question of .*test2015_questions\.json"):
        vqa.submission_questions(root, "test-dev2015")
    full(root).unlink()
    with pytest.raises(DataError, match=r"test2015_questions\.json: not found; .*every test2015 question"):
        vqa.submission_questions(root, "test-dev2015")


def one_line_error(call) -> str:
    with pytest.raises(DataError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and "Fix:" in message
    return message


@pytest.mark.parametrize(("rows", "expected"), [
    ({"1000": "a"}, r"sub\.json: expected a JSON list \[\{\"question_id\": int, \"answer\": str\}\], found dict"),
    ([{"question_id": "1000", "answer": "a"}], r"sub\.json: record 0 \(question_id=1000\): field 'question_id' "
                                               r"should be an integer, found str"),
    ([{"question_id": 1000, "answer": 3}], r"record 0 \(question_id=1000\): field 'answer' should be a string"),
    ([{"question_id": 1000}], r"record 0 \(question_id=1000\): field 'answer' is missing"),
    ([{"question_id": 1000, "answer": "a"}, {"question_id": 1000, "answer": "b"}],
     r"sub\.json: record 1 \(question_id=1000\): question_id 1000 is answered a second time"),
    ([{"question_id": 1000, "answer": "a"}, {"question_id": 7000, "answer": "b"}],
     r"sub\.json: record 1 \(question_id=7000\): question_id 7000 is not a question of .*test2015_questions\.json"),
    ([{"question_id": 1000, "answer": "a"}, {"question_id": 1001, "answer": "b"}],
     r"sub\.json: no answer for 4 of 6 questions of .*test2015_questions\.json, the first question_id 2000\. "
     r"Fix: predict them all .*--split test2015"),
])
def test_each_bad_vqa_submission_is_one_line_naming_the_file_and_first_bad_id(root, tmp_path, rows, expected):
    sub = write(tmp_path / "sub.json", rows)
    assert re.search(expected, one_line_error(lambda: check_submission_file("vqa", sub, full(root))))


def test_bad_question_files_and_tasks_without_a_check(root, tmp_path):
    sub = write(tmp_path / "sub.json", [])
    dev = root / "vqa" / f"{VQA_QUESTION_FILES['test-dev2015']}.json"
    assert "wants an answer to every test2015 question" in one_line_error(
        lambda: check_submission_file("vqa", sub, dev))
    karpathy = write(tmp_path / "karpathy_test.json", [{"question_id": 1}])
    assert "not a VQA question file" in one_line_error(lambda: check_submission_file("vqa", sub, karpathy))
    twice = write(tmp_path / "q.json", vqa_questions("test2015", [1, 1]))
    assert "id '1000' appears more than once" in one_line_error(lambda: check_submission_file("vqa", sub, twice))
    with pytest.raises(VlpetError, match="task 'coco' has no leaderboard submission check; the tasks with one: "
                                         "vqa, gqa"):
        check_submission_file("coco", sub, dev)


def test_gqa_challenge_questions_are_a_split_and_its_submission_is_checked(tmp_path):
    official = {"201307251": {"imageId": "n1", "question": "What color is it?"},
                "201640614": {"imageId": "n2", "question": "Is it big?", "answer": "no"}}
    questions = write(tmp_path / "GQA" / "submit.json", official)
    gqa = get_task("gqa")
    records = gqa.load(tmp_path, "submit")
    assert [(r.id, r.image_ids, r.source, r.label) for r in records] == [
        ("201307251", ("n1",), "GQA", None), ("201640614", ("n2",), "GQA", {"no": 1.0})]
    assert score("gqa", [{**gqa.eval_info(records[0]), "prediction": "red"}]) == {"n": 1, "scored": 0}
    assert annotation_images(questions) == {"n1": None, "n2": None}
    _, content = gqa.submission([{**gqa.eval_info(r), "prediction": "no"} for r in records])
    sub = write(tmp_path / "sub.json", json.loads(content))
    assert check_submission_file("gqa", sub, questions)["questions"] == 2
    lxmert = write(tmp_path / "lxmert.json", [{"question_id": "201307251", "img_id": "n1", "sent": "?"}])
    assert "questionId '201640614' is not a question of" in one_line_error(
        lambda: check_submission_file("gqa", sub, lxmert))
    numbers = write(tmp_path / "numbers.json", [{"questionId": 201307251, "prediction": "no"}])
    assert "field 'questionId' should be a string, found int" in one_line_error(
        lambda: check_submission_file("gqa", numbers, questions))


@pytest.mark.slow
def test_toy_world_vqa_and_gqa_submissions_validate(tmp_path):
    from vlpet_cli.evaluate import evaluate
    from vlpet_cli.toy.root import resolve_data_root
    from vlpet_cli.train import resolve_train_preset, train

    toy = resolve_data_root("toy")
    questions = toy / "vqa" / f"{VQA_QUESTION_FILES['test2015']}.json"
    asked = json.loads(questions.read_text())
    assert asked["data_subtype"] == "test2015" and set(asked) == {"info", "task_type", "data_type", "data_subtype",
                                                                  "questions", "license"}
    dev = json.loads((toy / "vqa" / f"{VQA_QUESTION_FILES['test-dev2015']}.json").read_text())["questions"]
    assert len(asked["questions"]) == 90 and len(dev) == 36 and all(q in asked["questions"] for q in dev)

    preset = resolve_train_preset("vlpet-small", ["vqa", "gqa"], "toy", "tiny-bart",
                                  ["data.limit=16", "train.epochs=1", "eval.every=0"])
    run = tmp_path / "run"
    train(preset, run)
    with pytest.warns(UserWarning, match="54 of the 90 test2015 questions were not predicted"):
        result = evaluate(run, ["vqa"], split="test-dev2015", progress=False)
    assert result["vqa"]["metrics"] == {"n": 36, "scored": 0}
    record = json.loads((run / "eval" / "vqa-test-dev2015.json").read_text())
    assert record["submission"] == {"questions": str(questions), "answered": 90, "predicted": 36, "filled": 54}
    for split in ("test-dev2015", "test2015"):
        if split == "test2015":
            evaluate(run, ["vqa"], split=split, progress=False)
        sub = run / "eval" / f"vqa-{split}.submission.json"
        assert check_submission_file("vqa", sub, questions)["questions"] == 90
    predicted = {r["question_id"]: r["answer"] for r in json.loads(sub.read_text())}
    assert all(isinstance(a, str) for a in predicted.values())
    assert json.loads((run / "eval" / "vqa-test2015.json").read_text())["submission"]["filled"] == 0

    # GQA: the challenge's questions (official format) as GQA/submit.json under a data root beside the toy's features
    data = tmp_path / "data" / "GQA"
    data.mkdir(parents=True)
    os.symlink(toy / "GQA" / "clip_features", data / "clip_features")
    testdev = json.loads((toy / "GQA" / "testdev.json").read_text())
    gqa_questions = write(data / "submit.json", {r["question_id"]: {"imageId": r["img_id"], "question": r["sent"]}
                                                 for r in testdev})
    evaluate(run, ["gqa"], split="submit", data_root=str(tmp_path / "data"), out_dir=tmp_path / "out",
             progress=False)
    assert check_submission_file("gqa", tmp_path / "out" / "gqa-submit.submission.json",
                                 gqa_questions)["questions"] == len(testdev)


def test_the_command_checks_a_file_in_one_line(root, tmp_path, monkeypatch, capsys):
    from functools import partial

    from tests.faults.faultkit import vlpet as run

    vlpet = partial(run, monkeypatch, capsys)

    rows = [{"question_id": q, "answer": "yes"} for q in (1000, 1001, 2000, 2001, 3000, 3001)]
    good = write(tmp_path / "good.json", rows)
    code, out, _ = vlpet("eval", "--task", "vqa", "--check-submission", good, "--questions", full(root))
    assert code == 0 and "valid: answers each of the 6 questions" in out
    code, out, _ = vlpet("eval", "--task", "vqa", "--check-submission", good, "--questions", full(root), "--json")
    assert code == 0 and json.loads(out)["questions"] == 6
    bad = write(tmp_path / "bad.json", rows[:-1])
    code, _, err = vlpet("eval", "--task", "vqa", "--check-submission", bad, "--questions", full(root))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "bad.json: no answer for 1 of 6 questions" in err and "the first question_id 3001" in err
    code, _, err = vlpet("eval", "--task", "vqa", "--check-submission", good)
    assert code == 2 and "needs --task, --check-submission FILE and --questions FILE" in err
