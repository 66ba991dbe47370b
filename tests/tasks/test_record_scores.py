"""Each task's own score per record (`Task.record_scores`, what the results page shows and sorts by) and what the
page shows of a record (`Task.review`); the mean of the records' scores is the task's metric."""

from __future__ import annotations

import json
import math
import warnings

import pytest

from vlpet_cli.tasks import FileScoring, Review, get_task


@pytest.fixture
def python_tokenizer(monkeypatch):
    """Captions tokenised without Java (fast; the same tokenizer for the per-record and the corpus CIDEr)."""
    monkeypatch.setattr("vlpet_cli.metrics.caption.java_available", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def vqa_pred(qid, answers, prediction, answer_type="other"):
    return {"question_id": qid, "img_id": f"COCO_val2014_{qid:012d}", "sent": f"question {qid}?",
            "label": None, "answers": answers, "answer_type": answer_type, "prediction": prediction}


def test_vqa_soft_score_per_question_and_its_mean_is_the_accuracy():
    task = get_task("vqa")
    preds = [vqa_pred(1, ["red"] * 10, "Red"), vqa_pred(2, ["2"] * 2 + ["3"] * 8, "two", "number"),
             vqa_pred(3, ["yes"] * 10, "no", "yes/no"), vqa_pred(4, ["a"] * 9 + ["b"], "b")]
    scores = task.record_scores(preds)
    assert scores == pytest.approx([100.0, 60.0, 0.0, 30.0])  # 'two' normalised to '2'; 1 of 10: 0.3
    assert sum(scores) / len(scores) == pytest.approx(task.score(preds)["vqa"])
    review = task.review(preds[1])
    assert review == Review("question 2?", ("3 (8)", "2 (2)"), ("COCO_val2014_000000000002",), "number")


def test_gqa_exact_match_and_nlvr_right_or_wrong():
    gqa = get_task("gqa")
    preds = [{"question_id": "q1", "img_id": "n1", "sent": "what is it?", "label": {"cat": 1.0}, "prediction": "cat"},
             {"question_id": "q2", "img_id": "n2", "sent": "where?", "label": {"left": 1.0}, "prediction": "Left"}]
    assert gqa.record_scores(preds) == [100.0, 0.0]  # case-sensitive, as the accuracy counts it
    # questions whose answers the leaderboard server holds (GQA submit, VQA test2015) are unscored, not wrong
    assert math.isnan(gqa.record_scores([{"prediction": "no", "label": None}])[0])
    assert math.isnan(get_task("vqa").record_scores([{"prediction": "no", "question_id": 1}])[0])
    assert gqa.review(preds[0]) == Review("what is it?", ("cat",), ("n1",))

    nlvr = get_task("nlvr")
    rows = [{"identifier": f"dev-1-0-{i}", "img0": "dev-1-0-img0", "img1": "dev-1-0-img1", "sent": "Two dogs.",
             "label": label, "uid": None, "prediction": pred}
            for i, (label, pred) in enumerate([(1, "true"), (1, "false"), (0, "false"), (0, "true")])]
    assert nlvr.record_scores(rows) == [100.0, 0.0, 100.0, 0.0]
    assert nlvr.review(rows[1]) == Review("Two dogs.", ("true",), ("dev-1-0-img0", "dev-1-0-img1"))


def test_coco_per_caption_cider_averages_to_the_corpus_cider(python_tokenizer):
    task = get_task("coco")
    refs = [["a red circle on the left", "a red circle"], ["a blue square in the middle", "a blue square"],
            ["a green triangle on the right", "a triangle that is green"]]
    preds = [{"img_id": f"COCO_val2014_{i:012d}", "cocoid": i, "references": r, "prediction": p}
             for i, (r, p) in enumerate(zip(refs, ["a red circle", "a yellow shape", "a green triangle"]))]
    scores = task.record_scores(preds)
    assert scores[0] > scores[2] > scores[1] >= 0.0
    assert sum(scores) / 3 == pytest.approx(task.score(preds, ["cider"])["cider"])
    assert task.review(preds[0]) == Review("caption:", tuple(refs[0]), ("COCO_val2014_000000000000",))


def test_video_qa_right_or_wrong_and_unscored_where_the_answer_is_hidden():
    task = get_task("tvqa")
    preds = [{"question_id": 1, "vid_name": "v1", "type": "friends", "answer": "a2", "sent": "[Q] who? [TS] (1-2)",
              "prediction": "a2"},
             {"question_id": 2, "vid_name": "v1", "type": "friends", "answer": "a2", "sent": "[Q] what?",
              "prediction": "a0"},
             {"question_id": 3, "vid_name": "v2", "type": "house", "answer": None, "sent": "[Q] when?",
              "prediction": "a1"}]
    scores = task.record_scores(preds)
    assert scores[:2] == [100.0, 0.0] and math.isnan(scores[2])
    assert task.review(preds[0]) == Review("[Q] who? [TS] (1-2)", ("a2",), ("v1",), "friends")
    assert task.review(preds[2]).references == ()


def test_video_caption_cider_per_row_against_its_own_description(python_tokenizer):
    task = get_task("tvc")
    descs = ["a man opens the door", "a woman sits down", "two people talk in the kitchen"]
    preds = [{"question_id": i, "clip_id": 7, "vid_name": "clip7", "reference": d, "references": descs,
              "ts": [1.0, 4.5], "prediction": p}
             for i, (d, p) in enumerate(zip(descs, ["a man opens the door", "a man sits", "people talk"]))]
    preds.append({"question_id": 9, "clip_id": 8, "vid_name": "clip8", "reference": None, "references": [],
                  "ts": [0, 1], "prediction": "hidden"})
    scores = task.record_scores(preds)
    assert scores[0] > scores[1] and scores[0] > scores[2] and math.isnan(scores[3])
    assert sum(scores[:3]) / 3 == pytest.approx(task.score(preds, ["cider"])["cider"])
    assert task.review(preds[1]) == Review("[TS] ([1.0, 4.5])", ("a woman sits down",), ("clip7",))


def test_file_predictions_join_a_predictions_file_with_its_annotations(tmp_path):
    ann = tmp_path / "karpathy_test.json"
    ann.write_text(json.dumps([{"question_id": 5, "img_id": "COCO_val2014_000000000005", "sent": "Is it red?",
                                "answer_type": "yes/no", "answers": ["yes"] * 10}]))
    pred = tmp_path / "vqa-test.predictions.json"
    pred.write_text(json.dumps([{"question_id": 5, "answer": "no"}]))
    task = get_task("vqa")
    rows = task.file_predictions(FileScoring(pred, ann))
    assert task.review(rows[0]) == Review("Is it red?", ("yes (10)",), ("COCO_val2014_000000000005",), "yes/no")
    assert task.record_scores(rows) == [0.0]

    nlvr_ann = tmp_path / "dev.json"
    nlvr_ann.write_text("".join(json.dumps({"identifier": f"dev-3-1-{i}", "sentence": "One cat.", "label": "True"})
                                + "\n" for i in range(2)))  # NLVR2's own JSON lines
    nlvr_pred = tmp_path / "nlvr.csv"
    nlvr_pred.write_text("dev-3-1-0,True\ndev-3-1-1,False\n")
    nlvr = get_task("nlvr")
    rows = nlvr.file_predictions(FileScoring(nlvr_pred, nlvr_ann))
    assert nlvr.review(rows[0]) == Review("One cat.", ("true",), ("dev-3-1-img0", "dev-3-1-img1"))
    assert nlvr.record_scores(rows) == [100.0, 0.0]
