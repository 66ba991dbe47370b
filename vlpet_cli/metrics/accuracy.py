"""Exact-match accuracies: GQA (soft-score labels, no normalisation) and NLVR2 (accuracy and consistency).

Both follow the reference evaluators (spec/pipeline.md §5.2); results are x100.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from typing import Any, TypeVar

from vlpet_cli.errors import VlpetError
from vlpet_cli.metrics import preview_ids

K = TypeVar("K", bound=Hashable)  # a question id, of whatever type predictions and labels share


def _soft_label(value: Mapping[str, Any]) -> Mapping[str, Any]:
    """Accept either a soft-score dict {answer: score} or a whole record carrying one under "label"."""
    inner = value.get("label")
    return inner if isinstance(inner, Mapping) else value


def soft_score_accuracy(
    predictions: Mapping[K, str], labels: Mapping[K, Mapping[str, Any]], task: str = "GQA"
) -> float:
    """Mean of label.get(prediction, 0) x100: exact, case-sensitive match with no normalisation.

    `labels` maps question id to its {answer: score} dict, or to a record that has one under "label".
    """
    if not predictions:
        raise VlpetError(f"no {task} predictions to score")
    unknown = [qid for qid in predictions if qid not in labels]
    if unknown:
        raise VlpetError(
            f"{len(unknown)} {task} prediction(s) have no label: question ids {preview_ids(unknown)}; "
            "use the annotation file of the split that was predicted"
        )
    total = 0.0
    for qid, prediction in predictions.items():
        label = _soft_label(labels[qid])
        total += float(label.get(prediction, 0.0)) if isinstance(prediction, str) else 0.0
    return 100.0 * total / len(predictions)


def gqa_accuracy(predictions: Mapping[K, str], labels: Mapping[K, Mapping[str, Any]]) -> float:
    """GQA accuracy x100 as the reference computes it: label.get(prediction, 0), case-sensitive, unnormalised."""
    return soft_score_accuracy(predictions, labels, task="GQA")


def parse_bool(value: Any) -> bool:
    """Read an NLVR2 label or prediction: True/False, 1/0, or the strings "True"/"False"/"1"/"0"."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "1"):
            return True
        if text in ("false", "0"):
            return False
    raise ValueError(f"{value!r} is not a boolean (expected True/False or 1/0)")


def nlvr_group(identifier: str) -> str:
    """Sentence group of an NLVR2 identifier: its 3rd '-'-separated field (the image pair) blanked.

    "dev-850-0-0" and "dev-850-1-0" share the group "dev-850--0"; "test1-0-1-3" belongs to "test1-0--3".
    """
    parts = str(identifier).split("-")
    if len(parts) < 3:
        raise VlpetError(
            f"NLVR2 identifier {identifier!r} has fewer than 3 '-'-separated fields; "
            "expected split-set-pair-sentence such as 'dev-850-0-0'"
        )
    parts[2] = ""
    return "-".join(parts)


def nlvr_scores(predictions: Mapping[str, Any], labels: Mapping[str, Any]) -> dict[str, float]:
    """NLVR2 accuracy and consistency (fraction of sentence groups all correct), both x100, over all labels.

    Every labelled identifier needs a prediction; extra predictions are ignored, as in the reference.
    """
    if not labels:
        raise VlpetError("no NLVR2 labels to score against")
    missing = [ident for ident in labels if ident not in predictions]
    if missing:
        raise VlpetError(
            f"{len(missing)} of {len(labels)} NLVR2 examples have no prediction: identifiers "
            f"{preview_ids(missing)}; predict the whole split"
        )
    correct = 0
    group_ok: dict[str, bool] = {}
    for ident, label in labels.items():
        try:
            hit = parse_bool(predictions[ident]) == parse_bool(label)
        except ValueError as exc:
            raise VlpetError(f"NLVR2 example {ident!r}: {exc}") from None
        correct += hit
        group = nlvr_group(ident)
        group_ok[group] = group_ok.get(group, True) and hit
    return {
        "acc": 100.0 * correct / len(labels),
        "consistency": 100.0 * sum(group_ok.values()) / len(group_ok),
        "n": len(labels),
    }


def typed_accuracy(rows: Iterable[tuple[Any, Any, str]]) -> dict[str, Any]:
    """Exact-match accuracy x100 of (prediction, answer, type) rows, overall and per type.

    TVQA/How2QA's evaluator (spec/pipeline.md §5.4): a prediction is right when it equals "a{answer_idx}";
    the type is the show (TVQA) or "how2qa"; {"acc", "per_type": {type: acc}, "n"}.
    """
    right: dict[str, int] = {}
    count: dict[str, int] = {}
    for prediction, answer, kind in rows:
        count[kind] = count.get(kind, 0) + 1
        right[kind] = right.get(kind, 0) + int(prediction == answer)
    total = sum(count.values())
    if not total:
        raise VlpetError("no video QA predictions with answers to score")
    return {"acc": 100.0 * sum(right.values()) / total,
            "per_type": {k: 100.0 * right[k] / count[k] for k in sorted(count)}, "n": total}
