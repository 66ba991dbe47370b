"""Scoring prediction files without a model: formats, id checks, metric selection, values x100."""

import json
import warnings

import pytest

from vlpet_cli.errors import DataError, VlpetError
from vlpet_cli.evaluate import score_predictions_file
from vlpet_cli.metrics import caption
from vlpet_cli.metrics.caption import caption_scores
from vlpet_cli.tasks import TASKS, primary_metrics, task_class

PRIMARY_METRIC = primary_metrics()
VALID_METRICS = {name: cls.valid_metrics for name, cls in TASKS.items()}
DEFAULT_METRICS = {name: cls.default_metrics for name, cls in TASKS.items()}


def resolve_metrics(task, metrics=None):
    """The metric names a task resolves (its declaration in the task table)."""
    return task_class(task).resolve_metrics(metrics)


def write(path, data):
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def answers(*texts):
    return [{"answer": t, "answer_confidence": "yes", "answer_id": i + 1} for i, t in enumerate(texts)]


# ------------------------------------------------------------------ VQA


@pytest.fixture
def vqa_files(tmp_path):
    ann = {
        "annotations": [
            {
                "question_id": 458752000,
                "answers": answers(*["net"] * 10),
                "answer_type": "other",
                "question_type": "what is",
            },
            {
                "question_id": 458752001,
                "answers": answers("2", "2", *["3"] * 8),
                "answer_type": "number",
                "question_type": "how many",
            },
            {
                "question_id": 458752002,
                "answers": answers(*["yes"] * 10),
                "answer_type": "yes/no",
                "question_type": "is this",
            },
        ]
    }
    preds = [{"question_id": 458752000, "answer": "Net"}, {"question_id": "458752001", "answer": "two"}]
    return write(tmp_path / "preds.json", preds), write(tmp_path / "v2_annotations.json", ann)


def test_vqa_file_scores_predicted_subset_of_official_annotations(vqa_files):
    preds, ann = vqa_files
    result = score_predictions_file("vqa", preds, ann)
    assert result["vqa"] == pytest.approx(80.0)  # (1.0 + 0.6) / 2
    assert result["per_answer_type"] == pytest.approx({"other": 100.0, "number": 60.0})
    assert result["per_question_type"] == pytest.approx({"what is": 100.0, "how many": 60.0})
    assert result["n"] == 2


def test_vqa_file_can_require_every_annotated_question(vqa_files):
    preds, ann = vqa_files
    with pytest.raises(DataError, match=r"no prediction for 1 of 3 ids .*'458752002'"):
        score_predictions_file("vqa", preds, ann, allow_missing=False)


def test_vqa_file_variant_is_passed_through(tmp_path, vqa_files):
    _, ann = vqa_files
    preds = write(tmp_path / "p.json", [{"question_id": 458752000, "answer": "the net"}])
    assert score_predictions_file("vqa", preds, ann)["vqa"] == pytest.approx(100.0)
    assert score_predictions_file("vqa", preds, ann, vqa_variant="official")["vqa"] == pytest.approx(0.0)


def test_vqa_extra_prediction_ids_are_named(tmp_path, vqa_files):
    _, ann = vqa_files
    preds = write(
        tmp_path / "p.json",
        [
            {"question_id": 1, "answer": "a"},
            {"question_id": 2, "answer": "b"},
            {"question_id": 458752000, "answer": "net"},
        ],
    )
    with pytest.raises(DataError, match=r"2 of 3 predicted ids are not in .*v2_annotations.json: '1', '2'"):
        score_predictions_file("vqa", preds, ann)


def test_vqa_wrong_format_annotations_name_file_and_field(tmp_path, vqa_files):
    preds, _ = vqa_files
    bad = write(tmp_path / "questions.json", {"questions": []})
    with pytest.raises(DataError, match=r"questions.json.*'annotations'"):
        score_predictions_file("vqa", preds, bad)
    no_answers = write(tmp_path / "records.json", [{"question_id": 458752000, "label": {"net": 1}}])
    with pytest.raises(DataError, match=r"records.json: record 0 \(question_id=458752000\): field 'answers' is "
                                        r"missing"):
        score_predictions_file("vqa", preds, no_answers)


def test_prediction_file_errors(tmp_path, vqa_files):
    _, ann = vqa_files
    with pytest.raises(DataError, match="file not found: .*missing.json"):
        score_predictions_file("vqa", tmp_path / "missing.json", ann)
    broken = write(tmp_path / "broken.json", "[{")
    with pytest.raises(DataError, match="broken.json: not valid JSON"):
        score_predictions_file("vqa", broken, ann)
    dup = write(tmp_path / "dup.json", [{"question_id": 458752000, "answer": "a"}] * 2)
    with pytest.raises(DataError, match="'458752000' appears more than once"):
        score_predictions_file("vqa", dup, ann)


# ------------------------------------------------------------------ GQA


def test_gqa_reference_records_and_official_dict(tmp_path):
    preds = write(
        tmp_path / "p.json",
        [{"questionId": "07333408", "prediction": "pipe"}, {"questionId": "201", "prediction": "red"}],
    )
    records = write(
        tmp_path / "testdev.json",
        [
            {"question_id": "07333408", "label": {"pipe": 1.0}, "sent": "What is on the wall?"},
            {"question_id": "201", "label": {"Red": 1.0}},
        ],
    )
    official = write(
        tmp_path / "testdev_balanced_questions.json",
        {
            "07333408": {"imageId": "n1", "question": "?", "answer": "pipe"},
            "201": {"imageId": "n2", "question": "?", "answer": "red"},
        },
    )
    assert score_predictions_file("gqa", preds, records) == {"acc": pytest.approx(50.0), "n": 2}
    assert score_predictions_file("gqa", preds, official) == {"acc": pytest.approx(100.0), "n": 2}


def test_gqa_missing_predictions_and_bad_labels(tmp_path):
    preds = write(tmp_path / "p.json", [{"questionId": "1", "prediction": "pipe"}])
    labels = write(tmp_path / "l.json", {"1": {"answer": "pipe"}, "2": {"answer": "no"}})
    with pytest.raises(DataError, match=r"no prediction for 1 of 2 ids .*'2'"):
        score_predictions_file("gqa", preds, labels)
    bad = write(tmp_path / "bad.json", [{"question_id": "1", "sent": "?"}])
    with pytest.raises(DataError, match=r"bad.json: record 0 \(question_id=1\): no 'label' object or 'answer' string"):
        score_predictions_file("gqa", preds, bad)


# ------------------------------------------------------------------ NLVR2


@pytest.fixture
def nlvr_labels(tmp_path):
    return write(
        tmp_path / "test.json",
        [
            {"identifier": "test1-0-0-0", "label": 1, "sent": "s"},
            {"identifier": "test1-0-1-0", "label": 0},
            {"identifier": "test1-0-0-1", "label": 1},
            {"identifier": "test1-1-0-0", "label": 0},
        ],
    )


def test_nlvr_csv_predictions(tmp_path, nlvr_labels):
    csv = write(
        tmp_path / "nlvr_submit.csv",
        "test1-0-0-0,True\ntest1-0-1-0,True\ntest1-0-0-1,True\ntest1-1-0-0,False\n",
    )
    result = score_predictions_file("nlvr", csv, nlvr_labels)
    # 3 of 4 right; groups test1-0--0 (one wrong), test1-0--1 and test1-1--0 (right) -> 2 of 3 consistent
    assert result == {"acc": pytest.approx(75.0), "consistency": pytest.approx(200.0 / 3), "n": 4}
    only = score_predictions_file("nlvr", csv, nlvr_labels, metrics=["consistency"])
    assert set(only) == {"consistency", "n"}


def test_nlvr_json_predictions_and_jsonl_labels(tmp_path):
    labels = write(
        tmp_path / "dev.jsonl",
        '{"identifier": "dev-1-0-0", "label": "True"}\n{"identifier": "dev-1-1-0", "label": "False"}\n',
    )
    preds = write(tmp_path / "p.json", {"dev-1-0-0": True, "dev-1-1-0": False})
    assert score_predictions_file("nlvr", preds, labels)["consistency"] == pytest.approx(100.0)


def test_nlvr_missing_prediction_and_bad_csv(tmp_path, nlvr_labels):
    partial = write(tmp_path / "p.csv", "test1-0-0-0,True\n")
    with pytest.raises(DataError, match=r"no prediction for 3 of 4 ids .*'test1-0-1-0'"):
        score_predictions_file("nlvr", partial, nlvr_labels)
    bad = write(tmp_path / "bad.csv", "test1-0-0-0,Maybe\n")
    with pytest.raises(DataError, match=r"bad.csv: line 1 \(identifier 'test1-0-0-0'\).*'Maybe'"):
        score_predictions_file("nlvr", bad, nlvr_labels)


# ------------------------------------------------------------------ COCO captions

REFS = {
    391895: ["A man is surfing on a big wave.", "A surfer rides a wave.", "Man riding a surfboard on a wave"],
    522418: ["Two dogs play on the lawn.", "A pair of dogs running in grass", "Dogs playing in a field."],
    184613: ["A plate with broccoli and meat.", "Food on a white plate, with broccoli."],
}
PREDS = {
    391895: "A man riding a wave on a surfboard.",
    522418: "Two dogs playing in the grass!",
    184613: "a plate of food with broccoli",
}


@pytest.fixture
def karpathy(tmp_path):
    images = [
        {
            "filepath": "val2014",
            "filename": f"COCO_val2014_{cid:012d}.jpg",
            "split": "test",
            "cocoid": cid,
            "sentences": [{"raw": f" {r} ", "tokens": []} for r in refs],
        }
        for cid, refs in REFS.items()
    ]
    images.append(
        {
            "filepath": "val2014",
            "filename": "COCO_val2014_000000000042.jpg",
            "split": "val",
            "cocoid": 42,
            "sentences": [{"raw": "A cat."}],
        }
    )
    return write(tmp_path / "dataset_coco.json", {"images": images, "dataset": "coco"})


def test_coco_karpathy_split_by_cocoid_and_filename_stem(tmp_path, karpathy):
    by_id = write(tmp_path / "a.json", [{"image_id": k, "caption": v} for k, v in PREDS.items()])
    by_stem = write(
        tmp_path / "b.json", [{"image_id": f"COCO_val2014_{k:012d}", "caption": v} for k, v in PREDS.items()]
    )
    expected = caption_scores(PREDS, REFS, metrics=("bleu", "cider"))
    for preds in (by_id, by_stem):
        result = score_predictions_file("coco", preds, karpathy, split="test", metrics=["cider", "bleu"])
        assert set(result) == {"cider", "bleu1", "bleu2", "bleu3", "bleu4", "tokenizer", "n"}
        assert result["cider"] == pytest.approx(100.0 * expected["cider"])
        assert result["bleu4"] == pytest.approx(100.0 * expected["bleu4"])
        assert result["n"] == 3


def test_coco_karpathy_needs_split_and_full_split(tmp_path, karpathy):
    preds = write(tmp_path / "p.json", [{"image_id": 391895, "caption": "a man surfing"}])
    with pytest.raises(VlpetError, match="choose the split"):
        score_predictions_file("coco", preds, karpathy, metrics=["cider"])
    with pytest.raises(DataError, match=r"no prediction for 2 of 3 ids"):
        score_predictions_file("coco", preds, karpathy, split="test", metrics=["cider"])
    with pytest.raises(DataError, match=r"1 of 1 predicted ids are not in .*'391895'"):
        score_predictions_file("coco", preds, karpathy, split="val", metrics=["cider"])


def test_coco_captions_annotation_format_is_a_pool(tmp_path):
    anns = [
        {"image_id": k, "id": i * 10 + j, "caption": c}
        for i, (k, refs) in enumerate(REFS.items())
        for j, c in enumerate(refs)
    ]
    ann = write(tmp_path / "captions_val2014.json", {"images": [], "annotations": anns})
    preds = write(
        tmp_path / "p.json", [{"image_id": k, "caption": v} for k, v in PREDS.items() if k != 184613]
    )
    result = score_predictions_file("coco", preds, ann, metrics=["rougel"])
    sub = {k: v for k, v in PREDS.items() if k != 184613}
    expected = caption_scores(sub, {k: REFS[k] for k in sub}, metrics=("rouge",))
    assert result["rougel"] == pytest.approx(100.0 * expected["rougel"])
    with pytest.raises(VlpetError, match="has no splits"):
        score_predictions_file("coco", preds, ann, split="test", metrics=["rougel"])
    bad = write(tmp_path / "bad.json", {"images": [{"id": 1}]})
    with pytest.raises(DataError, match=r"bad.json: not a caption annotation file.*'annotations'"):
        score_predictions_file("coco", preds, bad, metrics=["rougel"])


def test_coco_default_metrics_without_java_drop_meteor(tmp_path, karpathy, monkeypatch):
    monkeypatch.setattr(caption, "java_available", lambda: False)
    preds = write(tmp_path / "p.json", [{"image_id": k, "caption": v} for k, v in PREDS.items()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = score_predictions_file("coco", preds, karpathy, split="test")
    assert set(result) == {"bleu1", "bleu2", "bleu3", "bleu4", "rougel", "cider", "tokenizer", "n"}
    assert result["tokenizer"] == "python"
    messages = " ".join(str(w.message) for w in caught)
    assert "METEOR is left out" in messages and "may differ slightly" in messages


# ------------------------------------------------------------------ metric names


def test_metric_names_per_task():
    assert PRIMARY_METRIC == {"vqa": "vqa", "gqa": "acc", "nlvr": "acc", "coco": "cider",
                              "tvqa": "acc", "how2qa": "acc", "tvc": "cider", "yc2c": "cider"}
    assert resolve_metrics("coco") == list(DEFAULT_METRICS["coco"])
    assert "spice" not in resolve_metrics("coco")
    assert resolve_metrics("nlvr") == ["acc", "consistency"]
    assert resolve_metrics("coco", ["CIDEr", "bleu", "ROUGE_L", "bleu4"]) == [
        "cider",
        "bleu1",
        "bleu2",
        "bleu3",
        "bleu4",
        "rougel",
    ]
    for task, names in VALID_METRICS.items():
        assert PRIMARY_METRIC[task] in names


def test_inapplicable_metric_lists_valid_names(tmp_path, vqa_files):
    preds, ann = vqa_files
    with pytest.raises(VlpetError, match=r"metric 'cider' does not apply to task 'vqa'; valid: vqa"):
        score_predictions_file("vqa", preds, ann, metrics=["cider"])
    with pytest.raises(VlpetError, match="valid: acc, consistency"):
        resolve_metrics("nlvr", ["vqa"])
    with pytest.raises(VlpetError, match="valid tasks: vqa, gqa, nlvr, coco, tvqa, how2qa, tvc, yc2c"):
        score_predictions_file("imagenet", preds, ann)
