"""Find, load, override (dotted key=value) and validate presets."""

from __future__ import annotations

import copy
import difflib
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from vlpet_cli.backbones import family_of
from vlpet_cli.config import Preset
from vlpet_cli.errors import VlpetError, file_error
from vlpet_cli.features.kinds import VIDEO
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


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.setdefault(key, line)
            except TypeError:  # an unhashable key: PyYAML's own error follows
                continue
            if first != line:
                raise DuplicateKeyError(key, first, line)
        return super().construct_mapping(node, deep)


class DuplicateKeyError(yaml.YAMLError):
    """A mapping of a YAML text holds the same key twice."""

    def __init__(self, key: Any, first: int, second: int):
        super().__init__(f"key '{key}' appears twice in one mapping (lines {first} and {second}), and only the "
                         f"last would count")
        self.key, self.first, self.second = key, first, second


def parse_yaml(text: str) -> Any:
    """YAML text as Python data, refusing a key given twice in one mapping (DuplicateKeyError)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects


def read_yaml(path: Path, fix: str) -> Any:
    """A YAML file's content; an unreadable file, invalid YAML or a key given twice in one mapping is one
    VlpetError naming the file, the problem and `fix`. Every YAML file vlpet reads goes through here."""
    try:
        return parse_yaml(Path(path).read_text(encoding="utf-8"))
    except DuplicateKeyError as exc:
        raise VlpetError(f"{path}: {exc}; remove one of them or merge the two") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        problem = getattr(exc, "problem", None) or exc.__class__.__name__
        raise VlpetError(f"{path}: not valid YAML{line} ({problem}); {fix}") from None
    except UnicodeDecodeError as exc:
        raise VlpetError(f"{path}: cannot be read ({exc}); {fix}") from None
    except OSError as exc:
        raise file_error(exc, writing=False) from None


def load_raw(name: str) -> dict:
    """The preset's YAML as a dict."""
    path = preset_path(name)
    data = read_yaml(path, "fix the file (see `vlpet presets show vlpet-small` for the layout)")
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
        value = parse_yaml(text)
    except DuplicateKeyError as exc:
        raise VlpetError(f"override value {text!r}: {exc}; give each key once") from None
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


SECTION_ORDERS = ((), ("video",), ("t5",), ("video", "t5"))  # the sections a key may sit in, outermost first


def _sections(dotted: str) -> tuple[tuple[str, ...], str]:
    """('video', 't5') and 'train.lr' for 'video.t5.train.lr': the leading section names and the field path."""
    parts = dotted.split(".")
    sections: list[str] = []
    while len(parts) > 1 and parts[0] in ("t5", "video"):
        sections.append(parts.pop(0))
    return tuple(sections), ".".join(parts)


def _field_homes(model: type[BaseModel] = Preset, prefix: str = "") -> dict[str, list[str]]:
    """{field name: the dotted paths where a preset has a field of that name}, for 'belongs under' hints."""
    homes: dict[str, list[str]] = {}
    for name, info in model.model_fields.items():
        if name in ("t5", "video"):
            continue
        homes.setdefault(name, []).append(prefix + name)
        inner = _unwrap(info.annotation)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            for key, paths in _field_homes(inner, f"{prefix}{name}.").items():
                homes.setdefault(key, []).extend(paths)
    return homes


def check_key(dotted: str) -> None:
    """Raise a VlpetError with the fix if `dotted` names no field of a preset: a did-you-mean for a typo, the
    right place for a field under the wrong section (`train.lora.r` -> `pet.lora.r`). A key may sit in the `t5.`
    or `video.` section, or in `video.t5.` (the video section's T5 part), and is checked as the rest."""
    sections, rest = _sections(dotted)
    if sections not in SECTION_ORDERS:
        fixed = "video.t5" if set(sections) == {"video", "t5"} else sections[0]
        raise VlpetError(f"unknown key '{dotted}': sections nest only as t5, video and video.t5 (T5 backbones on "
                         f"video tasks); write {fixed}.{rest}")
    where = "".join(f"{section}." for section in sections)
    model: Any = Preset
    parts = rest.split(".")
    for i, part in enumerate(parts):
        if isinstance(model, type) and issubclass(model, BaseModel):
            fields = model.model_fields
            if part not in fields or (model is Preset and sections and part in ("t5", "video")):
                parent = where + ".".join(parts[:i]) if i else (f"the {where[:-1]} section" if where
                                                                 else "the preset")
                raise VlpetError(f"unknown key '{dotted}': {parent} has no field '{part}'"
                                 f"{_fix_for(part, parts[i + 1:], where, list(fields))}")
            model = _unwrap(fields[part].annotation)
        elif typing.get_origin(model) is dict:
            model = _unwrap(typing.get_args(model)[1])
        elif model is dict:
            return
        else:
            raise VlpetError(f"unknown key '{dotted}': '{where}{'.'.join(parts[:i])}' is a value, not a section")


def _fix_for(part: str, below: list[str], where: str, siblings: list[str]) -> str:
    """Where a field of this name lives (a block under the wrong section), else a did-you-mean."""
    homes = _field_homes().get(part, [])
    if not homes or len(homes) > 3:
        return _did_you_mean(part, siblings)
    parents = " or ".join(home.rsplit(".", 1)[0] if "." in home else "the top level" for home in homes)
    keys = " or ".join(".".join([where + home, *below]) for home in homes)
    return f"; '{part}' belongs under {parents}: write {keys}"


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
    """A Preset from a dict, with pydantic's errors turned into one readable message naming `source` (the file or
    what was being resolved), each wrong key with the value given."""
    if not isinstance(data, dict):
        raise VlpetError(f"{source}: a preset must be a mapping of sections (name, method, pet, train, ...)")
    check_keys(data, source)
    try:
        return Preset.model_validate(data)
    except ValidationError as exc:
        raise VlpetError(f"{source}: {'; '.join(_problem(e) for e in exc.errors())}") from None


def check_keys(data: dict, source: str) -> None:
    """Every key of a preset tree names a field where it sits (check_key), else a VlpetError naming `source`."""
    for key in _leaf_keys(data):
        try:
            check_key(key)
        except VlpetError as exc:
            raise VlpetError(f"{source}: {exc}") from None


def _problem(error: Any) -> str:
    """One pydantic error as 'train.epochs 0: must be at least 1' (a bound) or 'pet.gate.granularity=huge: Input
    should be ...' (anything else)."""
    key = ".".join(str(p) for p in error["loc"])
    given, bounds = error.get("input"), error.get("ctx") or {}
    if error["type"] in ("greater_than", "greater_than_equal") and isinstance(given, (int, float)):
        bound = bounds.get("gt", bounds.get("ge"))
        if error["type"] == "greater_than" and isinstance(given, int) and isinstance(bound, int):
            return f"{key} {given}: must be at least {bound + 1}"
        return f"{key} {given}: must be {'greater than' if error['type'] == 'greater_than' else 'at least'} {bound:g}"
    shown = f"={given}" if isinstance(given, (int, float, str)) or given is None else ""
    return f"{key}{shown}: {error['msg']}"


def apply(base: dict | Preset, overrides: Iterable[str | tuple[str, Any]] = (), source: str = "preset") -> Preset:
    """The one way overrides reach a preset: `base` (a preset's YAML as a dict, or a stored or resolved Preset)
    with each `key=value` (or parsed (key, value)) set in order, a later one winning, then validated. Every key is
    checked before anything is set: an unknown one is refused with its fix (check_key)."""
    data = base.model_dump(mode="json") if isinstance(base, BaseModel) else copy.deepcopy(base)
    pairs = [item if isinstance(item, tuple) else parse_overrides([item])[0] for item in overrides]
    for key, _ in pairs:
        check_key(key)
    for key, value in pairs:
        set_dotted(data, key, value)
    return validate(data, source)


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
    """True when there are tasks and every one reads video features (the feature-kind table's VIDEO)."""
    if task_kind is None or not tasks:
        return False
    return all(task_kind(t) == VIDEO.name for t in tasks)


def resolve(name: str, overrides: list[str] | None = None, backbone: str | None = None,
            defaults: list[str] | None = None, task_kind: Callable[[str], str] | None = None,
            run: bool = False) -> Preset:
    """Load a preset and apply, in order: the video section (VIDEO_DEFAULTS merged with the preset's `video:`)
    when every task is a video task (`task_kind`, e.g. the task table's feature_kind, tells), its T5 section on
    a T5 backbone, the video section's `t5:` part when both hold, then `defaults` (e.g. the toy world's), then the
    user's overrides, and validate. Overrides follow the same order: plain keys, then `video.<key>` (video runs),
    `t5.<key>` (T5 backbones), `video.t5.<key>`; a prefixed key that does not apply stays in its section, except
    for a run (`run=True`), where it would have no effect and is refused, as are settings its backbone family
    ignores (check_applies). With `task_kind`, the per-task sections' keys must name tasks."""
    raw = load_raw(name)
    source = f"preset '{name}'"
    check_keys(raw, source)  # as written: its t5 and video sections are merged away below
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
    tasks = _run_tasks(raw, pairs)
    video = is_video_run(tasks, task_kind)
    if run:
        check_applies(pairs, family, str(chosen), video, tasks)
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

    ranked = sorted((rank(p) for p in pairs), key=lambda r: r[0])
    preset = with_default_tasks(apply(raw, [(key, value) for _, key, value in ranked], source))
    if run and family != "t5" and preset.pet.trainable.relative_attention_bias:
        raise VlpetError(f"{source}: pet.trainable.relative_attention_bias=true has no effect on {chosen}: only T5 "
                         f"backbones have relative attention bias tables; set it under t5 (t5.pet.trainable."
                         f"relative_attention_bias=true) or drop it")
    if task_kind is not None:
        check_task_keys(preset, task_kind, source)
    return preset


def check_applies(pairs: list[tuple[str, Any]], family: str, backbone: str, video: bool, tasks: list[str]) -> None:
    """A run's `t5.` and `video.` overrides must apply to it: on another family or on image tasks they would sit
    in a section the run never reads."""
    for key, value in pairs:
        rest = key[len(VIDEO_PREFIX):] if key.startswith(VIDEO_PREFIX) else key
        if key.startswith(VIDEO_PREFIX) and not video:
            raise VlpetError(f"{key}={value}: video.* settings apply only when every task is a video task, and "
                             f"this run trains {', '.join(tasks) or 'no task'}; give {rest}={value} instead")
        if rest.startswith(T5_PREFIX) and family != "t5":
            raise VlpetError(f"{key}={value}: t5.* settings apply only on T5 backbones, and {backbone} is a "
                             f"{family} model; give {key.replace(T5_PREFIX, '', 1)}={value} instead, or a T5 "
                             f"--backbone")


TASK_KEYED = ("train.task_ratios", "eval.generation", "data.prompts")  # sections keyed by task name


def check_task_keys(preset: Preset, task_kind: Callable[[str], str], source: str) -> None:
    """Every key of a per-task section, and every task of HyperFormer's task embeddings, names a task (`task_kind`
    refuses other names): an entry for no task would be ignored."""
    named = [(f"{section}.{task}", task) for section in TASK_KEYED
             for task in getattr(getattr(preset, section.split(".")[0]), section.split(".")[1], None) or {}]
    if preset.pet.hyperformer is not None:
        named += [("pet.hyperformer.tasks", task) for task in preset.pet.hyperformer.tasks or []]
    for where, task in named:
        try:
            task_kind(task)
        except VlpetError as exc:
            raise VlpetError(f"{source}: {where}: {exc}") from None


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
