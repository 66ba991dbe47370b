"""Prediction and scoring on datasets: what `vlpet eval` and validation during training share."""

from __future__ import annotations

from vlpet_cli.config import GenerationSpec, Preset
from vlpet_cli.errors import VlpetError
from vlpet_cli.metrics import PRIMARY_METRIC
from vlpet_cli.vl.decoding import generation_kwargs

CHOICES = ("true", "false")


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
