"""Import the reference code's full `.pth` checkpoints (VLBart / VLT5 state dicts) as vlpet adapter directories.

The reference saves `torch.save(model.state_dict())` of a DDP-wrapped model (spec pipeline §6): every key carries
`module.`, the frozen backbone is included, and the added modules use the reference's names (spec modules §1-§3).
This module maps those names onto vlpet's, checks the backbone against the one the user gives, and writes a normal
adapter directory (`vl/state.save_adapter`), so `vlpet eval DIR` evaluates a published checkpoint.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from vlpet_cli.backbones import N_VIS
from vlpet_cli.config import Preset
from vlpet_cli.errors import VlpetError

# A frozen backbone tensor "differs" when torch.allclose(rtol, atol) fails; it differs "largely" when
# ||ckpt - backbone|| / ||backbone|| exceeds LARGE_DIFFERENCE (a different or fine-tuned model, not float noise).
RTOL, ATOL = 1e-5, 1e-6
LARGE_DIFFERENCE = 1e-2
SHOW = 5  # names shown in an error message

# Where the reference's encoder modules sit. BART: inside BartEncoderLayer. T5: inside T5LayerSelfAttention
# (layer.0) for `attn_*` names and T5LayerFF (layer.1) for `ff_*` names; `_sublayer_ok` checks the pairing.
SITES = {
    "bart": {"ROOT": r"model\.", "ENC": r"model\.encoder\.layers\.(?P<layer>\d+)\.",
             "CROSS": r"model\.decoder\.layers\.(?P<layer>\d+)\.encoder_attn\."},
    "t5": {"ROOT": "", "ENC": r"encoder\.block\.(?P<layer>\d+)\.layer\.(?P<sub>\d+)\.",
           "CROSS": r"decoder\.block\.(?P<layer>\d+)\.layer\.1\.EncDecAttention\."},
}
T5_SUBLAYER = {"attn": "0", "ff": "1"}
KIND = {"attn": "attn", "ff": "ffn"}  # reference sub-layer word -> vlpet SubLayer.kind
CHECKPOINT_CLASS = {"bart": "VLBart", "t5": "VLT5"}

P = r"(?P<p>weight|bias)"
VIS = r"{ROOT}encoder\.visual_embedding\."
# (reference name pattern, vlpet name template or None to ignore, what it is)
RULES: list[tuple[str, str | None, str]] = [
    (VIS + r"(?P<mod>feat_embedding\.[01]|absolute_vis_pos_embedding\.[01]|img_order_embedding)\." + P,
     "projector.{mod}.{p}", "projector"),
    (VIS + r"obj_order_embedding\.weight", None, "tied word embedding"),
    (r"{ENC}(?P<kind>attn|ff)_adapter_multihead_down\.(?P<head>\d+)\." + P,
     "pet.encoder_modules.encoder_{layer}_{kind}.down.{p}", "down head"),
    (r"{ENC}(?P<kind>attn|ff)_adapter_multihead_up\." + P,
     "pet.encoder_modules.encoder_{layer}_{kind}.up.{p}", "module"),
    (r"{ENC}encoder_(?P<kind>attn|ff)_adapter_gating_large_x_(?P<which>down|up)\." + P,
     "pet.gates.encoder_{layer}_{kind}.{which}.{p}", "gate:large"),
    (r"{ENC}encoder_(?P<kind>attn|ff)_adapter_gating_middle_xy_add\." + P,
     "pet.gates.encoder_{layer}_{kind}.proj.{p}", "gate:middlex"),
    (r"{ENC}encoder_(?P<kind>attn|ff)_adapter_gating_middle_ia3_add",
     "pet.gates.encoder_{layer}_{kind}.z", "gate:middley"),
    (r"{ENC}encoder_(?P<kind>attn|ff)_adapter_gating_small_xy_cat\." + P,
     "pet.gates.encoder_{layer}_{kind}.proj.{p}", "gate:small"),
    (r"{CROSS}attn_value_parallel_adapter\.adapters\.(?P<task>[^.]+)\.(?P<which>down|up)_sampler\." + P,
     "pet.value.decoder_{layer}_cross.{which}.{p}", "value"),
]


class Rule(NamedTuple):
    """One compiled row of RULES for a backbone family."""

    pattern: re.Pattern
    target: str | None
    what: str


@dataclass
class Mapped:
    """A checkpoint sorted into vlpet names."""

    tensors: dict = field(default_factory=dict)  # vlpet name (pet.*, projector.*) -> tensor
    backbone: dict = field(default_factory=dict)  # HF backbone name -> tensor
    heads: dict = field(default_factory=dict)  # vlpet down name -> {head index: tensor}
    values: dict = field(default_factory=dict)  # vlpet value name -> {task: tensor}
    ignored: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    gates: set = field(default_factory=set)  # gate granularities the checkpoint holds


def rules(family: str) -> list[Rule]:
    """The rule table with the family's module paths filled in."""
    sites = SITES[family]
    out = []
    for pattern, target, what in RULES:
        for name, path in sites.items():
            pattern = pattern.replace("{" + name + "}", path)
        out.append(Rule(re.compile(pattern), target, what))
    return out


def _first(names: Iterable[str], n: int = SHOW) -> str:
    """The first n names, comma-separated, with how many more there are."""
    names = list(names)
    more = f" (and {len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


# ---- reading ---------------------------------------------------------------------------------------------------
def _load_failure(pth: Path, exc: Exception) -> str:
    """One message for a file that weights-only loading refused."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
    if found:
        return (f"{pth}: not a weights-only state dict: it holds a pickled {found.group(1)} object, and vlpet never "
                f"unpickles arbitrary objects. Where you trust the file, re-save only the tensors "
                f"(torch.save(model.state_dict(), NEW.pth)) and import that")
    return (f"{pth}: not a weights-only state dict: torch.load(weights_only=True) cannot read it "
            f"({type(exc).__name__}); the file is damaged or is not a PyTorch checkpoint")


def load_state_dict(pth: Path) -> tuple[dict, dict]:
    """(tensors by name with any `module.` prefix stripped, notes) from a weights-only `.pth` file."""
    import torch

    pth = Path(pth)
    if not pth.is_file():
        raise VlpetError(f"{pth}: no such checkpoint file")
    try:
        data = torch.load(pth, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        raise VlpetError(_load_failure(pth, exc)) from None
    notes: dict = {"nested_under": None, "prefix_stripped": False}
    for key in ("state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data, notes["nested_under"] = data[key], key
            break
    if not isinstance(data, dict):
        raise VlpetError(f"{pth}: not a state dict (the file holds a {type(data).__name__}, not a dict of tensors)")
    bad = [str(k) for k, v in data.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise VlpetError(f"{pth}: not a plain state dict: {_first(bad)} do not hold tensors")
    if not data:
        raise VlpetError(f"{pth}: the state dict is empty")
    state = {}
    for key, tensor in data.items():
        if key.startswith("module."):
            key, notes["prefix_stripped"] = key[len("module."):], True
        state[key] = tensor
    return state, notes


def checkpoint_family(state: dict) -> str | None:
    """'bart' (VLBart keys) or 't5' (VLT5 keys) from the key names, None when neither is recognisable."""
    if any(k.startswith("model.encoder.layers.") for k in state):
        return "bart"
    if any(k.startswith("encoder.block.") for k in state):
        return "t5"
    return None


# ---- mapping ---------------------------------------------------------------------------------------------------
def map_keys(state: dict, family: str, backbone_keys: set[str]) -> Mapped:
    """Sort every checkpoint key into mapped module tensors, backbone tensors, ignored and unexpected keys."""
    table = rules(family)
    out = Mapped()
    for key, tensor in state.items():
        rule, match = next(((r, m) for r in table if (m := r.pattern.fullmatch(key))), (None, None))
        if rule is not None and not _sublayer_ok(match):
            rule = None
        if rule is None and key in backbone_keys:
            out.backbone[key] = tensor
            continue
        if rule is None:
            out.unexpected.append(key)
            continue
        if rule.target is None:
            out.ignored.append(key)
            continue
        groups = match.groupdict()
        if "kind" in groups:
            groups["kind"] = KIND[groups["kind"]]
        name = rule.target.format(**groups)
        if rule.what.startswith("gate:"):
            out.gates.add(rule.what[len("gate:"):])
        if rule.what == "down head":
            out.heads.setdefault(name, {})[int(groups["head"])] = tensor
        elif rule.what == "value":
            out.values.setdefault(name, {})[groups["task"]] = tensor
        else:
            out.tensors[name] = tensor
    return out


def _sublayer_ok(match: re.Match) -> bool:
    """T5: attention modules must sit in layer.0 (T5LayerSelfAttention), FFN modules in layer.1 (T5LayerFF)."""
    groups = match.groupdict()
    return groups.get("sub") is None or T5_SUBLAYER.get(groups.get("kind")) == groups["sub"]


def join_heads(heads: dict, pth: Path) -> tuple[dict, int | None]:
    """Concatenate each module's N_h down heads in head order into one Linear(d, r) (spec modules §1.2)."""
    import torch

    joined, counts = {}, set()
    for name, parts in heads.items():
        order = sorted(parts)
        if order != list(range(len(order))):
            raise VlpetError(f"{pth}: {name} has down-projection heads {order}; expected 0..{len(order) - 1}")
        joined[name] = torch.cat([parts[i] for i in order], dim=0)
        counts.add(len(order))
    if len(counts) > 1:
        raise VlpetError(f"{pth}: encoder modules have different numbers of down heads {sorted(counts)}")
    return joined, counts.pop() if counts else None


def merge_tasks(values: dict, pth: Path) -> tuple[dict, list[str]]:
    """One tensor per value-adapter weight: the task copies of `--use_single_adapter` must be equal."""
    import torch

    merged, tasks = {}, set()
    for name, per_task in values.items():
        names = sorted(per_task)
        tasks.update(names)
        first = per_task[names[0]]
        for task in names[1:]:
            if per_task[task].shape != first.shape or not torch.equal(per_task[task], first):
                layer = name.split(".")[2].split("_")[1]
                raise VlpetError(
                    f"{pth}: decoder layer {layer} has different value adapters for tasks '{names[0]}' and "
                    f"'{task}' ({name}): the checkpoint was trained with one adapter per task (without "
                    f"--use_single_adapter), while vlpet's value adapter is shared by all tasks")
        merged[name] = first
    return merged, sorted(tasks)


# ---- checking --------------------------------------------------------------------------------------------------
def _override_hint(name: str, shape: tuple) -> str:
    """The preset override that gives a vlpet tensor the checkpoint's shape."""
    width = shape[1] if name.endswith(".up.weight") else shape[0]
    if name.startswith("pet.encoder_modules."):
        return f"set pet.encoder.r={width}"
    if name.startswith("pet.gates."):
        return f"set pet.gate.r={width}"
    if name.startswith("pet.value."):
        return f"set pet.value.r={width}"
    if name == "projector.feat_embedding.0.weight":
        return f"set model.feat_dim={shape[1]} (2048: CLIP RN101 image features, 512: video)"
    return "check the preset and its overrides"


def _fit_hint(preset: Preset, mapped: Mapped) -> str:
    """What to change when the checkpoint's modules and the preset's disagree."""
    gate = preset.pet.gate.granularity if preset.pet.gate else "none"
    held = sorted(mapped.gates) or ["none"]
    if held != [gate]:
        return (f"The checkpoint's gates are '{', '.join(held)}', the preset's '{gate}': pick the matching preset "
                f"(vlpet-large, vlpet-middlex, vlpet-middley, vlpet-small) or override pet.gate.granularity")
    return "Check the preset and its overrides (pet.encoder, pet.gate, pet.value, pet.trainable)"


def check_fit(model, preset: Preset, mapped: Mapped, tensors: dict, pth: Path) -> dict:
    """{model parameter name: checkpoint tensor} for every trainable tensor; refuses gaps, extras and shapes."""
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    found = dict(tensors)
    for key, tensor in mapped.backbone.items():
        if f"backbone.{key}" in trainable:
            found[f"backbone.{key}"] = tensor
    if mapped.unexpected:
        raise VlpetError(f"{pth}: {len(mapped.unexpected)} checkpoint key(s) match no VL-PET module and no "
                         f"backbone tensor: {_first(mapped.unexpected)}. vlpet imports VL-PET checkpoints "
                         f"(multi-head encoder modules, gates, decoder value adapters) on the backbone they were "
                         f"trained from")
    missing = sorted(trainable - set(found))
    extra = sorted(n for n in tensors if n not in params)
    frozen = sorted(n for n in tensors if n in params and n not in trainable)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"the model needs {len(missing)} tensor(s) the checkpoint lacks: {_first(missing)}")
        if extra:
            parts.append(f"the checkpoint has {len(extra)} tensor(s) the model lacks: {_first(extra)}")
        raise VlpetError(f"{pth} does not fit preset '{preset.name}': {'; '.join(parts)}. {_fit_hint(preset, mapped)}")
    if frozen:
        raise VlpetError(f"preset '{preset.name}' keeps {_first(frozen)} frozen, so the adapter could not carry "
                         f"them; set pet.trainable.projector=true")
    for name, tensor in found.items():
        want = tuple(params[name].shape)
        if tuple(tensor.shape) != want:
            raise VlpetError(f"{pth}: {name} has shape {tuple(tensor.shape)} in the checkpoint but {want} in the "
                             f"model built from preset '{preset.name}': {_override_hint(name, tuple(tensor.shape))}")
    return found


def check_backbone_shapes(model, mapped: Mapped, pth: Path, backbone: str) -> None:
    """Every backbone tensor of the checkpoint must have the vlpet backbone's shape."""
    state = model.backbone.state_dict()
    for key, tensor in mapped.backbone.items():
        if tuple(tensor.shape) != tuple(state[key].shape):
            raise VlpetError(
                f"{pth}: backbone tensor {key} has shape {tuple(tensor.shape)} in the checkpoint but "
                f"{tuple(state[key].shape)} in '{backbone}': the checkpoint was trained "
                f"on another backbone or vocabulary (reference: bart-base resized to 50465 rows, t5-base to 32200); "
                f"pass --backbone with that model")


def compare_frozen(model, mapped: Mapped, original_vocab: int) -> dict:
    """Compare the checkpoint's frozen backbone tensors with the user's backbone (tied tensors once).

    Vocabulary tables are compared over their pretrained rows only: the rows vlpet adds (extra ids, object-order
    codes) are random in both models."""
    import torch

    state = model.backbone.state_dict()
    params = dict(model.backbone.named_parameters(remove_duplicate=False))
    vocab = model.backbone.get_input_embeddings().weight.shape[0]
    rows = min(original_vocab, vocab - N_VIS)
    seen, differing, largest, compared = set(), [], 0.0, 0
    for key, tensor in mapped.backbone.items():
        target = state[key]
        if key in params and params[key].requires_grad:
            continue
        if target.data_ptr() in seen:
            continue
        seen.add(target.data_ptr())
        a, b = tensor.detach().float(), target.detach().float()
        if a.dim() == 2 and a.shape[0] == vocab:
            a, b = a[:rows], b[:rows]
        compared += 1
        if torch.allclose(a, b, rtol=RTOL, atol=ATOL):
            continue
        relative = float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp(min=1e-12))
        differing.append((key, relative))
        largest = max(largest, relative)
    return {"compared": compared, "differing": len(differing), "max_relative_difference": largest,
            "differing_names": [k for k, _ in differing[:10]],
            "large": [k for k, r in differing if r > LARGE_DIFFERENCE]}


def object_rows_source(state: dict, mapped: Mapped, word_keys: list[str]):
    """The checkpoint's word embedding (its last N_VIS rows are the object-order codes), or None."""
    for key in word_keys:
        if key in mapped.backbone:
            return mapped.backbone[key]
    alias = next((k for k in mapped.ignored if k.endswith("obj_order_embedding.weight")), None)
    return state[alias] if alias else None


def backbone_warnings(comparison: dict, backbone: str, vocab: int, original_vocab: int) -> list[str]:
    """What the report should tell the user about the frozen backbone."""
    warnings = []
    if not comparison["compared"]:
        warnings.append(f"the checkpoint holds no frozen backbone tensors, so vlpet could not check that "
                        f"'{backbone}' is the model it was trained from")
    if comparison["differing"]:
        warnings.append(f"{comparison['differing']} of {comparison['compared']} frozen backbone tensors differ from "
                        f"'{backbone}' (largest relative difference {comparison['max_relative_difference']:.3g}); "
                        f"the adapter runs on the backbone you gave, not on the checkpoint's copy")
    extra_rows = max(0, vocab - N_VIS - original_vocab)
    if extra_rows:
        warnings.append(f"{extra_rows} added vocabulary rows (<extra_id_*>) are frozen random rows that the adapter "
                        f"does not carry; they only matter if a model generates those tokens")
    return warnings


# ---- the import ------------------------------------------------------------------------------------------------
def _resolve_preset(preset: str | Preset, backbone: str | None, overrides: Iterable[str]) -> Preset:
    from vlpet_cli.presets import parse_overrides, resolve, set_dotted, validate

    if isinstance(preset, str):
        return resolve(preset, list(overrides), backbone=backbone)
    data = preset.model_dump(mode="json")
    pairs = parse_overrides(list(overrides)) + ([("model.backbone", backbone)] if backbone else [])
    for key, value in pairs:
        set_dotted(data, key, value)
    return validate(data, f"preset '{preset.name}'")


def _check_out(out: Path) -> None:
    """Refuse to replace a directory that is not an adapter directory (save_adapter replaces it whole)."""
    from vlpet_cli.vl.state import ADAPTER_CONFIG

    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / ADAPTER_CONFIG).exists())):
        raise VlpetError(f"{out} exists and is not an adapter directory; choose a new --out path")


def import_reference_checkpoint(pth: Path, preset: str | Preset, out: Path, backbone: str | None = None,
                                overrides: Iterable[str] = (), allow_mismatch: bool = False) -> dict:
    """Map a reference VLBart/VLT5 `.pth` onto a vlpet model for `preset` and write an adapter directory at `out`.

    Returns a report: counts of mapped tensors, heads, tasks, and how the frozen backbone compares."""
    import torch

    from vlpet_cli import backbones
    from vlpet_cli.pet import anatomy
    from vlpet_cli.vl.model import build_model
    from vlpet_cli.vl.state import OBJ_ROWS, save_adapter

    pth, out = Path(pth), Path(out)
    _check_out(out)
    state, notes = load_state_dict(pth)
    resolved = _resolve_preset(preset, backbone, overrides)
    bb = backbones.resolve(resolved.model.backbone)
    found_family = checkpoint_family(state)
    if found_family and found_family != bb.family:
        raise VlpetError(f"{pth} is a {CHECKPOINT_CLASS[found_family]} checkpoint but "
                         f"backbone '{resolved.model.backbone}' is {bb.family}; pass --backbone with a "
                         f"{found_family} model")
    model, _ = build_model(resolved, weights=True)
    words = anatomy.word_embedding(model.backbone).weight
    backbone_state = model.backbone.state_dict()
    word_keys = [k for k, v in backbone_state.items() if v.data_ptr() == words.data_ptr()]

    mapped = map_keys(state, bb.family, set(backbone_state))
    heads, n_heads = join_heads(mapped.heads, pth)
    values, tasks = merge_tasks(mapped.values, pth)
    tensors = {**mapped.tensors, **heads, **values}
    check_backbone_shapes(model, mapped, pth, resolved.model.backbone)
    found = check_fit(model, resolved, mapped, tensors, pth)

    source_words = object_rows_source(state, mapped, word_keys)
    if source_words is None and not words.requires_grad:
        raise VlpetError(f"{pth} has no word embedding ({_first(word_keys)}): the object-order rows of the visual "
                         f"projector live there; import the full state dict the reference saved")
    original_vocab = backbones.load_config(bb).vocab_size
    comparison = compare_frozen(model, mapped, original_vocab)
    if comparison["large"] and not allow_mismatch:
        raise VlpetError(f"{pth} was not trained from backbone '{resolved.model.backbone}': frozen tensors "
                         f"{_first(comparison['large'])} differ by more than {LARGE_DIFFERENCE:g} (relative). "
                         f"Pass --backbone with the model it was trained from, or --allow-mismatch to import anyway")

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in found.items():
            params[name].copy_(tensor.to(params[name].dtype))
        if not words.requires_grad:
            words[-N_VIS:].copy_(source_words[-N_VIS:].to(words.dtype))
    size = save_adapter(out, model, resolved, {"imported_from": str(pth)})

    warnings = backbone_warnings(comparison, resolved.model.backbone, words.shape[0], original_vocab)
    return {
        "source": str(pth), "out": str(out), "bytes": size, "preset": resolved.name,
        "backbone": resolved.model.backbone, "family": bb.family,
        "checkpoint_keys": len(state), "nested_under": notes["nested_under"],
        "prefix_stripped": notes["prefix_stripped"],
        "imported": len(found) + (0 if words.requires_grad else 1),
        "adapter_tensors": sorted([*found, *([] if words.requires_grad else [OBJ_ROWS])]),
        "encoder_heads": n_heads, "value_tasks": tasks, "gates": sorted(mapped.gates),
        "ignored": mapped.ignored,
        "backbone_in_checkpoint": len(mapped.backbone),
        "backbone_compared": comparison["compared"], "backbone_differing": comparison["differing"],
        "backbone_max_relative_difference": comparison["max_relative_difference"],
        "backbone_differing_names": comparison["differing_names"],
        "warnings": warnings,
    }
