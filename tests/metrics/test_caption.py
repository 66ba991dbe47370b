"""Caption metrics: vlpet's caption_scores must equal pycocoevalcap's own scorers on PTB-tokenised text."""

import shutil
import warnings

import pytest

from vlpet_cli.errors import VlpetError
from vlpet_cli.metrics import caption
from vlpet_cli.metrics.caption import caption_scores, simple_tokenize, spice_problem

needs_java = pytest.mark.skipif(
    shutil.which("java") is None, reason="Java (PTB tokenizer, METEOR) not installed"
)

PREDICTIONS = {
    391895: "A man riding a wave on top of a surfboard.",
    "COCO_val2014_000000522418": "Two dogs playing in the grass!",
    7: "a plate of food, with broccoli (and rice)",
}
REFERENCES = {
    391895: ["A man is surfing on a big wave.", "A surfer rides a wave.", "Man riding a surfboard on a wave"],
    "COCO_val2014_000000522418": [
        "Two dogs play on the lawn.",
        "A pair of dogs running in grass",
        "Dogs playing in a field.",
    ],
    7: ["A plate with broccoli and meat.", "Food on a white plate, with broccoli.", "Broccoli and rice."],
}


def pycocoevalcap_reference(predictions, references):
    """What coco-caption computes: PTB-tokenise gts and res separately, then Bleu(4), Rouge and Cider."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in refs] for k, refs in references.items()})
    res = tok.tokenize({k: [{"caption": c}] for k, c in predictions.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return {
        "bleu1": bleu[0],
        "bleu2": bleu[1],
        "bleu3": bleu[2],
        "bleu4": bleu[3],
        "rougel": rouge,
        "cider": cider,
    }


@needs_java
def test_scores_equal_pycocoevalcap_on_ptb_tokens():
    expected = pycocoevalcap_reference(PREDICTIONS, REFERENCES)
    got = caption_scores(PREDICTIONS, REFERENCES, metrics=("bleu", "rouge", "cider"), tokenizer="ptb")
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert got["tokenizer"] == "ptb"
    assert got["n"] == 3
    assert "meteor" not in got and "spice" not in got
    assert got["cider"] > 0.5  # raw scale (CIDEr-D ~ 0..10), not x100


@needs_java
def test_java_progress_line_stays_off_stderr(capfd):
    caption_scores(PREDICTIONS, REFERENCES, metrics=("bleu",), tokenizer="ptb")
    assert "PTBTokenizer" not in capfd.readouterr().err


@needs_java
def test_ptb_tokenizer_handles_empty_and_multiline_captions():
    got = caption.tokenize_ptb({"a": ["", "Two\nlines, here."], "b": ["\n"]})
    assert got == {"a": ["", "two lines here"], "b": [""]}


def test_fallback_tokenizer_case_and_punctuation():
    assert simple_tokenize("A MAN riding a wave, on a surfboard.") == "a man riding a wave on a surfboard"
    assert simple_tokenize("Don't stop: the black-and-white cat!") == "do n't stop the black-and-white cat"
    assert simple_tokenize('The man\'s "red" hat -- 1,000 $5 (big)') == (
        "the man 's red hat 1,000 $ 5 -lrb- big -rrb-"
    )
    assert simple_tokenize("Mr. Smith at 3:30; in the U.S.") == "mr. smith at 3:30 in the u.s."
    assert simple_tokenize("dogs' bowls... really?") == "dogs bowls really"
    # PTB keeps runs like "?!" as one token, which is not in coco-caption's removal list.
    assert simple_tokenize("really?!") == "really ?!"


@needs_java
def test_fallback_tokenizer_agrees_with_ptb_on_typical_captions():
    captions = [
        "A man riding a wave on top of a surfboard.",
        "Two dogs' toys on the floor",
        "A train at 3:30 pm, near the station.",
        "a pizza with cheese , olives and peppers .",
        "It's a black-and-white photo of a cat (sleeping)!",
        "Mr. Smith can't find the U.S.A. map...",
        'A sign says "STOP" -- and a car waits; 50% off $5 items',
        "tennis-player swings racket",
    ]
    ptb = caption.tokenize_ptb({i: [c] for i, c in enumerate(captions)})
    assert [simple_tokenize(c) for c in captions] == [ptb[i][0] for i in range(len(captions))]


def test_python_tokenizer_matches_scorers_on_its_tokens():
    from pycocoevalcap.cider.cider import Cider

    got = caption_scores(PREDICTIONS, REFERENCES, metrics=("cider",), tokenizer="python")
    gts = {k: [simple_tokenize(c) for c in refs] for k, refs in REFERENCES.items()}
    res = {k: [simple_tokenize(c)] for k, c in PREDICTIONS.items()}
    assert got["cider"] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-12)
    assert got["tokenizer"] == "python"


def test_without_java_auto_falls_back_with_a_warning(monkeypatch):
    monkeypatch.setattr(caption, "java_available", lambda: False)
    with pytest.warns(UserWarning, match="may differ slightly"):
        got = caption_scores(PREDICTIONS, REFERENCES, metrics=("bleu",))
    assert got["tokenizer"] == "python"
    with pytest.raises(VlpetError, match="needs Java"):
        caption_scores(PREDICTIONS, REFERENCES, metrics=("bleu",), tokenizer="ptb")
    with pytest.raises(VlpetError, match="METEOR needs Java"):
        caption_scores(PREDICTIONS, REFERENCES, metrics=("meteor",), tokenizer="python")


@pytest.mark.slow
@needs_java
def test_meteor_runs_and_rewards_exact_captions():
    refs = {1: ["a man riding a horse on a beach"], 2: ["two dogs playing with a red ball"]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PTB is used: no fallback warning
        got = caption_scores({1: refs[1][0], 2: refs[2][0]}, refs, metrics=("meteor", "bleu"))
    assert got["meteor"] > 0.99  # exact match: only METEOR's tiny one-chunk fragmentation penalty
    assert got["bleu4"] == pytest.approx(1.0)


def test_spice_is_refused_with_a_reason_when_it_cannot_run():
    problem = spice_problem()
    if problem is None:
        pytest.skip("SPICE can run on this machine")
    with pytest.raises(VlpetError, match="SPICE needs"):
        caption_scores(PREDICTIONS, REFERENCES, metrics=("cider",), spice=True)


def test_inputs_are_checked():
    with pytest.raises(VlpetError, match="have no prediction: ids 7"):
        caption_scores({391895: "a man"}, {391895: ["a man"], 7: ["food"]}, metrics=("cider",))
    with pytest.raises(VlpetError, match="have no references"):
        caption_scores({1: "a man", 2: "x"}, {1: ["a man"]}, metrics=("cider",))
    with pytest.raises(VlpetError, match="non-empty list"):
        caption_scores({1: "a man"}, {1: []}, metrics=("cider",))
    with pytest.raises(VlpetError, match="unknown caption metric 'bleurt'"):
        caption_scores({1: "a man"}, {1: ["a man"]}, metrics=("bleurt",))
    with pytest.raises(VlpetError, match="unknown caption tokenizer"):
        caption_scores({1: "a man"}, {1: ["a man"]}, metrics=("cider",), tokenizer="nltk")
