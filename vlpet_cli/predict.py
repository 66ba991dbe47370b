"""`vlpet predict`: a trained model on the user's own images, features extracted on the fly.

The features are made with the vision model, layer and dtype recorded with the run's own features (the adapter's
`features` entry, written by `vlpet train`), or `--vision-model` for models that record none; a vision model or
layer other than the recorded one is refused. Records are built as the task builds them from its files and decoded
with the task's settings (generation kwargs or scored choices, as `vlpet eval` decodes), so an image and question
from a dataset get the answer `vlpet eval` gives for that record.

Videos (TVQA, How2QA, TVC, YC2C): frames decoded as VALUE's extractor decodes them (one per 1.5 s), embedded by the
projected CLIP recorded with the run's video features (`image_embeds`), rounded to the store dtype and resized to
the run's `data.video.frames`. What a task takes (images or a video, question or statement, choices, moment) is
its own declaration (`Task.inputs`), and the task builds the record (`Task.input_record`) as its reader builds one
from an annotation line: subtitles (`--subtitles`, default none), question, moment (`--ts`, default the whole
video) and choices, so the encoder string is the task's own.

Scores: for generated answers the sequence score, the mean log-probability per generated token (beam search's
length-normalised score with length_penalty 1.0; the same quantity for greedy decoding); for tasks that score fixed
choices (NLVR2) the chosen answer's probability, a softmax over the choices' logits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlpet_cli.errors import VlpetError
from vlpet_cli.extras import require_extra
from vlpet_cli.progress import Progress
from vlpet_cli.tasks import (
    PredictInput,
    ScoreChoices,
    get_task,
    register_run_tasks,
    resolve_task,
    task_class,
    tasks_of_kind,
)
from vlpet_cli.tasks.records import read_records
from vlpet_cli.tasks.video.base import parse_ts
from vlpet_cli.threads import configure_threads, requested_threads

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from vlpet_cli.config import Preset
    from vlpet_cli.tasks import Task
    from vlpet_cli.vl.model import VLModel

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SCORE_KINDS = {"generate": "mean token log-probability", "choices": "choice probability"}


@dataclass
class VisionSettings:
    """How the run's features were made: vision model, layer, store dtype (float16 rounds as the stores do)."""

    model: str
    layer: int = -1
    dtype: str = "float16"
    torchscript: bool = False
    recorded: dict = field(default_factory=dict)


# ---- inputs -----------------------------------------------------------------------------------------------
def check_video_inputs(task: str, inputs: list[PredictInput]) -> None:
    """Every input of a video task has one existing video, no images, the text and choices the task takes (its own
    number of choices), and a moment only where the task reads one."""
    takes = task_class(task).inputs
    for item in inputs:
        if item.images:
            raise VlpetError(f"{item.where}: task {task} takes a video (--video FILE), not images")
        if item.video is None:
            raise VlpetError(f"{item.where}: task {task} needs a video: give --video FILE")
        if not Path(item.video).is_file():
            raise VlpetError(f"{item.where}: video {item.video} not found")
        if takes.text and not item.text.strip():
            raise VlpetError(f"{item.where}: task {task} needs a {takes.text} (--{takes.text} \"...\")")
        if not takes.text and item.text.strip():
            raise VlpetError(f"{item.where}: task {task} captions videos and takes no question")
        if takes.choices and len(item.choices) != takes.choices:
            raise VlpetError(f"{item.where}: task {task} takes {takes.choices} choices, got {len(item.choices)}; "
                             f"give --choices {takes.choices} times")
        if not takes.choices and item.choices:
            raise VlpetError(f"{item.where}: task {task} captions videos and takes no --choices")
        if item.ts is not None:
            if not takes.moment:
                raise VlpetError(f"{item.where}: task {task} takes no moment; drop --ts")
            parse_ts(item.ts, item.where)


def check_inputs(task: str, inputs: list[PredictInput]) -> None:
    """Every input has the task's number of images, each an existing file, and the text the task takes."""
    cls = task_class(task)
    takes = cls.inputs
    if not inputs:
        raise VlpetError("nothing to predict: give --image FILE (and --question/--statement), --video FILE, "
                         "or --inputs")
    if takes.video:
        check_video_inputs(task, inputs)
        return
    for item in inputs:
        if item.video is not None or (item.choices and not takes.choices) or item.subtitles or item.ts is not None:
            raise VlpetError(f"{item.where}: task {task} takes images; --video, --choices, --subtitles and --ts "
                             f"are for the video tasks ({', '.join(tasks_of_kind('video'))})")
        if takes.choices and len(item.choices) < 2:  # a task file's choice task: as many choices as the input has
            raise VlpetError(f"{item.where}: task {task} chooses among answers: give --choices once per choice "
                             f"(at least two)")
        if len(item.images) != takes.images:
            raise VlpetError(f"{item.where}: task {task} takes {takes.images} image(s) per input, got "
                             f"{len(item.images)}; " + ("give --image twice (left, right)" if takes.images == 2
                                                       else "give one --image"))
        for path in item.images:
            if not path.is_file():
                raise VlpetError(f"{item.where}: image {path} not found")
        if takes.text and not item.text.strip():
            raise VlpetError(f"{item.where}: task {task} needs a {takes.text} (--{takes.text} \"...\")")
        if not takes.text and item.text.strip():
            raise VlpetError(f"{item.where}: task {task} captions images and takes no question or statement")


def _folder_inputs(folder: Path, text: str) -> list[PredictInput]:
    """One input per image of a folder (sorted), each with the same text."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise VlpetError(f"{folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
    return [PredictInput([p], text, str(p)) for p in files]


def _jsonl_inputs(path: Path) -> list[PredictInput]:
    """Inputs from a JSON-lines file: {"image": ...} or {"images": [...]}, with "question" or "statement"; or
    {"video": ..., "question", "choices", "subtitles", "ts"}."""
    base = path.parent
    inputs = []
    for ref in read_records(path, "inputs file", "check --inputs", lines=True):
        obj, where = ref.raw, f"{path}: {ref.who()}"
        if not isinstance(obj, dict):
            raise ref.error("not a JSON object", "write one object a line, e.g. {\"image\": \"a.jpg\", "
                                                 "\"question\": \"...\"}")
        text = obj.get("question", obj.get("statement", obj.get("sent", "")))
        if "video" in obj:
            if "image" in obj or "images" in obj:
                raise ref.error("it gives \"video\" and \"image(s)\"", "give one of them")
            choices = obj.get("choices", [])
            if not isinstance(obj["video"], str) or not isinstance(choices, list):
                raise ref.error("\"video\" is not a file name or \"choices\" not a list",
                                "give \"video\": FILE (and \"choices\": [...] for QA)")
            ts = obj.get("ts")
            ts = None if ts is None else (",".join(str(x) for x in ts) if isinstance(ts, list) else str(ts))
            inputs.append(PredictInput([], str(text or ""), where, base / obj["video"], [str(c) for c in choices],
                                       str(obj.get("subtitles") or ""), ts))
            continue
        images = obj.get("images", [obj["image"]] if "image" in obj else None)
        if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            raise ref.error("it names no image or video", "give \"image\": FILE, \"images\": [FILE, ...] or "
                                                          "\"video\": FILE")
        inputs.append(PredictInput([base / i for i in images], str(text or ""), where))
    if not inputs:
        raise VlpetError(f"{path}: no inputs. Fix: write one JSON object per line.")
    return inputs


def gather_inputs(task: str, images: list[Path], text: str | None, inputs: Path | None, video: Path | None = None,
                  choices: list[str] | None = None, subtitles: str | None = None,
                  ts: str | None = None) -> list[PredictInput]:
    """The inputs of one invocation: --image (+ text), --video (+ question, choices, subtitles, ts), a folder of
    images, or a JSON-lines file."""
    if images and video is not None:
        raise VlpetError("give --image (image tasks) or --video (video tasks), not both")
    if inputs is not None and (images or video is not None):
        raise VlpetError(f"give --{'video' if video is not None else 'image'} or --inputs, not both")
    if inputs is not None and (choices or subtitles or ts):
        raise VlpetError("--choices, --subtitles and --ts go with --video; a JSON-lines file carries each input's own")
    if inputs is None:
        return [PredictInput(list(images), text or "", video=video, choices=list(choices or []),
                             subtitles=subtitles or "", ts=ts)]
    if inputs.is_dir():
        return _folder_inputs(inputs, text or "")
    if inputs.is_file():
        if text:
            raise VlpetError(f"{inputs}: a JSON-lines file carries each input's own question or statement; drop "
                             f"--question/--statement")
        return _jsonl_inputs(inputs)
    raise VlpetError(f"--inputs {inputs}: no such folder or JSON-lines file")


# ---- the vision model -------------------------------------------------------------------------------------
def _name(model_id: str) -> str:
    """What identifies a vision model across machines: a hub id or built-in name, or a path's last component."""
    return Path(str(model_id)).name


def vision_settings(recorded: dict, source: str, vision_model: str | None, layer: int | None,
                    torchscript: bool, directory: Path) -> VisionSettings:
    """The recorded vision settings of the task's feature source; a given --vision-model or --layer must agree."""
    rec = (recorded.get(source) or next(iter(recorded.values()))) if recorded else None
    if rec is None or "model" not in rec:
        if vision_model is None:
            raise VlpetError(f"{directory} records no vision model for its features (trained before vlpet recorded "
                             f"it, or folded); pass --vision-model DIR, the model its features were extracted with")
        return VisionSettings(vision_model, -1 if layer is None else layer, "float16", torchscript)
    rec_layer = int(rec.get("layer", -1))
    if vision_model is not None and _name(vision_model) != _name(rec["model"]):
        raise VlpetError(f"{directory} was trained on features of vision model {rec['model']} (layer {rec_layer}), "
                         f"not {vision_model}; pass --vision-model with that model, or leave it out")
    if layer is not None and layer != rec_layer:
        raise VlpetError(f"{directory} was trained on features of layer {rec_layer} of {rec['model']}, not layer "
                         f"{layer}; leave --layer out")
    dtype = str(rec.get("dtype") or "float16")
    # features extracted from OpenAI's TorchScript archive were asked for explicitly (--torchscript) back then
    archive = vision_model is None and str(rec["model"]).endswith((".pt", ".pth"))
    return VisionSettings(vision_model or str(rec["model"]), rec_layer, dtype, torchscript or archive, rec)


def video_duration(path: Path) -> float:
    """A video's duration in seconds (the container's, else its stream's)."""
    require_extra("video")
    import av

    with av.open(str(path)) as container:
        if container.duration:
            return float(container.duration) / 1_000_000
        stream = container.streams.video[0]
        return float(stream.duration * stream.time_base) if stream.duration else 0.0


def task_records(spec: Any, inputs: list[PredictInput]) -> list[Any]:
    """The records the task builds from the inputs (`Task.input_record`), as its reader builds them from a file; a
    task that reads a moment gets the whole video when none is given."""
    records = []
    for index, item in enumerate(inputs):
        if spec.inputs.moment and item.ts is None:
            assert item.video is not None, "a task that reads a moment reads a video"
            item = replace(item, ts=f"{0.0:.2f}-{round(video_duration(Path(item.video)), 2):.2f}")
        records.append(spec.input_record(item, index))
    return records


# ---- the command ------------------------------------------------------------------------------------------
def _scores_generated(model: Any, out: Any, eos: int | None) -> list[float]:
    """Mean log-probability per generated token, up to and including the first EOS."""
    import torch

    if getattr(out, "sequences_scores", None) is not None:
        return [float(s) for s in out.sequences_scores]
    steps = model.backbone.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    gen = out.sequences[:, -steps.shape[1]:]
    is_eos = gen == eos if eos is not None else torch.zeros_like(gen, dtype=torch.bool)
    keep = (is_eos.long().cumsum(1) - is_eos.long()) == 0
    logp = torch.where(keep, steps, torch.zeros_like(steps)).sum(1) / keep.sum(1).clamp(min=1)
    return [float(s) for s in logp]


def _decode(model: VLModel, tokenizer: PreTrainedTokenizerBase, preset: Preset, task: Task,
            batch: dict) -> tuple[list[str], list[float]]:
    """The task's decoding on one batch: (answers, scores)."""
    import torch

    from vlpet_cli.inference import generation_config

    if isinstance(task.decoding, ScoreChoices):
        choices = task.decoding.choices
        logits = model.score_choices(batch, [tokenizer(c)["input_ids"] for c in choices])
        probs = torch.softmax(logits.float(), dim=1)
        best = logits.argmax(1).tolist()
        return [choices[i] for i in best], [float(probs[b, i]) for b, i in enumerate(best)]
    config = generation_config(model, tokenizer, preset, task.name, return_dict_in_generate=True, output_scores=True)
    out = model.generate(batch, generation_config=config)
    assert not isinstance(out, torch.Tensor)  # return_dict_in_generate: the sequences and their scores
    texts = [t.strip() for t in tokenizer.batch_decode(out.sequences, skip_special_tokens=True)]
    return texts, _scores_generated(model, out, tokenizer.eos_token_id)


def register_tasks(path: Path) -> None:
    """Register the task files the model at `path` (a run, adapter, bundle or folded model) was trained on, from
    the run's copies where it has them, so that `--task NAME` names them."""
    from vlpet_cli.runs import locate

    try:
        located = locate(path)
        meta = _model_meta(located.directory)
    except VlpetError:
        return  # `predict` names the problem, after the inputs are checked
    register_run_tasks((meta.get("preset") or {}).get("data"), located.run)


def _model_meta(directory: Path) -> dict:
    """The vlpet config of an adapter, bundle or folded model."""
    from vlpet_cli.artifacts import ADAPTER_CONFIG, FOLDED_CONFIG, read_adapter_config

    if (directory / FOLDED_CONFIG).is_file():
        meta = json.loads((directory / FOLDED_CONFIG).read_text(encoding="utf-8"))
    elif (directory / ADAPTER_CONFIG).is_file():
        meta = read_adapter_config(directory)
    else:
        raise VlpetError(f"{directory} is neither a run with a final adapter, an adapter, a bundle nor a folded "
                         f"model; give one written by `vlpet train` or `vlpet merge`")
    return meta if isinstance(meta, dict) else {}


def _chosen(answer: str, item: PredictInput) -> dict:
    """For an input with choices, the chosen one's index and text (read from 'a<index>' as VALUE reads it)."""
    if not item.choices:
        return {}
    from vlpet_cli.tasks.video.base import choice_index

    k = choice_index(answer)
    return {"choice_index": k, "choice": item.choices[k] if k < len(item.choices) else None}


def _recorded_features(directory: Path) -> tuple[dict, list[str]]:
    """(the adapter's recorded feature attributes per source, the tasks it was trained on), read without a model."""
    meta = _model_meta(directory)
    tasks = ((meta.get("preset") or {}).get("data") or {}).get("tasks") or []
    features = meta.get("features")
    return (features if isinstance(features, dict) else {}), [resolve_task(t) for t in tasks]


def _locate(path: Path) -> Path:
    """The directory to load: a run directory means its final adapter (`runs.locate`)."""
    from vlpet_cli.runs import locate

    return locate(path).directory


def predict(path: Path, task: str, inputs: list[PredictInput], vision_model: str | None = None,
            layer: int | None = None, torchscript: bool = False, batch_size: int = 16, backbone: str | None = None,
            progress: bool = True) -> list[dict]:
    """One answer per input: {"task", "images", "text", "answer", "score", "score_kind"} (video tasks: "video"
    instead of "images", and for QA "choice_index" and "choice", the chosen choice's text). Everything the user
    gave is checked before a model is loaded."""
    import torch

    from vlpet_cli.artifacts import load_any
    from vlpet_cli.features.kinds import feature_kind
    from vlpet_cli.tasks.base import TaskDataset, collate

    task = resolve_task(task)
    cls = task_class(task)
    if batch_size < 1:
        raise VlpetError(f"--batch-size {batch_size}: must be at least 1")
    requested_threads()  # a bad VLPET_THREADS is refused before a model loads
    check_inputs(task, inputs)
    directory = _locate(path)
    recorded, trained = _recorded_features(directory)
    if trained and task not in trained:
        raise VlpetError(f"{directory} was trained on {', '.join(trained)}, not on {task}; its answers would mean "
                         f"nothing: pick one of its tasks")
    source = cls().feature_source(cls().split_names("test")[0])
    settings = vision_settings(recorded, source, vision_model, layer, torchscript, directory)
    model, tokenizer, preset = load_any(directory, backbone=backbone)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    features = feature_kind(cls.feature_kind)
    extraction = features.extraction()
    video = cls.inputs.video
    vm = extraction.load_model(settings.model, device, settings.torchscript)
    if vm.dim != preset.model.feat_dim:
        raise VlpetError(f"{settings.model} gives {vm.dim}-dimensional features, but {directory} was "
                         f"trained on model.feat_dim={preset.model.feat_dim}; pass the vision model it was trained "
                         f"with (--vision-model)")
    model.to(device).eval()
    configure_threads(model, preset.train.threads)
    spec = get_task(task, preset.data.prompts, preset.data.use_prompts, preset.data.video)
    records = task_records(spec, inputs)
    results: list[dict] = []
    with Progress(len(inputs), enabled=progress and len(inputs) > 1, label="predict", unit="inputs",
                  stderr=True) as bar, torch.no_grad():
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            paths = [Path(p) for r in chunk for p in r.image_ids]
            feats = extraction.embed_files(vm, paths, batch_size, settings.layer, settings.dtype)
            dataset = TaskDataset(spec, chunk, features.memory(feats), tokenizer, split_kind="eval")
            batch = collate([dataset[i] for i in range(len(chunk))], dataset.pad_id)
            batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
            answers, scores = _decode(model, tokenizer, preset, spec, batch)
            kind = SCORE_KINDS["choices" if isinstance(spec.decoding, ScoreChoices) else "generate"]
            for record, answer, value in zip(chunk, answers, scores):
                item = inputs[record.index]
                if not video:
                    results.append({"task": task, "images": list(record.image_ids), "text": record.text,
                                    "answer": answer, "score": value, "score_kind": kind, **_chosen(answer, item)})
                    continue
                row = {"task": task, "video": record.image_ids[0], "text": item.text, "answer": answer,
                       "score": value, "score_kind": kind}
                if item.choices:
                    from vlpet_cli.tasks.video.base import choice_index

                    k = choice_index(answer)  # VALUE reads int(answer[1]), 0 when it cannot
                    row.update(choice_index=k, choice=item.choices[k] if k < len(item.choices) else None)
                results.append(row)
            bar.advance(len(chunk))
    return results
