"""Find, load, override (dotted key=value) and validate presets."""

from __future__ import annotations

import copy
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from vlpet_cli.backbones import family_of
from vlpet_cli.config import Preset
from vlpet_cli.errors import VlpetError

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


def check_key(dotted: str) -> None:
    """Raise a VlpetError with a did-you-mean if `dotted` names no field of a preset (`t5.<key>` is checked as
    `<key>`, since the T5 section holds the same fields)."""
    if dotted.startswith(T5_PREFIX):
        try:
            check_key(dotted[len(T5_PREFIX):])
        except VlpetError as exc:
            raise VlpetError(str(exc).replace("unknown key '", f"unknown key '{T5_PREFIX}", 1)) from None
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


def resolve(name: str, overrides: list[str] | None = None, backbone: str | None = None,
            defaults: list[str] | None = None) -> Preset:
    """Load a preset, apply its T5 section when the backbone is a T5, then `defaults` (e.g. the toy world's),
    then the user's overrides, and validate. `t5.<key>=v` overrides act as `<key>=v` (after the others) on a T5
    backbone and are kept in the T5 section otherwise."""
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
    if family == "t5" and raw.get("t5"):
        raw = deep_merge(raw, raw["t5"])
        raw["t5"] = None
    pairs = parse_overrides(defaults or []) + pairs
    if family == "t5":  # the T5-only values win over the general ones, as the preset's T5 section does
        pairs = [p for p in pairs if not p[0].startswith(T5_PREFIX)] + [
            (k[len(T5_PREFIX):], v) for k, v in pairs if k.startswith(T5_PREFIX)]
    for key, value in pairs:
        set_dotted(raw, key, value)
    return validate(raw, f"preset '{name}'")


def to_yaml(preset: Preset) -> str:
    """The preset as YAML, in field order."""
    return yaml.safe_dump(preset.model_dump(mode="json"), sort_keys=False)
