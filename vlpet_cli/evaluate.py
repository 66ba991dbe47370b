"""`vlpet eval`: generate per task with explicit settings, score with the field's metrics, write the files."""

from __future__ import annotations

import csv
import io
import json
import platform
import time
from pathlib import Path

from vlpet_cli.config import GenerationSpec, Preset
from vlpet_cli.errors import VlpetError
from vlpet_cli.metrics import PRIMARY_METRIC

CHOICES = ("true", "false")


def generation_kwargs(spec: GenerationSpec, family: str, tokenizer) -> dict:
    """Every decoding setting spelled out, so nothing is inherited silently from a model's config.

    BART keeps the reference's effective defaults (facebook/bart-base's config: no_repeat_ngram_size 3, forced
    BOS, early stopping) unless overridden; T5 has none of them.
    """
    ngram = spec.no_repeat_ngram_size
    kwargs = {"num_beams": spec.num_beams, "max_length": spec.max_length, "do_sample": False,
              "no_repeat_ngram_size": 3 if ngram is None and family == "bart" else (ngram or 0),
              "early_stopping": spec.num_beams > 1, "length_penalty": 1.0,
              "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    if family == "bart" and tokenizer.bos_token_id is not None:
        kwargs["forced_bos_token_id"] = tokenizer.bos_token_id
    return kwargs


def predict(model, tokenizer, dataset, preset: Preset, batch_size: int, progress=None) -> list[dict]:
    """One prediction per record: generated text, or 'true'/'false' from the logits for NLVR2."""
    import torch
    from transformers import GenerationConfig

    from vlpet_cli.data.multitask import eval_batches

    task = dataset.task.name
    model.eval()
    device = next(model.parameters()).device
    out: list[dict] = []
    spec = preset.eval.generation.get(task, GenerationSpec())
    kwargs = generation_kwargs(spec, model.family, tokenizer)
    gen_config = GenerationConfig(decoder_start_token_id=model.config.decoder_start_token_id, **kwargs)
    choice_ids = [tokenizer(c)["input_ids"] for c in CHOICES]
    with torch.no_grad():
        for batch in eval_batches(dataset, batch_size, num_workers=preset.data.num_workers):
            batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
            if task == "nlvr":
                logits = model.score_choices(batch, choice_ids)
                texts = [CHOICES[i] for i in logits.argmax(1).tolist()]
            else:
                ids = model.generate(batch, generation_config=gen_config)
                texts = [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
            out.extend({**meta, "prediction": text} for meta, text in zip(batch["meta"], texts))
            if progress is not None:
                progress(len(texts))
    return out


def score(task: str, predictions: list[dict], metrics: list[str] | None = None,
          vqa_variant: str = "reference") -> dict:
    """Metrics (x100, lower-case keys) of a task's predictions against the references in their metadata."""
    from vlpet_cli.metrics.files import resolve_metrics

    wanted = resolve_metrics(task, metrics)
    if task == "vqa":
        from vlpet_cli.metrics.vqa import topk_score, vqa_accuracy

        preds = {p["question_id"]: p["prediction"] for p in predictions}
        annotations = {p["question_id"]: p for p in predictions}
        result = vqa_accuracy(preds, annotations, variant=vqa_variant)
        out = {"vqa": result["overall"], "per_answer_type": result["per_answer_type"],
               "per_question_type": result["per_question_type"]}
        labelled = {p["question_id"]: p for p in predictions if p.get("label")}
        if labelled:
            out["topk"] = topk_score({q: preds[q] for q in labelled}, labelled)
        return out
    if task == "gqa":
        from vlpet_cli.metrics.accuracy import gqa_accuracy

        return {"acc": gqa_accuracy({p["question_id"]: p["prediction"] for p in predictions},
                                    {p["question_id"]: p["label"] or {} for p in predictions})}
    if task == "nlvr":
        from vlpet_cli.metrics.accuracy import nlvr_scores

        result = nlvr_scores({p["identifier"]: p["prediction"] == "true" for p in predictions},
                             {p["identifier"]: bool(p["label"]) for p in predictions})
        return {k: result[k] for k in ("acc", "consistency")}
    from vlpet_cli.metrics.caption import caption_scores

    scorers = {"bleu" if m.startswith("bleu") else "rouge" if m == "rougel" else m for m in wanted}
    result = caption_scores({p["img_id"]: p["prediction"] for p in predictions},
                            {p["img_id"]: p["references"] for p in predictions},
                            metrics=sorted(scorers - {"spice"}), spice="spice" in scorers)
    chosen = {m for m in wanted if m != "bleu"} | ({f"bleu{i}" for i in range(1, 5)} if "bleu" in wanted else set())
    return {k: 100 * v for k, v in result.items() if k in chosen}


def validate(model, tokenizer, preset: Preset, datasets: dict, progress: bool = False) -> dict:
    """Primary metrics per task on the validation datasets (captions: CIDEr only, as spec §8 advises)."""
    result = {}
    for task, ds in datasets.items():
        preds = predict(model, tokenizer, ds, preset, preset.eval.batch_size)
        metrics = ["cider"] if task == "coco" else None
        result[task] = {k: v for k, v in score(task, preds, metrics, preset.eval.vqa_variant).items()
                        if not isinstance(v, dict)}
    return result


def best_score(result: dict, best_metric: str) -> float:
    """The selection score: 'avg' of the tasks' primary metrics, or one 'task.metric'."""
    if best_metric == "avg":
        values = [m[PRIMARY_METRIC[t]] for t, m in result.items() if PRIMARY_METRIC.get(t) in m]
        return sum(values) / len(values) if values else float("nan")
    task, _, metric = best_metric.partition(".")
    if task not in result or metric not in result[task]:
        raise VlpetError(f"eval.best_metric '{best_metric}' is not among the validation metrics "
                         f"{[f'{t}.{m}' for t, ms in result.items() for m in ms]}")
    return result[task][metric]


# ---- files ------------------------------------------------------------------------------------------------
def submission(task: str, predictions: list[dict]) -> tuple[str, str]:
    """(file name suffix, content) in the task's official submission format."""
    if task == "vqa":
        return "json", json.dumps([{"question_id": p["question_id"], "answer": p["prediction"]}
                                   for p in predictions])
    if task == "gqa":
        return "json", json.dumps([{"questionId": str(p["question_id"]), "prediction": p["prediction"]}
                                   for p in predictions])
    if task == "nlvr":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        for p in predictions:
            writer.writerow([p["identifier"], "True" if p["prediction"] == "true" else "False"])
        return "csv", buf.getvalue()
    return "json", json.dumps([{"image_id": p.get("cocoid") or p["img_id"], "caption": p["prediction"]}
                               for p in predictions])


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
    from vlpet_cli.merge import load_any

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
    from vlpet_cli.vl.state import write_json

    for task, record in results.items():
        preds = record.pop("predictions")
        record.update(source=str(path), versions=versions(), out_dir=str(out_dir))
        write_json(out_dir / f"{task}-{split}.json", record)
        write_json(out_dir / f"{task}-{split}.predictions.json", preds)
        suffix, content = submission(task, preds)
        (out_dir / f"{task}-{split}.submission.{suffix}").write_text(content)
    return results


def evaluate_model(model, tokenizer, preset: Preset, split: str = "test", metrics: list[str] | dict | None = None,
                   batch_size: int | None = None, progress: bool = True) -> dict:
    """{task: {metrics, settings, predictions, n, seconds, ...}} for the preset's tasks and data root.
    `metrics` is one list for every task, or {task: list}."""
    import torch

    from vlpet_cli.train import load_task_data, resolve_data_root

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
            spec = preset.eval.generation.get(task, GenerationSpec())
            settings = ({"decoding": "logits of 'true' vs 'false'"} if task == "nlvr"
                        else generation_kwargs(spec, model.family, tokenizer))
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
