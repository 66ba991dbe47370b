"""Find, load, override (dotted key=value) and validate presets."""

from __future__ import annotations

import copy
import difflib
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from vlpet_cli.backbones import family_of
from vlpet_cli.config import Preset
from vlpet_cli.errors import VlpetError
from vlpet_cli.tasks import default_tasks

PRESET_DIR = Path(__file__).parent / "presets"


def list_presets() -> list[str]:
    """Names of the shipped presets, sorted."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    """The YAML file of a shipped preset name, or a path to a user's preset file."""
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml") and candidate.exists():
        return candidate
    path = PRESET_DIR / f"{name}.yaml"
    if not path.exists():
        raise VlpetError(f"unknown preset '{name}'{_did_you_mean(name, list_presets())}; see `vlpet presets ls`")
    return path


def load_raw(name: str) -> dict:
    """The preset's YAML as a dict."""
    path = preset_path(name)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise VlpetError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise VlpetError(f"{path}: a preset must be a YAML mapping")
    return data


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """Split `a.b=value` items; values are parsed as YAML (numbers, booleans, lists, null)."""
    parsed = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise VlpetError(f"override '{item}' is not of the form key=value (e.g. train.lr=5e-4)")
        parsed.append((key.strip(), _parse_value(value)))
    return parsed


def _parse_value(text: str) -> Any:
    """YAML value, with YAML 1.1's gaps filled: '5e-4' is a number, not a string."""
    if not text.strip():
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _unwrap(annotation: Any) -> Any:
    """The model class inside Optional[...]/Union, or the annotation itself."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        for arg in typing.get_args(annotation):
            if arg is not type(None):
                return _unwrap(arg)
    return annotation


T5_PREFIX = "t5."  # `t5.<key>` overrides apply on T5 backbones only (the preset's T5 section)
VIDEO_PREFIX = "video."  # `video.<key>` overrides apply when every task is a video task (the video section)

# The reference's video-text settings (src/multitask_video.py and the video-text scripts, spec modules §3-4,
# pipeline §2.3, §4, §5): 512-d CLIP ViT frame embeddings, 64 visual tokens (64 frames; the 8x8 -> 8x8 "pool" is
# the identity), lr 7e-4, 20 epochs, batch 50 for every video task (BART). Applied when every task of a run is a
# video task, merged with the preset's own `video:` section; its `t5:` part applies on T5 backbones after the
# preset's T5 section (no T5 video scripts exist: the T5 section's modules and lr stand, with the reference's T5
# video batch 30). How each video task decodes (beams, greedy on T5) is the task's own (vlpet_cli/tasks/video/).
VIDEO_DEFAULTS: dict = {
    "model": {"feat_dim": 512, "n_boxes": 64},
    "train": {"lr": 7.0e-4, "epochs": 20, "batch_size": 50},
    "t5": {"train": {"batch_size": 30}},
}


def check_key(dotted: str) -> None:
    """Raise a VlpetError with a did-you-mean if `dotted` names no field of a preset (`t5.<key>` and
    `video.<key>` are checked as `<key>`, since those sections hold the same fields)."""
    for prefix in (T5_PREFIX, VIDEO_PREFIX):
        if dotted.startswith(prefix):
            try:
                check_key(dotted[len(prefix):])
            except VlpetError as exc:
                raise VlpetError(str(exc).replace("unknown key '", f"unknown key '{prefix}", 1)) from None
            return
    model: Any = Preset
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if isinstance(model, type) and issubclass(model, BaseModel):
            fields = model.model_fields
            if part not in fields:
                where = ".".join(parts[:i]) or "the preset"
                raise VlpetError(
                    f"unknown key '{dotted}': {where} has no field '{part}'{_did_you_mean(part, list(fields))}"
                )
            model = _unwrap(fields[part].annotation)
        elif typing.get_origin(model) is dict:
            model = _unwrap(typing.get_args(model)[1])
        elif model is dict:
            return
        else:
            raise VlpetError(f"unknown key '{dotted}': '{'.'.join(parts[:i])}' is a value, not a section")


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """Set tree[a][b][c] = value for 'a.b.c', creating (or replacing null) sections on the way."""
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def deep_merge(base: dict, extra: dict) -> dict:
    """A copy of base with extra merged in: mappings merge recursively, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def validate(data: dict, source: str) -> Preset:
    """A Preset from a dict, with pydantic's errors turned into one readable message."""
    for key in _leaf_keys(data):
        check_key(key)
    try:
        return Preset.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise VlpetError(f"{source}: {problems}") from None


def _leaf_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in ("task_ratios", "prompts"):
            keys.extend(_leaf_keys(value, dotted + "."))
        else:
            keys.append(dotted)
    return keys


def _run_tasks(raw: dict, pairs: list[tuple[str, Any]]) -> list[str]:
    """The task names a run will have: the last `data.tasks` given, else the preset's, else the default."""
    given = next((v for k, v in reversed(pairs) if k == "data.tasks"), None)
    if given is None:
        given = (raw.get("data") or {}).get("tasks")
    if given is None:
        given = default_tasks()
    if isinstance(given, str):
        given = given.split(",")
    return [str(t).strip() for t in given or [] if str(t).strip()]


def is_video_run(tasks: list[str], task_kind: Callable[[str], str] | None) -> bool:
    """True when there are tasks and every one is a video task (`task_kind(name) == "video"`)."""
    if task_kind is None or not tasks:
        return False
    return all(task_kind(t) == "video" for t in tasks)


def resolve(name: str, overrides: list[str] | None = None, backbone: str | None = None,
            defaults: list[str] | None = None, task_kind: Callable[[str], str] | None = None) -> Preset:
    """Load a preset and apply, in order: the video section (VIDEO_DEFAULTS merged with the preset's `video:`)
    when every task is a video task (`task_kind`, e.g. the task table's feature_kind, tells), its T5 section on
    a T5 backbone, the video section's `t5:` part when both hold, then `defaults` (e.g. the toy world's), then the
    user's overrides, and validate. Overrides follow the same order: plain keys, then `video.<key>` (video runs),
    `t5.<key>` (T5 backbones), `video.t5.<key>`; a prefixed key that does not apply stays in its section."""
    raw = load_raw(name)
    pairs = parse_overrides(overrides or [])
    for key, _ in pairs:
        check_key(key)
    if backbone:
        pairs.append(("model.backbone", backbone))
    chosen = next((v for k, v in reversed(pairs) if k == "model.backbone"), None)
    chosen = chosen or raw.get("model", {}).get("backbone", "bart-base")
    family = family_of(str(chosen))
    families = raw.get("families", ["bart", "t5"])
    if family not in families:
        raise VlpetError(f"preset '{name}' is for {', '.join(families)} backbones, not {family} ('{chosen}')")
    pairs = parse_overrides(defaults or []) + pairs
    video = is_video_run(_run_tasks(raw, pairs), task_kind)
    video_t5 = None
    if video:
        section = deep_merge(VIDEO_DEFAULTS, raw.get("video") or {})
        video_t5 = section.pop("t5", None)
        raw = deep_merge(raw, section)
        raw["video"] = None
    if family == "t5" and raw.get("t5"):
        raw = deep_merge(raw, raw["t5"])
        raw["t5"] = None
    if family == "t5" and video_t5:
        raw = deep_merge(raw, video_t5)

    def rank(pair: tuple[str, Any]) -> tuple[int, str, Any]:
        key, level = pair[0], 0
        if video and key.startswith(VIDEO_PREFIX):
            key, level = key[len(VIDEO_PREFIX):], 1
        if family == "t5" and key.startswith(T5_PREFIX):
            key, level = key[len(T5_PREFIX):], level + 2
        return level, key, pair[1]

    for _, key, value in sorted((rank(p) for p in pairs), key=lambda r: r[0]):
        set_dotted(raw, key, value)
    return with_default_tasks(validate(raw, f"preset '{name}'"))


def with_default_tasks(preset: Preset) -> Preset:
    """The preset with the task lists it leaves open (data.tasks, pet.hyperformer.tasks) set to the task table's
    default tasks, so that a resolved preset (and the run's config.yaml) names its tasks."""
    data, pet = preset.data, preset.pet
    if data.tasks is None:
        data = data.model_copy(update={"tasks": default_tasks()})
    if pet.hyperformer is not None and pet.hyperformer.tasks is None:
        pet = pet.model_copy(update={"hyperformer": pet.hyperformer.model_copy(update={"tasks": default_tasks()})})
    return preset.model_copy(update={"data": data, "pet": pet})


def to_yaml(preset: Preset) -> str:
    """The preset as YAML, in field order."""
    return yaml.safe_dump(preset.model_dump(mode="json"), sort_keys=False)
