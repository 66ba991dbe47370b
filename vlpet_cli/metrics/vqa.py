"""VQA accuracy as the official VQA v2 evaluation computes it (spec/pipeline.md §5.1).

Answers are normalised with the official rules (punctuation, number words, articles, contractions) and a
prediction scores, per question, the mean over the GT answers g of min(1, #{other GT answers == prediction} / 3).
Two variants exist: "reference" (the vqaEval.py copy in LXMERT/VL-T5/VL-PET, default for parity) and "official"
(the later GT-Vision-Lab revision). The caller's GT data is never modified.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Literal

from vlpet_cli.errors import VlpetError
from vlpet_cli.metrics import preview_ids
from vlpet_cli.metrics.accuracy import soft_score_accuracy

Variant = Literal["reference", "official"]
VARIANTS: tuple[str, ...] = ("reference", "official")

# fmt: off
# Characters processPunctuation deletes or turns into a space.
PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)
# A comma between digits ("1,000") anywhere in the answer makes every punctuation mark a deletion.
COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
# Kept verbatim from the official script: "(?!<=" is a typo for "(?<!", so this is a lookahead that never
# fires at a period, and the rule in effect is "delete every period not followed by a digit".
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
# The official script passes re.UNICODE (== 32) positionally to Pattern.sub, where it means count=32.
_PERIOD_STRIP_COUNT = int(re.UNICODE)

NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# The official evaluation's contraction table, including its oddities: keys with capitals ("Im", "Ive") can
# never match after lower-casing, and "somebody'd" maps to "somebodyd" (the wrong way round).
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
# fmt: on


def clean_whitespace(text: str) -> str:
    """Turn newlines and tabs into spaces and strip, as the official script does before anything else."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """Official processPunctuation: delete or space out punctuation marks, then drop periods not before a digit."""
    has_number_comma = COMMA_IN_NUMBER.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        # The tests look at the original text, not at the text already edited for earlier marks.
        if mark + " " in text or " " + mark in text or has_number_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """Official processDigitArticle: lower-case, number words to digits, drop articles, expand contractions."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(text: str) -> str:
    """Fully normalise one answer: whitespace, punctuation, then digits/articles/contractions."""
    return process_digit_article(process_punctuation(clean_whitespace(text)))


def _answer_strings(answers: Sequence[Any], qid: Hashable) -> list[str]:
    """Read GT answers given as strings or as official {"answer": str, ...} dicts (copies, never the originals)."""
    out = []
    for answer in answers:
        value = answer.get("answer") if isinstance(answer, Mapping) else answer
        if not isinstance(value, str):
            raise VlpetError(
                f"VQA question {qid!r}: GT answer {answer!r} is not a string or an {{'answer': str}} record; "
                "fix the annotation file"
            )
        out.append(value)
    return out


def _prepare(prediction: str, gts: list[str], variant: str) -> tuple[str, list[str]]:
    """Apply the variant's normalisation to a prediction and its GT answers."""
    if variant == "reference":
        # VL-T5/LXMERT copy: prediction always fully normalised; GTs get punctuation only, and only if they differ.
        pred = normalize_answer(prediction)
        if len(set(gts)) > 1:
            gts = [process_punctuation(g) for g in gts]
        return pred, gts
    if variant == "official":
        # Later GT-Vision-Lab revision: both sides get whitespace cleaning, and the full rules only if GTs differ.
        pred = clean_whitespace(prediction)
        gts = [clean_whitespace(g) for g in gts]
        if len(set(gts)) > 1:
            pred = process_digit_article(process_punctuation(pred))
            gts = [process_digit_article(process_punctuation(g)) for g in gts]
        return pred, gts
    raise VlpetError(f"unknown VQA evaluation variant {variant!r}; choose one of: {', '.join(VARIANTS)}")


def leave_one_out_accuracy(prediction: str, gts: Sequence[str]) -> float:
    """Mean over GT answers g of min(1, matches among the other answers / 3); 2 of 10 matching gives 0.6."""
    if not gts:
        return 0.0
    total = sum(1 for g in gts if g == prediction)
    # Leaving out answer i removes one match exactly when answer i itself matches.
    return sum(min(1.0, (total - (g == prediction)) / 3.0) for g in gts) / len(gts)


def question_accuracy(prediction: str, answers: Sequence[Any], variant: Variant = "reference") -> float:
    """VQA accuracy (0..1) of one predicted answer against its GT answers (strings or {"answer": ...} dicts)."""
    if not isinstance(prediction, str):
        raise VlpetError(f"VQA prediction {prediction!r} is not a string")
    pred, gts = _prepare(prediction, _answer_strings(answers, "?"), variant)
    return leave_one_out_accuracy(pred, gts)


def _percent_by_group(scores: Mapping[Hashable, float], groups: Mapping[Hashable, str]) -> dict[str, float]:
    """Mean score x100 per group name, for the questions that have a group."""
    buckets: dict[str, list[float]] = {}
    for qid, score in scores.items():
        if qid in groups:
            buckets.setdefault(groups[qid], []).append(score)
    return {name: 100.0 * sum(vals) / len(vals) for name, vals in buckets.items()}


def vqa_accuracy(
    predictions: Mapping[Hashable, str],
    annotations: Mapping[Hashable, Mapping[str, Any]],
    variant: str = "reference",
) -> dict[str, Any]:
    """Score predicted answers against annotation records {"answers", "answer_type", "question_type"}.

    Returns overall (x100, unrounded), overall_2dp (as the official script reports it), per_answer_type and
    per_question_type (x100), per_question (0..1) and n. Only predicted questions are scored, as in the reference.
    """
    if not predictions:
        raise VlpetError("no VQA predictions to score")
    unknown = [qid for qid in predictions if qid not in annotations]
    if unknown:
        raise VlpetError(
            f"{len(unknown)} VQA prediction(s) have no annotation: question ids {preview_ids(unknown)}; "
            "use the annotation file of the split that was predicted"
        )
    per_question: dict[Hashable, float] = {}
    answer_types: dict[Hashable, str] = {}
    question_types: dict[Hashable, str] = {}
    for qid, prediction in predictions.items():
        record = annotations[qid]
        if not isinstance(prediction, str):
            raise VlpetError(f"VQA prediction for question {qid!r} is {prediction!r}, not a string")
        answers = record.get("answers")
        if not isinstance(answers, Sequence) or isinstance(answers, str) or not answers:
            raise VlpetError(
                f"VQA annotation for question {qid!r} has no 'answers' list; use the official VQA v2 annotations"
            )
        pred, gts = _prepare(prediction, _answer_strings(answers, qid), variant)
        per_question[qid] = leave_one_out_accuracy(pred, gts)
        if "answer_type" in record:
            answer_types[qid] = str(record["answer_type"])
        if "question_type" in record:
            question_types[qid] = str(record["question_type"])
    overall = 100.0 * sum(per_question.values()) / len(per_question)
    return {
        "overall": overall,
        "overall_2dp": round(overall, 2),
        "per_answer_type": _percent_by_group(per_question, answer_types),
        "per_question_type": _percent_by_group(per_question, question_types),
        "per_question": per_question,
        "n": len(per_question),
    }


def topk_score(predictions: Mapping[Hashable, str], labels: Mapping[Hashable, Mapping[str, Any]]) -> float:
    """The reference's "topk score" x100: mean of label[prediction] (soft score, exact match, 0 if absent).

    `labels` maps question id to its {answer: score} dict, or to a record that has one under "label".
    """
    return soft_score_accuracy(predictions, labels, task="VQA")
