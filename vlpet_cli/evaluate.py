"""`vlpet eval`: generate per task with explicit settings, score with the field's metrics, write the files."""

from __future__ import annotations

import json
import os
import platform
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from vlpet_cli.atomic import signals_deferred, write_json, write_text
from vlpet_cli.config import Preset
from vlpet_cli.errors import VlpetError
from vlpet_cli.inference import check_precision, decoding_settings, predict_all, score
from vlpet_cli.progress import Progress
from vlpet_cli.runs import Located, check_writable, checkpoints_dir, locate, recorded_path
from vlpet_cli.tasks import (
    TASKS,
    FileScoring,
    Task,
    VideoTask,
    own_task,
    register_run_tasks,
    resolve_task,
    task_class,
)
from vlpet_cli.tasks.submissions import Questions
from vlpet_cli.threads import configure_threads, requested_threads

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from vlpet_cli.vl.model import VLModel


def own_annotations(task: str, split: str | None) -> Path:
    """The split file a task file's predictions are scored against when no annotation file is given."""
    cls = own_task(resolve_task(task))
    if cls is None:
        raise VlpetError(f"scoring a predictions file of task {task!r} needs its annotation file: pass --annotations")
    split = split or "test"
    if split not in cls.spec.splits:
        raise VlpetError(f"{cls.spec.path}: no {split!r} split to score against; pass --split "
                         f"({', '.join(cls.spec.splits)}) or --annotations FILE")
    return cls.spec.splits[split]


def score_predictions_file(
    task: str,
    predictions: Path,
    annotations: Path | None,
    split: str | None = None,
    metrics: list[str] | None = None,
    vqa_variant: str = "reference",
    allow_missing: bool | None = None,
    tokenizer: str = "auto",
) -> dict:
    """Score a predictions file for a task against an annotation file (no model); metrics lower-case, x100.

    allow_missing=None lets annotation files that cover a whole pool (official VQA v2 annotations, COCO
    captions_*.json) hold ids without a prediction; split-sized files must be predicted completely. Only tasks
    whose annotation files hold several splits (Karpathy's dataset_coco.json) take a split. A task file's
    predictions need no annotation file: they are scored against its split (`split`, default test).
    """
    cls = task_class(task)
    cls.resolve_metrics(metrics)  # an unknown metric is refused before any file is read
    if annotations is None:
        annotations, split = own_annotations(task, split), None
    if split is not None and not cls.split_option:
        takes = ", ".join(name for name, c in TASKS.items() if c.split_option)
        raise VlpetError(f"split applies only to {takes} (annotation files holding several splits, such as "
                         f"Karpathy's dataset_coco.json), not to task {resolve_task(task)!r}; drop --split")
    return cls().score_files(FileScoring(Path(predictions), Path(annotations), metrics, split, vqa_variant,
                                         allow_missing, tokenizer))


def page_folder(predictions: Path, out: Path | None, images: Path | None) -> Path:
    """Where the results page of a predictions file goes (--out, else beside the file), checked writable, and
    --images checked: before anything is scored."""
    from vlpet_cli.pages import check_images_folder

    folder = Path(out) if out is not None else Path(predictions).parent
    check_writable(folder, "--out")
    check_images_folder(images)
    return folder


def predictions_page(task: str, predictions: Path, annotations: Path | None, folder: Path, split: str | None = None,
                     vqa_variant: str = "reference", allow_missing: bool | None = None, tokenizer: str = "auto",
                     images: Path | None = None, metrics: dict | None = None) -> Path:
    """The results page of a predictions file (`vlpet eval --predictions --html`): <task>-<name>.html in `folder`
    (`page_folder`); <name> is --split, else the file's name less '<task>-' and '.predictions'
    (vqa-test.predictions.json gives vqa-test.html; gqa.json gives gqa-predictions.html)."""
    from vlpet_cli.pages import write_page
    from vlpet_cli.tasks import get_task

    if annotations is None:  # a task file's own split
        annotations = own_annotations(task, split)
    spec = get_task(task)
    name = split or Path(predictions).stem.removesuffix(".predictions").removeprefix(f"{spec.name}-")
    name = "predictions" if name == spec.name else name
    rows = spec.file_predictions(FileScoring(Path(predictions), Path(annotations), None, split, vqa_variant,
                                             allow_missing, tokenizer))
    return write_page(spec, name, rows, folder, metrics=metrics, images=images, vqa_variant=vqa_variant,
                      source=str(predictions))


def check_submission_file(task: str, submission: Path, questions: Path) -> dict:
    """Check a leaderboard submission file against its server's question file (no model): every question
    answered exactly once, nothing else, in the server's format; one DataError naming the first bad id if not."""
    cls = task_class(task)
    if cls.check_submission is Task.check_submission:
        takes = ", ".join(name for name, c in TASKS.items() if c.check_submission is not Task.check_submission)
        raise VlpetError(f"task {cls.name!r} has no leaderboard submission check; the tasks with one: {takes}")
    return {"task": cls.name, "file": str(submission), **cls().check_submission(Path(submission), Path(questions))}


def versions() -> dict:
    import torch
    import transformers

    from vlpet_cli import __version__

    return {"vlpet": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def stored_preset(directory: Path) -> dict:
    """The preset recorded in an adapter, bundle or folded directory, read without building the model."""
    from vlpet_cli.artifacts import FOLDED_CONFIG, kind_of, read_adapter_config

    try:
        if kind_of(directory) == "folded":
            meta = json.loads((directory / FOLDED_CONFIG).read_text(encoding="utf-8"))
        else:
            meta = read_adapter_config(directory)
    except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise VlpetError(f"{directory}: its vlpet config is not readable JSON ({exc}); write it again with "
                         f"`vlpet train` or `vlpet merge`") from None
    preset = meta.get("preset") if isinstance(meta, dict) else None
    if not isinstance(preset, dict):
        raise VlpetError(f"{directory}: its vlpet config holds no preset; write it again with `vlpet train` or "
                         f"`vlpet merge`")
    return preset


def load_for_eval(path: Path, backbone: str | None = None):
    """(model, tokenizer, preset, adapter dir) from a run directory or an adapter/bundle/folded directory."""
    from vlpet_cli.artifacts import load_any

    path = locate(path).directory
    model, tokenizer, preset = load_any(path, backbone=backbone)
    return model, tokenizer, preset, path


def output_dir(out_dir: Path | None, located: Located) -> Path:
    """Where the evaluation files go (--out, else the run's eval/, eval/best/ for its best checkpoint); never
    inside a run's checkpoints, which training replaces; checked writable before the model is built."""
    out = Path(out_dir) if out_dir is not None else located.eval_dir
    if located.run is not None:
        checkpoints = checkpoints_dir(located.run).resolve()
        if out.resolve() == checkpoints or checkpoints in out.resolve().parents:
            raise VlpetError(f"--out {out} is inside the run's checkpoints ({checkpoints}), which training replaces; "
                             f"leave --out out (the files go to {located.eval_dir}) or choose another folder")
    check_writable(out, "--out")
    return out


def recorded_settings(stored: dict, located: Located, data_root: str | None, backbone: str | None,
                      overrides: list[str] | None) -> tuple[str | None, str | None]:
    """(data root, backbone) to evaluate with: what the user gave, else what the adapter recorded, found from
    here. Older runs recorded relative paths (relative to where training started): they are looked for from the
    current directory and from the run's, and a missing data root says where it was looked for."""
    from vlpet_cli import backbones
    from vlpet_cli.artifacts import kind_of
    from vlpet_cli.presets import parse_overrides

    given = {key for key, _ in parse_overrides(overrides or [])}
    root = (stored.get("data") or {}).get("data_root")
    if data_root is None and "data.data_root" not in given and root not in (None, "toy"):
        found = recorded_path(root, located.run, "data root", "--data-root")
        data_root = found if found != root else None
    name = (stored.get("model") or {}).get("backbone")
    if backbone is None and name and not Path(name).is_absolute() and kind_of(located.directory) == "adapter":
        try:
            backbones.resolve(name)
        except VlpetError:  # a relative backbone directory recorded by an older run: from the run's directory
            found = recorded_path(name, located.run, "backbone directory", "--backbone", required=False)
            backbone = found if found != name else None
    return data_root, backbone


def eval_preset(base: dict, tasks: list[str] | None, data_root: str | None, overrides: list[str] | None,
                limit: int | None, split: str = "test") -> Preset:
    """The preset an evaluation runs with: the stored one, then overrides, --data-root, --task and --limit."""
    from vlpet_cli.presets import T5_PREFIX, VIDEO_PREFIX, apply, parse_overrides

    if limit is not None and limit < 1:
        raise VlpetError(f"--limit {limit}: the number of records per task must be at least 1; leave --limit out "
                         f"to evaluate the whole split")
    pairs = parse_overrides(overrides or [])
    for key, _ in pairs:
        if key.startswith((T5_PREFIX, VIDEO_PREFIX)):
            raise VlpetError(f"{key}: t5.* and video.* overrides are resolved when a run starts; an evaluation reads "
                             f"the run's resolved settings, so give the key without '{key.split('.')[0]}.'")
    if data_root:
        pairs.append(("data.data_root", data_root))
    chosen = tasks or next((v for k, v in reversed(pairs) if k == "data.tasks"), None)
    chosen = chosen if chosen is not None else (base.get("data") or {}).get("tasks")
    pairs.append(("data.tasks", list(dict.fromkeys(resolve_task(t) for t in chosen or []))))
    # --limit, else an explicit eval.limit override; never the training run's validation limit
    pairs.append(("eval.limit", limit if limit is not None else next(
        (v for k, v in pairs if k == "eval.limit"), None)))
    if split == "train":  # the training split is cut by data.limit (vlpet_cli/data/loading.py)
        pairs.append(("data.limit", pairs[-1][1]))
    return apply(base, pairs, "eval settings")


def check_eval_arguments(preset: Preset, split: str, metrics: list[str] | None, batch_size: int | None) -> None:
    """Refuse what cannot work before anything is loaded: splits, metrics, batch size and limit."""
    if not preset.data.tasks:
        raise VlpetError("no task to evaluate; pass --task, e.g. --task vqa")
    if batch_size is not None and batch_size < 1:
        raise VlpetError(f"--batch-size {batch_size}: the evaluation batch size must be at least 1")
    if batch_size is None and preset.eval.batch_size < 1:
        raise VlpetError(f"eval.batch_size {preset.eval.batch_size}: the evaluation batch size must be at least 1; "
                         f"pass --batch-size N")
    for task in preset.data.tasks:
        cls = task_class(task)
        check_split(cls, split)
        cls.resolve_metrics(metrics)


def check_eval_precision(precision: str, backbone: str) -> None:
    """eval.precision works on this machine and the adapter's backbone (inference.check_precision), checked before
    the model loads; a backbone that cannot be resolved yet (a folded model's) is checked once loaded."""
    import torch

    from vlpet_cli import backbones

    if precision == "fp16" or (precision == "bf16" and torch.cuda.is_available()):
        try:
            family = backbones.family_of(backbone)
        except VlpetError:
            family = "unknown"
        check_precision("eval.precision", precision, family)


def check_split(cls: type[Task], split: str) -> None:
    """A split is one the task declares: a kind (train, val, test) or one of its split files by name."""
    files = {name.strip() for names in cls.splits.values() for name in names.split(",")}
    asked = [name.strip() for name in split.split(",") if name.strip()]
    if split in cls.splits or (asked and all(name in files for name in asked)):
        return
    kinds = [k for k in ("test", "val", "train") if k in cls.splits] + [
        k for k in cls.splits if k not in ("test", "val", "train")]
    raise VlpetError(f"unknown split {split!r} for task {cls.name}; choose one of {', '.join(kinds)} "
                     f"(--split), or one of its split files: {', '.join(sorted(files))}")


def evaluate(path: Path, tasks: list[str] | None = None, split: str = "test", metrics: list[str] | None = None,
             batch_size: int | None = None, data_root: str | None = None, backbone: str | None = None,
             out_dir: Path | None = None, overrides: list[str] | None = None, progress: bool = True,
             limit: int | None = None, html: bool = False, images: Path | None = None) -> dict:
    """Generate and score each task's split; writes eval/<task>-<split>.json, predictions and submissions, and
    with `html` the results page eval/<task>-<split>.html (thumbnails from `images` or the task's own folder).

    Every argument is checked against the stored preset before the model is built. Each record says how many
    records were scored (`n`, `limit`) and whether the adapter was trained on the task (`trained`)."""
    from vlpet_cli.data.loading import check_annotations
    from vlpet_cli.data.own_features import prepare_task_features
    from vlpet_cli.pages import check_images_folder
    from vlpet_cli.toy.root import resolve_data_root

    located = locate(path)
    adapter_dir = located.directory
    stored = stored_preset(adapter_dir)
    register_run_tasks(stored.get("data"), located.run)
    trained = [resolve_task(t) for t in (stored.get("data") or {}).get("tasks") or []]
    data_root, backbone = recorded_settings(stored, located, data_root, backbone, overrides)
    settings = eval_preset(stored, tasks, data_root, overrides, limit, split)
    check_eval_arguments(settings, split, metrics, batch_size)
    # refused before the model is built: a missing data root, annotation files and an output that cannot be written
    root = resolve_data_root(settings.data.data_root, settings.data.tasks)
    check_annotations(root, settings, (split,))
    covers = submission_covers(root, settings.data.tasks or [], split)
    out_dir = output_dir(out_dir, located)
    check_images_folder(images)
    requested_threads(settings.train.threads)  # a bad VLPET_THREADS is refused before the model is built
    check_eval_precision(settings.eval.precision, backbone or settings.model.backbone)
    if int(os.environ.get("RANK", "0")) == 0:  # a task file's features on first use (training made them already)
        prepare_task_features(settings.data.tasks, progress)
    untrained = [t for t in settings.data.tasks or [] if t not in trained]
    if untrained:
        warnings.warn(f"{adapter_dir} was trained on {', '.join(trained) or 'no task'}, not on "
                      f"{', '.join(untrained)}: those scores do not measure what it learned (the eval files "
                      f"say trained: false, and `vlpet report` leaves them out of averages)", UserWarning,
                      stacklevel=1)
    model, tokenizer, loaded, _ = load_for_eval(adapter_dir, backbone)
    preset = eval_preset(loaded.model_dump(mode="json"), tasks, data_root, overrides, limit, split)
    check_precision("eval.precision", preset.eval.precision, model.family)  # the loaded model's own family
    configure_threads(model, preset.train.threads)
    state = process_state()
    try:
        results = evaluate_model(model, tokenizer, preset, split, metrics, batch_size, progress, state=state)
        if state is None or state.is_main_process:  # the main process writes the files
            predictions = {task: record["predictions"] for task, record in results.items()}
            write_results(results, out_dir, split, trained, str(path), covers)
            if html:
                write_pages(results, predictions, preset, out_dir, images, str(path))
            if located.checkpoint is None:  # never write inside a checkpoint, which training replaces
                from vlpet_cli.artifacts import refresh_model_card

                refresh_model_card(adapter_dir, out_dir)  # the card beside the weights shows the new scores
        else:
            for record in results.values():
                record.pop("predictions")
                record.update(trained=record["task"] in trained, out_dir=str(out_dir))
    finally:
        if state is not None:  # every process waits for the files, then leaves the group cleanly (gloo aborts
            import torch.distributed as dist  # a process that exits while a peer still holds the group)

            state.wait_for_everyone()
            dist.destroy_process_group()
    return results


def submission_covers(root: Path, tasks: list[str], split: str) -> dict[str, Questions]:
    """{task: the questions its submission must answer in full} (VQA's server splits: every test2015 question),
    read and checked before the model is built."""
    covers = {}
    for name in tasks:
        questions = task_class(name)().submission_questions(root, split)
        if questions is not None:
            covers[resolve_task(name)] = questions
    return covers


def write_results(results: dict, out_dir: Path, split: str, trained: list[str], source: str,
                  covers: dict[str, Questions] | None = None) -> None:
    """Each task's eval record, predictions and submission file under out_dir; a signal waits until all are
    written (each file is written atomically, so a failure leaves every file whole). A submission that must answer
    questions not predicted (`covers`) is completed by the task, and the record says how many it filled in."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with signals_deferred():
        for task, record in results.items():
            preds = record.pop("predictions")
            cover = (covers or {}).get(task)
            if cover is None:
                suffix, content = task_class(task)().submission(preds)
            else:
                suffix, content, filled = task_class(task)().complete_submission(preds, cover)
                record["submission"] = {"questions": str(cover.path), "answered": len(cover.ids),
                                        "predicted": len(cover.ids) - filled, "filled": filled}
            name = submission_name(task, split, suffix)
            record.update(trained=task in trained, trained_tasks=trained, source=source, versions=versions(),
                          out_dir=str(out_dir))
            write_json(out_dir / f"{task}-{split}.json", record)
            write_json(out_dir / f"{task}-{split}.predictions.json", preds)
            write_text(out_dir / name, content)


def write_pages(results: dict, predictions: dict[str, list[dict]], preset: Preset, out_dir: Path,
                images: Path | None, source: str) -> None:
    """Each task's results page beside its eval record (`--html`); its path is added to the result as 'page'. On
    the toy world the raw images are known without --images: they lie under its data root."""
    from vlpet_cli.pages import write_page
    from vlpet_cli.tasks import get_task
    from vlpet_cli.toy.root import resolve_data_root

    if images is None and preset.data.data_root == "toy":
        images = resolve_data_root("toy")
    for task, record in results.items():
        spec = get_task(task, preset.data.prompts, preset.data.use_prompts, preset.data.video)
        record["page"] = str(write_page(spec, record["split"], predictions[task], out_dir, metrics=record["metrics"],
                                        images=images, vqa_variant=preset.eval.vqa_variant, source=source))


def submission_name(task: str, split: str, suffix: str) -> str:
    """The submission file's name: VALUE's own for a video task's test split (e.g. tvqa_test_predictions.json),
    else <task>-<split>.submission.<suffix>."""
    cls = task_class(task)
    if issubclass(cls, VideoTask) and split in ("test", cls.splits["test"]):
        return cls.submission_file
    return f"{task}-{split}.submission.{suffix}"


def process_state():
    """accelerate's PartialState when started by `accelerate launch`/torchrun with several processes, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def evaluate_model(model: VLModel, tokenizer: PreTrainedTokenizerBase, preset: Preset, split: str = "test",
                   metrics: list[str] | dict | None = None, batch_size: int | None = None, progress: bool = True,
                   state=None) -> dict:
    """{task: {metrics, settings, predictions, n, limit, seconds, ...}} for the preset's tasks and data root.
    `metrics` is one list for every task, or {task: list}. With `state` (several processes) each process predicts
    its shard, the predictions are gathered in record order and the main process scores; every process returns
    the same metrics."""
    import torch

    from vlpet_cli.data.loading import load_task_data
    from vlpet_cli.toy.root import resolve_data_root

    root = resolve_data_root(preset.data.data_root, preset.data.tasks)
    device = state.device if state is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    main = state is None or state.is_main_process
    model.to(device)
    data = load_task_data(preset, root, tokenizer, splits=(split,))
    datasets = data.train if split == "train" else data.val
    size = batch_size if batch_size is not None else preset.eval.batch_size
    results = {}
    world = 1 if state is None else state.num_processes
    with Progress(sum(len(d) for d in datasets.values()), enabled=progress and main, label="eval",
                  unit="samples", stderr=True) as bar:
        for task, ds in datasets.items():
            started = time.time()
            preds = predict_all(model, tokenizer, ds, preset, size,
                                progress=lambda n, task=task: bar.advance(n * world, task), state=state)
            seconds = time.time() - started
            settings = decoding_settings(model, tokenizer, preset, task)
            wanted = metrics.get(task) if isinstance(metrics, dict) else metrics
            scored = [score(task, preds, wanted, preset.eval.vqa_variant, preset.eval.caption_references)
                      if main else None]
            if state is not None:
                from accelerate.utils import broadcast_object_list

                broadcast_object_list(scored)
            results[task] = {"task": task, "split": split, "metrics": scored[0],
                             "n": len(preds), "limit": preset.eval.limit, "seconds": seconds, "processes": world,
                             "samples_per_s": len(preds) / max(seconds, 1e-9), "settings": settings,
                             "predictions": preds}
    return results
