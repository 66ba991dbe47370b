"""What every image-text task shares: records, the Task base (its declarations), TaskDataset and collate.

A `Task` owns everything about one task, declared once: its files, splits, feature sources and records, what one
input holds (`Inputs`: what `vlpet predict` asks for, and the record it builds from them), prompt, tokenisation and
truncation, targets and loss reduction, its metrics (valid, default, primary, validation), how it decodes (generate
or score choices: the default of `eval.generation`), how its predictions are scored, its submission format, how
predictions and annotation files are read for `vlpet eval --predictions` (`FileScoring`), the image ids it needs
features for and its batch ratio (the default of `train.task_ratios`). A `TaskDataset` turns a task's records into
model items; `collate` builds the batch contract that `vl/model.py` relies on (spec/pipeline.md §3). numpy and
torch are imported inside functions so that importing the task table stays cheap for the CLI.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeGuard

from vlpet_cli.config import GenerationSpec, VideoData
from vlpet_cli.errors import DataError, VlpetError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from vlpet_cli.tasks.submissions import Questions

_METRIC_ALIASES = {"rouge": "rougel", "accuracy": "acc", "vqaacc": "vqa"}


@dataclass(slots=True)
class Record:
    """One example as read from an annotation file; `extra` holds task-specific evaluation fields."""

    file: str
    index: int
    id: Any
    text: str
    image_ids: tuple[str, ...]
    source: str
    label: Any = None
    extra: dict | None = None

    def where(self) -> str:
        """'<file>: record <index> (<id>)', the prefix of every message about this record."""
        return f"{self.file}: record {self.index} ({self.id})"


@dataclass(frozen=True)
class Generate:
    """Decode by generation; these are the task's own `eval.generation` settings."""

    num_beams: int = 1
    max_length: int = 20
    greedy_on: tuple[str, ...] = ()
    """Backbone families on which the task decodes greedily (num_beams 1) instead."""

    def spec(self, family: str, given: GenerationSpec | None = None) -> GenerationSpec:
        """The generation settings on a backbone family: `given` (eval.generation.<task>), with what it leaves
        open (None) taken from the task's own."""
        given = given or GenerationSpec()
        own = {"num_beams": 1 if family in self.greedy_on else self.num_beams, "max_length": self.max_length}
        return given.model_copy(update={k: v for k, v in own.items() if getattr(given, k) is None})


@dataclass(frozen=True)
class ScoreChoices:
    """Decode by comparing the model's scores of fixed answers (NLVR2: 'true' vs 'false'); no generation."""

    choices: tuple[str, ...]

    def describe(self) -> str:
        """How predictions are made, for the eval record's settings."""
        return "logits of " + " vs ".join(repr(c) for c in self.choices)


Decoding = Generate | ScoreChoices


@dataclass(frozen=True)
class Inputs:
    """What one input of a task holds, as `vlpet predict` asks for it: its images (or video) and texts."""

    images: int = 1
    """Images per input (a video task: its one video)."""
    video: bool = False
    """Whether the input is a video file (predict's --video) rather than images."""
    text: str | None = None
    """The text it takes, by its option's name: 'question', 'statement', or None (captioning)."""
    choices: int = 0
    """Answer choices per input (video QA)."""
    moment: bool = False
    """Whether it reads a moment of its video (the annotation's `ts`, predict's --ts)."""


@dataclass
class PredictInput:
    """One input a user gives `vlpet predict`: its images (or its video) and its text (question or statement; none
    for captions); for video tasks also the choices (TVQA, How2QA), the subtitles text and the moment `ts`
    ("s-e" or "s,e")."""

    images: list[Path]
    text: str = ""
    where: str = "command line"
    video: Path | None = None
    choices: list[str] = field(default_factory=list)
    subtitles: str = ""
    ts: str | None = None


@dataclass(frozen=True)
class FileScoring:
    """What `vlpet eval --predictions` scores: a predictions file against an annotation file, and how."""

    predictions: Path
    annotations: Path
    metrics: list[str] | None = None
    """The metrics asked for (None: the task's defaults)."""
    split: str | None = None
    """The split predicted, for annotation files that hold several (Karpathy's dataset_coco.json)."""
    vqa_variant: str = "reference"
    allow_missing: bool | None = None
    """Score only the predicted ids; None: allowed for annotation files covering a whole pool."""
    tokenizer: str = "auto"
    """Caption tokenizer: 'auto', 'ptb' or 'python'."""

    def allowed_missing(self, pooled: bool) -> bool:
        """Whether annotated ids may lack a prediction (by default only in a pooled annotation file)."""
        return pooled if self.allow_missing is None else self.allow_missing


@dataclass(frozen=True)
class Review:
    """One row of the results page (`vlpet eval --html`): the record's text as the model was asked (question,
    statement or prompt), its reference answers or captions, its answer type where the task has them, and the ids
    of its images (or video), resolved to files under `Task.image_folder()` or `--images DIR`."""

    text: str
    references: tuple[str, ...]
    image_ids: tuple[str, ...]
    answer_type: str | None = None


class Task:
    """One task: files, splits, records, prompt, targets, loss, metrics, decoding, scoring and file formats."""

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    folder: ClassVar[str]
    default_prompt: ClassVar[str]
    splits: ClassVar[dict[str, str]]
    input_max_length: ClassVar[int | None]
    target_max_length: ClassVar[int | None]
    loss_reduction: ClassVar[str] = "example"
    inputs: ClassVar[Inputs] = Inputs()
    """What one input holds: images (or a video), text, choices, moment."""
    batch_ratio: ClassVar[Fraction]
    """Batch size relative to train.batch_size (the reference's per-task ratios; train.task_ratios overrides)."""
    decoding: ClassVar[Decoding]
    """How it predicts: generation (its settings the default of eval.generation) or scoring fixed choices."""
    valid_metrics: ClassVar[tuple[str, ...]]
    """Metric names a user may ask for ('bleu' is shorthand for bleu1..bleu4)."""
    default_metrics: ClassVar[tuple[str, ...]]
    """What is computed when the user names no metric."""
    primary_metric: ClassVar[str]
    """The metric that stands for the task (best-checkpoint 'avg', quick start, report, plots)."""
    validation_metrics: ClassVar[tuple[str, ...] | None] = None
    """What validation during training computes (None: the defaults)."""
    label: ClassVar[str]
    """The primary metric's name for people, e.g. 'VQA accuracy' (the quick start's table)."""
    image_fields: ClassVar[tuple[str, ...]] = ()
    """Fields of a split-file record that name its images (for `vlpet extract-features --annotations`)."""
    split_option: ClassVar[bool] = False
    """Whether `vlpet eval --predictions` may take a --split for this task's annotation files."""
    feature_kind: ClassVar[str] = "image"
    """'image' (per-image grid features) or 'video' (per-video frame features, data.video)."""
    split_files_fix: ClassVar[str] = "check --data-root: it must hold the task's annotation files"
    """How to fix a missing split file (the messages of readers and of `data.loading.check_annotations`)."""
    hub_task: ClassVar[str] = "visual-question-answering"
    """The Hugging Face Hub's task type of a model trained on it (model cards)."""

    def __init__(self, prompt: str | None = None, video: VideoData | None = None) -> None:
        self.prompt = self.default_prompt if prompt is None else prompt
        self.video = video if video is not None else VideoData()

    # ---- files and splits -------------------------------------------------------------------------------
    def split_names(self, split: str) -> list[str]:
        """File-level split names for a kind ('train'/'val'/'test') or a comma-separated list of names."""
        split = self.splits.get(split, split)
        names = [s.strip() for s in split.split(",") if s.strip()]
        if not names:
            raise VlpetError(f"{self.name}: empty split name. Fix: use one of {', '.join(self.splits)}.")
        return names

    def split_path(self, data_root: Path, name: str) -> Path:
        """The annotation file of one split."""
        return Path(data_root) / self.folder / f"{name}.json"

    def feature_source(self, split_name: str) -> str:
        """The feature-store source (a folder under the data root) for images of a split."""
        raise NotImplementedError

    def is_train_split(self, split: str) -> bool:
        """True when `split` names the task's training split."""
        return self.split_names(split) == self.split_names("train")

    def load(self, data_root: Path, split: str, *, for_eval: bool | None = None) -> list[Record]:
        """Read and validate the records of a split (kind or names); for_eval defaults to 'not train'."""
        if for_eval is None:
            for_eval = not self.is_train_split(split)
        records: list[Record] = []
        for name in self.split_names(split):
            records.extend(self.read_split(Path(data_root), name, for_eval))
        return records

    def read_split(self, data_root: Path, name: str, for_eval: bool) -> list[Record]:
        """Read one split file into records."""
        raise NotImplementedError

    def support_files(self, data_root: Path) -> list[Path]:
        """Files outside the task's folder that its records depend on (the video tasks' subtitles)."""
        return []

    # ---- model input and targets ------------------------------------------------------------------------
    def source_text(self, record: Record) -> str:
        """The encoder text: prompt followed by the record's text."""
        return self.prompt + record.text

    def source_ids(self, records: Sequence[Record], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
        """The encoder token ids of records (one batched call): their source_text tokenised, cut at
        input_max_length. TaskDataset.item and the record cache both ask this, so there is one rule."""
        return tokenize_batch(tokenizer, [self.source_text(r) for r in records], self.input_max_length)

    def input_record(self, given: PredictInput, index: int) -> Record:
        """The record of one `vlpet predict` input, as the task's reader would build it from a file."""
        source = self.feature_source(self.split_names("test")[0])
        return Record(given.where, index, index, given.text, tuple(str(p) for p in given.images), source)

    def target(self, record: Record, rng: Any, train: bool) -> tuple[str, float] | None:
        """(target text, loss weight) for a record, or None when it has no target."""
        raise NotImplementedError

    def eval_info(self, record: Record) -> dict:
        """What evaluation needs about a record (ids, answers, references, ...)."""
        raise NotImplementedError

    # ---- metrics, scoring and files -----------------------------------------------------------------------
    @classmethod
    def resolve_metrics(cls, metrics: Iterable[str] | None = None) -> list[str]:
        """Expand and check metric names ("bleu" -> bleu1..bleu4, "ROUGE_L" -> rougel); None gives the defaults."""
        if metrics is None:
            return list(cls.default_metrics)
        chosen: list[str] = []
        for raw in metrics:
            name = re.sub(r"[\s_\-]", "", str(raw).lower())
            name = _METRIC_ALIASES.get(name, name)
            if name not in cls.valid_metrics:
                raise VlpetError(f"metric {raw!r} does not apply to task {cls.name!r}; "
                                 f"valid: {', '.join(cls.valid_metrics)}")
            for expanded in [f"bleu{i}" for i in range(1, 5)] if name == "bleu" else [name]:
                if expanded not in chosen:
                    chosen.append(expanded)
        if not chosen:
            raise VlpetError(f"no metric given for task {cls.name!r}; valid: {', '.join(cls.valid_metrics)}")
        return chosen

    def score(self, predictions: list[dict], metrics: list[str] | None = None,
              vqa_variant: str = "reference") -> dict:
        """Metrics (x100, lower-case keys) of predictions carrying their record's eval_info."""
        raise NotImplementedError

    def submission(self, predictions: list[dict]) -> tuple[str, str]:
        """(file name suffix, content) in the task's official submission format."""
        raise NotImplementedError

    def score_files(self, job: FileScoring) -> dict:
        """Score a predictions file against an annotation file (`vlpet eval --predictions`)."""
        raise NotImplementedError

    # ---- leaderboard submissions (tasks/submissions.py) ------------------------------------------------------
    def submission_questions(self, data_root: Path, split: str) -> Questions | None:
        """The questions a split's submission must answer in full though only some may be predicted (VQA
        test-dev2015: every test2015 question), read before the model is built; None: the predictions are the
        submission."""
        return None

    def complete_submission(self, predictions: list[dict], questions: Questions) -> tuple[str, str, int]:
        """(suffix, content, answers filled in) of the submission answering every question of `questions`."""
        raise NotImplementedError

    def check_submission(self, submission: Path, questions: Path) -> dict:
        """Check a leaderboard submission file against its server's question file (`vlpet eval
        --check-submission`): every question answered exactly once, nothing else; one DataError otherwise."""
        raise NotImplementedError

    # ---- looking at results (`vlpet eval --html`) ----------------------------------------------------------
    def record_scores(self, predictions: list[dict], vqa_variant: str = "reference") -> list[float]:
        """Each prediction's own score, in order, on its primary metric's 0-100 scale (VQA's soft score, exact
        match, a caption's CIDEr against its own references): what the results page shows and sorts by."""
        raise NotImplementedError

    def review(self, prediction: dict) -> Review:
        """What the results page shows of one prediction (it carries its record's `eval_info`)."""
        raise NotImplementedError

    def file_predictions(self, job: FileScoring) -> list[dict]:
        """The predictions of a predictions file joined with their annotations, shaped as `vlpet eval`'s own
        predictions (`eval_info` plus "prediction"), in the file's order: what `vlpet eval --predictions --html`
        shows. Files are checked as `score_files` checks them."""
        raise VlpetError(f"{self.name}: --html with --predictions is not available for this task. Fix: write the "
                         f"page from a run with `vlpet eval RUN --html`.")

    def image_folder(self) -> Path | None:
        """Where this task's raw images (or videos) are, when the task knows (a task file's `images:`); None for
        built-in tasks, whose datasets ship features only (`vlpet eval --html --images DIR` names the folder)."""
        return None

    @classmethod
    def file_images(cls, data: Any, path: Path) -> dict[str, str | None] | None:
        """Image ids -> relative image path for an annotation file in a format of this task's own (not a
        plain list of records with `image_fields`), or None when `data` is not in such a format."""
        return None


def sample_answer(label: dict[str, float] | None, rng: Any, train: bool) -> tuple[str, float] | None:
    """LXMERT answer choice: sample ∝ score when training, highest score when not; ('', 0) if no score."""
    if label is None:
        return None
    total = sum(label.values())
    if total <= 0:
        return "", 0.0
    if len(label) == 1:
        return next(iter(label.items()))
    if not train:
        return max(label.items(), key=lambda kv: kv[1])
    u = rng.random() * total
    acc = 0.0
    for answer, score in label.items():
        acc += score
        if u < acc:
            return answer, score
    return [kv for kv in label.items() if kv[1] > 0][-1]  # float rounding left u just above the sum


# ---- tokenisation, dataset and collation --------------------------------------------------------------------
_BACKENDS: dict[tuple[int, int, int | None], tuple[Any, Any]] = {}


def _backend(tokenizer: PreTrainedTokenizerBase, max_length: int | None) -> Any:
    """A private copy of a fast tokenizer's Rust tokenizer that truncates as `tokenizer(..., max_length,
    truncation=True)` does (right side, special tokens kept), memoised per tokenizer and length; None for a slow
    tokenizer or one truncating on the left."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "truncation_side", "right") != "right":
        return None
    key = (id(tokenizer), len(tokenizer), max_length)
    memo = _BACKENDS.get(key)
    if memo is not None and memo[0] is tokenizer:
        return memo[1]
    from tokenizers import Tokenizer

    own = Tokenizer.from_str(backend.to_str())
    own.no_padding()
    if max_length is None:
        own.no_truncation()
    else:
        own.enable_truncation(max_length)
    _BACKENDS[key] = (tokenizer, own)
    return own


def tokenize_batch(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int | None) -> list[list[int]]:
    """Token ids of texts with the tokenizer's own special tokens, truncated to max_length when given: the ids of
    `tokenizer(text, max_length=..., truncation=True)`, in one batched call of the Rust tokenizer when it has one."""
    if not texts:
        return []
    backend = _backend(tokenizer, max_length)
    if backend is not None:
        return [e.ids for e in backend.encode_batch_fast(list(texts), add_special_tokens=True)]
    texts = list(texts)
    enc = tokenizer(texts, max_length=max_length, truncation=True) if max_length is not None else tokenizer(texts)
    return [list(ids) for ids in enc["input_ids"]]


class FlatRecords(Protocol):
    """Records that know their encoder token ids (data/cache.py's memory-mapped CachedRecords, `flat = True`)."""

    flat: bool

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> Record: ...

    def token_ids(self, i: int) -> list[int]: ...

    def token_lengths(self, indices: Sequence[int]) -> list[int]: ...


def is_flat(records: object) -> TypeGuard[FlatRecords]:
    """Whether `records` are cached records that carry their token ids."""
    return bool(getattr(records, "flat", False))


class TaskDataset:
    """Map-style dataset of one task split; item i at epoch e is deterministic given the seed."""

    def __init__(self, task: Task, records: Sequence[Record], features: Any, tokenizer: PreTrainedTokenizerBase,
                 split_kind: str = "train", seed: int = 0) -> None:
        if split_kind not in ("train", "eval"):
            raise VlpetError(f"split_kind must be 'train' or 'eval', not {split_kind!r}.")
        if seed < 0:
            raise VlpetError(f"the data seed must be >= 0, not {seed}.")
        self.task = task
        self.records = records if is_flat(records) else list(records)  # data/cache.py: mapped
        self.features = features
        self.tokenizer = tokenizer
        self.split_kind = split_kind
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose answer draws __getitem__ returns."""
        self.epoch = epoch

    @property
    def pad_id(self) -> int:
        """The tokenizer's pad id (0 when it has none)."""
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return 0 if pad is None else int(pad)

    def __getitem__(self, i: int) -> dict:
        return self.item(i, self.epoch)

    def rng(self, i: int, epoch: int) -> Any:
        """The random generator of item i at an epoch: seeded from (seed, epoch, i)."""
        import numpy as np

        return np.random.default_rng((self.seed, epoch, i))

    def visual(self, record: Record) -> dict:
        """The model's visual input for a record, as its store reads it: vis_feats (n_img, n_tokens, dim) float32
        for images; for a video task (1, frames, dim), the video's frames resized as the reference does, with
        vis_kind and, with data.video.mask_padding, vis_mask. Errors name the record."""
        stores = self.features
        store = stores.get(record.source) if isinstance(stores, Mapping) else stores
        if store is None:
            raise DataError(f"{record.where()}: no feature store for source '{record.source}'. "
                            f"Fix: open the features of source '{record.source}' for this task.")
        try:
            return store.visual(record.image_ids, self.task.video)
        except DataError as e:
            raise DataError(f"{record.where()}: {e}") from None

    def item(self, i: int, epoch: int) -> dict:
        """The model item of record i at an epoch: token ids, features, target ids, weight, eval info."""
        record = self.records[i]
        task = self.task
        target = task.target(record, self.rng(i, epoch), self.split_kind == "train")
        target_ids = None
        weight = 0.0
        if target is not None:
            text, weight = target
            target_ids = tokenize_batch(self.tokenizer, [text], task.target_max_length)[0]
        out = {
            "task": task.name,
            "input_ids": (self.records.token_ids(i) if is_flat(self.records) else
                          task.source_ids([record], self.tokenizer)[0]),
            "target": None if target is None else target[0],
            "target_ids": target_ids,
            "weight": float(weight),
            "loss_reduction": task.loss_reduction,
            "meta": task.eval_info(record),
        }
        out.update(self.visual(record))
        return out


def collate(items: Sequence[dict], pad_id: int) -> dict:
    """Batch items of one task into the model's batch contract (spec: input_ids, vis_feats, labels, ...)."""
    import numpy as np
    import torch

    if not items:
        raise VlpetError("cannot collate an empty batch.")
    tasks = {it["task"] for it in items}
    if len(tasks) != 1:
        raise VlpetError(f"a batch must hold one task, found {sorted(tasks)}.")
    n = len(items)
    t_len = max(len(it["input_ids"]) for it in items)
    input_ids = torch.full((n, t_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, t_len), dtype=torch.long)
    for b, it in enumerate(items):
        ids = it["input_ids"]
        input_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[b, : len(ids)] = 1

    shape = items[0]["vis_feats"].shape
    for it in items:
        if it["vis_feats"].shape != shape:
            raise DataError(f"{items[0]['task']}: image features of different shapes in one batch "
                            f"({shape} vs {it['vis_feats'].shape}, record {it['meta']}). "
                            f"Fix: extract all features with the same backbone and layer.")
    vis_feats = torch.from_numpy(np.stack([it["vis_feats"] for it in items]).astype(np.float32, copy=False))
    extra: dict = {}
    if "vis_kind" in items[0]:
        extra["vis_kind"] = items[0]["vis_kind"]
    if any("vis_mask" in it for it in items):  # video with data.video.mask_padding: 0 marks a padded frame
        n_vis = shape[0] * shape[1]
        extra["vis_mask"] = torch.from_numpy(np.stack(
            [np.asarray(it["vis_mask"], dtype=np.int64) if "vis_mask" in it else np.ones(n_vis, dtype=np.int64)
             for it in items]))

    labels = None
    if any(it["target_ids"] is not None for it in items):
        s_len = max(len(it["target_ids"] or ()) for it in items)
        labels = torch.full((n, s_len), -100, dtype=torch.long)
        for b, it in enumerate(items):
            ids = it["target_ids"] or []
            labels[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)

    return {
        "task": items[0]["task"],
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "vis_feats": vis_feats,
        "labels": labels,
        "loss_weights": torch.tensor([it["weight"] for it in items], dtype=torch.float),
        "loss_reduction": items[0]["loss_reduction"],
        "meta": [it["meta"] for it in items],
        **extra,
    }
