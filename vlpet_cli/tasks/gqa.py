"""GQA (spec/pipeline.md §1.2, §3.3, §5.2): balanced train+valid for training, testdev for validation and test.

The reference has no separate GQA test phase: its reported GQA number is the testdev accuracy logged during
validation. vlpet keeps that: the 'test' split is testdev too. train/valid images are Visual Genome ids and
read features from VG/; testdev/submit images read GQA/. The 'submit' split (GQA/submit.json: LXMERT's records
without labels, or GQA's official submission_all_questions.json copied there) gives the challenge server's file,
[{"questionId", "prediction"}] for every question (`vlpet eval --check-submission` checks it).
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar

from vlpet_cli.tasks import files, submissions
from vlpet_cli.tasks.base import FileScoring, Generate, Inputs, Record, Review, Task, sample_answer
from vlpet_cli.tasks.records import (
    RecordModel,
    RecordRef,
    SoftLabel,
    parse_record,
    read_json,
    record_refs,
    warn_empty,
)

SPLIT_SOURCES = {"train": "VG", "valid": "VG", "testdev": "GQA", "submit": "GQA"}


SPLIT_FILES_FIX = ("check --data-root: it must contain GQA/{train,valid,testdev}.json (LXMERT's balanced GQA files), "
                   "and for --split submit GQA/submit.json")

class GqaRecord(RecordModel):
    """One record of GQA/<split>.json (LXMERT's balanced GQA format); question ids are strings."""

    question_id: str | int
    img_id: str | int
    sent: str
    label: SoftLabel | None = None


class GqaAnswer(RecordModel):
    """A question's answer in a GQA annotation file: the reference's soft `label`, or the official `answer`."""

    label: SoftLabel | None = None
    answer: str | None = None


def load_labels(path: Path) -> dict[str, dict[str, float]]:
    """GQA labels: reference records [{"question_id", "label"}] or official {qid: {"answer"}} -> {qid: label}."""
    path = Path(path)
    data = read_json(path, "GQA annotation file", "check --annotations")
    if isinstance(data, dict):  # the official file: {question_id: {"answer": ...}}
        refs = [(str(k), RecordRef(path, k, v, unit="question")) for k, v in data.items()]
    else:
        refs = [(str(ref.field("question_id", "questionId")), ref)
                for ref in record_refs(data, path, "GQA annotation file", "question_id")]
    out: dict[str, dict[str, float]] = {}
    for key, ref in refs:
        rec = parse_record(GqaAnswer, ref.raw, ref)
        if rec.label is None and rec.answer is None:
            raise ref.error("no 'label' object or 'answer' string", "use the reference testdev.json records or "
                            "the official GQA *_balanced_questions.json")
        files.put(out, key, rec.label if rec.label is not None else {rec.answer: 1.0}, path)
    return out


def official_records(data: dict, path: Path, source: str, for_eval: bool) -> list[Record]:
    """The records of GQA's official {questionId: {"imageId", "question", "answer"?}} (the challenge's
    submission_all_questions.json has no answers); label {answer: 1.0} where the answer is given."""
    records = []
    for index, (qid, raw) in enumerate(data.items()):
        ref = RecordRef(path, index, {"questionId": qid, **raw} if isinstance(raw, dict) else raw, "questionId")
        question = parse_record(submissions.GqaQuestion, raw, ref)
        if question.answer is None and not for_eval:
            raise ref.error("field 'answer' is missing")
        label = None if question.answer is None else {question.answer: 1.0}
        records.append(Record(str(path), index, str(qid), question.question, (question.imageId,), source, label))
    return records


class GqaTask(Task):
    """GQA: 'gpa: ' (the reference's typo) + question -> answer sampled ∝ score, weight 1."""

    split_files_fix = SPLIT_FILES_FIX
    name = "gqa"
    folder = "GQA"
    default_prompt = "gpa: "
    splits: ClassVar[dict[str, str]] = {"train": "train,valid", "val": "testdev", "test": "testdev",
                                        "submit": "submit"}
    input_max_length = 20
    target_max_length = None
    loss_reduction = "example"
    batch_ratio = Fraction(100, 60)
    decoding = Generate(num_beams=1, max_length=20)
    valid_metrics = ("acc",)
    default_metrics = ("acc",)
    primary_metric = "acc"
    label = "GQA accuracy"
    image_fields = ("img_id",)
    inputs = Inputs(text="question")

    def feature_source(self, split_name: str) -> str:
        """VG for train/valid (Visual Genome images); GQA for testdev/submit and other test files."""
        if split_name in SPLIT_SOURCES:
            return SPLIT_SOURCES[split_name]
        return "GQA" if ("testdev" in split_name or "submit" in split_name) else "VG"

    def read_split(self, data_root: Path, name: str, for_eval: bool) -> list[Record]:
        """Read GQA/<name>.json (LXMERT's records, or GQA's official questions); question ids are strings."""
        path = self.split_path(data_root, name)
        source = self.feature_source(name)
        data = read_json(path, "GQA split file", SPLIT_FILES_FIX)
        if isinstance(data, dict):
            records = official_records(data, path, source, for_eval)
        else:
            records = []
            for ref in record_refs(data, path, "GQA split file", "question_id"):
                rec = parse_record(GqaRecord, ref.raw, ref)
                if rec.label is None and not for_eval:
                    raise ref.error("field 'label' is missing")
                records.append(Record(str(path), ref.index, str(rec.question_id), rec.sent, (str(rec.img_id),),
                                      source, rec.label))
        warn_empty(path, "question", [r.id for r in records if not r.text.strip()], len(records))
        return records

    def target(self, record: Record, rng: Any, train: bool) -> tuple[str, float] | None:
        """Answer sampled ∝ score (train) or the best answer (eval); weight 1 (no score weighting)."""
        chosen = sample_answer(record.label, rng, train)
        return None if chosen is None else (chosen[0], 1.0)

    def eval_info(self, record: Record) -> dict:
        """question_id (a string), image and soft label (accuracy = label.get(pred, 0))."""
        return {"question_id": record.id, "img_id": record.image_ids[0], "sent": record.text,
                "label": record.label}

    # ---- scoring and files ------------------------------------------------------------------------------
    def score(self, predictions: list[dict], metrics: list[str] | None = None,
              vqa_variant: str = "reference") -> dict:
        """Exact-match accuracy against the soft label (label.get(prediction, 0)), x100."""
        from vlpet_cli.metrics.accuracy import gqa_accuracy

        self.resolve_metrics(metrics)
        if all(p["label"] is None for p in predictions):  # the challenge's questions: answers hidden
            return {"n": len(predictions), "scored": 0}
        return {"acc": gqa_accuracy({p["question_id"]: p["prediction"] for p in predictions},
                                    {p["question_id"]: p["label"] or {} for p in predictions})}

    def submission(self, predictions: list[dict]) -> tuple[str, str]:
        """The GQA evaluation server's format: [{"questionId", "prediction"}]."""
        return "json", json.dumps([{"questionId": str(p["question_id"]), "prediction": p["prediction"]}
                                   for p in predictions])

    @classmethod
    def file_images(cls, data: Any, path: Path) -> dict[str, str | None] | None:
        """The images of GQA's official {questionId: {"imageId", ...}} (e.g. submission_all_questions.json)."""
        if not isinstance(data, dict) or not data or not all(isinstance(v, dict) and "imageId" in v
                                                             for v in data.values()):
            return None
        return {str(v["imageId"]): None for v in data.values()}

    def check_submission(self, submission: Path, questions: Path) -> dict:
        """A GQA challenge submission answers every question of its question file (submission_all_questions.json,
        or LXMERT's submit.json) exactly once, ids as strings."""
        asked = submissions.gqa_questions(questions)
        n = submissions.check_submission(submission, asked, submissions.GQA_FORMAT,
                                         "predict the whole file (vlpet eval RUN --task gqa --split submit)")
        return {"questions": n}

    def score_files(self, job: FileScoring) -> dict:
        """GQA exact-match accuracy x100 of [{"questionId", "prediction"}] against the labels."""
        from vlpet_cli.metrics.accuracy import gqa_accuracy

        self.resolve_metrics(job.metrics)
        preds = files.load_qa_predictions(job.predictions)
        labels = load_labels(job.annotations)
        ids = files.check_ids(preds, labels, job.predictions, job.annotations, job.allowed_missing(False))
        return {"acc": gqa_accuracy({i: preds[i] for i in ids}, labels), "n": len(ids)}

    # ---- looking at results -------------------------------------------------------------------------------
    def file_predictions(self, job: FileScoring) -> list[dict]:
        """Predictions with their labels, questions and images (reference records or the official file)."""
        preds = files.load_qa_predictions(job.predictions)
        labels = load_labels(job.annotations)
        ids = files.check_ids(preds, labels, job.predictions, job.annotations, job.allowed_missing(False))
        shown = files.shown_fields(job.annotations, ("question_id", "questionId"), ("sent", "question"),
                                   ("img_id", "imageId"))
        out = []
        for i in ids:
            text, images = shown.get(i, ("", ()))
            out.append({"question_id": i, "img_id": images[0] if images else "", "sent": text, "label": labels[i],
                        "prediction": preds[i]})
        return out

    def record_scores(self, predictions: list[dict], vqa_variant: str = "reference") -> list[float]:
        """Each question's exact match x100: label.get(prediction, 0), as the accuracy counts it; NaN for a question
        without a label (the submit split: the server holds them)."""
        return [100.0 * float(p["label"].get(p["prediction"], 0.0)) if p.get("label") is not None else float("nan")
                for p in predictions]

    def review(self, prediction: dict) -> Review:
        """The question, its labelled answers (highest score first) and its image."""
        label = prediction.get("label") or {}
        return Review(prediction.get("sent") or "", tuple(sorted(label, key=lambda a: -label[a])),
                      (str(prediction["img_id"]),))
