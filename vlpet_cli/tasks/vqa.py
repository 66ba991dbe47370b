"""VQA v2 on the Karpathy split (spec/pipeline.md §1.1, §3.3, §5.1): records, official answers, sampled
targets, VQA accuracy, the submission and the predictions/annotation files of `vlpet eval --predictions`; and the
official test2015 / test-dev2015 question files of the VQA v2 server, whose submission answers every test2015
question (`submissions.py`)."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar

from pydantic import field_validator

from vlpet_cli.errors import DataError
from vlpet_cli.tasks import files, submissions
from vlpet_cli.tasks.base import FileScoring, Generate, Inputs, Record, Review, Task, sample_answer
from vlpet_cli.tasks.records import (
    Answers,
    RecordModel,
    SoftLabel,
    answer_list,
    parse_record,
    parse_records,
    read_json,
    record_refs,
    warn_empty,
)

OFFICIAL_ANNOTATIONS = ("v2_mscoco_train2014_annotations.json", "v2_mscoco_val2014_annotations.json")


SPLIT_FILES_FIX = ("check --data-root: it must contain vqa/karpathy_{train,val,test}.json (VL-T5's VQA Karpathy "
                   "split files), and for --split test2015 or test-dev2015 the official "
                   "vqa/v2_OpenEnded_mscoco_test{,-dev}2015_questions.json (visualqa.org)")

class VqaRecord(RecordModel):
    """One record of vqa/karpathy_*.json (VL-T5's format); the question is 'sent' (or 'question')."""

    question_id: int | str
    img_id: str
    sent: str | None = None
    question: str | None = None
    label: SoftLabel | None = None
    answers: Any = None
    answer_type: str | None = None
    question_type: str | None = None
    is_topk_optimal: bool | None = None


class QuestionId(RecordModel):
    """The id of an official annotation, read first so that other questions' records are skipped cheaply."""

    question_id: int | str


class OfficialAnnotation(RecordModel):
    """One record of the official v2_mscoco_*_annotations.json: its 10 answers and types."""

    question_id: int | str
    answers: Answers
    answer_type: str | None = None
    question_type: str | None = None

    @field_validator("answers")
    @classmethod
    def _some(cls, answers: list[str]) -> list[str]:
        if not answers:
            raise ValueError("field 'answers' is empty; a question needs its answers")
        return answers


def load_annotations(path: Path, wanted: set[str] | None = None,
                     fix: str = "check --annotations") -> tuple[dict[str, dict[str, Any]], bool]:
    """VQA annotations -> ({str(question_id): {"answers", "answer_type", "question_type"}}, is_pool): the
    official v2_mscoco_*_annotations.json ({"annotations": [...]}: a pool covering a whole COCO split, which a
    Karpathy subset is scored against) or a list of records with "answers". `wanted` (str ids) skips the records
    of other questions cheaply; types are kept only where given."""
    path = Path(path)
    data = read_json(path, "VQA annotation file", fix)
    pooled = isinstance(data, dict)
    if pooled:
        if not isinstance(data.get("annotations"), list):
            raise DataError(f"{path}: not a VQA annotation file: expected an object with an 'annotations' list. "
                            f"Fix: use the official VQA v2 v2_mscoco_*_annotations.json.")
        data = data["annotations"]
    out: dict[str, dict[str, Any]] = {}
    for ref in record_refs(data, path, "VQA annotation file", "question_id"):
        key = str(parse_record(QuestionId, ref.raw, ref).question_id)
        if wanted is not None and key not in wanted:
            continue
        rec = parse_record(OfficialAnnotation, ref.raw, ref)
        types = {"answer_type": rec.answer_type, "question_type": rec.question_type}
        files.put(out, key, {"answers": rec.answers, **{k: v for k, v in types.items() if v is not None}}, path)
    return out, pooled


def load_official_answers(vqa_dir: Path, question_ids: set[str]) -> dict[str, dict]:
    """str(question_id) -> {answers, answer_type, question_type} from the official annotation files present."""
    found: dict[str, dict] = {}
    for name in OFFICIAL_ANNOTATIONS:
        if (vqa_dir / name).is_file():
            found.update(load_annotations(vqa_dir / name, question_ids,
                                          "re-download the official VQA v2 annotations")[0])
    return found


class VqaTask(Task):
    """VQA v2: 'vqa: ' + question -> answer sampled ∝ score, loss weighted by that score."""

    split_files_fix = SPLIT_FILES_FIX
    name = "vqa"
    folder = "vqa"
    default_prompt = "vqa: "
    splits: ClassVar[dict[str, str]] = {"train": "karpathy_train", "val": "karpathy_val", "test": "karpathy_test",
                                        **submissions.VQA_QUESTION_FILES}
    input_max_length = 20
    target_max_length = 10
    loss_reduction = "example"
    batch_ratio = Fraction(1)
    decoding = Generate(num_beams=1, max_length=20)
    valid_metrics = ("vqa",)
    default_metrics = ("vqa",)
    primary_metric = "vqa"
    label = "VQA accuracy"
    image_fields = ("img_id",)
    inputs = Inputs(text="question")

    def feature_source(self, split_name: str) -> str:
        """Every VQA image is a COCO image, test2015's too: the reference's COCO/clip_features holds the
        train2014, val2014 and test2015 images (spec/pipeline.md §2.1)."""
        return "COCO"

    def read_split(self, data_root: Path, name: str, for_eval: bool) -> list[Record]:
        """Read vqa/<name>.json; for evaluation, join the 10 official answers by question_id. An official
        question file (the server's test splits) gives records without answers."""
        path = self.split_path(data_root, name)
        source = self.feature_source(name)
        if name in submissions.VQA_QUESTION_FILES.values():
            return self.read_questions(path, source)
        parsed = []
        for ref, rec in parse_records(path, VqaRecord, "VQA split file", SPLIT_FILES_FIX, "question_id"):
            sent = rec.sent if rec.sent is not None else rec.question
            if sent is None:
                raise ref.error("field 'sent' (the question) is missing")
            if rec.label is None and not for_eval:
                raise ref.error("field 'label' is missing")
            parsed.append((ref, rec, sent))
        warn_empty(path, "question", [rec.question_id for _, rec, sent in parsed if not sent.strip()], len(parsed))

        official = load_official_answers(path.parent, {str(p[1].question_id) for p in parsed}) if for_eval else {}
        records = []
        for ref, rec, sent in parsed:
            extra = None
            if for_eval:
                gt = official.get(str(rec.question_id))
                if gt is None and rec.answers is not None:
                    try:
                        gt = {"answers": answer_list(rec.answers)}
                    except ValueError as exc:
                        raise ref.error(str(exc)) from None
                if gt is None:
                    raise ref.error(
                        "evaluation needs the 10 official answers, but the record has no 'answers' and its "
                        "question_id is not in vqa/v2_mscoco_{train,val}2014_annotations.json",
                        "put the official VQA v2 annotation files in vqa/ or add 'answers' to the records")
                extra = {
                    "answers": gt["answers"],
                    "answer_type": gt.get("answer_type") or rec.answer_type,
                    "question_type": gt.get("question_type") or rec.question_type,
                    "is_topk_optimal": rec.is_topk_optimal,
                }
            records.append(Record(str(path), ref.index, rec.question_id, sent, (rec.img_id,), source,
                                  rec.label, extra))
        return records

    def read_questions(self, path: Path, source: str) -> list[Record]:
        """The records of an official v2_OpenEnded_mscoco_*_questions.json: question, image, no answers."""
        questions, subset = submissions.read_vqa_questions(path)
        folder = submissions.vqa_image_folder(subset)
        warn_empty(path, "question", [q.question_id for _, q in questions if not q.question.strip()], len(questions))
        return [Record(str(path), ref.index, q.question_id, q.question,
                       (submissions.vqa_image_id(folder, q.image_id),), source) for ref, q in questions]

    @classmethod
    def file_images(cls, data: Any, path: Path) -> dict[str, str | None] | None:
        """The images of an official VQA question file: COCO_<folder>_<image_id:012d>.jpg (test-dev2015's are
        test2015 images)."""
        if not submissions.is_vqa_question_file(data):
            return None
        folder = submissions.vqa_image_folder(data.get("data_subtype"))
        out: dict[str, str | None] = {}
        for ref in record_refs(data["questions"], path, "VQA question file", "question_id"):
            image = submissions.vqa_image_id(folder, parse_record(submissions.VqaQuestion, ref.raw, ref).image_id)
            out.setdefault(image, f"{image}.jpg")
        return out

    def target(self, record: Record, rng: Any, train: bool) -> tuple[str, float] | None:
        """Answer sampled ∝ score (train) or the best answer (eval); weight = its score."""
        return sample_answer(record.label, rng, train)

    def eval_info(self, record: Record) -> dict:
        """question_id, image, question, soft label and (for eval splits) the official answers."""
        info = {"question_id": record.id, "img_id": record.image_ids[0], "sent": record.text,
                "label": record.label}
        info.update(record.extra or {})
        return info

    # ---- scoring and files ------------------------------------------------------------------------------
    def score(self, predictions: list[dict], metrics: list[str] | None = None,
              vqa_variant: str = "reference") -> dict:
        """VQA accuracy with per answer/question type breakdowns; the top-k score where labels exist."""
        from vlpet_cli.metrics.vqa import topk_score, vqa_accuracy

        self.resolve_metrics(metrics)
        if not any("answers" in p for p in predictions):  # the server's test splits: answers hidden
            return {"n": len(predictions), "scored": 0}
        preds = {p["question_id"]: p["prediction"] for p in predictions}
        annotations = {p["question_id"]: p for p in predictions}
        result = vqa_accuracy(preds, annotations, variant=vqa_variant)
        out = {"vqa": result["overall"], "per_answer_type": result["per_answer_type"],
               "per_question_type": result["per_question_type"]}
        labelled = {p["question_id"]: p for p in predictions if p.get("label")}
        if labelled:
            out["topk"] = topk_score({q: preds[q] for q in labelled}, labelled)
        return out

    def submission(self, predictions: list[dict]) -> tuple[str, str]:
        """The official VQA results format: [{"question_id", "answer"}]."""
        return "json", json.dumps([{"question_id": p["question_id"], "answer": p["prediction"]}
                                   for p in predictions])

    def submission_questions(self, data_root: Path, split: str) -> submissions.Questions | None:
        """For the server's splits (test2015, test-dev2015): every test2015 question, which the server wants
        answered even in its test-dev phase; read here, before any prediction, with a test-dev file's questions
        checked to be among them."""
        names = self.split_names(split)
        if not set(names) <= set(submissions.VQA_QUESTION_FILES.values()):
            return None
        full = self.split_path(data_root, submissions.VQA_QUESTION_FILES[submissions.VQA_TEST])
        if not full.is_file():
            raise DataError(f"{full}: not found; a VQA server submission answers every test2015 question, even "
                            f"for --split test-dev2015. Fix: {submissions.QUESTIONS_FIX} into {full.parent}.")
        questions = submissions.vqa_questions(full)
        known = set(questions.ids)
        for name in names:
            path = self.split_path(data_root, name)
            if path == full:
                continue
            outside = [q for q in submissions.vqa_questions(path).ids if q not in known]
            if outside:
                raise DataError(f"{path}: question_id {outside[0]} (and {len(outside) - 1} more) is not a question "
                                f"of {full}. Fix: use question files of one release, both from visualqa.org.")
        return questions

    def complete_submission(self, predictions: list[dict],
                            questions: submissions.Questions) -> tuple[str, str, int]:
        """The server's file: every question of `questions` in its order, predicted or answered VQA_FILLER."""
        answers = {p["question_id"]: p["prediction"] for p in predictions}
        outside = set(answers) - set(questions.ids)
        if outside:
            raise DataError(f"{questions.path}: lacks the predicted question_id {min(outside)}. Fix: use question "
                            f"files of one release, both from visualqa.org.")
        rows = [{"question_id": q, "answer": answers.get(q, submissions.VQA_FILLER)} for q in questions.ids]
        filled = len(rows) - len(answers)
        if filled:
            warnings.warn(f"vqa: {filled} of the {len(rows)} {submissions.VQA_TEST} questions were not predicted and "
                          f"are answered {submissions.VQA_FILLER!r} in the submission file: submit it to the VQA "
                          f"server's test-dev phase only (--split {submissions.VQA_TEST} predicts them all, for "
                          f"test-std)", UserWarning, stacklevel=2)
        return "json", json.dumps(rows), filled

    def check_submission(self, submission: Path, questions: Path) -> dict:
        """A VQA server submission answers every question of the test2015 question file exactly once."""
        asked = submissions.vqa_questions(questions)
        if asked.subset == "test-dev2015":
            raise DataError(f"{questions}: the test-dev2015 questions; the VQA server wants an answer to every "
                            f"test2015 question, in its test-dev phase too. Fix: check against "
                            f"{submissions.VQA_QUESTION_FILES[submissions.VQA_TEST]}.json.")
        n = submissions.check_submission(
            submission, asked, submissions.VQA_FORMAT,
            "predict them all (vlpet eval RUN --task vqa --split test2015), or write the test-dev phase's file with "
            "--split test-dev2015, which answers the questions outside test-dev with an empty string")
        return {"questions": n, "split": asked.subset}

    def score_files(self, job: FileScoring) -> dict:
        """VQA accuracy x100 of [{"question_id", "answer"}] against the official annotations (a pool)."""
        from vlpet_cli.metrics.vqa import vqa_accuracy

        self.resolve_metrics(job.metrics)
        preds = files.load_qa_predictions(job.predictions)
        records, pooled = load_annotations(job.annotations)
        ids = files.check_ids(preds, records, job.predictions, job.annotations, job.allowed_missing(pooled))
        result = vqa_accuracy({i: preds[i] for i in ids}, records, variant=job.vqa_variant)  # type: ignore[arg-type]
        return {"vqa": result["overall"], "per_answer_type": result["per_answer_type"],
                "per_question_type": result["per_question_type"], "n": result["n"]}

    # ---- looking at results -------------------------------------------------------------------------------
    def file_predictions(self, job: FileScoring) -> list[dict]:
        """Predictions with their answers and types; the question and image where the annotation records hold
        them (a Karpathy split file does; the official annotations name the image only)."""
        preds = files.load_qa_predictions(job.predictions)
        records, pooled = load_annotations(job.annotations)
        ids = files.check_ids(preds, records, job.predictions, job.annotations, job.allowed_missing(pooled))
        shown = files.shown_fields(job.annotations, ("question_id",), ("sent", "question"), ("img_id", "image_id"))
        out = []
        for i in ids:
            text, images = shown.get(i, ("", ()))
            out.append({"question_id": i, "img_id": images[0] if images else "", "sent": text,
                        "answers": records[i]["answers"], "answer_type": records[i].get("answer_type"),
                        "prediction": preds[i]})
        return out

    def record_scores(self, predictions: list[dict], vqa_variant: str = "reference") -> list[float]:
        """Each question's VQA soft score x100 (100 when at least 3 of its annotators gave the answer); NaN for a
        question without answers (test2015: the server holds them)."""
        from vlpet_cli.metrics.vqa import question_accuracy

        return [100.0 * question_accuracy(p["prediction"], p["answers"], vqa_variant)  # type: ignore[arg-type]
                if p.get("answers") else float("nan") for p in predictions]

    def review(self, prediction: dict) -> Review:
        """The question, its distinct answers, most given first ('yes (7)'), its image and answer type."""
        answers = Counter(a.get("answer") if isinstance(a, dict) else a for a in prediction.get("answers") or ())
        refs = tuple(f"{a} ({n})" if n > 1 else str(a) for a, n in answers.most_common())
        return Review(prediction.get("sent") or "", refs, (str(prediction["img_id"]),),
                      prediction.get("answer_type"))
