"""VQA v2 on the Karpathy split (spec/pipeline.md §1.1, §3.3): records, official answers, sampled targets."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from vlpet_cli.data.tasks.base import (
    Record,
    RecordRef,
    Task,
    get_field,
    read_json,
    read_label,
    read_record_list,
    sample_answer,
)
from vlpet_cli.errors import DataError

OFFICIAL_ANNOTATIONS = ("v2_mscoco_train2014_annotations.json", "v2_mscoco_val2014_annotations.json")


def _answer_list(value: Any, ref: RecordRef, field: str) -> list[str]:
    """Answers given as strings or as official {"answer": ...} objects, as a list of strings."""
    if not isinstance(value, list):
        raise ref.error(f"field '{field}' should be a list of answers, found {type(value).__name__}")
    out = []
    for k, a in enumerate(value):
        if isinstance(a, dict) and isinstance(a.get("answer"), str):
            out.append(a["answer"])
        elif isinstance(a, str):
            out.append(a)
        else:
            raise ref.error(f"field '{field}' item {k} should be a string or an object with 'answer', "
                            f"found {a!r:.60}")
    return out


def load_official_answers(vqa_dir: Path, question_ids: set) -> dict[Any, dict]:
    """question_id -> {answers, answer_type, question_type} from the official annotation files present."""
    found: dict[Any, dict] = {}
    for name in OFFICIAL_ANNOTATIONS:
        path = vqa_dir / name
        if not path.is_file():
            continue
        data = read_json(path, "VQA annotation file", "re-download the official VQA v2 annotations")
        anns = data.get("annotations") if isinstance(data, dict) else None
        if not isinstance(anns, list):
            raise DataError(f"{path}: expected an object with an 'annotations' list. "
                            f"Fix: re-download the official VQA v2 annotations.")
        for i, ann in enumerate(anns):
            ref = RecordRef(path, i, ann, "question_id")
            qid = get_field(ann, "question_id", (int, str), ref)
            if qid not in question_ids:
                continue
            found[qid] = {
                "answers": _answer_list(get_field(ann, "answers", (list,), ref), ref, "answers"),
                "answer_type": get_field(ann, "answer_type", (str,), ref, required=False),
                "question_type": get_field(ann, "question_type", (str,), ref, required=False),
            }
    return found


class VqaTask(Task):
    """VQA v2: 'vqa: ' + question -> answer sampled ∝ score, loss weighted by that score."""

    name = "vqa"
    folder = "vqa"
    default_prompt = "vqa: "
    splits: ClassVar[dict[str, str]] = {"train": "karpathy_train", "val": "karpathy_val", "test": "karpathy_test"}
    input_max_length = 20
    target_max_length = 10
    loss_reduction = "example"

    def feature_source(self, split_name: str) -> str:
        """Every VQA image is a COCO image."""
        return "COCO"

    def missing_file_fix(self) -> str:
        return ("check --data-root: it must contain vqa/karpathy_{train,val,test}.json "
                "(VL-T5's VQA Karpathy split files)")

    def read_split(self, data_root: Path, name: str, for_eval: bool) -> list[Record]:
        """Read vqa/<name>.json; for evaluation, join the 10 official answers by question_id."""
        path = self.split_path(data_root, name)
        raw = read_record_list(path, "VQA split file", self.missing_file_fix())
        source = self.feature_source(name)
        parsed = []
        for i, r in enumerate(raw):
            ref = RecordRef(path, i, r, "question_id")
            qid = get_field(r, "question_id", (int, str), ref)
            img_id = get_field(r, "img_id", (str,), ref)
            sent = get_field(r, "sent", (str,), ref, required=False)
            if sent is None:
                sent = get_field(r, "question", (str,), ref, required=False)
            if sent is None:
                raise ref.error("field 'sent' (the question) is missing")
            label = read_label(r, ref, required=not for_eval)
            answers = r.get("answers")
            parsed.append((ref, qid, img_id, sent, label, answers, r))

        official = load_official_answers(path.parent, {p[1] for p in parsed}) if for_eval else {}
        records = []
        for ref, qid, img_id, sent, label, answers, r in parsed:
            extra = None
            if for_eval:
                gt = official.get(qid)
                if gt is None and answers is not None:
                    gt = {"answers": _answer_list(answers, ref, "answers")}
                if gt is None:
                    raise ref.error(
                        "evaluation needs the 10 official answers, but the record has no 'answers' and its "
                        "question_id is not in vqa/v2_mscoco_{train,val}2014_annotations.json",
                        "put the official VQA v2 annotation files in vqa/ or add 'answers' to the records")
                extra = {
                    "answers": gt["answers"],
                    "answer_type": gt.get("answer_type") or get_field(r, "answer_type", (str,), ref,
                                                                      required=False),
                    "question_type": gt.get("question_type") or get_field(r, "question_type", (str,), ref,
                                                                          required=False),
                    "is_topk_optimal": get_field(r, "is_topk_optimal", (bool,), ref, required=False),
                }
            records.append(Record(str(path), ref.index, qid, sent, (img_id,), source, label, extra))
        return records

    def target(self, record: Record, rng: Any, train: bool) -> tuple[str, float] | None:
        """Answer sampled ∝ score (train) or the best answer (eval); weight = its score."""
        return sample_answer(record.label, rng, train)

    def eval_info(self, record: Record) -> dict:
        """question_id, image, question, soft label and (for eval splits) the official answers."""
        info = {"question_id": record.id, "img_id": record.image_ids[0], "sent": record.text,
                "label": record.label}
        info.update(record.extra or {})
        return info
