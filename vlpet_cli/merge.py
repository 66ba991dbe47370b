"""`vlpet merge`: average adapters, fold what is linear into the backbone, export LoRA or IA3 as a PEFT adapter.

Directory formats written here (all written atomically, all self-describing):

- folded model: a plain Hugging Face model directory (config, weights, tokenizer with vlpet's tokens) whose weights
  already contain the folded methods (LoRA deltas, IA3 scales) and every trained backbone tensor, plus
  `projector.safetensors`, `projector.json` and `vlpet_folded.json`
  (the preset with its PET modules removed, the source adapter).
- bundle: `vlpet_config.json` (format vlpet-bundle/1) + `adapter.safetensors` holding what cannot be folded, and
  `backbone/`, the folded backbone; it loads like an adapter whose backbone is its own `backbone/` folder.
- PEFT export: `adapter_config.json` + `adapter_model.safetensors` in peft's LoRA or IA3 format, the projector
  beside it, and `base/`, the backbone the adapter applies to (resized vocabulary, trained biases, no LoRA/IA3).
  What folds, what cannot and what exports is each PET method's own declaration (`vlpet_cli/pet/<method>.py`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlpet_cli.artifacts import (
    ADAPTER_CONFIG,
    ADAPTER_FORMAT,
    ADAPTER_WEIGHTS,
    BUNDLE_BACKBONE,
    BUNDLE_FORMAT,
    FOLDED_CONFIG,
    FOLDED_FORMAT,
    OBJ_ROWS,
    PROJECTOR_CONFIG,
    PROJECTOR_WEIGHTS,
    adapter_state,
    backbone_identity,
    load_adapter,
    parameter_counts,
    read_adapter_config,
    write_model_card,
    write_peft_card,
)
from vlpet_cli.atomic import staged_dir, write_json
from vlpet_cli.errors import VlpetError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from vlpet_cli.config import Preset
    from vlpet_cli.pet.inject import PetModules
    from vlpet_cli.vl.model import VLModel

PEFT_BASE = "base"

# ---- small helpers --------------------------------------------------------------------------------------
@contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """A temp directory that replaces `out` when the block succeeds and is removed when it fails."""
    with staged_dir(Path(out)) as tmp:
        yield tmp


def _refuse_overwrite(out: Path, inputs: list[Path]) -> None:
    """Writing over an input would destroy it; say so instead. An --out that cannot be written is refused before
    anything is loaded."""
    from vlpet_cli.runs import check_writable

    for path in inputs:
        if Path(out).resolve() == Path(path).resolve():
            raise VlpetError(f"--out {out} is one of the inputs; choose another output directory")
    check_writable(Path(out).parent, "--out", out)


def _brief(value: Any) -> str:
    return "{...}" if isinstance(value, dict) else repr(value)


def _dict_diffs(a: Any, b: Any, key: str) -> list[str]:
    """'key: A vs B' for every leaf (or whole section present on one side only) that differs."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in _dict_diffs(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{key}.{k}" if key else str(k))]
    return [] if a == b else [f"{key}: {_brief(a)} vs {_brief(b)}"]


def _summary(problems: list[str], limit: int = 8) -> str:
    shown = "; ".join(problems[:limit])
    return shown + (f"; and {len(problems) - limit} more" if len(problems) > limit else "")


def _dir_size(directory: Path) -> int:
    return sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file())


# ---- averaging ------------------------------------------------------------------------------------------
def adapter_of(path: Path) -> Path:
    """The adapter directory a path means: itself, or a run directory's final `adapter/` (`runs.locate`)."""
    from vlpet_cli.runs import locate

    return locate(path).directory


def _read_adapter(path: Path):
    """(config, tensors) of a plain adapter directory."""
    from vlpet_cli.artifacts import read_tensors

    path = Path(path)
    meta = read_adapter_config(path)
    if meta.get("format", ADAPTER_FORMAT) != ADAPTER_FORMAT:
        raise VlpetError(f"{path} is a {meta.get('format')} directory, not a trained adapter; "
                         f"average the adapters it was made from")
    weights = path / ADAPTER_WEIGHTS
    if not weights.exists():
        raise VlpetError(f"{path} is not an adapter directory: {ADAPTER_WEIGHTS} is missing")
    return meta, read_tensors(weights)


def compatibility_problems(meta_a: dict, tensors_a: dict, meta_b: dict, tensors_b: dict) -> list[str]:
    """Why two adapters cannot be combined parameter by parameter (empty when they can)."""
    problems = []
    for section in ("pet", "model"):
        a = dict(meta_a["preset"].get(section) or {})
        b = dict(meta_b["preset"].get(section) or {})
        if section == "model":  # the same backbone may sit at two paths; its identity is compared below
            a.pop("backbone", None)
            b.pop("backbone", None)
        problems += [f"preset {d}" for d in _dict_diffs(a, b, section)]
    problems += [f"backbone {d}" for d in _dict_diffs(meta_a.get("backbone", {}), meta_b.get("backbone", {}), "")]
    only_a, only_b = sorted(set(tensors_a) - set(tensors_b)), sorted(set(tensors_b) - set(tensors_a))
    if only_a:
        problems.append(f"tensors only in the first: {only_a[:5]} ({len(only_a)})")
    if only_b:
        problems.append(f"tensors only in the second: {only_b[:5]} ({len(only_b)})")
    for name in sorted(set(tensors_a) & set(tensors_b)):
        if tensors_a[name].shape != tensors_b[name].shape:
            problems.append(f"{name}: shape {tuple(tensors_a[name].shape)} vs {tuple(tensors_b[name].shape)}")
    return problems


def _check_obj_rows(first: dict, other: dict, a: Path, b: Path) -> None:
    """The frozen random object-order rows are not averaged: they must be the very same tensor."""
    import torch

    if OBJ_ROWS in first and not torch.equal(first[OBJ_ROWS], other[OBJ_ROWS]):
        raise VlpetError(
            f"cannot average {a} with {b}: their object-order embedding rows ({OBJ_ROWS}, the frozen random codes "
            f"the visual tokens carry) differ, so their modules read different visual codes (e.g. adapters imported "
            f"from different reference runs); average only adapters built with the same rows")


def merge_weights(n: int, weights: list[float] | None, mode: str, scale: float) -> list[float]:
    """The coefficient of each adapter: mean → scale·w_i/Σw; sum → scale·w_i (weights default to 1)."""
    import math

    if mode not in ("mean", "sum"):
        raise VlpetError(f"unknown merge mode '{mode}'; choose mean or sum")
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    if len(w) != n:
        raise VlpetError(f"got {len(w)} weights for {n} adapters; give one weight per adapter")
    if not all(math.isfinite(x) for x in [*w, scale]):
        raise VlpetError(f"weights and scale must be finite numbers, got {w} and {scale}")
    if mode == "mean":
        if any(x < 0 for x in w) or sum(w) <= 0:
            raise VlpetError(f"mean weights must be non-negative with a positive sum, got {w}; "
                             f"use --mode sum for signed combinations")
        total = sum(w)
        w = [x / total for x in w]
    return [scale * x for x in w]


def parse_weights(text: str | None) -> list[float] | None:
    """--weights '1,3' as numbers; a bad item is one clear error."""
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise VlpetError(f"--weights {text}: give a comma list of numbers, one per adapter (e.g. 1,3)") from None


def refuse_existing_out(out: Path, overwrite: bool) -> None:
    """An existing non-empty --out is replaced only with --overwrite (as `vlpet train` protects runs)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise VlpetError(f"--out {out} is a file; choose a directory path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise VlpetError(f"--out {out} already exists; pass --overwrite to replace it, or choose another --out")


def average_adapters(adapters: list[Path], out: Path, weights: list[float] | None = None,
                     mode: str = "mean", scale: float = 1.0, overwrite: bool = True) -> dict:
    """Combine adapters of one preset and backbone tensor by tensor: mean = Σ ŵ_i θ_i with ŵ = w / Σw;
    sum = Σ w_i θ_i (task-arithmetic style); both times `scale`. Writes a normal adapter directory; run
    directories mean their final adapter; an existing `out` is replaced only when `overwrite`."""
    import torch
    from safetensors.torch import save_file

    from vlpet_cli import __version__

    if not adapters:
        raise VlpetError("give at least one adapter directory to average")
    coefficients = merge_weights(len(adapters), weights, mode, scale)  # the arguments first, then the files
    adapters = [adapter_of(a) for a in adapters]
    _refuse_overwrite(out, adapters)
    refuse_existing_out(out, overwrite)
    loaded = [_read_adapter(a) for a in adapters]
    meta0, tensors0 = loaded[0]
    for path, (meta, tensors) in zip(adapters[1:], loaded[1:]):
        problems = compatibility_problems(meta0, tensors0, meta, tensors)
        if problems:
            raise VlpetError(f"cannot average {adapters[0]} with {path}: {_summary(problems)}")
        _check_obj_rows(tensors0, tensors, adapters[0], path)
    merged = {}
    for name, tensor in tensors0.items():
        if name == OBJ_ROWS:
            merged[name] = tensor.clone()
            continue
        acc = torch.zeros(tensor.shape, dtype=torch.float64)
        for c, (_, tensors) in zip(coefficients, loaded):
            acc = acc + c * tensors[name].to(torch.float64)
        merged[name] = acc.to(tensor.dtype).contiguous()
    record = {"mode": mode, "scale": scale, "weights": weights if weights is not None else [1.0] * len(adapters),
              "coefficients": coefficients, "sources": [str(a.resolve()) for a in adapters]}
    with _staged(Path(out)) as tmp:
        save_file(merged, str(tmp / ADAPTER_WEIGHTS))
        write_json(tmp / ADAPTER_CONFIG, {"format": ADAPTER_FORMAT, "vlpet_version": __version__,
                                          "preset": meta0["preset"], "backbone": meta0["backbone"],
                                          **({"parameters": meta0["parameters"]} if "parameters" in meta0 else {}),
                                          "merge": record})
        write_model_card(Path(out), files=tmp)
    return {"out": str(out), "tensors": len(merged), "coefficients": coefficients,
            "size_bytes": _dir_size(Path(out))}


# ---- folding --------------------------------------------------------------------------------------------
def unfoldable_groups(pet: PetModules) -> list[str]:
    """Why each PET method present cannot be folded into plain backbone weights (each method's declaration)."""
    from vlpet_cli.pet.inject import unfoldable

    return unfoldable(pet)


def fold_modules(model: VLModel) -> list[str]:
    """Detach the PET hooks and fold every foldable method (LoRA, IA3) into its Linears; returns what was folded."""
    from vlpet_cli.pet.inject import fold

    return fold(model.pet)


def _pet_without(preset, pet, keep_unfoldable: bool):
    """The preset with the folded methods removed (bundle) or with every PET module removed (folded model)."""
    from vlpet_cli.config import PetConfig
    from vlpet_cli.pet.inject import foldable
    from vlpet_cli.presets import validate

    data = preset.model_dump(mode="json")
    if keep_unfoldable:
        for method in foldable(pet):
            data["pet"][method.field] = None
    else:
        pet = preset.pet
        data["pet"] = PetConfig(trainable=pet.trainable, init=pet.init).model_dump(mode="json")
    return validate(data, "folded preset")


def _save_backbone(model: VLModel, tokenizer: PreTrainedTokenizerBase, directory: Path) -> None:
    """save_pretrained of the backbone and its (extended) tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    model.backbone.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))


def _save_projector(model: VLModel, preset: Preset, directory: Path) -> None:
    """projector.safetensors (its full state) + projector.json (what builds it)."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.projector.state_dict().items()}
    save_file(state, str(directory / PROJECTOR_WEIGHTS))
    write_json(directory / PROJECTOR_CONFIG, {"format": "vlpet-projector/1", "family": model.family,
                                              "d_model": model.backbone.config.d_model,
                                              "feat_dim": preset.model.feat_dim, "n_boxes": preset.model.n_boxes})


def fold_adapter(adapter: Path, out: Path, bundle: bool = False, backbone: str | None = None) -> dict:
    """Write the adapter's model as plain backbone weights (LoRA folded in) + projector; with `bundle`, what cannot
    be folded is kept as an adapter beside a folded `backbone/` so the directory loads with `load_bundle`."""
    from safetensors.torch import save_file

    from vlpet_cli import __version__

    adapter, out = adapter_of(adapter), Path(out)
    _refuse_overwrite(out, [adapter])
    model, tokenizer, preset = load_adapter(adapter, backbone=backbone)
    model.eval()
    counts, as_trained = parameter_counts(model), preset.model_dump(mode="json")  # the model as trained: its card
    kept = unfoldable_groups(model.pet)
    if kept and not bundle:
        raise VlpetError(f"{adapter} ({preset.name}) cannot be folded into plain {model.family} weights: "
                         f"{'; '.join(kept)}. Use --bundle to write a self-contained directory that keeps them "
                         f"as modules")
    from vlpet_cli.pet.inject import foldable

    folded_methods = foldable(model.pet)
    folded = fold_modules(model)
    trained = [n for n in adapter_state(model) if n.startswith("backbone.")]
    if trained:
        folded.append(f"trained backbone tensors ({len(trained)}, already in the weights)")
    source = str(adapter.resolve())
    with _staged(out) as tmp:
        if bundle:
            _save_backbone(model, tokenizer, tmp / BUNDLE_BACKBONE)
            _save_projector(model, preset, tmp)
            state = {k: v for k, v in adapter_state(model).items()
                     if not any(m.owns(k) for m in folded_methods)}
            save_file(state, str(tmp / ADAPTER_WEIGHTS))
            rest = _pet_without(preset, model.pet, keep_unfoldable=True).model_dump(mode="json")
            rest["model"]["backbone"] = BUNDLE_BACKBONE
            write_json(tmp / ADAPTER_CONFIG, {"format": BUNDLE_FORMAT, "vlpet_version": __version__, "preset": rest,
                                              "backbone": backbone_identity(model), "source": source,
                                              "folded": folded, "kept": kept, "parameters": counts,
                                              "trained_preset": as_trained})
        else:
            _save_backbone(model, tokenizer, tmp)
            _save_projector(model, preset, tmp)
            plain = _pet_without(preset, model.pet, keep_unfoldable=False).model_dump(mode="json")
            write_json(tmp / FOLDED_CONFIG, {"format": FOLDED_FORMAT, "vlpet_version": __version__, "preset": plain,
                                             "source": source, "folded": folded, "parameters": counts,
                                             "trained_preset": as_trained})
        write_model_card(out, files=tmp)
    return {"out": str(out), "bundle": bundle, "folded": folded, "kept": kept, "size_bytes": _dir_size(out)}


# ---- PEFT export ----------------------------------------------------------------------------------------
def _peft():
    try:
        import peft
    except ImportError:
        raise VlpetError("exporting to PEFT needs the optional 'peft' package: pip install 'vlpet[peft]' "
                         "(or pip install peft)") from None
    return peft


def export_peft(adapter: Path, out: Path, backbone: str | None = None, with_base: bool = True) -> dict:
    """Write the adapter's LoRA or IA3 as a PEFT adapter (+ projector beside it; + `base/`, the exact backbone it
    applies to, unless with_base=False). Returns the notes the user should read (what the adapter cannot hold)."""
    from safetensors.torch import save_file

    _peft()
    adapter, out = adapter_of(adapter), Path(out)
    _refuse_overwrite(out, [adapter])
    model, tokenizer, preset = load_adapter(adapter, backbone=backbone)
    methods = model.pet.methods()
    exportable = [m for m in methods if m.peft_type]
    if not exportable:
        raise VlpetError(f"{adapter} ({preset.name}) has no LoRA modules and no IA3 vectors, so there is nothing to "
                         f"export to PEFT; use `vlpet merge fold` for a standalone model")
    method = exportable[0]
    others = [m.why_unfoldable(model.pet) if m.unfoldable else f"{m.label}: a second PEFT adapter type"
              for m in methods if m is not method]
    if others:
        raise VlpetError(f"{adapter} ({preset.name}) is more than {method.label}: {'; '.join(others)}. A PEFT "
                         f"{method.peft_type} adapter would silently drop them; use `vlpet merge fold --bundle` "
                         f"instead")
    counts = parameter_counts(model)  # of the model as trained, for the card
    model.pet.remove_hooks()  # the base written below must be the backbone without the method
    trained = [n for n in adapter_state(model) if n.startswith("backbone.")]
    base_path = (out.resolve() / PEFT_BASE) if with_base else None
    kind = f"PEFT {method.peft_type} adapter"
    notes = [f"the visual projector is not part of a {kind}; it is saved beside it as {PROJECTOR_WEIGHTS}"]
    if with_base:
        notes.append(f"load with PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained('{base_path}'), "
                     f"'{out}'): {PEFT_BASE}/ is the backbone with the resized vocabulary ({len(tokenizer)} tokens)"
                     + (f" and the {len(trained)} trained backbone tensors (biases/LayerNorms)" if trained else ""))
    else:
        notes.append(f"load it on {preset.model.backbone} with the vocabulary resized to {len(tokenizer)} tokens")
        if trained:
            notes.append(f"{len(trained)} trained backbone tensors (biases/LayerNorms) cannot go into a {kind} "
                         f"and are NOT in this export; export with the base (default) to keep them")
    export = method.peft(model.pet, method.spec(preset.pet), model.backbone, str(base_path or preset.model.backbone))
    with _staged(out) as tmp:
        export.config.save_pretrained(str(tmp))
        save_file(export.state, str(tmp / "adapter_model.safetensors"))
        _save_projector(model, preset, tmp)
        if with_base:
            _save_backbone(model, tokenizer, tmp / PEFT_BASE)
        write_peft_card(adapter, out, tmp, preset, model.backbone.config.model_type, counts,
                        f"{method.peft_type}, {export.modules} {method.peft_unit}",
                        f"./{out.resolve().name}/{PEFT_BASE}" if with_base else None)
    summary = {"out": str(out), "peft_type": method.peft_type, "modules": export.modules,
               "exported": f"{export.modules} {method.peft_unit}", "notes": notes, "size_bytes": _dir_size(out)}
    if method.peft_type == "LORA":
        summary["lora_modules"] = export.modules
    return summary
