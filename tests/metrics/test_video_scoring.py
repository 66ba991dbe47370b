"""Scoring the video tasks (spec/pipeline.md §5.3, §5.4): QA accuracy by hand and per show, CIDEr equal to
pycocoevalcap's Cider on the same tokenised references (per row or per clip), VALUE submission files that
round-trip through `vlpet eval --predictions`, and the selection average."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pycocoevalcap.cider.cider import Cider

from vlpet_cli.config import Preset
from vlpet_cli.errors import DataError
from vlpet_cli.evaluate import score_predictions_file, submission_name
from vlpet_cli.inference import best_score, score
from vlpet_cli.metrics.caption import resolve_tokenizer, tokenize_ptb, tokenize_python
from vlpet_cli.tasks import task_class
from vlpet_cli.tasks.video.base import choice_index

SHOWS = {1: "House", 2: "House", 3: "House", 4: "Friends", 5: "Friends"}
ANSWERS = {1: 0, 2: 1, 3: 1, 4: 4, 5: 2}
PREDICTED = {1: 0, 2: 3, 3: 1, 4: 4, 5: 0}  # right: 1, 3 (House), 4 (Friends)


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def qa_line(qid: int, answer: int | None) -> dict:
    line = {"qid": qid, "q": "Who?", "vid_name": f"v{qid}", "ts": "1.0-2.0", "show_name": SHOWS[qid],
            **{f"a{i}": f"choice {i}" for i in range(5)}}
    if answer is not None:
        line["answer_idx"] = answer
    return line


@pytest.fixture
def tvqa_val(tmp_path) -> Path:
    return write_jsonl(tmp_path / "tvqa_val.jsonl", [qa_line(q, a) for q, a in ANSWERS.items()])


def write_predictions(tmp_path: Path, preds: dict) -> Path:
    path = tmp_path / "tvqa_test_predictions.json"
    path.write_text(json.dumps({str(q): a for q, a in preds.items()}))
    return path


# ---- QA -----------------------------------------------------------------------------------------------------
def test_qa_accuracy_by_hand_and_per_show(tmp_path, tvqa_val):
    result = score_predictions_file("tvqa", write_predictions(tmp_path, PREDICTED), tvqa_val)
    assert result["acc"] == pytest.approx(100 * 3 / 5)
    assert result["per_type"] == pytest.approx({"House": 100 * 2 / 3, "Friends": 100 * 1 / 2})
    assert result["n"] == 5
    rows = [{"question_id": q, "vid_name": f"v{q}", "type": SHOWS[q], "answer": f"a{ANSWERS[q]}",
             "prediction": f"a{PREDICTED[q]}"} for q in ANSWERS]
    assert score("tvqa", rows) == {"acc": result["acc"], "per_type": result["per_type"]}  # the same scoring
    rows[0]["prediction"] = "a0 and more"  # not "a{idx}" exactly: wrong, as in the reference
    assert score("tvqa", rows)["acc"] == pytest.approx(100 * 2 / 5)


def test_how2qa_has_one_type(tmp_path):
    ann = write_jsonl(tmp_path / "how2qa_val_release.jsonl",
                      [{**qa_line(q, min(a, 3)), "a4": None, "show_name": None} for q, a in ANSWERS.items()])
    preds = write_predictions(tmp_path, {q: min(a, 3) for q, a in PREDICTED.items()})
    result = score_predictions_file("how2", preds, ann)
    assert result["per_type"] == {"how2qa": pytest.approx(60.0)} and result["acc"] == pytest.approx(60.0)


def test_qa_test_predictions_have_no_scores(tmp_path):
    rows = [{"question_id": 5, "vid_name": "v", "type": "House", "answer": None, "prediction": "a1"}]
    assert score("tvqa", rows) == {"n": 1, "scored": 0}
    hidden = write_jsonl(tmp_path / "tvqa_test_release.jsonl", [qa_line(1, None)])
    with pytest.raises(DataError, match=r"tvqa_test_release.jsonl: line 1 \(qid=1\): field 'answer_idx' is "
                                        r"missing: this looks like a test file"):
        score_predictions_file("tvqa", write_predictions(tmp_path, {1: 0}), hidden)


def test_qa_files_that_do_not_match_are_refused(tmp_path, tvqa_val):
    with pytest.raises(DataError, match=r"1 of 6 predicted ids are not in .*tvqa_val.jsonl: '99'"):
        score_predictions_file("tvqa", write_predictions(tmp_path, {**PREDICTED, 99: 1}), tvqa_val)
    partial = write_predictions(tmp_path, {q: PREDICTED[q] for q in (1, 2, 4)})
    with pytest.raises(DataError, match=r"no prediction for 2 of 5 ids .*'3', '5'.*allow_missing"):
        score_predictions_file("tvqa", partial, tvqa_val)
    assert score_predictions_file("tvqa", partial, tvqa_val, allow_missing=True)["acc"] == pytest.approx(200 / 3)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"1": "a1"}))
    with pytest.raises(DataError, match=r"the answer of question '1' is 'a1'; expected an integer 0..4"):
        score_predictions_file("tvqa", bad, tvqa_val)
    bad.write_text(json.dumps([{"question_id": 1, "answer": 1}]))
    with pytest.raises(DataError, match=r"expected VALUE's tvqa predictions, a JSON object"):
        score_predictions_file("tvqa", bad, tvqa_val)


def test_qa_submission_round_trips(tmp_path, tvqa_val):
    rows = [{"question_id": q, "vid_name": f"v{q}", "type": SHOWS[q], "answer": f"a{ANSWERS[q]}",
             "prediction": f"a{PREDICTED[q]}"} for q in ANSWERS]
    suffix, content = task_class("tvqa")().submission(rows)
    assert suffix == "json" and json.loads(content) == {str(q): a for q, a in PREDICTED.items()}
    path = tmp_path / submission_name("tvqa", "test", suffix)
    path.write_text(content)
    from_file = score_predictions_file("tvqa", path, tvqa_val)
    assert {k: from_file[k] for k in ("acc", "per_type")} == score("tvqa", rows)
    assert [choice_index(p) for p in ("a3", "a10", "b2", "", "ax", "3")] == [3, 1, 2, 0, 0, 0]


# ---- captions -----------------------------------------------------------------------------------------------
CLIPS = {
    11: ("s01_clip_1", [1.5, 4.0], ["a man walks into the room", "the man enters a room", "someone walks in"]),
    12: ("s01_clip_2", [0, 2.25], ["two women talk at a table", "women are talking"]),
    13: ("s02_clip_9", [3.0, 9.5], ["a dog runs on the grass", "the dog is running", "a dog plays outside"]),
}
GENERATED = {11: "a man walks in", 12: "two women are talking", 13: "a cat sleeps"}


def caption_lines(ts: bool = True) -> list[dict]:
    return [{"vid_name": vid, "duration": 10.0, "clip_id": clip, **({"ts": moment} if ts else {}),
             "descs": [{"desc": d, "desc_id": clip * 10 + k} for k, d in enumerate(descs)]}
            for clip, (vid, moment, descs) in CLIPS.items()]


def caption_rows(ts: bool = True) -> list[dict]:
    """Validation predictions as the task makes them: one row per description, one prediction per clip."""
    rows = []
    for clip, (vid, moment, descs) in CLIPS.items():
        for k, d in enumerate(descs):
            row = {"question_id": clip * 10 + k, "clip_id": clip, "vid_name": vid, "reference": d,
                   "references": descs, "prediction": GENERATED[clip]}
            if ts:
                row["ts"] = moment
            rows.append(row)
    return rows


def cider_by_hand(preds: dict, refs: dict, tokenizer: str) -> float:
    """CIDEr x100 from pycocoevalcap's Cider on the references and predictions tokenised the same way."""
    tokenize = tokenize_ptb if tokenizer == "ptb" else tokenize_python
    gts = tokenize({k: refs[k] for k in preds})
    res = tokenize({k: [p] for k, p in preds.items()})
    value, _ = Cider().compute_score(gts, res)
    return 100 * value


@pytest.mark.parametrize("tokenizer", ["python", pytest.param("ptb", marks=pytest.mark.skipif(
    shutil.which("java") is None, reason="the PTB tokenizer needs Java"))])
def test_caption_file_cider_is_pycocoevalcaps(tmp_path, tokenizer):
    ann = write_jsonl(tmp_path / "tvc_val_release.jsonl", caption_lines())
    preds = write_jsonl(tmp_path / "tvc_val_predictions.jsonl",
                        [{"vid_name": CLIPS[c][0], "clip_id": c, "ts": CLIPS[c][1], "descs": [{"desc": g}]}
                         for c, g in GENERATED.items()])
    result = score_predictions_file("tvc", preds, ann, tokenizer=tokenizer)
    expected = cider_by_hand({str(c): g for c, g in GENERATED.items()},
                             {str(c): CLIPS[c][2] for c in CLIPS}, tokenizer)
    assert result["cider"] == pytest.approx(expected) and result["cider"] > 0
    assert (result["tokenizer"], result["n"]) == (tokenizer, 3)
    both = score_predictions_file("tvc", preds, ann, metrics=["cider", "bleu4", "rougel"], tokenizer=tokenizer)
    assert set(both) == {"cider", "bleu4", "rougel", "tokenizer", "n"} and both["cider"] == pytest.approx(expected)


@pytest.mark.slow  # six Java PTB tokenizer runs: 0.9 s
def test_validation_scores_per_row_or_per_clip():
    rows = caption_rows()
    used = resolve_tokenizer("auto")
    per_row = cider_by_hand({r["question_id"]: r["prediction"] for r in rows},
                            {r["question_id"]: [r["reference"]] for r in rows}, used)
    per_clip = cider_by_hand(dict(GENERATED), {c: CLIPS[c][2] for c in CLIPS}, used)
    assert score("tvc", rows)["cider"] == pytest.approx(per_row)
    assert score("tvc", rows, caption_references="clip")["cider"] == pytest.approx(per_clip)
    assert per_row != pytest.approx(per_clip)
    assert score("tvc", [{**rows[0], "reference": None, "references": []}]) == {"n": 1, "scored": 0}


@pytest.mark.slow  # four Java PTB tokenizer runs: 0.7 s
def test_validation_threads_caption_references(monkeypatch):
    import vlpet_cli.inference as inference

    monkeypatch.setattr(inference, "predict", lambda *args, **kwargs: caption_rows(ts=False))
    preset = Preset(name="p", method="m", description="d")
    clip = preset.model_copy(update={"eval": preset.eval.model_copy(update={"caption_references": "clip"})})
    by_row = inference.validate(None, None, preset, {"yc2c": None})
    by_clip = inference.validate(None, None, clip, {"yc2c": None})
    assert by_row["yc2c"]["cider"] == pytest.approx(score("yc2c", caption_rows(ts=False))["cider"])
    assert by_clip["yc2c"]["cider"] == pytest.approx(score("yc2c", caption_rows(ts=False), None, "reference",
                                                           "clip")["cider"])
    assert set(by_row["yc2c"]) == {"cider"}


def test_caption_submissions_round_trip(tmp_path):
    suffix, content = task_class("tvc")().submission(caption_rows())
    lines = [json.loads(line) for line in content.splitlines()]
    assert suffix == "jsonl" and lines == [
        {"vid_name": CLIPS[c][0], "clip_id": c, "ts": CLIPS[c][1], "descs": [{"desc": GENERATED[c]}]} for c in CLIPS]
    assert [list(line) for line in lines] == [["vid_name", "clip_id", "ts", "descs"]] * 3
    path = tmp_path / submission_name("tvc", "test", suffix)
    path.write_text(content)
    ann = write_jsonl(tmp_path / "tvc_val_release.jsonl", caption_lines())
    assert score_predictions_file("tvc", path, ann)["cider"] == pytest.approx(
        score("tvc", caption_rows(), caption_references="clip")["cider"])
    _, yc2 = task_class("yc2c")().submission(caption_rows(ts=False))
    assert [list(json.loads(line)) for line in yc2.splitlines()] == [["vid_name", "clip_id", "descs"]] * 3


def test_caption_files_that_do_not_match_are_refused(tmp_path):
    ann = write_jsonl(tmp_path / "yc2c_val_release.jsonl", caption_lines(ts=False))
    preds = write_jsonl(tmp_path / "p.jsonl", [{"clip_id": 11, "descs": [{"desc": "x"}]},
                                               {"clip_id": 77, "descs": [{"desc": "y"}]}])
    with pytest.raises(DataError, match=r"1 of 2 predicted ids are not in .*: '77'"):
        score_predictions_file("yc2c", preds, ann)
    write_jsonl(preds, [{"clip_id": 11, "descs": [{"desc": "x"}]}])
    with pytest.raises(DataError, match=r"no prediction for 2 of 3 ids .*'12', '13'"):
        score_predictions_file("yc2c", preds, ann)
    assert score_predictions_file("yc2c", preds, ann, allow_missing=True)["n"] == 1
    write_jsonl(preds, [{"clip_id": 11, "descs": "x"}])
    with pytest.raises(DataError, match=r"p.jsonl: line 1 \(clip_id=11\): field 'descs' should be a list holding"):
        score_predictions_file("yc2c", preds, ann)
    write_jsonl(preds, [{"clip_id": 11, "descs": [{"desc": "x"}]}, {"clip_id": 11, "descs": [{"desc": "z"}]}])
    with pytest.raises(DataError, match=r"id '11' appears more than once"):
        score_predictions_file("yc2c", preds, ann)
    write_jsonl(preds, [{"clip_id": 11, "descs": [{"desc": "x"}]}])
    hidden = write_jsonl(tmp_path / "yc2c_test_release.jsonl", [{"vid_name": "v", "clip_id": 11}])
    with pytest.raises(DataError, match=r"line 1 \(clip_id=11\): field 'descs' is missing: this looks like a test"):
        score_predictions_file("yc2c", preds, hidden, allow_missing=True)


# ---- files and selection ------------------------------------------------------------------------------------
def test_submission_files_have_values_names():
    assert [submission_name(t, "test", "json") for t in ("tvqa", "how2qa")] == [
        "tvqa_test_predictions.json", "how2qa_test_public_predictions.json"]
    assert [submission_name(t, "test", "jsonl") for t in ("tvc", "yc2c")] == [
        "tvc_test_predictions.jsonl", "yc2c_test_predictions.jsonl"]
    assert submission_name("tvqa", "test_public,test_release", "json") == "tvqa_test_predictions.json"
    assert submission_name("tvqa", "val", "json") == "tvqa-val.submission.json"
    assert submission_name("vqa", "test", "json") == "vqa-test.submission.json"


def test_best_average_is_the_references():
    result = {"tvqa": {"acc": 60.0}, "how2qa": {"acc": 40.0}, "tvc": {"cider": 30.0}, "yc2c": {"cider": 10.0}}
    assert best_score(result, "avg") == 35.0
    assert best_score(result, "tvc.cider") == 30.0


@pytest.mark.cli  # `python -m vlpet_cli` in subprocesses
def test_eval_predictions_command_scores_value_files(tmp_path, tvqa_val):
    preds = write_predictions(tmp_path, PREDICTED)
    out = subprocess.run([sys.executable, "-m", "vlpet_cli", "eval", "--task", "tvqa", "--predictions", str(preds),
                          "--annotations", str(tvqa_val), "--json"], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"acc": pytest.approx(60.0), "n": 5}
    bad = write_predictions(tmp_path, {**PREDICTED, 99: 0})
    out = subprocess.run([sys.executable, "-m", "vlpet_cli", "eval", "--task", "tvqa", "--predictions", str(bad),
                          "--annotations", str(tvqa_val)], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 2 and "predicted ids are not in" in out.stderr and "Traceback" not in out.stderr
