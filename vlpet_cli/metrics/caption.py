"""Caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, optional SPICE) from pycocoevalcap's scorers.

The scorers are called one by one (pycocoevalcap's COCOEvalCap.evaluate() always runs SPICE, which downloads
Stanford CoreNLP at first use). Text is tokenised like coco-caption: the Java Stanford PTBTokenizer, lower-cased,
with punctuation tokens removed. Without Java a pure-Python approximation is used and a warning says so.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

from vlpet_cli.errors import VlpetError
from vlpet_cli.metrics import preview_ids

CAPTION_METRICS: tuple[str, ...] = ("cider", "bleu", "bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rougel", "spice")
"""The caption metrics a captioning task offers ('bleu' is shorthand for bleu1..bleu4)."""
SCORERS: tuple[str, ...] = ("bleu", "meteor", "rouge", "cider", "spice")
TOKENIZERS: tuple[str, ...] = ("auto", "ptb", "python")
K = TypeVar("K", bound=Hashable)  # a caption id: tokenising keeps the caller's ids
_SCORER_ALIASES = {
    "bleu1": "bleu",
    "bleu2": "bleu",
    "bleu3": "bleu",
    "bleu4": "bleu",
    "rougel": "rouge",
    "rouge_l": "rouge",
}

# Tokens coco-caption's PTBTokenizer wrapper removes after tokenising. Brackets become -lrb-/-rrb-/... under
# -lowerCase, which no longer match the upper-case entries of that list, so (as in coco-caption) they stay.
PTB_REMOVED_TOKENS: frozenset[str] = frozenset(
    {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
)
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_SPLIT_SYMBOLS = re.compile(r"([?!]+|[;$%&+])")
_COMMA_OR_COLON = re.compile(r"(?<!\d)([,:])|([,:])(?!\d)")
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_CLITIC_TAILS = frozenset({"s", "re", "ve", "ll", "d", "m"})
# Common abbreviations whose period PTB keeps (a small subset of its list).
# fmt: off
_ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "ft", "mt", "vs", "etc", "sgt", "gen", "lt", "col", "capt",
    "rev", "ave", "blvd", "inc", "ltd", "corp", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept",
    "oct", "nov", "dec",
})
# fmt: on


def java_available() -> bool:
    """True when a `java` executable is on PATH (PTB tokenizer, METEOR and SPICE need it)."""
    return shutil.which("java") is not None


def _split_word(word: str) -> list[str]:
    """PTB-like split of one whitespace token: edge quotes and hyphens, a final period, clitics."""
    head: list[str] = []
    tail: list[str] = []
    while word.startswith("-") and len(word) > 1 and word.strip("-"):
        head.append("-")
        word = word[1:]
    while word.endswith("-") and len(word) > 1 and word.strip("-"):
        tail.insert(0, "-")
        word = word[:-1]
    while word.startswith("'") and word[1:] not in _CLITIC_TAILS and len(word) > 1:
        head.append("'")
        word = word[1:]
    while word.endswith("'") and len(word) > 1:
        tail.insert(0, "'")
        word = word[:-1]
    if word.endswith(".") and len(word) > 1 and "." not in word[:-1] and word[:-1] not in _ABBREVIATIONS:
        tail.insert(0, ".")
        word = word[:-1]
    match = _CLITIC.match(word)
    body = [match.group(1), match.group(2)] if match else [word]
    return head + body + tail


def simple_tokenize(text: str) -> str:
    """Pure-Python stand-in for the PTB tokenizer + punctuation removal used by coco-caption.

    Lower-cases; splits off runs of ? and !, ; $ % & +, commas and colons (not inside numbers like 1,000 or
    3:30), a word's final period (kept in "u.s." and common abbreviations such as "mr." "st." "ft."), edge
    quotes and hyphens, and the clitics n't 's 're 've 'll 'd 'm ("don't" -> "do n't"); turns brackets into
    -lrb- -rrb- -lsb- -rsb- -lcb- -rcb- (which coco-caption keeps); drops double quotes, backticks and the
    tokens PTB removes. It differs from Java PTB on rarer cases (other abbreviations, odd symbol runs).
    """
    text = text.lower().replace('"', " ").replace("`", " ")
    for bracket, name in _BRACKETS.items():
        text = text.replace(bracket, f" {name} ")
    text = text.replace("...", " ... ")
    text = _SPLIT_SYMBOLS.sub(r" \1 ", text)
    text = _COMMA_OR_COLON.sub(lambda m: f" {m.group(1) or m.group(2)} ", text)
    bracket_names = set(_BRACKETS.values())
    tokens = [
        piece for word in text.split() for piece in ([word] if word in bracket_names else _split_word(word))
    ]
    return " ".join(tok for tok in tokens if tok not in PTB_REMOVED_TOKENS and not set(tok) <= {"-"})


def tokenize_python(captions: Mapping[K, Sequence[str]]) -> dict[K, list[str]]:
    """Tokenise every caption with `simple_tokenize`, keeping ids and order."""
    return {key: [simple_tokenize(c) for c in caps] for key, caps in captions.items()}


def tokenize_ptb(captions: Mapping[K, Sequence[str]]) -> dict[K, list[str]]:
    """Tokenise with pycocoevalcap's PTBTokenizer (Java), keeping ids and order; errors become VlpetError."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # Java reads one caption per line: collapse all whitespace (line breaks included) to single spaces, and
    # keep empty captions out of its input (they tokenise to "" anyway).
    flat = {(key, i): " ".join(c.split()) for key, caps in captions.items() for i, c in enumerate(caps)}
    wrapped = {slot: [{"caption": text}] for slot, text in flat.items() if text}
    tokenized: dict[Any, list[str]] = {}
    if wrapped:
        with tempfile.TemporaryFile() as err:
            try:
                with _stderr_to(err):
                    tokenized = PTBTokenizer().tokenize(wrapped)
            except OSError as exc:
                raise VlpetError(
                    f"the Java PTB tokenizer could not run ({exc}); fix Java or use tokenizer='python'"
                ) from None
            err.seek(0)
            java_log = err.read().decode(errors="replace").strip()
        lost = [slot for slot in wrapped if len(tokenized.get(slot, [])) != 1]
        if lost:
            raise VlpetError(
                f"the Java PTB tokenizer returned no line for {len(lost)} caption(s)"
                + (f" (java said: {java_log[-500:]})" if java_log else "")
                + "; check the Java installation or use tokenizer='python'"
            )
    out: dict[K, list[str]] = {key: [] for key in captions}
    for slot, text in flat.items():
        out[slot[0]].append(tokenized[slot][0] if text else "")
    return out


@contextlib.contextmanager
def _stderr_to(target: IO[bytes]) -> Iterator[None]:
    """Redirect the process-level stderr (fd 2) to a file, to keep Java's progress line off the terminal."""
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(target.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def resolve_tokenizer(tokenizer: str) -> str:
    """Pick "ptb" or "python": "auto" means PTB when Java is on PATH; asking for "ptb" without Java is an error."""
    if tokenizer not in TOKENIZERS:
        raise VlpetError(f"unknown caption tokenizer {tokenizer!r}; choose one of: {', '.join(TOKENIZERS)}")
    if tokenizer == "python":
        return "python"
    if java_available():
        return "ptb"
    if tokenizer == "ptb":
        raise VlpetError(
            "tokenizer='ptb' needs Java: install a JRE so that `java` is on PATH, or use 'python'"
        )
    warnings.warn(
        "Java is not on PATH: captions are tokenised with vlpet's pure-Python approximation of the PTB "
        "tokenizer, so scores may differ slightly from coco-caption's; install Java for exact scores",
        UserWarning,
        stacklevel=3,
    )
    return "python"


def spice_problem() -> str | None:
    """Why SPICE cannot run here (no Java, or no Stanford CoreNLP 3.6.0 jars next to SPICE), or None if it can."""
    if not java_available():
        return "SPICE needs Java: install a JRE so that `java` is on PATH"
    import pycocoevalcap

    lib = Path(next(iter(pycocoevalcap.__path__))) / "spice" / "lib"
    needed = [lib / "stanford-corenlp-3.6.0.jar", lib / "stanford-corenlp-3.6.0-models.jar"]
    absent = [p.name for p in needed if not p.is_file()]
    if absent:
        return (
            f"SPICE needs {', '.join(absent)} in {lib}, and vlpet never downloads at run time; on a machine with "
            "network run `python -m pycocoevalcap.spice.get_stanford_models` once (it fetches Stanford CoreNLP "
            "3.6.0, several hundred MB) or copy the two jars there"
        )
    return None


def _normalise_scorers(metrics: Iterable[str], spice: bool) -> list[str]:
    """Map requested names (bleu, bleu1..4, meteor, rouge/rougel, cider, spice) to scorer names, in order."""
    chosen: list[str] = []
    for name in metrics:
        key = _SCORER_ALIASES.get(str(name).lower(), str(name).lower())
        if key not in SCORERS:
            raise VlpetError(
                f"unknown caption metric {name!r}; valid: bleu, bleu1..bleu4, meteor, rouge (rougel), cider, spice"
            )
        if key not in chosen:
            chosen.append(key)
    if spice and "spice" not in chosen:
        chosen.append("spice")
    return chosen


def _check_inputs(predictions: Mapping[K, str], references: Mapping[K, Sequence[str]]) -> None:
    """Same ids on both sides, one string per prediction, at least one string reference per id."""
    if not predictions:
        raise VlpetError("no caption predictions to score")
    extra = [k for k in predictions if k not in references]
    if extra:
        raise VlpetError(f"{len(extra)} caption prediction(s) have no references: ids {preview_ids(extra)}")
    missing = [k for k in references if k not in predictions]
    if missing:
        raise VlpetError(
            f"{len(missing)} of {len(references)} images with references have no prediction: ids "
            f"{preview_ids(missing)}"
        )
    for key, pred in predictions.items():
        if not isinstance(pred, str):
            raise VlpetError(f"caption prediction for id {key!r} is {pred!r}, not a string")
        refs = references[key]
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise VlpetError(f"references for id {key!r} must be a non-empty list of strings, got {refs!r}")


def _run_bleu(gts: dict, res: dict) -> dict[str, float]:
    """BLEU-1..4 (pycocoevalcap Bleu(4), 'closest' reference length)."""
    from pycocoevalcap.bleu.bleu import Bleu

    scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {f"bleu{i + 1}": float(s) for i, s in enumerate(scores)}


def _run_meteor(gts: dict, res: dict) -> dict[str, float]:
    """METEOR 1.5 through pycocoevalcap's Java wrapper; a crashed Java process becomes a VlpetError."""
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        score, _ = scorer.compute_score(gts, res)
    except (ValueError, OSError) as exc:
        raise VlpetError(f"METEOR (Java) failed: {exc}; check that Java can start with -Xmx2G") from None
    finally:
        _close_meteor(scorer)
    return {"meteor": float(score)}


def _close_meteor(scorer: Any) -> None:
    """Stop pycocoevalcap's METEOR Java process and close its pipes (its own __del__ leaves them open)."""
    if scorer.lock.locked():  # left held when the Java side died mid-call
        scorer.lock.release()
    process = scorer.meteor_p
    process.kill()
    process.wait()
    for pipe in (process.stdin, process.stdout, process.stderr):
        if pipe is not None:
            pipe.close()


def _run_rouge(gts: dict, res: dict) -> dict[str, float]:
    """ROUGE-L (beta 1.2) from pycocoevalcap."""
    from pycocoevalcap.rouge.rouge import Rouge

    score, _ = Rouge().compute_score(gts, res)
    return {"rougel": float(score)}


def _run_cider(gts: dict, res: dict) -> dict[str, float]:
    """CIDEr-D (n=4, sigma=6, IDF from the evaluated references) from pycocoevalcap."""
    from pycocoevalcap.cider.cider import Cider

    score, _ = Cider().compute_score(gts, res)
    return {"cider": float(score)}


def _run_spice(gts: dict, res: dict) -> dict[str, float]:
    """SPICE from pycocoevalcap, only when Java and the CoreNLP jars are present."""
    problem = spice_problem()
    if problem:
        raise VlpetError(problem)
    from pycocoevalcap.spice.spice import Spice

    try:
        score, _ = Spice().compute_score(gts, res)
    except (subprocess.CalledProcessError, OSError) as exc:
        raise VlpetError(f"SPICE (Java) failed: {exc}; it needs about 8 GB of memory for Java") from None
    return {"spice": float(score)}


_RUNNERS: dict[str, Callable[[dict, dict], dict[str, float]]] = {
    "bleu": _run_bleu,
    "meteor": _run_meteor,
    "rouge": _run_rouge,
    "cider": _run_cider,
    "spice": _run_spice,
}


def _tokenized(predictions: Mapping[K, str], references: Mapping[K, Sequence[str]],
               used: str) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(references, predictions) tokenised with "ptb" or "python", keyed "0", "1", ... in the order of
    `predictions`: internal string keys keep the scorers happy (SPICE sorts ids; Java tools see them as text)."""
    keys = {key: str(i) for i, key in enumerate(predictions)}
    raw = {f"r{keys[k]}": list(references[k]) for k in predictions}
    raw.update({f"p{keys[k]}": [predictions[k]] for k in predictions})
    tokenized = tokenize_ptb(raw) if used == "ptb" else tokenize_python(raw)
    return ({keys[k]: tokenized[f"r{keys[k]}"] for k in predictions},
            {keys[k]: tokenized[f"p{keys[k]}"] for k in predictions})


def caption_scores(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    metrics: Iterable[str] = ("bleu", "meteor", "rouge", "cider"),
    spice: bool = False,
    tokenizer: str = "auto",
) -> dict[str, Any]:
    """Score one caption per id against its references with pycocoevalcap's scorers, called one by one.

    Returns bleu1..bleu4, meteor, rougel, cider (and spice if asked) on the scorers' raw scale (CIDEr ~1.2,
    not x100), plus "tokenizer" ("ptb" or "python") and "n" (number of images).
    """
    scorers = _normalise_scorers(metrics, spice)
    _check_inputs(predictions, references)
    for name in scorers:  # fail before the slow parts, not after them
        if name == "meteor" and not java_available():
            raise VlpetError(
                "METEOR needs Java: install a JRE so that `java` is on PATH, or leave meteor out"
            )
        if name == "spice" and (problem := spice_problem()):
            raise VlpetError(problem)
    used = resolve_tokenizer(tokenizer)
    gts, res = _tokenized(predictions, references, used)
    out: dict[str, Any] = {}
    for name in scorers:
        out.update(_RUNNERS[name](gts, res))
    out["tokenizer"] = used
    out["n"] = len(predictions)
    return out


def computable_metrics(metrics: Sequence[str], explicit: bool) -> list[str]:
    """The caption metrics to compute: without Java, METEOR is dropped from defaults with one warning (asked for
    by name, it stays, and the scorer says that it needs Java)."""
    if "meteor" in metrics and not explicit and not java_available():
        warnings.warn("Java is not on PATH: METEOR is left out (install Java to get it)", UserWarning,
                      stacklevel=3)
        return [m for m in metrics if m != "meteor"]
    return list(metrics)


def scaled_caption_scores(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]],
                          metrics: Sequence[str], explicit: bool, tokenizer: str = "auto") -> dict[str, Any]:
    """The caption metrics of a task (bleu1..bleu4, meteor, rougel, cider, spice; `computable_metrics` decides
    about METEOR) x100, in the order given, with "tokenizer" and "n" as `caption_scores` reports them."""
    wanted = computable_metrics(metrics, explicit)
    raw = caption_scores(predictions, references, metrics=wanted, tokenizer=tokenizer)
    return {**{m: 100.0 * raw[m] for m in wanted}, "tokenizer": raw["tokenizer"], "n": raw["n"]}


def cider_per_caption(predictions: Mapping[K, str], references: Mapping[K, Sequence[str]],
                      tokenizer: str = "auto") -> dict[K, float]:
    """Each caption's own CIDEr-D x100 against its references (pycocoevalcap's per-image scores, the IDF taken
    from all the references given, so their mean is the corpus CIDEr that `caption_scores` reports)."""
    from pycocoevalcap.cider.cider import Cider

    _check_inputs(predictions, references)
    used = resolve_tokenizer(tokenizer)
    gts, res = _tokenized(predictions, references, used)
    _, scores = Cider().compute_score(gts, res)
    return {key: 100.0 * float(s) for key, s in zip(predictions, scores)}
