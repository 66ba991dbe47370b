"""`vlpet predict`: a trained model on the user's own images, features extracted on the fly.

The features are made with the vision model, layer and dtype recorded with the run's own features (the adapter's
`features` entry, written by `vlpet train`), or `--vision-model` for models that record none; a vision model or
layer other than the recorded one is refused. Records are built as the task builds them from its files and decoded
with the task's settings (generation kwargs or scored choices, as `vlpet eval` decodes), so an image and question
from a dataset get the answer `vlpet eval` gives for that record.

Videos (TVQA, How2QA, TVC, YC2C): frames decoded as VALUE's extractor decodes them (one per 1.5 s), embedded by the
projected CLIP recorded with the run's video features (`image_embeds`), rounded to the store dtype and resized to
the run's `data.video.frames`. The record is the one the task's reader builds from an annotation line: subtitles
(`--subtitles`, default none), question, moment (`--ts`, default the whole video) and choices formatted as VALUE's
files give them, so the encoder string is the task's own.

Scores: for generated answers the sequence score, the mean log-probability per generated token (beam search's
length-normalised score with length_penalty 1.0; the same quantity for greedy decoding); for tasks that score fixed
choices (NLVR2) the chosen answer's probability, a softmax over the choices' logits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlpet_cli.errors import VlpetError
from vlpet_cli.progress import Progress
from vlpet_cli.tasks import ScoreChoices, get_task, resolve_task, task_class
from vlpet_cli.threads import configure_threads, requested_threads

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SCORE_KINDS = {"generate": "mean token log-probability", "choices": "choice probability"}


@dataclass
class PredictInput:
    """One thing to predict: its images (or its video) and its text (question or statement; none for captions);
    for video tasks also the choices (TVQA, How2QA), the subtitles text and the moment `ts` ("s-e" or "s,e")."""

    images: list[Path]
    text: str = ""
    where: str = "command line"
    video: Path | None = None
    choices: list[str] = field(default_factory=list)
    subtitles: str = ""
    ts: str | None = None


@dataclass
class VisionSettings:
    """How the run's features were made: vision model, layer, store dtype (float16 rounds as the stores do)."""

    model: str
    layer: int = -1
    dtype: str = "float16"
    torchscript: bool = False
    recorded: dict = field(default_factory=dict)


# ---- inputs -----------------------------------------------------------------------------------------------
def _text_field(task: str) -> str | None:
    """The input text a task needs: 'question', 'statement' (NLVR2) or None (captioning)."""
    if task == "coco":
        return None
    return "statement" if task == "nlvr" else "question"


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


def check_video_inputs(task: str, inputs: list[PredictInput]) -> None:
    """Every input of a video task has one existing video, no images, the question and choices a QA task needs
    (its own number of choices), and a moment only where the task has one."""
    cls = task_class(task)
    qa = hasattr(cls, "n_choices")
    for item in inputs:
        if item.images:
            raise VlpetError(f"{item.where}: task {task} takes a video (--video FILE), not images")
        if item.video is None:
            raise VlpetError(f"{item.where}: task {task} needs a video: give --video FILE")
        if not Path(item.video).is_file():
            raise VlpetError(f"{item.where}: video {item.video} not found")
        if qa:
            if not item.text.strip():
                raise VlpetError(f"{item.where}: task {task} needs a question (--question \"...\")")
            if len(item.choices) != cls.n_choices:
                raise VlpetError(f"{item.where}: task {task} takes {cls.n_choices} choices, got "
                                 f"{len(item.choices)}; give --choices {cls.n_choices} times")
        else:
            if item.text.strip():
                raise VlpetError(f"{item.where}: task {task} captions videos and takes no question")
            if item.choices:
                raise VlpetError(f"{item.where}: task {task} captions videos and takes no --choices")
        if item.ts is not None:
            if not (qa or getattr(cls, "uses_ts", False)):
                raise VlpetError(f"{item.where}: task {task} takes no moment; drop --ts")
            parse_ts(item.ts, item.where)


def check_inputs(task: str, inputs: list[PredictInput]) -> None:
    """Every input has the task's number of images, each an existing file, and the text the task needs."""
    cls = task_class(task)
    needs = _text_field(task)
    if not inputs:
        raise VlpetError("nothing to predict: give --image FILE (and --question/--statement), --video FILE, "
                         "or --inputs")
    if cls.feature_kind == "video":
        check_video_inputs(task, inputs)
        return
    for item in inputs:
        if item.video is not None or item.choices or item.subtitles or item.ts is not None:
            raise VlpetError(f"{item.where}: task {task} takes images; --video, --choices, --subtitles and --ts "
                             f"are for the video tasks (tvqa, how2qa, tvc, yc2c)")
        if len(item.images) != cls.n_images:
            raise VlpetError(f"{item.where}: task {task} takes {cls.n_images} image(s) per input, got "
                             f"{len(item.images)}; " + ("give --image twice (left, right)" if cls.n_images == 2
                                                       else "give one --image"))
        for path in item.images:
            if not path.is_file():
                raise VlpetError(f"{item.where}: image {path} not found")
        if needs and not item.text.strip():
            raise VlpetError(f"{item.where}: task {task} needs a {needs} (--{needs} \"...\")")
        if not needs and item.text.strip():
            raise VlpetError(f"{item.where}: task {task} captions images and takes no question or statement")


def _folder_inputs(folder: Path, text: str) -> list[PredictInput]:
    """One input per image of a folder (sorted), each with the same text."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise VlpetError(f"{folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
    return [PredictInput([p], text, str(p)) for p in files]


def _jsonl_inputs(path: Path, task: str) -> list[PredictInput]:
    """Inputs from a JSON-lines file: {"image": ...} or {"images": [...]}, with "question" or "statement"."""
    base = path.parent
    inputs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}: line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise VlpetError(f"{where}: not valid JSON ({exc.msg}); one object per line") from None
        if not isinstance(obj, dict):
            raise VlpetError(f"{where}: not a JSON object; write {{\"image\": \"a.jpg\", \"question\": \"...\"}}")
        text = obj.get("question", obj.get("statement", obj.get("sent", "")))
        if "video" in obj:
            if "image" in obj or "images" in obj:
                raise VlpetError(f"{where}: give \"video\" or \"image(s)\", not both")
            choices = obj.get("choices", [])
            if not isinstance(obj["video"], str) or not isinstance(choices, list):
                raise VlpetError(f"{where}: needs \"video\": FILE (and \"choices\": [...] for QA)")
            ts = obj.get("ts")
            ts = None if ts is None else (",".join(str(x) for x in ts) if isinstance(ts, list) else str(ts))
            inputs.append(PredictInput([], str(text or ""), where, base / obj["video"], [str(c) for c in choices],
                                       str(obj.get("subtitles") or ""), ts))
            continue
        images = obj.get("images", [obj["image"]] if "image" in obj else None)
        if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            raise VlpetError(f"{where}: needs \"image\": FILE, \"images\": [FILE, ...] or \"video\": FILE")
        inputs.append(PredictInput([base / i for i in images], str(text or ""), where))
    if not inputs:
        raise VlpetError(f"{path}: no inputs (one JSON object per line)")
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
        return _jsonl_inputs(inputs, task)
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


class _Features:
    """An in-memory feature store for TaskDataset: img_id -> (n_tokens, dim) array."""

    def __init__(self, arrays: dict[str, Any]):
        self.arrays = arrays

    def get(self, img_id: str) -> Any:
        return self.arrays[img_id]


def extract(vm: Any, settings: VisionSettings, paths: list[Path], batch_size: int) -> dict[str, Any]:
    """Features of every distinct image, rounded to the store dtype the run was trained on."""
    import numpy as np

    from vlpet_cli.features.extract.images import grid_features, preprocess, to_pixels

    unique = list(dict.fromkeys(str(p) for p in paths))
    out: dict[str, Any] = {}
    for i in range(0, len(unique), batch_size):
        chunk = unique[i:i + batch_size]
        try:
            arrays = [preprocess(Path(p), vm.image_size, vm.mean, vm.std) for p in chunk]
        except OSError as exc:
            raise VlpetError(f"cannot read an image ({exc}); check the file") from None
        feats = grid_features(vm, to_pixels(arrays), settings.layer).numpy()
        for p, f in zip(chunk, feats):
            out[p] = f.astype(settings.dtype).astype(np.float32)
    return out


def extract_videos(vm: Any, settings: VisionSettings, paths: list[Path], batch_size: int = 64) -> dict[str, Any]:
    """Per-frame projected embeddings (n_frames, dim) of every distinct video, decoded and cropped as VALUE's
    extractor does, rounded to the store dtype the run was trained on."""
    import numpy as np
    import torch

    from vlpet_cli.features.extract.videos import image_embeds, preprocess_video

    out: dict[str, Any] = {}
    for p in dict.fromkeys(str(p) for p in paths):
        try:
            pixels = torch.from_numpy(preprocess_video(Path(p), vm.image_size, vm.mean, vm.std))
        except Exception as exc:  # noqa: BLE001 - PyAV raises its own errors for unreadable files
            raise VlpetError(f"cannot decode video {p} ({type(exc).__name__}: {exc}); check the file") from None
        feats = torch.cat([image_embeds(vm, pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)])
        out[p] = feats.numpy().astype(settings.dtype).astype(np.float32)
    return out


def video_duration(path: Path) -> float:
    """A video's duration in seconds (the container's, else its stream's)."""
    import av

    with av.open(str(path)) as container:
        if container.duration:
            return float(container.duration) / 1_000_000
        stream = container.streams.video[0]
        return float(stream.duration * stream.time_base) if stream.duration else 0.0


def video_record(spec: Any, item: PredictInput, index: int) -> Any:
    """The Record the task's reader builds from an annotation line with this video, question, moment, choices
    and subtitles: QA '[Q] q [TS] (s-e) [Choices] a0: ... .', TVC '[TS] ([s, e])', YC2C no text."""
    from vlpet_cli.tasks.base import Record

    vid = str(item.video)
    if item.ts is None:
        start, end = 0.0, round(video_duration(Path(vid)), 2)
        raw_ts = f"{start:.2f}-{end:.2f}"
    else:
        start, end = parse_ts(item.ts, item.where)
        raw_ts = item.ts.strip() if "-" in item.ts and "," not in item.ts else f"{start:.2f}-{end:.2f}"
    if hasattr(spec, "n_choices"):
        choices = [f"a{i}: {c.strip('. ')}." for i, c in enumerate(item.choices)]
        text = " ".join([f"[Q] {item.text.strip()}", f"[TS] ({raw_ts})", "[Choices] " + " ".join(choices)])
        extra = {"subs": item.subtitles, "type": spec.qa_type}
        return Record(item.where, index, index, text, (vid,), spec.source, None, extra)
    ts = [start, end] if getattr(spec, "uses_ts", False) else None
    text = f"[TS] ({ts})" if ts is not None else ""
    extra = {"subs": item.subtitles, "clip_id": index, "ts": ts, "duration": None, "references": []}
    return Record(item.where, index, index, text, (vid,), spec.source, None, extra)


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


def _decode(model: Any, tokenizer: Any, preset: Any, task: Any, batch: dict) -> tuple[list[str], list[float]]:
    """The task's decoding on one batch: (answers, scores)."""
    import torch
    from transformers import GenerationConfig

    from vlpet_cli.inference import decoding_settings

    if isinstance(task.decoding, ScoreChoices):
        choices = task.decoding.choices
        logits = model.score_choices(batch, [tokenizer(c)["input_ids"] for c in choices])
        probs = torch.softmax(logits.float(), dim=1)
        best = logits.argmax(1).tolist()
        return [choices[i] for i in best], [float(probs[b, i]) for b, i in enumerate(best)]
    kwargs = decoding_settings(model, tokenizer, preset, task.name)
    config = GenerationConfig(decoder_start_token_id=model.config.decoder_start_token_id, return_dict_in_generate=True,
                              output_scores=True, **kwargs)
    out = model.generate(batch, generation_config=config)
    texts = [t.strip() for t in tokenizer.batch_decode(out.sequences, skip_special_tokens=True)]
    return texts, _scores_generated(model, out, tokenizer.eos_token_id)


def _recorded_features(directory: Path) -> tuple[dict, list[str]]:
    """(the adapter's recorded feature attributes per source, the tasks it was trained on), read without a model."""
    from vlpet_cli.artifacts import ADAPTER_CONFIG, FOLDED_CONFIG, read_adapter_config

    if (directory / FOLDED_CONFIG).is_file():
        meta = json.loads((directory / FOLDED_CONFIG).read_text(encoding="utf-8"))
    elif (directory / ADAPTER_CONFIG).is_file():
        meta = read_adapter_config(directory)
    else:
        raise VlpetError(f"{directory} is neither a run with a final adapter, an adapter, a bundle nor a folded "
                         f"model; give one written by `vlpet train` or `vlpet merge`")
    tasks = ((meta.get("preset") or {}).get("data") or {}).get("tasks") or []
    features = meta.get("features")
    return (features if isinstance(features, dict) else {}), [resolve_task(t) for t in tasks]


def _locate(path: Path) -> Path:
    """A run directory means its final adapter; anything else is loaded as it is."""
    path = Path(path)
    if not path.exists():
        raise VlpetError(f"{path} does not exist; give a run directory, an adapter, a bundle or a folded model")
    if (path / "config.yaml").is_file() and not (path / "adapter").is_dir():
        raise VlpetError(f"{path} is a run without a final adapter yet; wait for training to finish or use "
                         f"{path / 'checkpoints' / 'best'}")
    return path / "adapter" if (path / "adapter").is_dir() else path


def predict(path: Path, task: str, inputs: list[PredictInput], vision_model: str | None = None,
            layer: int | None = None, torchscript: bool = False, batch_size: int = 16, backbone: str | None = None,
            progress: bool = True) -> list[dict]:
    """One answer per input: {"task", "images", "text", "answer", "score", "score_kind"} (video tasks: "video"
    instead of "images", and for QA "choice_index" and "choice", the chosen choice's text). Everything the user
    gave is checked before a model is loaded."""
    import torch

    from vlpet_cli.artifacts import load_any
    from vlpet_cli.features.extract.images import load_vision_model
    from vlpet_cli.tasks.base import Record, TaskDataset, collate

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
    video = cls.feature_kind == "video"
    if video:
        from vlpet_cli.features.extract.videos import load_projected_model

        vm = load_projected_model(settings.model, device)
        dim = vm.dim
    else:
        vm = load_vision_model(settings.model, device, settings.torchscript)
        dim = vm.hidden_size
    if dim != preset.model.feat_dim:
        raise VlpetError(f"{settings.model} gives {dim}-dimensional features, but {directory} was "
                         f"trained on model.feat_dim={preset.model.feat_dim}; pass the vision model it was trained "
                         f"with (--vision-model)")
    model.to(device).eval()
    configure_threads(model, preset.train.threads)
    spec = get_task(task, preset.data.prompts, preset.data.use_prompts, preset.data.video)
    if video:
        records = [video_record(spec, item, i) for i, item in enumerate(inputs)]
    else:
        records = [Record(item.where, i, i, item.text, tuple(str(p) for p in item.images), source)
                   for i, item in enumerate(inputs)]
    results: list[dict] = []
    with Progress(len(inputs), enabled=progress and len(inputs) > 1, label="predict", unit="inputs",
                  stderr=True) as bar, torch.no_grad():
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            paths = [Path(p) for r in chunk for p in r.image_ids]
            feats = extract_videos(vm, settings, paths) if video else extract(vm, settings, paths, batch_size)
            dataset = TaskDataset(spec, chunk, _Features(feats), tokenizer, split_kind="eval")
            batch = collate([dataset[i] for i in range(len(chunk))], dataset.pad_id)
            batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
            answers, scores = _decode(model, tokenizer, preset, spec, batch)
            kind = SCORE_KINDS["choices" if isinstance(spec.decoding, ScoreChoices) else "generate"]
            for record, answer, value in zip(chunk, answers, scores):
                item = inputs[record.index]
                if not video:
                    results.append({"task": task, "images": list(record.image_ids), "text": record.text,
                                    "answer": answer, "score": value, "score_kind": kind})
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
