"""Leaderboard submissions: the official question files of the VQA v2 server (EvalAI; its test-dev and test-std
phases both take answers to every test2015 question) and of the GQA challenge, and the check that a submission
file answers every question of its question file exactly once (`vlpet eval --check-submission FILE --questions
QFILE`). Each problem is one DataError naming the file and the first bad record or id."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlpet_cli.errors import DataError
from vlpet_cli.tasks import files
from vlpet_cli.tasks.records import RecordModel, RecordRef, parse_record, read_json, record_refs

VQA_TEST = "test2015"
"""The split whose every question a VQA server submission answers (test-dev2015 is a subset of it)."""
VQA_QUESTION_FILES = {"test2015": "v2_OpenEnded_mscoco_test2015_questions",
                      "test-dev2015": "v2_OpenEnded_mscoco_test-dev2015_questions"}
"""The official question files (vqa/<name>.json under the data root) of the VQA v2 server's splits."""
VQA_FILLER = ""
"""The answer written for a test2015 question that was not predicted (`--split test-dev2015`): the server needs an
entry for every test2015 question but scores only the test-dev ones in its test-dev phase."""
QUESTIONS_FIX = "use the official file from visualqa.org (v2_OpenEnded_mscoco_test2015_questions.json)"


class VqaQuestion(RecordModel):
    """One question of an official v2_OpenEnded_mscoco_*_questions.json."""

    image_id: int
    question: str
    question_id: int


class GqaQuestion(RecordModel):
    """One question of GQA's official files ({questionId: {"imageId", "question", ...}}); `answer` where given."""

    imageId: str  # noqa: N815 (the official field name)
    question: str
    answer: str | None = None


@dataclass(frozen=True)
class Questions:
    """The question ids of a question file, in the file's order; `subset` is the VQA file's data_subtype."""

    path: Path
    ids: list[Any]
    subset: str | None = None


def is_vqa_question_file(data: Any) -> bool:
    """Whether a JSON document is an official VQA question file (an object with a 'questions' list)."""
    return isinstance(data, dict) and isinstance(data.get("questions"), list)


def vqa_image_folder(subset: str | None) -> str:
    """The COCO image folder a VQA question file asks about: test-dev2015's images are test2015's."""
    return VQA_TEST if subset in (None, "test-dev2015") else str(subset)


def vqa_image_id(folder: str, image_id: int) -> str:
    """COCO's file stem of an image, e.g. COCO_test2015_000000262144: the id its features are stored under."""
    return f"COCO_{folder}_{image_id:012d}"


def read_vqa_questions(path: Path) -> tuple[list[tuple[RecordRef, VqaQuestion]], str | None]:
    """The validated questions of an official VQA question file, and its data_subtype; a question id given
    twice is refused."""
    path = Path(path)
    data = read_json(path, "VQA question file", QUESTIONS_FIX)
    if not is_vqa_question_file(data):
        raise DataError(f"{path}: not a VQA question file: expected an object with a 'questions' list. "
                        f"Fix: {QUESTIONS_FIX}.")
    subset = data.get("data_subtype")
    out = []
    seen: dict[str, None] = {}
    for ref in record_refs(data["questions"], path, "VQA question file", "question_id"):
        question = parse_record(VqaQuestion, ref.raw, ref)
        files.put(seen, str(question.question_id), None, path)
        out.append((ref, question))
    return out, subset if isinstance(subset, str) else None


def vqa_questions(path: Path) -> Questions:
    """The question ids (ints) of an official VQA question file."""
    questions, subset = read_vqa_questions(path)
    return Questions(Path(path), [q.question_id for _, q in questions], subset)


def gqa_questions(path: Path) -> Questions:
    """The question ids (strings) of a GQA question file: the official {questionId: {...}} (e.g.
    submission_all_questions.json) or a list of records with 'question_id' (LXMERT's submit.json)."""
    path = Path(path)
    data = read_json(path, "GQA question file", "use GQA's submission_all_questions.json")
    ids: dict[str, None] = {}
    if isinstance(data, dict):
        for key in data:
            files.put(ids, str(key), None, path)
    else:
        for ref in record_refs(data, path, "GQA question file", "question_id"):
            files.put(ids, str(ref.field("question_id", "questionId")), None, path)
    return Questions(path, list(ids))


@dataclass(frozen=True)
class Format:
    """A server's submission format: a JSON list of {id_field: id, answer_field: str}; ids of `id_type`."""

    id_field: str
    answer_field: str
    id_type: type
    example: str


VQA_FORMAT = Format("question_id", "answer", int, '[{"question_id": int, "answer": str}]')
GQA_FORMAT = Format("questionId", "prediction", str, '[{"questionId": str, "prediction": str}]')
_TYPE_WORDS = {int: "an integer", str: "a string"}


def check_submission(submission: Path, questions: Questions, form: Format, fix_missing: str) -> int:
    """Check that `submission` answers every question of `questions` exactly once, in `form`, and nothing else;
    return the number of answers. The first problem is one DataError naming the file and the record or id."""
    submission = Path(submission)
    data = read_json(submission, "submission file", "check --check-submission")
    if not isinstance(data, list):
        raise DataError(f"{submission}: expected a JSON list {form.example}, found {type(data).__name__}. "
                        f"Fix: write the server's format.")
    wanted = set(questions.ids)
    seen: set[Any] = set()
    for ref in record_refs(data, submission, "submission file", form.id_field):
        qid, answer = ref.field(form.id_field), ref.field(form.answer_field)
        if type(qid) is not form.id_type:
            raise ref.error(f"field '{form.id_field}' should be {_TYPE_WORDS[form.id_type]}, found "
                            f"{type(qid).__name__} {qid!r:.40}", f"write the ids as {questions.path.name} gives them")
        if not isinstance(answer, str):
            raise ref.error(f"field '{form.answer_field}' should be a string, found {type(answer).__name__} "
                            f"{answer!r:.40}", "write every answer as a string")
        if qid in seen:
            raise ref.error(f"{form.id_field} {qid!r} is answered a second time", "keep one answer per question")
        if qid not in wanted:
            raise ref.error(f"{form.id_field} {qid!r} is not a question of {questions.path}",
                            "answer the questions of that file only (is the file for another split or release?)")
        seen.add(qid)
    missing = [q for q in questions.ids if q not in seen]
    if missing:
        raise DataError(f"{submission}: no answer for {len(missing)} of {len(questions.ids)} questions of "
                        f"{questions.path}, the first {form.id_field} {missing[0]!r}. Fix: {fix_missing}.")
    return len(seen)
