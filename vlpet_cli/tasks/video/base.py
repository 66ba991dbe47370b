"""What the four VALUE video-text tasks share (spec/pipeline.md §1.5, §3.1, §3.3, §5.4): subtitles, the
`VideoTask` base (files, prompts, truncation at data.video.max_length), and the QA and captioning bases.

A video record names one video (`image_ids == (vid_name,)`) from one source ("tv", "how2", "yc2"). The encoder
text is `"[Subs] {subtitles} {rest} {prompt}"`, the prompt after the text as in the reference; `rest` is the
question, moment and choices (QA), the moment (TVC) or nothing (YC2C), and is kept in `Record.text`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from vlpet_cli.config import VideoData
from vlpet_cli.errors import DataError, VlpetError
from vlpet_cli.metrics.caption import CAPTION_METRICS, cider_per_caption, scaled_caption_scores
from vlpet_cli.tasks import files
from vlpet_cli.tasks.base import FileScoring, Generate, Inputs, PredictInput, Record, Review, Task, tokenize_batch
from vlpet_cli.tasks.records import RecordModel, RecordRef, parse_record, read_json, read_records

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ANN_DIR = Path("video") / "ann"


class SubtitleLine(RecordModel):
    """One timed line of a subtitles record; only its text enters the model."""

    text: str
    start: float | int | None = None
    end: float | int | None = None


class Subtitles(RecordModel):
    """One line of `<source>_subtitles.jsonl`: a video and its subtitle lines."""

    vid_name: str
    sub: list[SubtitleLine]


def subtitles_path(data_root: Path, source: str) -> Path:
    """`<root>/video/ann/<source>_subtitles.jsonl`."""
    return Path(data_root) / ANN_DIR / f"{source}_subtitles.jsonl"


@lru_cache(maxsize=4)
def _subtitles_cached(path: Path, stamp: tuple[int, int]) -> dict[str, str]:
    """vid_name -> subtitles text of a subtitles file (cached per file version: tv serves TVQA and TVC)."""
    out: dict[str, str] = {}
    fix = "put VALUE's subtitles file there (video/ann/{tv,how2,yc2}_subtitles.jsonl, spec/pipeline.md §1.5)"
    for ref in read_records(path, "subtitles file", fix, "vid_name"):
        rec = parse_record(Subtitles, ref.raw, ref)
        out[rec.vid_name] = " ".join(line.text.strip() for line in rec.sub)  # a repeated video: the last line
    return out


def load_subtitles(path: Path) -> dict[str, str]:
    """vid_name -> the space-joined `text.strip()` of its subtitle lines (speaker prefixes kept), as the
    reference builds `subs`; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"subtitles file not found: {path}. Fix: put VALUE's subtitles file there "
                        f"(video/ann/<source>_subtitles.jsonl, spec/pipeline.md §1.5) or check --data-root.")
    st = path.stat()
    return _subtitles_cached(path, (st.st_mtime_ns, st.st_size))


class VideoTask(Task):
    """A VALUE task: subtitles + task text + prompt, right-truncated at data.video.max_length by default."""

    folder: ClassVar[str]
    source: ClassVar[str]
    """The feature and subtitles source: 'tv', 'how2' or 'yc2'."""
    submission_file: ClassVar[str]
    """VALUE's name of the test submission file (e.g. tvqa_test_predictions.json)."""
    line_id: ClassVar[str]
    """The id field of an annotation line ('qid', 'clip_id'), named in messages."""
    feature_kind = "video"
    inputs = Inputs(video=True)
    hub_task = "video-text-to-text"
    input_max_length = 600  # the reference's; the value used is data.video.max_length
    target_max_length = 20
    loss_reduction = "example"
    batch_ratio = Fraction(1)
    image_fields = ("vid_name",)

    def split_path(self, data_root: Path, name: str) -> Path:
        """`<root>/video/ann/<task>/<task>_<split>.jsonl`."""
        return Path(data_root) / self.folder / f"{self.name}_{name}.jsonl"

    def feature_source(self, split_name: str) -> str:
        """Every split of a VALUE task uses one source's video features."""
        return self.source

    @property
    def split_files_fix(self) -> str:  # type: ignore[override]  # Task: a class constant; here from the folder
        """The fix to print when a split file is missing."""
        names = ", ".join(f"{self.name}_{n}.jsonl" for v in self.splits.values() for n in v.split(","))
        return f"check --data-root: it must contain {self.folder}/ with VALUE's {names} (spec/pipeline.md §1.5)"

    def is_test_split(self, name: str) -> bool:
        """True for the split files of the test kind (labels hidden in VALUE's release)."""
        return name in self.split_names("test")

    # ---- records ----------------------------------------------------------------------------------------
    def subtitles_for(self, data_root: Path, vid: str, ref: RecordRef, subs: dict[str, str]) -> str:
        """The subtitles text of a video; a video without an entry is an error naming it and the file."""
        try:
            return subs[vid]
        except KeyError:
            raise ref.error(f"video {vid!r} has no entry in {subtitles_path(data_root, self.source)}",
                            "add its line to the subtitles file (with an empty 'sub' list if it has no "
                            "subtitles) or use the subtitles file of the same VALUE release") from None

    def read_split(self, data_root: Path, name: str, for_eval: bool) -> list[Record]:
        """Read one VALUE .jsonl split file into records (subtitles joined, errors naming file and line)."""
        lines = self.read_lines(self.split_path(data_root, name), self.split_files_fix)
        subs = load_subtitles(subtitles_path(data_root, self.source))
        records: list[Record] = []
        for ref in lines:
            records.extend(self.line_records(Path(data_root), ref, name, subs, for_eval))
        return records

    def read_lines(self, path: Path, fix: str = "check --annotations") -> Iterator[RecordRef]:
        """The lines of one of the task's VALUE annotation files (errors name the file and the line)."""
        return read_records(Path(path), f"{self.name} annotation file", fix, self.line_id)

    def line_records(self, data_root: Path, ref: RecordRef, split: str, subs: dict[str, str],
                     for_eval: bool) -> list[Record]:
        """The records of one annotation line."""
        raise NotImplementedError

    # ---- model input ------------------------------------------------------------------------------------
    def compose(self, record: Record, subs: str) -> str:
        """The exact encoder string: '[Subs] {subs}' and the task text joined by spaces, then ' ' + prompt."""
        sent = " ".join([f"[Subs] {subs}", record.text]) if record.text else f"[Subs] {subs}"
        return f"{sent} {self.prompt}"

    def source_text(self, record: Record) -> str:
        """The whole encoder text before truncation."""
        return self.compose(record, (record.extra or {}).get("subs", ""))

    def support_files(self, data_root: Path) -> list[Path]:
        """The subtitles file of the task's source."""
        return [subtitles_path(data_root, self.source)]

    def source_ids(self, records: Sequence[Record], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
        """Token ids within data.video.max_length: cut at the end (reference, may lose question, choices and
        prompt) or, with data.video.truncate 'subtitles', shorten the subtitles so the rest survives (the texts
        are tokenised whole in one batch; only those over the limit are shortened, record by record)."""
        limit = self.video.max_length
        texts = [self.source_text(r) for r in records]
        if self.video.truncate == "tail":
            return tokenize_batch(tokenizer, texts, limit)
        ids = tokenize_batch(tokenizer, texts, None)
        return [x if len(x) <= limit else self._shortened(r, tokenizer) for x, r in zip(ids, records)]

    def _shortened(self, record: Record, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """The ids with the most subtitle words that fit data.video.max_length (a binary search)."""
        limit = self.video.max_length
        words = (record.extra or {}).get("subs", "").split(" ")
        lo, hi = 0, len(words) - 1  # the most subtitle words that fit lie in [lo, hi]: all of them do not
        best = None
        while lo <= hi:
            mid = (lo + hi) // 2
            trial = tokenize_batch(tokenizer, [self.compose(record, " ".join(words[:mid]))], None)[0]
            if len(trial) <= limit:
                best, lo = trial, mid + 1
            else:
                hi = mid - 1
        if best is not None:
            return best
        return tokenize_batch(tokenizer, [self.compose(record, "")], limit)[0]  # too long even without subtitles

    def target(self, record: Record, rng: Any, train: bool) -> tuple[str, float] | None:
        """'a{answer_idx}' (QA) or the row's description (captions), weight 1; None when hidden (test)."""
        return None if record.label is None else (record.label, 1.0)


# ---- multiple-choice video QA -----------------------------------------------------------------------------
class VideoQaRecord(RecordModel):
    """A TVQA/How2QA line: question, moment, answer index (absent in test) and the show; choices a0..aN-1."""

    qid: int | str
    q: str
    vid_name: str
    ts: str | float | int | list[float | int]
    answer_idx: int | None = None
    show_name: str | None = None


def parse_ts(value: str, where: str = "--ts") -> tuple[float, float]:
    """A moment "20.1-25.3" or "20.1,25.3" -> (start, end) seconds, start <= end."""
    text = str(value).strip().strip("[]()")
    parts = text.split(",") if "," in text else text.split("-")
    try:
        start, end = (float(x) for x in parts)
    except ValueError:
        raise VlpetError(f"{where}: moment {value!r} is not 'START-END' or 'START,END' in seconds (e.g. "
                         f"--ts 20.1-25.3)") from None
    if not 0 <= start <= end:
        raise VlpetError(f"{where}: moment {value!r} must have 0 <= start <= end")
    return start, end


def qa_text(question: str, ts: Any, choices: Sequence[str]) -> str:
    """The task text of a video question: '[Q] q [TS] (ts) [Choices] a0: c0. a1: c1. ...' (each choice stripped of
    '. ' and ended with '.', as the reference formats VALUE's a0..aN-1)."""
    listed = " ".join(f"a{i}: {c.strip('. ')}." for i, c in enumerate(choices))
    return " ".join([f"[Q] {question.strip()}", f"[TS] ({ts})", "[Choices] " + listed])


def choice_index(prediction: Any) -> int:
    """VALUE's answer index of a generated 'a{idx}': int(pred[1]), 0 when that fails (the reference's rule)."""
    try:
        return int(str(prediction)[1])
    except (IndexError, ValueError):
        return 0


class VideoQaTask(VideoTask):
    """TVQA/How2QA: subtitles, question, moment and choices -> 'a{idx}'; accuracy overall and per type."""

    line_id = "qid"
    qa_type: ClassVar[str | None] = None
    """The `type` of every question (How2QA: 'how2qa'); None takes the show name (TVQA)."""
    # the reference decodes with the backbone config's beams: bart-base's 4, T5's 1 (its T5 video runs are greedy)
    decoding = Generate(num_beams=4, max_length=20, greedy_on=("t5",))
    valid_metrics = ("acc",)
    default_metrics = ("acc",)
    primary_metric = "acc"

    def load(self, data_root: Path, split: str, *, for_eval: bool | None = None) -> list[Record]:
        """Records of a split; with data.video.dedup_test, a question repeated across test files only once."""
        records = super().load(data_root, split, for_eval=for_eval)
        if not self.video.dedup_test or self.is_train_split(split):
            return records
        kept: dict[Any, Record] = {}
        for r in records:
            kept.setdefault(r.id, r)
        return list(kept.values())

    def choices(self, raw: dict, ref: RecordRef) -> list[str]:
        """The choices a0..aN-1 of a line."""
        out = []
        for i in range(self.inputs.choices):
            value = raw.get(f"a{i}")
            if not isinstance(value, str):
                problem = f"field 'a{i}' is missing" if value is None else (
                    f"field 'a{i}' should be a string, found {type(value).__name__} {value!r:.60}")
                raise ref.error(problem)
            out.append(value)
        return out

    def parse_line(self, raw: Any, ref: RecordRef, for_eval: bool) -> tuple[VideoQaRecord, list[str]]:
        """A validated line and its choices."""
        rec = parse_record(VideoQaRecord, raw, ref)
        choices = self.choices(raw, ref)
        n = self.inputs.choices
        if rec.answer_idx is None and not for_eval:
            raise ref.error("field 'answer_idx' is missing (a training line needs its answer)")
        if rec.answer_idx is not None and not 0 <= rec.answer_idx < n:
            raise ref.error(f"field 'answer_idx' is {rec.answer_idx}; expected 0..{n - 1}")
        if self.qa_type is None and rec.show_name is None:
            raise ref.error("field 'show_name' is missing")
        return rec, choices

    def line_records(self, data_root: Path, ref: RecordRef, split: str, subs: dict[str, str],
                     for_eval: bool) -> list[Record]:
        """One record per question: text '[Q] q [TS] (ts) [Choices] a0: ... .', label 'a{answer_idx}'."""
        rec, choices = self.parse_line(ref.raw, ref, for_eval)
        label = None if rec.answer_idx is None else f"a{rec.answer_idx}"
        extra = {"subs": self.subtitles_for(data_root, rec.vid_name, ref, subs),
                 "type": self.qa_type or rec.show_name}
        return [Record(str(ref.path), ref.index, rec.qid, qa_text(rec.q, rec.ts, choices), (rec.vid_name,),
                       self.source, label, extra)]

    def input_record(self, given: PredictInput, index: int) -> Record:
        """A `vlpet predict` question as a line of VALUE's file would give it: the moment 's-e' as given (or
        rounded to 2 decimals), the choices formatted as the reader formats them, no show."""
        assert given.ts is not None, "predict gives a moment task the whole video when no --ts is given"
        start, end = parse_ts(given.ts, given.where)
        ts = given.ts.strip() if "-" in given.ts and "," not in given.ts else f"{start:.2f}-{end:.2f}"
        extra = {"subs": given.subtitles, "type": self.qa_type}
        return Record(given.where, index, index, qa_text(given.text, ts, given.choices), (str(given.video),),
                      self.source, None, extra)

    def eval_info(self, record: Record) -> dict:
        """question_id, video, type (show), the answer ('a{idx}', None when hidden) and the question text (its
        moment and choices: what the results page shows)."""
        extra = record.extra or {}
        return {"question_id": record.id, "vid_name": record.image_ids[0], "type": extra.get("type"),
                "answer": record.label, "sent": record.text}

    # ---- scoring and files ------------------------------------------------------------------------------
    def score(self, predictions: list[dict], metrics: list[str] | None = None,
              vqa_variant: str = "reference") -> dict:
        """Accuracy x100 (prediction == 'a{idx}') overall and per type; test predictions (answers hidden)
        give only their count."""
        from vlpet_cli.metrics.accuracy import typed_accuracy

        self.resolve_metrics(metrics)
        rows = [(p["prediction"], p["answer"], str(p.get("type"))) for p in predictions if p.get("answer")]
        if not rows:
            return {"n": len(predictions), "scored": 0}
        result = typed_accuracy(rows)
        return {"acc": result["acc"], "per_type": result["per_type"]}

    def submission(self, predictions: list[dict]) -> tuple[str, str]:
        """VALUE's QA format: {qid: answer index} (int(pred[1]), 0 when that fails)."""
        return "json", json.dumps({str(p["question_id"]): choice_index(p["prediction"]) for p in predictions})

    def load_predictions(self, path: Path) -> dict[str, str]:
        """A VALUE QA predictions file {qid: index} -> {qid: 'a{index}'}."""
        data = read_json(path, f"{self.name} predictions file", "check --predictions")
        if not isinstance(data, dict):
            raise DataError(f"{path}: expected VALUE's {self.name} predictions, a JSON object "
                            f"{{qid: answer index}}, found {type(data).__name__}. Fix: write VALUE's format.")
        out = {}
        n = self.inputs.choices
        for qid, value in data.items():
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
                raise DataError(f"{path}: the answer of question {qid!r} is {value!r}; expected an integer "
                                f"0..{n - 1}. Fix: write VALUE's format {{qid: answer index}}.")
            out[str(qid)] = f"a{value}"
        return out

    def load_answers(self, path: Path) -> dict[str, tuple[str, str]]:
        """A VALUE QA annotation file -> {qid: ('a{answer_idx}', type)}; lines without answers are refused."""
        out: dict[str, tuple[str, str]] = {}
        for ref in self.read_lines(path):
            rec, _ = self.parse_line(ref.raw, ref, for_eval=True)
            if rec.answer_idx is None:
                raise ref.error("field 'answer_idx' is missing: this looks like a test file, whose answers "
                                "VALUE keeps hidden", "score a val file here, or submit test predictions to "
                                "the VALUE server")
            key = str(rec.qid)
            if key not in out:  # a question twice (TVQA test_public within test_release) counts once
                out[key] = (f"a{rec.answer_idx}", str(self.qa_type or rec.show_name))
        return out

    def score_files(self, job: FileScoring) -> dict:
        """Accuracy x100 overall and per type of a VALUE {qid: index} file against a VALUE annotation file."""
        from vlpet_cli.metrics.accuracy import typed_accuracy

        self.resolve_metrics(job.metrics)
        preds = self.load_predictions(job.predictions)
        answers = self.load_answers(job.annotations)
        ids = files.check_ids(preds, answers, job.predictions, job.annotations, job.allowed_missing(False))
        return typed_accuracy((preds[i], *answers[i]) for i in ids)

    # ---- looking at results -------------------------------------------------------------------------------
    def file_predictions(self, job: FileScoring) -> list[dict]:
        """Predicted 'a{idx}' with the answer, type, question text (moment and choices) and video of each."""
        preds = self.load_predictions(job.predictions)
        answers = self.load_answers(job.annotations)
        ids = files.check_ids(preds, answers, job.predictions, job.annotations, job.allowed_missing(False))
        shown: dict[str, tuple[str, str]] = {}
        for ref in self.read_lines(job.annotations):
            rec, choices = self.parse_line(ref.raw, ref, for_eval=True)
            shown.setdefault(str(rec.qid), (qa_text(rec.q, rec.ts, choices), rec.vid_name))
        return [{"question_id": i, "vid_name": shown[i][1], "type": answers[i][1], "answer": answers[i][0],
                 "sent": shown[i][0], "prediction": preds[i]} for i in ids]

    def record_scores(self, predictions: list[dict], vqa_variant: str = "reference") -> list[float]:
        """100 where the predicted 'a{idx}' is the answer, else 0; NaN where the answer is hidden (test)."""
        return [math.nan if not p.get("answer") else 100.0 if p["prediction"] == p["answer"] else 0.0
                for p in predictions]

    def review(self, prediction: dict) -> Review:
        """The question with its moment and choices, the answer, the video and its type (the show)."""
        answer = prediction.get("answer")
        kind = prediction.get("type")
        return Review(prediction.get("sent") or "", (answer,) if answer else (), (str(prediction["vid_name"]),),
                      None if kind is None else str(kind))


# ---- video captioning -------------------------------------------------------------------------------------
class Description(RecordModel):
    """One description of a clip."""

    desc: str
    desc_id: int | str | None = None
    type: str | None = None


class VideoCaptionRecord(RecordModel):
    """A TVC/YC2C line: the clip, its video, duration, moment (TVC) and descriptions (absent in test)."""

    vid_name: str
    clip_id: int | str
    duration: float | int | None = None
    ts: list[float | int] | None = None
    descs: list[Description] | None = None


def caption_text(ts: Any) -> str:
    """The task text of a clip to describe: '[TS] (ts)' for a task reading a moment (TVC), none otherwise."""
    return "" if ts is None else f"[TS] ({ts})"


class VideoCaptionTask(VideoTask):
    """TVC/YC2C: subtitles (and the moment) -> a description; CIDEr (pycocoevalcap), one reference per row
    by default or every description of the clip (`eval.caption_references: clip`, VALUE's scoring)."""

    line_id = "clip_id"
    decoding = Generate(num_beams=5, max_length=20)
    valid_metrics = CAPTION_METRICS
    default_metrics = ("cider",)
    primary_metric = "cider"
    validation_metrics = ("cider",)

    def __init__(self, prompt: str | None = None, video: VideoData | None = None) -> None:
        super().__init__(prompt, video)
        self.caption_references = "row"  # eval.caption_references: 'row' (the reference's) or 'clip'

    def parse_line(self, raw: Any, ref: RecordRef) -> VideoCaptionRecord:
        """A validated line (TVC needs its moment `ts`)."""
        rec = parse_record(VideoCaptionRecord, raw, ref)
        if self.inputs.moment and rec.ts is None:
            raise ref.error("field 'ts' is missing")
        if rec.descs is not None and not rec.descs:
            raise ref.error("field 'descs' is empty; a clip needs its descriptions")
        return rec

    def line_records(self, data_root: Path, ref: RecordRef, split: str, subs: dict[str, str],
                     for_eval: bool) -> list[Record]:
        """Train and val: one record per description (id desc_id); test: one per clip (id clip_id)."""
        rec = self.parse_line(ref.raw, ref)
        path, lineno = ref.path, ref.index
        if rec.descs is None and not for_eval:
            raise ref.error("field 'descs' is missing (a training line needs its descriptions)")
        text = caption_text(rec.ts if self.inputs.moment else None)
        references = [d.desc for d in rec.descs or ()]
        extra = {"subs": self.subtitles_for(data_root, rec.vid_name, ref, subs), "clip_id": rec.clip_id,
                 "ts": rec.ts, "duration": rec.duration, "references": references}
        vid = (rec.vid_name,)
        if rec.descs is None or self.is_test_split(split):
            return [Record(str(path), lineno, rec.clip_id, text, vid, self.source, None, extra)]
        out = []
        for k, d in enumerate(rec.descs):
            if d.desc_id is None:
                raise ref.error(f"descs[{k}] has no 'desc_id'")
            out.append(Record(str(path), lineno, d.desc_id, text, vid, self.source, d.desc, extra))
        return out

    def input_record(self, given: PredictInput, index: int) -> Record:
        """A `vlpet predict` clip as a line of VALUE's file would give it: the moment [start, end] (TVC)."""
        ts = None
        if self.inputs.moment:
            assert given.ts is not None, "predict gives a moment task the whole video when no --ts is given"
            ts = list(parse_ts(given.ts, given.where))
        extra = {"subs": given.subtitles, "clip_id": index, "ts": ts, "duration": None, "references": []}
        return Record(given.where, index, index, caption_text(ts), (str(given.video),), self.source, None, extra)

    def eval_info(self, record: Record) -> dict:
        """Row id, clip, video, moment, the row's description and all descriptions of the clip."""
        extra = record.extra or {}
        info = {"question_id": record.id, "clip_id": extra.get("clip_id"), "vid_name": record.image_ids[0],
                "reference": record.label, "references": extra.get("references", [])}
        if self.inputs.moment:
            info["ts"] = extra.get("ts")
        return info

    # ---- scoring and files ------------------------------------------------------------------------------
    def score(self, predictions: list[dict], metrics: list[str] | None = None,
              vqa_variant: str = "reference") -> dict:
        """Caption metrics x100: per row against its own description ('row'), or one prediction per clip
        against all its descriptions ('clip'); test predictions (descriptions hidden) give only their count."""
        wanted = self.resolve_metrics(metrics)
        preds, refs = grouped_references(predictions, self.caption_references)
        if not preds:
            return {"n": len(predictions), "scored": 0}
        result = scaled_caption_scores(preds, refs, wanted, explicit=metrics is not None)
        return {k: v for k, v in result.items() if k in wanted}

    def submission(self, predictions: list[dict]) -> tuple[str, str]:
        """VALUE's captioning format: one line per clip {"vid_name", "clip_id", ("ts",) "descs": [{"desc"}]}."""
        lines: dict[Any, str] = {}
        for p in predictions:
            if p["clip_id"] in lines:
                continue
            entry: dict[str, Any] = {"vid_name": p["vid_name"], "clip_id": p["clip_id"]}
            if self.inputs.moment:
                entry["ts"] = p.get("ts")
            entry["descs"] = [{"desc": p["prediction"]}]
            lines[p["clip_id"]] = json.dumps(entry)
        return "jsonl", "".join(line + "\n" for line in lines.values())

    def load_predictions(self, path: Path) -> dict[str, str]:
        """A VALUE captioning predictions file (.jsonl, one clip a line) -> {clip_id: description}."""
        out: dict[str, str] = {}
        for ref in read_records(Path(path), f"{self.name} predictions file", "check the path", "clip_id"):
            raw = ref.raw
            if not isinstance(raw, dict) or "clip_id" not in raw:
                raise ref.error("field 'clip_id' is missing", "write one {\"clip_id\", \"descs\": "
                                "[{\"desc\"}]} object a line (VALUE's format)")
            descs = raw.get("descs")
            if not (isinstance(descs, list) and descs and isinstance(descs[0], dict)
                    and isinstance(descs[0].get("desc"), str)):
                raise ref.error("field 'descs' should be a list holding one {\"desc\": text}",
                                "write VALUE's format {\"clip_id\", \"descs\": [{\"desc\": text}]}")
            files.put(out, str(raw["clip_id"]), descs[0]["desc"], Path(path))
        return out

    def load_references(self, path: Path) -> dict[str, list[str]]:
        """A VALUE captioning annotation file -> {clip_id: every description}; lines without any refused."""
        out: dict[str, list[str]] = {}
        for ref in self.read_lines(path):
            rec = self.parse_line(ref.raw, ref)
            if rec.descs is None:
                raise ref.error("field 'descs' is missing: this looks like a test file, whose descriptions "
                                "VALUE keeps hidden", "score a val file here, or submit test predictions to "
                                "the VALUE server")
            files.put(out, str(rec.clip_id), [d.desc for d in rec.descs], Path(path))
        return out

    def score_files(self, job: FileScoring) -> dict:
        """Caption metrics x100 of a VALUE predictions file, every description of a clip its references."""
        wanted = self.resolve_metrics(job.metrics)
        preds = self.load_predictions(job.predictions)
        refs = self.load_references(job.annotations)
        ids = files.check_ids(preds, refs, job.predictions, job.annotations, job.allowed_missing(False))
        return scaled_caption_scores({i: preds[i] for i in ids}, {i: refs[i] for i in ids}, wanted,
                                     explicit=job.metrics is not None, tokenizer=job.tokenizer)

    # ---- looking at results -------------------------------------------------------------------------------
    def file_predictions(self, job: FileScoring) -> list[dict]:
        """One description per clip with every description of the clip as its references, its video and moment."""
        preds = self.load_predictions(job.predictions)
        refs = self.load_references(job.annotations)
        ids = files.check_ids(preds, refs, job.predictions, job.annotations, job.allowed_missing(False))
        clips: dict[str, VideoCaptionRecord] = {}
        for ref in self.read_lines(job.annotations):
            rec = self.parse_line(ref.raw, ref)
            clips.setdefault(str(rec.clip_id), rec)
        return [{"question_id": i, "clip_id": i, "vid_name": clips[i].vid_name, "reference": None,
                 "references": refs[i], "prediction": preds[i],
                 **({"ts": clips[i].ts} if self.inputs.moment else {})} for i in ids]

    def record_scores(self, predictions: list[dict], vqa_variant: str = "reference") -> list[float]:
        """Each row's own CIDEr x100 against its own description (a clip row without one: all the clip's
        descriptions), as 'row' scoring counts it; NaN where the descriptions are hidden (test)."""
        preds, refs = grouped_references(predictions, "row")
        scores = iter(cider_per_caption(preds, refs).values()) if preds else iter(())
        own = [p.get("reference") is not None or bool(p.get("references")) for p in predictions]
        return [next(scores) if has else math.nan for has in own]

    def review(self, prediction: dict) -> Review:
        """The moment asked about (TVC) or the prompt, the row's description (else the clip's) and the video."""
        ts = prediction.get("ts")
        own = prediction.get("reference")
        refs = (own,) if own is not None else tuple(prediction.get("references") or ())
        return Review(caption_text(ts) or self.prompt.strip(), refs, (str(prediction["vid_name"]),))


def grouped_references(predictions: Sequence[dict], mode: str) -> tuple[dict[Any, str], dict[Any, list[str]]]:
    """(predictions, references) to score: 'row' scores every row against its own description (the
    reference's validation; rows without one, i.e. clip rows, against all the clip's descriptions); 'clip'
    scores the first prediction of each clip against all its descriptions. Rows with no reference are left out."""
    if mode not in ("row", "clip"):
        raise VlpetError(f"eval.caption_references {mode!r}: choose 'row' or 'clip'")
    preds: dict[Any, str] = {}
    refs: dict[Any, list[str]] = {}
    for p in predictions:
        if mode == "clip":
            key: tuple[Any, ...] = ("clip", p["clip_id"])
            if key in preds or not p.get("references"):
                continue
            preds[key], refs[key] = p["prediction"], list(p["references"])
            continue
        own = [p["reference"]] if p.get("reference") is not None else list(p.get("references") or [])
        if own:
            key = ("row", p["question_id"], len(preds))
            preds[key], refs[key] = p["prediction"], own
    return preds, refs
