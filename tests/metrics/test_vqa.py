"""VQA accuracy: official answer normalisation and the leave-one-out min(1, n/3) score (spec/pipeline.md §5.1).

Golden values are computed by hand from the rules of the official VQA v2 evaluation script (vqaEval.py).
"""

import copy

import pytest

from vlpet_cli.errors import VlpetError
from vlpet_cli.metrics.vqa import (
    leave_one_out_accuracy,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    question_accuracy,
    topk_score,
    vqa_accuracy,
)


def official_answers(*answers: str) -> list[dict]:
    """GT answers as the official annotation file stores them (unique answer_id per annotator)."""
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]


# ------------------------------------------------------------------ processPunctuation


def test_punctuation_next_to_space_is_deleted():
    # "," is followed by a space, so it is deleted rather than turned into a space.
    assert process_punctuation("yes, it is") == "yes it is"


def test_punctuation_not_next_to_space_becomes_space():
    assert process_punctuation("black,white") == "black white"
    assert process_punctuation("x-ray") == "x ray"


def test_comma_in_number_deletes_every_mark():
    assert process_punctuation("1,000") == "1000"
    # A number comma anywhere switches every mark of the answer to deletion.
    assert process_punctuation("x-ray 1,000") == "xray 1000"


def test_each_mark_is_judged_on_the_original_text():
    # "?" is next to a space only in the original text ("? "), "/" never is.
    assert process_punctuation("a/b? c") == "a b c"


def test_period_rule_keeps_periods_before_digits_only():
    assert process_punctuation("3.5") == "3.5"
    assert process_punctuation(".5") == ".5"
    assert process_punctuation("st. louis") == "st louis"
    assert process_punctuation("a.b") == "ab"


def test_period_regex_typo_is_kept():
    # The official "(?!<=\d)" is a lookahead typo: a period after a digit is still stripped. A correct
    # lookbehind "(?<!\d)" would have kept "2." unchanged.
    assert process_punctuation("2.") == "2"


# ------------------------------------------------------------------ processDigitArticle


def test_number_words_become_digits():
    assert process_digit_article("Two Dogs") == "2 dogs"
    assert process_digit_article("none") == "0"
    assert process_digit_article("ten") == "10"
    assert process_digit_article("eleven") == "eleven"


def test_articles_are_dropped():
    assert process_digit_article("the cat") == "cat"
    assert process_digit_article("an apple a day") == "apple day"


def test_contractions_table():
    assert process_digit_article("dont") == "don't"
    assert process_digit_article("isnt") == "isn't"
    assert process_digit_article("whats up") == "what's up"
    assert process_digit_article("oclock") == "o'clock"
    # Table quirks kept: capitalised keys never match after lower-casing, one entry is inverted.
    assert process_digit_article("Im") == "im"
    assert process_digit_article("somebody'd") == "somebodyd"


def test_normalize_answer_does_everything():
    assert normalize_answer("  The Two\tdogs!\n") == "2 dogs"


# ------------------------------------------------------------------ accuracy


@pytest.mark.parametrize(
    ("matching", "expected"),
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)],
)
def test_leave_one_out_average(matching, expected):
    # 2 of 10: the 2 matching annotators see 1 other match (1/3), the 8 others see 2 (2/3):
    # (2 * 1/3 + 8 * 2/3) / 10 = 0.6, not min(1, 2/3) = 0.667.
    gts = ["yes"] * matching + ["no"] * (10 - matching)
    assert leave_one_out_accuracy("yes", gts) == pytest.approx(expected)


def test_reference_variant_normalises_prediction_even_when_gts_agree():
    gts = official_answers(*["dog"] * 10)
    # Reference (VL-T5): prediction always normalised -> "dog" matches all 10.
    assert question_accuracy("the dog", gts, variant="reference") == pytest.approx(1.0)
    # Official revision: identical GTs mean no normalisation at all -> "the dog" matches nothing.
    assert question_accuracy("the dog", gts, variant="official") == pytest.approx(0.0)


def test_reference_variant_gives_gts_punctuation_only():
    gts = official_answers(*["two"] * 8, "2", "2")
    # Reference: GTs keep "two" (no digit mapping), so "2" matches 2 annotators -> 0.6.
    assert question_accuracy("2", gts, variant="reference") == pytest.approx(0.6)
    # Official: GTs differ, so all go through both functions -> ten "2" -> 1.0.
    assert question_accuracy("2", gts, variant="official") == pytest.approx(1.0)


def test_gt_punctuation_applies_when_gts_differ():
    gts = official_answers(*["black, white"] * 3, *["gray"] * 7)
    # "black, white" -> "black white" on the GT side; the prediction normalises to the same -> 3 matches.
    assert question_accuracy("Black white", gts) == pytest.approx(0.9)


def test_identical_gts_are_compared_raw_in_reference_variant():
    # Known quirk of the reference: the prediction is lower-cased, ten identical "Yes" GTs are not.
    assert question_accuracy("yes", official_answers(*["Yes"] * 10)) == 0.0


def test_plain_string_answers_without_ids_still_leave_one_out():
    # The reference compares answer dicts; with identical dicts (no answer_id) it would drop them all.
    # vlpet leaves out exactly one answer by position, as the official answer_ids make the reference do.
    assert question_accuracy("yes", ["yes"] * 10) == pytest.approx(1.0)


def annotations() -> dict:
    return {
        1: {"answers": official_answers(*["net"] * 10), "answer_type": "other", "question_type": "what is"},
        2: {
            "answers": official_answers("2", "2", *["3"] * 8),
            "answer_type": "number",
            "question_type": "how many",
        },
        3: {"answers": official_answers(*["no"] * 10), "answer_type": "yes/no", "question_type": "is this"},
    }


def test_vqa_accuracy_overall_and_breakdowns():
    result = vqa_accuracy({1: "Net", 2: "two", 3: "yes"}, annotations())
    # 1.0, 0.6 and 0.0 -> 100 * 1.6 / 3 = 53.333...
    assert result["overall"] == pytest.approx(160.0 / 3)
    assert result["overall_2dp"] == 53.33
    assert result["per_answer_type"] == pytest.approx({"other": 100.0, "number": 60.0, "yes/no": 0.0})
    assert result["per_question_type"] == pytest.approx({"what is": 100.0, "how many": 60.0, "is this": 0.0})
    assert result["per_question"] == pytest.approx({1: 1.0, 2: 0.6, 3: 0.0})
    assert result["n"] == 3


def test_vqa_accuracy_scores_only_predicted_questions():
    result = vqa_accuracy({2: "2"}, annotations())
    assert result["overall"] == pytest.approx(60.0)
    assert result["n"] == 1


def test_vqa_accuracy_never_mutates_gt():
    gt = {1: {"answers": official_answers("black, white", "gray", *["black, white"] * 8)}}
    before = copy.deepcopy(gt)
    vqa_accuracy({1: "black white"}, gt)
    vqa_accuracy({1: "black white"}, gt, variant="official")
    assert gt == before


def test_unknown_question_id_is_an_error_naming_it():
    with pytest.raises(VlpetError, match="999"):
        vqa_accuracy({999: "yes"}, annotations())


def test_unknown_variant_is_an_error():
    with pytest.raises(VlpetError, match="reference, official"):
        vqa_accuracy({1: "net"}, annotations(), variant="vl-t5")


def test_topk_score_is_mean_soft_score():
    labels = {1: {"net": 1.0}, 2: {"2": 0.6, "3": 1.0}, 3: {"label": {"no": 1.0}}}
    # exact match only: 1.0 + 0.6 + 0 ("No" is not "no") over 3 -> 53.33
    assert topk_score({1: "net", 2: "2", 3: "No"}, labels) == pytest.approx(160.0 / 3)
