"""Your own task, from a small YAML file: a folder of images and split files (CSV, JSON, JSON lines or Parquet, read
with `datasets`) become a `Task` subclass of one of four kinds, registered under the file's name.

    name: colors-qa          # the task's name in runs, eval files and reports (never a built-in task's)
    kind: qa                 # qa | caption | choice | classify
    images: images/          # the image column's paths are relative to this folder (itself relative to the file)
    splits: {train: train.csv, val: val.csv, test: test.csv}
    columns: {image: image, question: question, answer: answer}   # optional: the kind's defaults
    prompt: "colors-qa: "    # optional: '<name>: '; a prompt naming {question}, {choices} or {text} is a template
    vision: tiny-clip        # extract the features on first use with this vision model ...
    features: feats.h5       # ... into this store (default: features/<images>.<vision>.h5 beside the file)
    labels: [yes, no]        # classify: the label set (default: the train split's labels, in order)
    ratio: 1                 # the task's batch ratio in multi-task training

The kinds score as the built-in tasks do: `qa` generates an answer, scored by exact match after VQA's official
normalisation, or with the VQA soft score min(#matching / 3, 1) against a list of answers; `caption` is COCO's
(`CocoTask`: CIDEr, BLEU-4, ROUGE-L, METEOR with Java, PTB tokenisation); `choice` lists its choices in the text and
generates 'a<index>' as TVQA does; `classify` scores its labels' logits as NLVR2 scores 'true' and 'false'. Every
problem of the task file or of a split file is one DataError naming the file, the row and column, and the fix.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, ClassVar

from vlpet_cli.errors import DataError
from vlpet_cli.tasks import files
from vlpet_cli.tasks.base import (
    FileScoring,
    Generate,
    Inputs,
    PredictInput,
    Record,
    Review,
    ScoreChoices,
    Task,
    sample_answer,
)
from vlpet_cli.tasks.coco import CocoTask
from vlpet_cli.tasks.records import read_records
from vlpet_cli.tasks.video.base import choice_index

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

KINDS = ("qa", "caption", "choice", "classify")
KEYS = ("name", "kind", "images", "splits", "columns", "prompt", "vision", "features", "labels", "ratio")
SPLITS = ("train", "val", "test")
FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
COLUMNS: dict[str, dict[str, str]] = {
    "qa": {"image": "image", "question": "question", "answer": "answer"},
    "caption": {"image": "image", "caption": "caption"},
    "choice": {"image": "image", "question": "question", "choices": "choices", "answer": "answer"},
    "classify": {"image": "image", "text": "text", "label": "label"},
}
OPTIONAL = ("id", "text")  # columns a split file may leave out (the row number is the id; classify needs no text)
LAYOUT = {"qa": "{question}", "caption": "", "choice": "{question} [Choices] {choices}", "classify": "{text}"}
"""The encoder text after a plain prompt; a prompt naming a placeholder replaces it."""
PLACEHOLDERS = {"qa": ("question",), "caption": (), "choice": ("question", "choices"), "classify": ("text",)}
LIST_SEPARATOR = "|"  # a CSV cell holding a list (choices, several images): its items joined by '|'
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
FILE_FIX = "see docs/own-data.md for the task file's keys"


def is_task_file(name: str) -> bool:
    """Whether a --task value names a task file rather than a built-in task."""
    return name.strip().lower().endswith((".yaml", ".yml"))


@dataclass(frozen=True)
class TaskFile:
    """A task file, read and checked; every path absolute."""

    path: Path
    name: str
    kind: str
    images: Path
    splits: dict[str, Path]
    columns: dict[str, str]
    prompt: str | None = None
    vision: str | None = None
    features: Path | None = None
    labels: tuple[str, ...] = ()
    ratio: Fraction = Fraction(1)
    required: tuple[str, ...] = field(default=())
    """The column roles every split file must have (the kind's, less the optional ones the file does not name)."""
    video: bool = False
    """Whether the visual column holds videos (`columns: {video: COLUMN}`; its role is still 'image')."""

    def error(self, problem: str, fix: str = FILE_FIX) -> DataError:
        return DataError(f"{self.path}: {problem}. Fix: {fix}.")

    def as_yaml(self) -> dict[str, Any]:
        """The file's settings with every path absolute and the labels spelled out (the copy a run keeps)."""
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "images": str(self.images),
                               "splits": {k: str(v) for k, v in self.splits.items()},
                               "columns": {("video" if role == "image" and self.video else role): self.columns[role]
                                           for role in self.required}}
        if self.prompt is not None:
            out["prompt"] = self.prompt
        if self.vision is not None:
            out["vision"] = self.vision
        out["features"] = str(self.features)
        if self.labels:
            out["labels"] = list(self.labels)
        out["ratio"] = str(self.ratio) if self.ratio.denominator != 1 else int(self.ratio)
        return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "features"


def read_task_file(path: Path, reserved: Collection[str] = ()) -> TaskFile:
    """Read and check a task file (keys, kind, name, paths, columns, prompt); `reserved` are the names it must not
    take (the built-in tasks and their aliases)."""
    import yaml

    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise DataError(f"{path}: task file not found. Fix: check the path given to --task.")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise DataError(f"{path}: {where}not valid YAML ({problem}). Fix: correct the YAML "
                        f"(e.g. quote values holding ':' or '#').") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the task file ({exc}). Fix: check the file.") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: a task file is a YAML mapping of {', '.join(KEYS)}, found "
                        f"{type(raw).__name__}. Fix: {FILE_FIX}.")
    unknown = [k for k in raw if k not in KEYS]
    if unknown:
        raise DataError(f"{path}: unknown key {unknown[0]!r}. Fix: use the keys {', '.join(KEYS)}.")
    for key in ("name", "kind", "images", "splits"):
        if key not in raw:
            raise DataError(f"{path}: key '{key}' is missing. Fix: add it ({FILE_FIX}).")
    name = str(raw["name"]).strip().lower()
    if not _NAME.match(name) or is_task_file(name):
        raise DataError(f"{path}: name {raw['name']!r} is not a task name. Fix: use lower-case letters, digits, "
                        f"'-' or '_', e.g. name: colors-qa.")
    if name in reserved:
        raise DataError(f"{path}: name {name!r} is a built-in task's. Fix: choose another name, e.g. "
                        f"name: my-{name}.")
    kind = str(raw["kind"]).strip().lower()
    if kind not in KINDS:
        raise DataError(f"{path}: kind {raw['kind']!r} is not a task kind. Fix: use one of {', '.join(KINDS)}.")
    base = path.parent
    images = (base / str(raw["images"])).resolve()
    if not images.is_dir():
        raise DataError(f"{path}: images: folder {images} not found. Fix: give the folder holding the images, "
                        f"relative to the task file.")
    splits_raw = raw["splits"]
    if not isinstance(splits_raw, dict) or not splits_raw:
        raise DataError(f"{path}: splits must map train, val or test to a file. Fix: e.g. splits: {{train: "
                        f"train.csv, test: test.csv}}.")
    splits: dict[str, Path] = {}
    for split, file in splits_raw.items():
        if split not in SPLITS:
            raise DataError(f"{path}: unknown split {split!r}. Fix: use {', '.join(SPLITS)}.")
        file_path = (base / str(file)).resolve()
        if file_path.suffix.lower() not in FORMATS:
            raise DataError(f"{path}: splits.{split}: {file} is not a CSV, JSON, JSONL or Parquet file. Fix: give "
                            f"a file ending in {', '.join(FORMATS)}.")
        if not file_path.is_file():
            raise DataError(f"{path}: splits.{split}: {file_path} not found. Fix: give the split file's path, "
                            f"relative to the task file.")
        splits[split] = file_path
    columns = dict(COLUMNS[kind])
    given = raw.get("columns") or {}
    if not isinstance(given, dict):
        raise DataError(f"{path}: columns must map a role to a column name. Fix: e.g. columns: {{image: file}}.")
    video = "video" in given
    if video and (kind == "classify" or "image" in given):
        raise DataError(f"{path}: columns: a video column is for qa, caption and choice tasks, instead of an image "
                        f"column. Fix: name one of them.")
    for role, column in given.items():
        if role not in (*COLUMNS[kind], "id", *(("video",) if kind != "classify" else ())):
            raise DataError(f"{path}: columns: {role!r} is not a column of a {kind} task. Fix: name "
                            f"{', '.join([*COLUMNS[kind], 'id'])}.")
        columns["image" if role == "video" else role] = str(column)
    prompt = raw.get("prompt")
    if prompt is not None:
        prompt = str(prompt)
        named = re.findall(r"\{([^{}]*)\}", prompt)
        bad = [n for n in named if n not in PLACEHOLDERS[kind]]
        if bad:
            allowed = ", ".join("{" + p + "}" for p in PLACEHOLDERS[kind]) or "no placeholder"
            raise DataError(f"{path}: prompt names {{{bad[0]}}}. Fix: a {kind} prompt may use {allowed}.")
    vision = None if raw.get("vision") is None else str(raw["vision"])
    features = raw.get("features")
    if features is None and vision is None:
        raise DataError(f"{path}: neither 'vision' nor 'features' is given. Fix: add vision: tiny-clip (or "
                        f"another CLIP model) to extract the features on first use, or features: FILE.h5.")
    store = ((base / str(features)).resolve() if features is not None else
             base / "features" / f"{_slug(images.name)}.{_slug(vision or '')}.h5")
    labels = raw.get("labels") or ()
    if kind != "classify" and labels:
        raise DataError(f"{path}: labels apply to classify tasks only. Fix: drop 'labels'.")
    if not isinstance(labels, (list, tuple)) or any(isinstance(x, (dict, list)) for x in labels):
        raise DataError(f"{path}: labels must be a list, e.g. labels: [cat, dog]. Fix: write them as a list.")
    try:
        ratio = Fraction(str(raw.get("ratio", 1)))
    except (ValueError, ZeroDivisionError):
        ratio = Fraction(0)
    if ratio <= 0:
        raise DataError(f"{path}: ratio {raw.get('ratio')!r} is not a positive number. Fix: e.g. ratio: 0.5.")
    required = tuple(role for role in columns if role not in OPTIONAL or role in given)
    return TaskFile(path, name, kind, images, splits, columns, prompt, vision, store,
                    tuple(str(x) for x in labels), ratio, required, video)


# ---- split files --------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One row of a split file, with what messages name: the file, its row number (from 1) and the columns."""

    path: Path
    number: int
    values: dict[str, Any]
    columns: dict[str, str]

    def error(self, role: str, problem: str, fix: str) -> DataError:
        column = self.columns.get(role, role)
        return DataError(f"{self.path}: row {self.number}, column '{column}': {problem}. Fix: {fix}.")

    def get(self, role: str) -> Any:
        return self.values.get(self.columns.get(role, role))


@lru_cache(maxsize=16)
def _table(path: Path, stamp: tuple[int, int]) -> tuple[tuple[str, ...], tuple[dict, ...]]:
    """(column names, rows) of a split file, read with `datasets`; cached per file version (a command reads a
    split when it registers the task, when it checks its images and when it loads its records)."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        table = datasets.load_dataset(FORMATS[path.suffix.lower()], data_files=str(path), split="train")
    except Exception as exc:  # noqa: BLE001 - datasets and pyarrow raise many kinds; the cause is named
        if "corresponds to no data" in str(exc) or path.stat().st_size == 0:
            return (), ()  # a file of no rows (a CSV header alone, an empty JSON list)
        cause = exc.__cause__ or exc.__context__ or exc
        text = " ".join(str(cause).split())[:200]
        raise DataError(f"{path}: cannot be read as a table ({type(cause).__name__}: {text}). Fix: write one "
                        f"record per row, each giving every column the same type.") from None
    return tuple(table.column_names), tuple(table.to_list())


def read_rows(spec: TaskFile, path: Path) -> list[Row]:
    """The rows of one split file (CSV, JSON list, JSON lines, Parquet, read with `datasets`); its columns checked."""
    try:
        st = path.stat()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the split file ({exc.strerror or exc}). Fix: check the task file's "
                        f"splits.") from None
    names, rows = _table(path, (st.st_mtime_ns, st.st_size))
    if not rows:
        raise DataError(f"{path}: the split is empty. Fix: add rows, or drop the split from the task file.")
    for role in spec.required:
        column = spec.columns[role]
        if column not in names:
            raise DataError(f"{path}: column '{column}' ({role}) is missing; the file has {', '.join(names)}. "
                            f"Fix: add the column, or name the one to use in the task file (columns: "
                            f"{{{role}: NAME}}).")
    return [Row(path, i, dict(values), spec.columns) for i, values in enumerate(rows, start=1)]


def image_key(rel: str) -> str:
    """An image's id in the feature store: its path relative to the images folder without its suffix (for a flat
    folder the file's stem, as `vlpet extract-features --images DIR` names it)."""
    return PurePosixPath(rel.replace("\\", "/")).with_suffix("").as_posix()


def _items(row: Row, role: str, what: str, csv: bool) -> list[str]:
    """A cell holding one text or a list of texts ('|'-separated in CSV); empty items are refused."""
    value = row.get(role)
    if isinstance(value, str) and csv and LIST_SEPARATOR in value:
        value = value.split(LIST_SEPARATOR)
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if (item is None or isinstance(item, (dict, list)) or (isinstance(item, str) and not item.strip())
                or (isinstance(item, float) and item != item)):  # NaN: an empty CSV cell
            raise row.error(role, f"{what} is empty or not text ({value!r:.60})", f"write the {what}")
        out.append(str(item).strip())
    return out


class OwnTask(Task):
    """A task read from a task file; its kind's subclass decides targets and scoring."""

    kind: ClassVar[str]
    spec: ClassVar[TaskFile]
    store: ClassVar[Path]
    aliases: ClassVar[tuple[str, ...]] = ()
    folder = ""
    split_files_fix = "check the task file's splits"
    input_max_length: ClassVar[int | None] = 128
    target_max_length: ClassVar[int | None] = 40
    batch_ratio = Fraction(1)
    valid_metrics: ClassVar[tuple[str, ...]] = ("acc",)
    default_metrics: ClassVar[tuple[str, ...]] = ("acc",)
    primary_metric = "acc"

    # ---- files and splits ---------------------------------------------------------------------------------
    def split_path(self, data_root: Path, name: str) -> Path:
        """The split's file from the task file (the data root plays no part)."""
        if name not in self.spec.splits:
            raise DataError(f"{self.spec.path}: no '{name}' split. Fix: add splits: {{{name}: FILE}} to the task "
                            f"file" + (", or train without validation (eval.every=0)" if name == "val" else "")
                            + ".")
        return self.spec.splits[name]

    def feature_source(self, split_name: str) -> str:
        """The task's feature store, as an absolute path (`FeatureKind.locate` opens it as it is)."""
        return str(self.store)

    def image_folder(self) -> Path | None:
        return self.spec.images

    def read_split(self, data_root: Path, name: str, for_eval: bool) -> list[Record]:
        """The records of one of the task's splits."""
        return self.read_file(self.split_path(data_root, name), for_eval)

    def read_file(self, path: Path, for_eval: bool) -> list[Record]:
        """The rows of a split file as records; every image is checked to exist, every row has the task's number of
        images, and ids (the 'id' column, else the row number) are unique."""
        csv = path.suffix.lower() == ".csv"
        records: list[Record] = []
        seen: set[str] = set()
        for row in read_rows(self.spec, path):
            noun = "video" if self.spec.video else "image"
            images = tuple(_items(row, "image", f"{noun} path", csv))
            for rel in images:
                if not (self.spec.images / rel).is_file():
                    raise row.error("image", f"{noun} {rel!r} not found in {self.spec.images}",
                                    f"put the {noun} there, or correct the path (relative to the images folder)")
            if len(images) != self.inputs.images:
                raise row.error("image", f"{len(images)} {noun}(s) where the task's first row has "
                                         f"{self.inputs.images}", f"give every row the same number of {noun}s")
            keys = tuple(image_key(rel) for rel in images)
            ident = row.get("id")
            ident = row.number if ident is None else ident
            if str(ident) in seen:
                raise row.error("id", f"id {ident!r} appears twice", "give every row its own id")
            seen.add(str(ident))
            for record in self.row_records(row, ident, keys, for_eval, csv):
                record.extra = {**(record.extra or {}), "images": list(images)}
                records.append(record)
        return records

    def row_records(self, row: Row, ident: Any, images: tuple[str, ...], for_eval: bool,
                    csv: bool) -> list[Record]:
        """The records of one row (a caption row gives one per caption when training)."""
        raise NotImplementedError

    def record(self, row: Row, ident: Any, text: str, images: tuple[str, ...], label: Any,
               extra: dict) -> Record:
        return Record(str(row.path), row.number, ident, text, images, str(self.store), label, extra)

    # ---- model input --------------------------------------------------------------------------------------
    def source_text(self, record: Record) -> str:
        """A plain prompt followed by the kind's layout, or the prompt as a template of the record's fields."""
        fields = {"question": record.text, "text": record.text,
                  "choices": " ".join(f"a{i}: {c.strip('. ')}." for i, c in enumerate(
                      (record.extra or {}).get("choices") or ()))}
        template = self.prompt if "{" in self.prompt else self.prompt + LAYOUT[self.kind]
        for key, value in fields.items():
            template = template.replace("{" + key + "}", value)
        return template.strip()

    def input_record(self, given: PredictInput, index: int) -> Record:
        """A `vlpet predict` input: its images or video (paths) and text."""
        files = (given.video,) if given.video is not None else tuple(given.images)
        return Record(given.where, index, index, given.text, tuple(str(p) for p in files), str(self.store),
                      None, {"choices": list(given.choices)})

    def eval_info(self, record: Record) -> dict:
        """The row's id, images (paths relative to the images folder), text and what its kind scores with."""
        return {"id": record.id, "images": list(record.image_ids), "text": record.text, **(record.extra or {})}

    # ---- results ------------------------------------------------------------------------------------------
    def submission(self, predictions: list[dict]) -> tuple[str, str]:
        """[{"id", "prediction"}]: what `vlpet eval --task FILE --predictions` reads back."""
        import json

        return "json", json.dumps([{"id": p["id"], "prediction": p["prediction"]} for p in predictions])

    def review(self, prediction: dict) -> Review:
        return Review(self.review_text(prediction), tuple(self.references(prediction)),
                      tuple(prediction.get("images") or ()))

    def review_text(self, prediction: dict) -> str:
        return str(prediction.get("text") or "")

    def references(self, prediction: dict) -> list[str]:
        raise NotImplementedError

    def score_files(self, job: FileScoring) -> dict:
        """Score [{"id", "prediction"}] (or "answer", "caption", "label") against one of the task's split files."""
        scored = self.file_predictions(job)
        return {**self.score(scored, job.metrics, job.vqa_variant), "n": len(scored)}

    def file_predictions(self, job: FileScoring) -> list[dict]:
        """The predictions of a file joined with their rows of the split file (`eval_info` plus "prediction"), in
        the file's order, as `vlpet eval` predicts them."""
        records = self.read_file(Path(job.annotations), True)
        info = {str(r.id): self.eval_info(r) for r in records}
        preds: dict[str, Any] = {}
        for ref in read_records(Path(job.predictions), "predictions file", "check --predictions"):
            key = str(ref.field("id"))
            files.put(preds, key, ref.field("prediction", "answer", "caption", "label"), Path(job.predictions))
        ids = files.check_ids(preds, info, job.predictions, job.annotations, job.allowed_missing(False))
        return [{**info[i], "prediction": self.file_prediction(preds[i], info[i])} for i in ids]

    def file_prediction(self, value: Any, info: dict) -> str:
        """A prediction as read from a file, as the model would have given it."""
        return str(value)


class QaTask(OwnTask):
    """Open answers: one answer (exact match after VQA's normalisation) or a list (the VQA soft score)."""

    kind = "qa"
    decoding = Generate(num_beams=1, max_length=20)
    target_max_length = 20
    label = "accuracy"

    def row_records(self, row, ident, images, for_eval, csv) -> list[Record]:
        question = _items(row, "question", "question", False)[0]
        answers = _items(row, "answer", "answer", False)
        label = {a: min(answers.count(a) / 3.0, 1.0) if len(answers) > 1 else 1.0 for a in answers}
        return [self.record(row, ident, question, images, label, {"answers": answers})]

    def target(self, record: Record, rng: Any, train: bool) -> tuple[str, float] | None:
        """An answer drawn ∝ its soft score (train) or the best one, weight its score (VQA's rule)."""
        return sample_answer(record.label, rng, train)

    def record_scores(self, predictions: list[dict], vqa_variant: str = "reference") -> list[float]:
        """100 x the exact match (one answer) or min(#matching / 3, 1) (a list), normalised as VQA does."""
        from vlpet_cli.metrics.vqa import normalize_answer

        out = []
        for p in predictions:
            pred, answers = normalize_answer(str(p["prediction"])), [normalize_answer(a) for a in p["answers"]]
            matching = sum(a == pred for a in answers)
            out.append(100.0 * (min(matching / 3.0, 1.0) if len(answers) > 1 else float(matching > 0)))
        return out

    def score(self, predictions: list[dict], metrics: list[str] | None = None,
              vqa_variant: str = "reference") -> dict:
        self.resolve_metrics(metrics)
        scores = self.record_scores(predictions)
        return {"acc": sum(scores) / max(len(scores), 1)}

    def references(self, prediction: dict) -> list[str]:
        return list(prediction.get("answers") or ())


class CaptionTask(OwnTask, CocoTask):  # type: ignore[misc]  # CocoTask infers narrower class constants
    """Captions: one caption or a list of references per row, scored as COCO's (`CocoTask.score`)."""

    kind = "caption"
    loss_reduction = "token"
    input_max_length = 40
    hub_task = "image-to-text"
    label = "CIDEr"
    valid_metrics = CocoTask.valid_metrics
    default_metrics = CocoTask.default_metrics
    primary_metric = CocoTask.primary_metric
    validation_metrics = CocoTask.validation_metrics
    decoding = CocoTask.decoding
    split_option = False

    def row_records(self, row, ident, images, for_eval, csv) -> list[Record]:
        captions = _items(row, "caption", "caption", False)
        extra = {"img_id": ident, "references": captions}
        if for_eval:
            return [self.record(row, ident, "", images, None, extra)]
        return [self.record(row, ident, "", images, caption, extra) for caption in captions]

    def review_text(self, prediction: dict) -> str:
        return self.prompt.strip()

    def references(self, prediction: dict) -> list[str]:
        return list(prediction.get("references") or ())


class ChoiceTask(OwnTask):
    """Multiple choice: the choices listed in the text, the answer generated as 'a<index>' (TVQA's scoring)."""

    kind = "choice"
    decoding = Generate(num_beams=1, max_length=5)
    target_max_length = 5
    label = "accuracy"

    def row_records(self, row, ident, images, for_eval, csv) -> list[Record]:
        question = _items(row, "question", "question", False)[0]
        choices = _items(row, "choices", "choice", csv)
        raw = row.get("answer")
        if isinstance(raw, bool) or raw is None:
            raise row.error("answer", f"answer {raw!r} is not a choice's index or text",
                            "give the right choice's index (from 0) or its text")
        if isinstance(raw, str) and raw.strip() in choices:
            index = choices.index(raw.strip())
        elif isinstance(raw, int) or (isinstance(raw, str) and raw.strip().isdigit()):
            index = int(raw)
            if not 0 <= index < len(choices):
                raise row.error("answer", f"answer index {index} is out of range for {len(choices)} choices",
                                f"give an index from 0 to {len(choices) - 1}, or the choice's text")
        else:
            raise row.error("answer", f"answer {raw!r} is none of the choices {choices}",
                            "give the right choice's index (from 0) or its exact text")
        return [self.record(row, ident, question, images, f"a{index}", {"choices": choices, "answer": index})]

    def target(self, record: Record, rng: Any, train: bool) -> tuple[str, float] | None:
        return None if record.label is None else (record.label, 1.0)

    def record_scores(self, predictions: list[dict], vqa_variant: str = "reference") -> list[float]:
        """100 when the generated 'a<index>' (read as VALUE reads it) is the answer's index, else 0."""
        return [100.0 * (choice_index(p["prediction"]) == p["answer"]) for p in predictions]

    def score(self, predictions: list[dict], metrics: list[str] | None = None,
              vqa_variant: str = "reference") -> dict:
        self.resolve_metrics(metrics)
        scores = self.record_scores(predictions)
        return {"acc": sum(scores) / max(len(scores), 1)}

    def file_prediction(self, value: Any, info: dict) -> str:
        """'a<index>', an index, or a choice's text, as 'a<index>'."""
        if isinstance(value, int) and not isinstance(value, bool):
            return f"a{value}"
        text = str(value).strip()
        return f"a{info['choices'].index(text)}" if text in info["choices"] else text

    def review_text(self, prediction: dict) -> str:
        choices = "; ".join(f"a{i}: {c}" for i, c in enumerate(prediction.get("choices") or ()))
        return f"{prediction.get('text') or ''} [{choices}]"

    def references(self, prediction: dict) -> list[str]:
        k = prediction["answer"]
        return [f"a{k}: {prediction['choices'][k]}"]


class ClassifyTask(OwnTask):
    """A label from a fixed set, decoded by comparing the labels' logits (NLVR2's true/false)."""

    kind = "classify"
    hub_task = "image-classification"
    label = "accuracy"
    target_max_length = None

    def row_records(self, row, ident, images, for_eval, csv) -> list[Record]:
        text = row.get("text")
        text = "" if text is None else str(text).strip()
        label = _items(row, "label", "label", False)[0]
        labels = self.spec.labels  # the file's, or those inferred from train (`task_class_of`)
        if label not in labels:
            raise row.error("label", f"label {label!r} is not in the task's labels ({', '.join(labels)})",
                            "correct the label, or add it to the task file's labels")
        return [self.record(row, ident, text, images, label, {"label": label})]

    def target(self, record: Record, rng: Any, train: bool) -> tuple[str, float] | None:
        return None if record.label is None else (record.label, 1.0)

    def source_ids(self, records: Sequence[Record], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
        """The encoder ids; the first time the task meets the tokenizer, its labels are checked to be told apart."""
        if getattr(self, "_checked_with", None) is not tokenizer:
            self.check_labels(tokenizer)
            self._checked_with = tokenizer
        return super().source_ids(records, tokenizer)

    def check_labels(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """The labels are compared by the model's score of one token each: the first token after the prefix all of
        them share (`VLModel.score_choices`); two labels with the same token there could never be told apart."""
        labels = self.spec.labels
        ids = [tokenizer(label)["input_ids"] for label in labels]
        j = 0
        while all(len(x) > j for x in ids) and len({x[j] for x in ids}) == 1:
            j += 1
        first: dict[int | None, str] = {}
        for label, x in zip(labels, ids):
            token = x[j] if len(x) > j else None
            if token in first:
                raise self.spec.error(f"labels {first[token]!r} and {label!r} begin alike, and the model tells labels "
                                      f"apart by one token after what they all share",
                                      "give labels that differ in their first word (e.g. 'car, red' and 'bike, red')")
            first[token] = label

    def record_scores(self, predictions: list[dict], vqa_variant: str = "reference") -> list[float]:
        """100 when the label scored highest is the row's label, else 0."""
        return [100.0 * (str(p["prediction"]) == str(p["label"])) for p in predictions]

    def score(self, predictions: list[dict], metrics: list[str] | None = None,
              vqa_variant: str = "reference") -> dict:
        self.resolve_metrics(metrics)
        scores = self.record_scores(predictions)
        return {"acc": sum(scores) / max(len(scores), 1)}

    def references(self, prediction: dict) -> list[str]:
        return [str(prediction["label"])]


BASES: dict[str, type[OwnTask]] = {"qa": QaTask, "caption": CaptionTask, "choice": ChoiceTask,
                                   "classify": ClassifyTask}


def _first_row(spec: TaskFile) -> Row:
    first = next(iter(spec.splits.values()))
    return read_rows(spec, first)[0]


def _labels(spec: TaskFile) -> tuple[str, ...]:
    """The classify task's labels: the file's, else those of its train split in order of first use."""
    if spec.labels:
        return spec.labels
    if "train" not in spec.splits:
        raise spec.error("a classify task without a train split needs its labels", "add labels: [...]")
    path = spec.splits["train"]
    seen: dict[str, None] = {}
    for row in read_rows(spec, path):
        seen.setdefault(_items(row, "label", "label", False)[0], None)
    if len(seen) < 2:
        raise spec.error(f"the train split {path} holds {len(seen)} label(s)", "give at least two labels")
    return tuple(seen)


def task_class_of(spec: TaskFile) -> type[OwnTask]:
    """The Task subclass of a task file (its declarations read from the file and its first row)."""
    first = _first_row(spec)
    csv = first.path.suffix.lower() == ".csv"
    n_images = len(_items(first, "image", "image path", csv))
    base = BASES[spec.kind]
    has_text = spec.kind != "classify" or spec.columns["text"] in first.values
    choices = len(_items(first, "choices", "choice", csv)) if spec.kind == "choice" else 0
    if spec.video and n_images != 1:
        raise first.error("image", f"{n_images} videos in one row", "give each row one video")
    attrs: dict[str, Any] = {
        "name": spec.name, "spec": spec, "store": spec.features, "batch_ratio": spec.ratio,
        "feature_kind": "video" if spec.video else "image",
        "default_prompt": spec.prompt if spec.prompt is not None else f"{spec.name}: ",
        "splits": {split: split for split in spec.splits},
        "inputs": Inputs(images=n_images, video=spec.video, choices=choices,
                         text={"qa": "question", "caption": None, "choice": "question",
                               "classify": "statement" if has_text else None}[spec.kind]),
        "__module__": __name__,
    }
    if spec.kind == "classify":
        labels = _labels(spec)
        attrs["decoding"] = ScoreChoices(labels)
        spec = replace(spec, labels=labels)
        attrs["spec"] = spec
    if spec.kind == "caption":
        attrs["label"] = f"{spec.name} CIDEr"
    else:
        attrs["label"] = f"{spec.name} accuracy"
    return type(f"Own_{_slug(spec.name)}", (base,), attrs)


def write_copy(cls: type[OwnTask], dest: Path) -> None:
    """The task file as a run keeps it: every path absolute, the labels spelled out."""
    import yaml

    from vlpet_cli.atomic import write_text

    dest.parent.mkdir(parents=True, exist_ok=True)
    write_text(dest, yaml.safe_dump(cls.spec.as_yaml(), sort_keys=False, allow_unicode=True))
