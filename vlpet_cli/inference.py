"""Prediction and scoring on datasets: what `vlpet eval` and validation during training share.

How a task decodes (generate, or score fixed choices) and how its predictions are scored are the task's own
declarations (vlpet_cli/tasks/); this module runs the model and asks the task.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlpet_cli.config import GenerationSpec, Preset
from vlpet_cli.errors import VlpetError
from vlpet_cli.tasks import Generate, ScoreChoices, VideoCaptionTask, primary_metrics, task_class
from vlpet_cli.vl.decoding import generation_kwargs

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from vlpet_cli.tasks import TaskDataset
    from vlpet_cli.vl.model import VLModel


def check_precision(key: str, precision: str, family: str, cuda: bool | None = None) -> None:
    """A precision setting (train.precision, eval.precision) that cannot work here, refused in one line: fp16 on a
    T5-family backbone or without a CUDA GPU, bf16 on a GPU without it. `cuda`: whether a GPU is used (default:
    whether one is available)."""
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    if precision == "fp16" and family == "t5":
        raise VlpetError(f"{key}=fp16: T5-family backbones overflow in fp16 (their activations exceed its range, "
                         f"a known transformers problem, giving inf/nan losses); use {key}=bf16 or {key}=fp32")
    if precision == "fp16" and not cuda:
        raise VlpetError(f"{key}=fp16: fp16 needs a CUDA GPU and this run has none (on the CPU it is slow and "
                         f"unsupported by Accelerate's loss scaling); use {key}=bf16 or {key}=fp32")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name()
        fix = f"{key}=fp16 or {key}=fp32" if family == "bart" else f"{key}=fp32"
        raise VlpetError(f"{key}=bf16: this GPU ({name}) does not support bf16; use {fix}")


def autocast(precision: str, device):
    """The autocast context of a precision setting on a device (fp32: none)."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)


def generation_spec(preset: Preset, task: str, family: str) -> GenerationSpec:
    """How a task generates on a backbone family: eval.generation.<task>, what it leaves open the task's own."""
    decoding = task_class(task).decoding
    assert isinstance(decoding, Generate), f"{task} scores fixed choices; it does not generate"
    return decoding.spec(family, preset.eval.generation.get(task))


def decoding_settings(model: VLModel, tokenizer: PreTrainedTokenizerBase, preset: Preset, task: str) -> dict:
    """The decoding settings of a task as recorded with its results: generation kwargs (`generation_spec` on the
    model's family), or the choices scored."""
    decoding = task_class(task).decoding
    if isinstance(decoding, ScoreChoices):
        return {"decoding": decoding.describe()}
    return generation_kwargs(generation_spec(preset, task, model.family), model.family, tokenizer)


def generation_config(model: VLModel, tokenizer: PreTrainedTokenizerBase, preset: Preset, task: str, **extra):
    """The transformers GenerationConfig a task generates with (`decoding_settings`); `extra` adds output options
    (`vlpet predict` asks for the scores)."""
    from transformers import GenerationConfig

    return GenerationConfig(decoder_start_token_id=model.config.decoder_start_token_id,
                            **decoding_settings(model, tokenizer, preset, task), **extra)


def predict(model: VLModel, tokenizer: PreTrainedTokenizerBase, dataset: TaskDataset, preset: Preset,
            batch_size: int, progress=None, rank: int = 0, world_size: int = 1, by_length: bool = False) -> list[dict]:
    """One prediction per record of this rank's shard, in record order: generated text, or the best-scored choice
    for tasks that score choices. The batches are those one process forms; rank r of world_size predicts
    batches r, r+W, ... (`shard_records` names its records), so every batch, and so every prediction, is the
    same under any number of processes. by_length forms the batches longest text first (less padding). It is off:
    the padded rows are masked, but other batch shapes round differently and can flip a prediction (the quick
    start's GQA score moved by 0.8)."""
    import torch

    from vlpet_cli.data.multitask import eval_batches, eval_order, shard_batches

    task = dataset.task
    model.eval()
    device = next(model.parameters()).device
    out: list[dict] = []
    choices = task.decoding.choices if isinstance(task.decoding, ScoreChoices) else None
    if choices is None:
        gen_config = generation_config(model, tokenizer, preset, task.name)
    else:
        choice_ids = [tokenizer(c)["input_ids"] for c in choices]
    mine = [i for b in shard_batches(eval_order(dataset, by_length=by_length), batch_size, rank, world_size)
            for i in b]
    with torch.no_grad(), autocast(preset.eval.precision, device):
        for batch in eval_batches(dataset, batch_size, num_workers=preset.data.num_workers, order=mine):
            batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
            if choices is not None:
                logits = model.score_choices(batch, choice_ids)
                texts = [choices[i] for i in logits.argmax(1).tolist()]
            else:
                ids = model.generate(batch, generation_config=gen_config)
                assert isinstance(ids, torch.Tensor)  # gen_config does not return_dict_in_generate
                texts = [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
            out.extend({**meta, "prediction": text} for meta, text in zip(batch["meta"], texts))
            if progress is not None:
                progress(len(texts))
    return [pred for _, pred in sorted(zip(mine, out), key=lambda pair: pair[0])]


def shard_records(dataset, batch_size: int, rank: int, world_size: int, by_length: bool = False) -> list[int]:
    """The records rank r predicts, in record order (what `predict` returns predictions for)."""
    from vlpet_cli.data.multitask import eval_order, shard_batches

    return sorted(i for b in shard_batches(eval_order(dataset, by_length=by_length), batch_size, rank, world_size)
                  for i in b)


def merge(per_rank: list[list[dict]], records: list[list[int]]) -> list[dict]:
    """Record order from the ranks' predictions and the records each rank held; every record once."""
    out: list[dict] = [None] * sum(len(p) for p in per_rank)  # type: ignore[list-item]
    for preds, indices in zip(per_rank, records):
        for i, pred in zip(indices, preds):
            out[i] = pred
    return out


def processes(state) -> tuple[int, int]:
    """(rank, world size) of an Accelerator/PartialState, (0, 1) without one."""
    return (0, 1) if state is None else (state.process_index, state.num_processes)


def predict_all(model: VLModel, tokenizer: PreTrainedTokenizerBase, dataset: TaskDataset, preset: Preset,
                batch_size: int, progress=None, state=None) -> list[dict]:
    """Every record's prediction, in record order. Under several processes (`state`: an Accelerator or
    PartialState) each predicts its batches and every process receives all predictions (gather_object); the
    batches being those of one process, so are the predictions."""
    rank, world = processes(state)
    mine = predict(model, tokenizer, dataset, preset, batch_size, progress, rank=rank, world_size=world)
    if world == 1:
        return mine
    from accelerate.utils import gather_object

    held = [shard_records(dataset, batch_size, r, world) for r in range(world)]
    return merge(gather_object([mine]), held)


def score(task: str, predictions: list[dict], metrics: list[str] | None = None,
          vqa_variant: str = "reference", caption_references: str = "row") -> dict:
    """Metrics (x100, lower-case keys) of a task's predictions against the references in their metadata;
    caption_references is eval.caption_references (TVC/YC2C: one reference per row, or per clip)."""
    scorer = task_class(task)()
    if isinstance(scorer, VideoCaptionTask):
        scorer.caption_references = caption_references
    return scorer.score(predictions, metrics, vqa_variant)


def validate(model: VLModel, tokenizer: PreTrainedTokenizerBase, preset: Preset, datasets: dict, progress: bool = False,
             state=None) -> dict:
    """Each task's validation metrics (its `validation_metrics`, e.g. CIDEr only for captions, spec §8). Under
    several processes every process predicts its shard and the main process scores ({} on the others)."""
    result = {}
    for task, ds in datasets.items():
        preds = predict_all(model, tokenizer, ds, preset, preset.eval.batch_size, state=state)
        if state is not None and not state.is_main_process:
            continue
        wanted = task_class(task).validation_metrics
        result[task] = {k: v for k, v in score(task, preds, None if wanted is None else list(wanted),
                                               preset.eval.vqa_variant, preset.eval.caption_references).items()
                        if not isinstance(v, dict)}
    return result


def best_score(result: dict, best_metric: str) -> float:
    """The selection score: 'avg' of the tasks' primary metrics, or one 'task.metric'."""
    if best_metric == "avg":
        primary = primary_metrics()
        values = [m[primary[t]] for t, m in result.items() if primary.get(t) in m]
        return sum(values) / len(values) if values else float("nan")
    task, _, metric = best_metric.partition(".")
    if task not in result or metric not in result[task]:
        raise VlpetError(f"eval.best_metric '{best_metric}' is not among the validation metrics "
                         f"{[f'{t}.{m}' for t, ms in result.items() for m in ms]}")
    return result[task][metric]
