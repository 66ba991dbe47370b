"""Import the reference code's full `.pth` checkpoints (VLBart / VLT5 state dicts) as vlpet adapter directories.

The reference saves `torch.save(model.state_dict())` of a DDP-wrapped model (spec pipeline §6): every key carries
`module.`, the frozen backbone is included, and the added modules use the reference's names (spec modules §1-§3).
Each PET method declares how the reference names its tensors in one record, `pet.method.ReferenceNaming` (its
`ReferenceRule`s, compiled per backbone family by `pet.reference_names`, which also gives training the reference's
decay groups; the labels, flag, sizes and preset its messages and guesses use), which only this module and
`pet.reference_names` read. This module sorts every key into module tensors, backbone tensors and ignored keys, checks
the backbone against the one the user gives, and writes a normal adapter directory (`artifacts.save_adapter`), so
`vlpet eval DIR` evaluates a published checkpoint.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from vlpet_cli.backbones import N_VIS
from vlpet_cli.config import Preset
from vlpet_cli.errors import VlpetError, file_error
from vlpet_cli.pet import reference_names
from vlpet_cli.pet.inject import METHODS, owner
from vlpet_cli.pet.method import ReferenceNaming
from vlpet_cli.pet.reference_names import rules  # noqa: F401  (re-exported: the rule table of both families)
from vlpet_cli.runs import check_writable

if TYPE_CHECKING:
    from vlpet_cli.vl.model import VLModel

# A frozen backbone tensor "differs" when torch.allclose(rtol, atol) fails; it differs "largely" when
# ||ckpt - backbone|| / ||backbone|| exceeds LARGE_DIFFERENCE (a different or fine-tuned model, not float noise).
RTOL, ATOL = 1e-5, 1e-6
LARGE_DIFFERENCE = 1e-2
SHOW = 5  # names shown in an error message
CHECKPOINT_CLASS = {"bart": "VLBart", "t5": "VLT5"}


@dataclass
class Mapped:
    """A checkpoint sorted into vlpet names."""

    tensors: dict = field(default_factory=dict)  # vlpet name (pet.*, projector.*) -> tensor
    backbone: dict = field(default_factory=dict)  # HF backbone name -> tensor
    heads: dict = field(default_factory=dict)  # vlpet down name -> {head index: tensor}
    values: dict = field(default_factory=dict)  # vlpet name -> {task: tensor} (the per-task copies of a module)
    ignored: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    gates: set = field(default_factory=set)  # gate granularities the checkpoint holds
    methods: set = field(default_factory=set)  # module families: vlpet, adapter, lora, prompt, hyperformer
    task_embeddings: dict = field(default_factory=dict)  # source module -> {vlpet name: tensor}


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
    except OSError as exc:
        if exc.errno is not None:  # the file could not be read (permissions, I/O): not a damaged checkpoint
            raise file_error(exc, writing=False) from None
        raise VlpetError(_load_failure(pth, exc)) from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
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
    out = Mapped()
    for key, tensor in state.items():
        found = reference_names.match(key, family)
        if found is None and key in backbone_keys:
            out.backbone[key] = tensor
            continue
        if found is None:
            out.unexpected.append(key)
            continue
        rule, groups = found
        if rule.target is None:
            out.ignored.append(key)
            continue
        declared = rule.declared
        name = rule.target.format(**groups)
        if declared.gate:
            out.gates.add(declared.gate)
        if declared.tag:
            out.methods.add(declared.tag)
        if declared.role == "head":
            out.heads.setdefault(name, {})[int(groups["head"])] = tensor
        elif declared.role == "task":
            out.values.setdefault(name, {})[groups["task"]] = tensor
        elif declared.role == "task embedding":
            out.task_embeddings.setdefault(key.rsplit(".", 1)[0], {})[name] = tensor
        else:
            out.tensors[name] = tensor
    return out


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
    """One tensor per module weight: the task copies of `--use_single_adapter` (lora, prompt) must be equal."""
    import torch

    merged, tasks = {}, set()
    for name, per_task in values.items():
        names = sorted(per_task)
        tasks.update(names)
        first = per_task[names[0]]
        for task in names[1:]:
            if per_task[task].shape != first.shape or not torch.equal(per_task[task], first):
                method = owner(name)
                naming = method.reference if method else ReferenceNaming()
                what, flag = naming.label, naming.single_flag
                where = name.split(".")[2].split("_") if name.count(".") > 2 else []
                site = f"{where[0]} layer {where[1]}" if len(where) > 1 and where[1].isdigit() else "the encoder"
                raise VlpetError(
                    f"{pth}: {site} has different {what} for tasks '{names[0]}' and "
                    f"'{task}' ({name}): the checkpoint was trained with one module per task (without {flag}), "
                    f"while vlpet's modules are shared by all tasks")
        merged[name] = first
    return merged, sorted(tasks)


def task_embeddings(mapped: Mapped, preset: Preset, pth: Path) -> dict:
    """HyperFormer's task embeddings, one tensor per task (caption = coco): the shared table and the per-stack ones
    must agree, and hold the preset's tasks."""
    import torch

    if not mapped.task_embeddings:
        return {}
    sources = list(mapped.task_embeddings.values())
    first = sources[0]
    for other in sources[1:]:
        if sorted(other) != sorted(first) or any(not torch.equal(other[n], first[n]) for n in first):
            raise VlpetError(f"{pth}: the task embeddings of the encoder, decoder and shared table differ; vlpet "
                             f"keeps one table for both stacks (the reference's --unique_hyper_net)")
    if preset.pet.hyperformer is None:
        return first  # check_fit names them as tensors the model lacks
    found = sorted(n.rsplit(".", 1)[-1] for n in first)
    order = preset.pet.hyperformer.tasks
    assert order is not None, "resolve sets pet.hyperformer.tasks"
    if found != sorted(order):
        raise VlpetError(f"{pth}: the checkpoint has task embeddings for {found}, the preset's "
                         f"pet.hyperformer.tasks are {order}; set pet.hyperformer.tasks to the reference's --tasks")
    return first


def module_tensors(mapped: Mapped, preset: Preset, pth: Path) -> tuple[dict, int | None, list[str]]:
    """({vlpet name: tensor} of the checkpoint's module and projector tensors, with the down heads joined, the
    per-task copies merged and the task embeddings checked; the number of down heads; the tasks of the copies)."""
    heads, n_heads = join_heads(mapped.heads, pth)
    values, tasks = merge_tasks(mapped.values, pth)
    clash = sorted((set(mapped.tensors) & set(heads)) | (set(mapped.tensors) | set(heads)) & set(values))
    if clash:
        raise VlpetError(f"{pth}: two kinds of reference module map onto {_first(clash)} (e.g. VL-PET multi-head and "
                         f"VL-Adapter adapters in one sub-layer); vlpet holds one module per sub-layer")
    return {**mapped.tensors, **heads, **values, **task_embeddings(mapped, preset, pth)}, n_heads, tasks


def guess_preset(mapped: Mapped) -> str | None:
    """The preset that a method recognises from the checkpoint's modules, or None (no added modules, or a mix no
    preset has).

    Sizes are not guessed: a preset whose sizes differ is refused with the override to pass (`_override_hint`)."""
    names = {*mapped.tensors, *mapped.values, *mapped.heads}
    return next((p for m in METHODS if (p := m.reference.preset_of(mapped.methods, mapped.gates, names))), None)


# ---- checking --------------------------------------------------------------------------------------------------
def _override_hint(name: str, shape: tuple) -> str:
    """The preset override that gives a vlpet tensor the checkpoint's shape."""
    if name == "projector.feat_embedding.0.weight":
        return f"set model.feat_dim={shape[1]} (2048: CLIP RN101 image features, 512: video)"
    method = owner(name)
    hint = method.reference.size_hint(name, tuple(shape)) if method is not None else None
    return hint or "check the preset and its overrides"


def holds(mapped: Mapped) -> str:
    """What the checkpoint holds, in words, for error messages."""
    methods = sorted(mapped.methods) or ["no added modules (BitFit or full fine-tuning)"]
    gates = f", gates '{', '.join(sorted(mapped.gates))}'" if mapped.gates else ""
    return f"modules: {', '.join(methods)}{gates}"


def _fit_hint(preset: Preset, mapped: Mapped) -> str:
    """What to change when the checkpoint's modules and the preset's disagree."""
    gate = preset.pet.gate.granularity if preset.pet.gate else "none"
    held = sorted(mapped.gates) or ["none"]
    guess = guess_preset(mapped)
    pick = f"pass --preset {guess}" if guess and guess != preset.name else "pick the matching preset"
    if held != [gate]:
        return (f"The checkpoint holds {holds(mapped)}; the preset's gate is '{gate}': {pick} "
                f"(vlpet-large, vlpet-middlex, vlpet-middley, vlpet-small) or override pet.gate.granularity")
    return (f"The checkpoint holds {holds(mapped)}: {pick}, or check its overrides (pet.encoder, pet.decoder, "
            f"pet.gate, pet.value, pet.lora, pet.prompt, pet.hyperformer, pet.trainable)")


def check_fit(model: VLModel, preset: Preset, mapped: Mapped, tensors: dict, pth: Path) -> dict:
    """{model parameter name: checkpoint tensor} for every trainable tensor; refuses gaps, extras and shapes."""
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    found = dict(tensors)
    for key, tensor in mapped.backbone.items():
        if f"backbone.{key}" in trainable:
            found[f"backbone.{key}"] = tensor
    if mapped.unexpected:
        raise VlpetError(f"{pth}: {len(mapped.unexpected)} checkpoint key(s) match no VL-PET module and no "
                         f"backbone tensor: {_first(mapped.unexpected)}. vlpet imports the reference's VL-PET, "
                         f"VL-Adapter, Compacter, LoRA, prompt-tuning, HyperFormer, BitFit and full fine-tuning "
                         f"checkpoints on the backbone they were trained from")
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
    wrong = [(name, tuple(t.shape)) for name, t in found.items() if tuple(t.shape) != tuple(params[name].shape)]
    if wrong:  # report a tensor whose shape names an override, and every override the shapes call for
        name, shape = min(wrong, key=lambda w: _override_hint(*w).startswith("check"))
        hints = sorted({h[len("set "):] for w in wrong if (h := _override_hint(*w)).startswith("set ")})
        fix = f"set {' '.join(hints)} (the overrides to pass)" if hints else _override_hint(name, shape)
        raise VlpetError(f"{pth}: {name} has shape {shape} in the checkpoint but {tuple(params[name].shape)} in the "
                         f"model built from preset '{preset.name}': {fix}")
    return found


def check_backbone_shapes(model: VLModel, mapped: Mapped, pth: Path, backbone: str) -> None:
    """Every backbone tensor of the checkpoint must have the vlpet backbone's shape."""
    state = model.backbone.state_dict()
    for key, tensor in mapped.backbone.items():
        if tuple(tensor.shape) != tuple(state[key].shape):
            raise VlpetError(
                f"{pth}: backbone tensor {key} has shape {tuple(tensor.shape)} in the checkpoint but "
                f"{tuple(state[key].shape)} in '{backbone}': the checkpoint was trained "
                f"on another backbone or vocabulary (reference: bart-base resized to 50465 rows, t5-base to 32200); "
                f"pass --backbone with that model")


def compare_frozen(model: VLModel, mapped: Mapped, original_vocab: int) -> dict:
    """Compare the checkpoint's frozen backbone tensors with the user's backbone (tied tensors once).

    Vocabulary tables are compared over their pretrained rows only: the rows vlpet adds (extra ids, object-order
    codes) are random in both models."""
    import torch

    from vlpet_cli.pet import anatomy

    state = model.backbone.state_dict()
    params = dict(model.backbone.named_parameters(remove_duplicate=False))
    vocab = anatomy.word_embedding(model.backbone).weight.shape[0]
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


def backbone_warnings(comparison: dict, backbone: str) -> list[str]:
    """What the report should tell the user about the frozen backbone."""
    warnings = []
    if not comparison["compared"]:
        warnings.append(f"the checkpoint holds no frozen backbone tensors, so vlpet could not check that "
                        f"'{backbone}' is the model it was trained from")
    if comparison["differing"]:
        warnings.append(f"{comparison['differing']} of {comparison['compared']} frozen backbone tensors differ from "
                        f"'{backbone}' (largest relative difference {comparison['max_relative_difference']:.3g}); "
                        f"the adapter runs on the backbone you gave, not on the checkpoint's copy")
    return warnings


# ---- the import ------------------------------------------------------------------------------------------------
def _resolve_preset(preset: str | Preset, backbone: str | None, overrides: Iterable[str]) -> Preset:
    from vlpet_cli.presets import apply, resolve

    if isinstance(preset, str):
        return resolve(preset, list(overrides), backbone=backbone)
    return apply(preset, [*overrides, *([("model.backbone", backbone)] if backbone else [])],
                 f"preset '{preset.name}'")


def _preset_from_checkpoint(state: dict, pth: Path) -> str:
    """The preset `guess_preset` finds for a checkpoint, or an error saying which preset and overrides to pass."""
    family = checkpoint_family(state) or "bart"
    mapped = map_keys(state, family, set())
    guess = guess_preset(mapped)
    if guess is None:
        raise VlpetError(f"{pth}: cannot tell the preset from the checkpoint (it holds {holds(mapped)}); pass "
                         f"--preset (bitfit or full-finetune for a checkpoint without added modules, or the method's "
                         f"preset) and the overrides of its run, e.g. pet.encoder.r=192 for T5")
    return guess


def _check_out(out: Path) -> None:
    """Refuse to replace a directory that is not an adapter directory (save_adapter replaces it whole)."""
    from vlpet_cli.artifacts import ADAPTER_CONFIG

    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / ADAPTER_CONFIG).exists())):
        raise VlpetError(f"{out} exists and is not an adapter directory; choose a new --out path")
    check_writable(out.parent, "--out", out)  # before the checkpoint and the backbone are loaded


def import_reference_checkpoint(pth: Path, preset: str | Preset | None, out: Path, backbone: str | None = None,
                                overrides: Iterable[str] = (), allow_mismatch: bool = False) -> dict:
    """Map a reference VLBart/VLT5 `.pth` onto a vlpet model for `preset` and write an adapter directory at `out`.

    preset None picks the preset from the checkpoint's modules where they say it (`guess_preset`). Every added
    vocabulary row (extra ids and object-order codes) is taken from the checkpoint and carried by the adapter.
    Returns a report: counts of mapped tensors, heads, tasks, and how the frozen backbone compares."""
    import torch

    from vlpet_cli import backbones
    from vlpet_cli.artifacts import OBJ_ROWS, save_adapter
    from vlpet_cli.pet import anatomy
    from vlpet_cli.vl.model import build_model

    pth, out = Path(pth), Path(out)
    _check_out(out)
    state, notes = load_state_dict(pth)
    if preset is None:
        preset = _preset_from_checkpoint(state, pth)
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
    tensors, n_heads, tasks = module_tensors(mapped, resolved, pth)
    check_backbone_shapes(model, mapped, pth, resolved.model.backbone)
    found = check_fit(model, resolved, mapped, tensors, pth)

    source_words = object_rows_source(state, mapped, word_keys)
    if source_words is None and not words.requires_grad:
        raise VlpetError(f"{pth} has no word embedding ({_first(word_keys)}): the object-order rows of the visual "
                         f"projector live there; import the full state dict the reference saved")
    original_vocab = backbones.load_config(bb).vocab_size
    added = max(N_VIS, words.shape[0] - original_vocab)
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
            words[-added:].copy_(source_words[-added:].to(words.dtype))
            model.carried_rows = added
    size = save_adapter(out, model, resolved, {"imported_from": str(pth)})

    warnings = backbone_warnings(comparison, resolved.model.backbone)
    return {
        "source": str(pth), "out": str(out), "bytes": size, "preset": resolved.name,
        "backbone": resolved.model.backbone, "family": bb.family,
        "checkpoint_keys": len(state), "nested_under": notes["nested_under"],
        "prefix_stripped": notes["prefix_stripped"],
        "imported": len(found) + (0 if words.requires_grad else 1),
        "adapter_tensors": sorted([*found, *([] if words.requires_grad else [OBJ_ROWS])]),
        "encoder_heads": n_heads, "value_tasks": tasks, "task_modules": tasks, "methods": sorted(mapped.methods),
        "carried_vocab_rows": 0 if words.requires_grad else added, "gates": sorted(mapped.gates),
        "ignored": mapped.ignored,
        "backbone_in_checkpoint": len(mapped.backbone),
        "backbone_compared": comparison["compared"], "backbone_differing": comparison["differing"],
        "backbone_max_relative_difference": comparison["max_relative_difference"],
        "backbone_differing_names": comparison["differing_names"],
        "warnings": warnings,
    }
