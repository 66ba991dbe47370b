"""GQA exact-match accuracy and NLVR2 accuracy/consistency (spec/pipeline.md §5.2), golden values by hand."""

import pytest

from vlpet_cli.errors import VlpetError
from vlpet_cli.metrics.accuracy import gqa_accuracy, nlvr_group, nlvr_scores, parse_bool


def test_gqa_accuracy_is_case_sensitive_exact_match():
    labels = {"07333408": {"pipe": 1.0}, "1": {"Red": 1.0}, "2": {"yes": 1.0}}
    # "red" != "Red": no normalisation at all -> 2 of 3.
    assert gqa_accuracy({"07333408": "pipe", "1": "red", "2": "yes"}, labels) == pytest.approx(200.0 / 3)


def test_gqa_accuracy_uses_soft_scores_and_records():
    labels = {"a": {"label": {"cat": 0.5}}, "b": {"label": {"dog": 1.0}}}
    assert gqa_accuracy({"a": "cat", "b": "cat"}, labels) == pytest.approx(25.0)


def test_gqa_prediction_without_label_is_an_error():
    with pytest.raises(VlpetError, match="'zz'"):
        gqa_accuracy({"zz": "pipe"}, {"a": {"pipe": 1.0}})


def test_nlvr_group_blanks_the_third_field():
    assert nlvr_group("dev-850-0-0") == "dev-850--0"
    assert nlvr_group("dev-850-1-0") == nlvr_group("dev-850-0-0")
    assert nlvr_group("dev-850-0-1") != nlvr_group("dev-850-0-0")
    assert nlvr_group("test1-0-1-3") == "test1-0--3"
    with pytest.raises(VlpetError, match="dev-850"):
        nlvr_group("dev-850")


def test_nlvr_accuracy_and_consistency():
    labels = {
        # group dev-1--0: three image pairs, all predicted right -> consistent
        "dev-1-0-0": 1,
        "dev-1-1-0": 0,
        "dev-1-2-0": 1,
        # group dev-1--1: same set, another sentence, predicted right -> consistent
        "dev-1-0-1": 0,
        # group dev-2--0: one of two wrong -> not consistent
        "dev-2-0-0": 1,
        "dev-2-1-0": 1,
        # group dev-3--0: wrong
        "dev-3-0-0": 0,
    }
    preds = {
        "dev-1-0-0": True,
        "dev-1-1-0": False,
        "dev-1-2-0": "True",
        "dev-1-0-1": "False",
        "dev-2-0-0": True,
        "dev-2-1-0": False,
        "dev-3-0-0": 1,
        "dev-9-0-0": True,  # extra predictions are ignored, as in the reference
    }
    scores = nlvr_scores(preds, labels)
    assert scores["acc"] == pytest.approx(500.0 / 7)  # 5 of 7 right
    assert scores["consistency"] == pytest.approx(50.0)  # 2 of 4 groups all right
    assert scores["n"] == 7


def test_nlvr_missing_predictions_raise_not_exit():
    with pytest.raises(VlpetError, match=r"2 of 3 .*'dev-1-1-0', 'dev-1-2-0'"):
        nlvr_scores({"dev-1-0-0": True}, {"dev-1-0-0": 1, "dev-1-1-0": 0, "dev-1-2-0": 1})


def test_nlvr_unreadable_prediction_names_the_example():
    with pytest.raises(VlpetError, match="dev-1-0-0.*maybe"):
        nlvr_scores({"dev-1-0-0": "maybe"}, {"dev-1-0-0": 1})


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, True), (False, False), (1, True), (0, False), ("True", True), (" false ", False), ("1", True)],
)
def test_parse_bool(value, expected):
    assert parse_bool(value) is expected


@pytest.mark.parametrize("value", ["yes", 2, None, 0.5])
def test_parse_bool_rejects_other_values(value):
    with pytest.raises(ValueError):
        parse_bool(value)
