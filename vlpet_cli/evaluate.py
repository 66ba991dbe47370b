"""`vlpet eval`: generate per task with explicit settings, score with the field's metrics, write the files."""

from __future__ import annotations

import platform
import time
from pathlib import Path

from vlpet_cli.atomic import write_json, write_text
from vlpet_cli.config import Preset
from vlpet_cli.data.tasks import TASKS, resolve_task, task_class
from vlpet_cli.errors import VlpetError
from vlpet_cli.inference import decoding_settings, predict, score


def score_predictions_file(
    task: str,
    predictions: Path,
    annotations: Path,
    split: str | None = None,
    metrics: list[str] | None = None,
    vqa_variant: str = "reference",
    allow_missing: bool | None = None,
    tokenizer: str = "auto",
) -> dict:
    """Score a predictions file for a task against an annotation file (no model); metrics lower-case, x100.

    allow_missing=None lets annotation files that cover a whole pool (official VQA v2 annotations, COCO
    captions_*.json) hold ids without a prediction; split-sized files must be predicted completely. Only tasks
    whose annotation files hold several splits (Karpathy's dataset_coco.json) take a split.
    """
    cls = task_class(task)
    chosen = cls.resolve_metrics(metrics)
    if split is not None and not cls.split_option:
        takes = ", ".join(name for name, c in TASKS.items() if c.split_option)
        raise VlpetError(f"split applies only to {takes} (annotation files holding several splits, such as "
                         f"Karpathy's dataset_coco.json), not to task {resolve_task(task)!r}; drop --split")
    return cls().score_files(Path(predictions), Path(annotations), split=split, metrics=chosen,
                             explicit=metrics is not None, vqa_variant=vqa_variant, allow_missing=allow_missing,
                             tokenizer=tokenizer)


def versions() -> dict:
    import torch
    import transformers

    from vlpet_cli import __version__

    return {"vlpet": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def load_for_eval(path: Path, backbone: str | None = None):
    """(model, tokenizer, preset, adapter dir) from a run directory or an adapter/bundle/folded directory."""
    path = Path(path)
    if (path / "config.yaml").exists() and (path / "adapter").is_dir():
        path = path / "adapter"
    elif (path / "config.yaml").exists():
        raise VlpetError(f"{path} is a run without a final adapter yet; wait for training to finish or "
                         f"evaluate {path / 'checkpoints' / 'best'}")
    from vlpet_cli.artifacts import load_any

    model, tokenizer, preset = load_any(path, backbone=backbone)
    return model, tokenizer, preset, path


def evaluate(path: Path, tasks: list[str] | None = None, split: str = "test", metrics: list[str] | None = None,
             batch_size: int | None = None, data_root: str | None = None, backbone: str | None = None,
             out_dir: Path | None = None, overrides: list[str] | None = None, progress: bool = True,
             limit: int | None = None) -> dict:
    """Generate and score each task's split; writes eval/<task>-<split>.json, predictions and submissions."""
    from vlpet_cli.presets import parse_overrides, set_dotted
    from vlpet_cli.presets import validate as validate_preset

    model, tokenizer, preset, adapter_dir = load_for_eval(path, backbone)
    data = preset.model_dump(mode="json")
    for key, value in parse_overrides(overrides or []):
        set_dotted(data, key, value)
    if data_root:
        data["data"]["data_root"] = data_root
    if tasks:
        data["data"]["tasks"] = tasks
    data["eval"]["limit"] = limit
    preset = validate_preset(data, "eval settings")
    out_dir = out_dir or (adapter_dir.parent / "eval" if adapter_dir.name == "adapter" else adapter_dir / "eval")
    results = evaluate_model(model, tokenizer, preset, split, metrics, batch_size, progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    for task, record in results.items():
        preds = record.pop("predictions")
        record.update(source=str(path), versions=versions(), out_dir=str(out_dir))
        write_json(out_dir / f"{task}-{split}.json", record)
        write_json(out_dir / f"{task}-{split}.predictions.json", preds)
        suffix, content = task_class(task)().submission(preds)
        write_text(out_dir / f"{task}-{split}.submission.{suffix}", content)
    return results


def evaluate_model(model, tokenizer, preset: Preset, split: str = "test", metrics: list[str] | dict | None = None,
                   batch_size: int | None = None, progress: bool = True) -> dict:
    """{task: {metrics, settings, predictions, n, seconds, ...}} for the preset's tasks and data root.
    `metrics` is one list for every task, or {task: list}."""
    import torch

    from vlpet_cli.data.loading import load_task_data, resolve_data_root

    root = resolve_data_root(preset.data.data_root)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    data = load_task_data(preset, root, tokenizer, splits=(split,))
    datasets = data.train if split == "train" else data.val
    bar = Progress(sum(len(d) for d in datasets.values())) if progress else None
    results = {}
    try:
        for task, ds in datasets.items():
            started = time.time()
            preds = predict(model, tokenizer, ds, preset, batch_size or preset.eval.batch_size,
                            progress=bar.advance(task) if bar else None)
            seconds = time.time() - started
            settings = decoding_settings(model, tokenizer, preset, task)
            wanted = metrics.get(task) if isinstance(metrics, dict) else metrics
            results[task] = {"task": task, "split": split, "metrics": score(task, preds, wanted,
                                                                            preset.eval.vqa_variant),
                             "n": len(preds), "seconds": seconds, "samples_per_s": len(preds) / max(seconds, 1e-9),
                             "settings": settings, "predictions": preds}
    finally:
        if bar:
            bar.stop()
    return results


class Progress:
    """A rich progress bar with samples/s over every task's records."""

    def __init__(self, total: int):
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self.progress = RichProgress(TextColumn("eval {task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[rate]}"), TimeRemainingColumn())
        self.bar = self.progress.add_task("", total=total, rate="")
        self.started = time.time()
        self.done = 0
        self.progress.start()

    def advance(self, task: str):
        def step(n: int) -> None:
            self.done += n
            rate = f"{self.done / max(time.time() - self.started, 1e-9):.1f} samples/s"
            self.progress.update(self.bar, advance=n, description=task, rate=rate)
        return step

    def stop(self) -> None:
        self.progress.stop()
