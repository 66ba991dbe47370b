"""What a run ships: the adapter, bundle and folded-model directory formats, and one loader for any of them.

- adapter: `vlpet_config.json` (format vlpet-adapter/1: preset, backbone identity) + `adapter.safetensors` holding
  only what is not in the backbone (trainable tensors and the frozen random object-order rows).
- bundle: `vlpet_config.json` (format vlpet-bundle/1) + `adapter.safetensors` holding what cannot be folded, and
  `backbone/`, the folded backbone; it loads like an adapter whose backbone is its own `backbone/` folder.
- folded model: a plain Hugging Face model directory with `projector.safetensors`, `projector.json` and
  `vlpet_folded.json` (the preset with its PET modules removed, the source adapter).

Each of them carries a model card, `README.md` (vlpet_cli/cards.py renders it from the directory's own files, here
`card_facts`); their vlpet JSON records the trained model's parameter counts (`parameters`) for it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from vlpet_cli import __version__
from vlpet_cli.atomic import staged_dir, write_json
from vlpet_cli.backbones import N_VIS
from vlpet_cli.cards import CardFacts, read_evaluations, write_card
from vlpet_cli.config import Preset
from vlpet_cli.errors import VlpetError, file_error
from vlpet_cli.layout import place
from vlpet_cli.pet import anatomy
from vlpet_cli.presets import validate
from vlpet_cli.vl.identity import backbone_identity
from vlpet_cli.vl.model import build_model

if TYPE_CHECKING:
    from vlpet_cli.vl.model import VLModel

ADAPTER_CONFIG = "vlpet_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
OBJ_ROWS = "obj_order_rows"
ADAPTER_FORMAT = "vlpet-adapter/1"
BUNDLE_FORMAT = "vlpet-bundle/1"
FOLDED_FORMAT = "vlpet-folded/1"
FOLDED_CONFIG = "vlpet_folded.json"
PROJECTOR_WEIGHTS = "projector.safetensors"
PROJECTOR_CONFIG = "projector.json"
BUNDLE_BACKBONE = "backbone"

__all__ = ["backbone_identity"]  # re-exported: the identity is part of the adapter format


# ---- adapter ----------------------------------------------------------------------------------------------
def adapter_state(model: VLModel) -> dict[str, torch.Tensor]:
    """Every trainable tensor, plus the frozen random object-order rows (they are not in the pretrained file)."""
    state = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    words = anatomy.word_embedding(model.backbone).weight
    if not words.requires_grad:
        # the object-order codes; an imported reference checkpoint carries all its added rows (`carried_rows`)
        state[OBJ_ROWS] = words.detach()[-getattr(model, "carried_rows", N_VIS):].cpu().contiguous()
    return state


def load_adapter_state(model: VLModel, state: dict[str, torch.Tensor], source: str) -> None:
    """Strictly load an adapter state: every trainable tensor present, nothing unknown, shapes equal."""
    expected = adapter_state(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise VlpetError(f"{source} does not match this preset/backbone: missing {missing[:5]} "
                         f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state.items():
            if name == OBJ_ROWS:  # the trailing added vocabulary rows: N_VIS, or all added rows of an import
                words = anatomy.word_embedding(model.backbone).weight
                model.carried_rows = min(max(tensor.shape[0], N_VIS), words.shape[0])
                target = words[-model.carried_rows:]
            else:
                target = params[name]
            if target.shape != tensor.shape:
                raise VlpetError(f"{source}: {name} has shape {tuple(tensor.shape)}, model has {tuple(target.shape)}")
            target.copy_(tensor.to(target.dtype))


def parameter_counts(model: VLModel) -> dict:
    """{"trainable", "total", "percent"} of a model as built (the reference's percentage, pet/budget.py)."""
    from vlpet_cli.pet.budget import budget

    info = budget(model)
    return {"trainable": info["trainable"], "total": info["total"], "percent": info["percent"]}


def save_adapter(directory: Path, model: VLModel, preset: Preset, extra: dict | None = None) -> int:
    """Write <directory>/vlpet_config.json + adapter.safetensors + its model card atomically; returns the size in
    bytes."""
    with staged_dir(directory) as tmp:
        save_file(adapter_state(model), str(tmp / ADAPTER_WEIGHTS))
        write_json(tmp / ADAPTER_CONFIG, {"format": ADAPTER_FORMAT, "vlpet_version": __version__,
                                          "preset": preset.model_dump(mode="json"),
                                          "backbone": backbone_identity(model),
                                          "parameters": parameter_counts(model), **(extra or {})})
        write_model_card(directory, files=tmp)
    return sum(f.stat().st_size for f in directory.iterdir())


def read_adapter_config(directory: Path) -> dict:
    """The vlpet_config.json of an adapter or bundle directory; a clear error when it is not one."""
    path = directory / ADAPTER_CONFIG
    if not path.exists():
        raise VlpetError(f"{directory} is not an adapter directory: {ADAPTER_CONFIG} is missing")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise file_error(exc, writing=False) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise VlpetError(f"{path} is damaged (not valid JSON: {exc}); copy it again from where the adapter "
                         f"was trained") from None
    if not isinstance(meta, dict):
        raise VlpetError(f"{path} is damaged (not a JSON object); copy it again from where the adapter was trained")
    return meta


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a missing, truncated or corrupt file is one clear error."""
    path = Path(path)
    if not path.is_file():
        raise VlpetError(f"{path} is missing; the adapter directory {path.parent} is incomplete")
    try:
        path.open("rb").close()  # safetensors reports a file it may not read as missing
    except OSError as exc:
        raise file_error(exc, writing=False) from None
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors reports a damaged header or short data as SafetensorError
        raise VlpetError(f"{path} is damaged ({exc}); copy it again from where it was written, or retrain") from None


def load_adapter(directory: Path, backbone: str | None = None):
    """(VLModel, tokenizer, Preset) from an adapter directory; the backbone must be the one it was trained on."""
    directory = Path(directory)
    meta = read_adapter_config(directory)
    data = dict(meta["preset"])
    if backbone:
        data["model"] = {**data["model"], "backbone": backbone}
    preset = validate(data, str(directory / ADAPTER_CONFIG))
    model, tokenizer = build_model(preset, weights=True)
    found = backbone_identity(model)
    want = meta["backbone"]
    diffs = [f"{k}: adapter {want.get(k)} vs backbone {found[k]}" for k in found if want.get(k) != found[k]]
    if diffs:
        raise VlpetError(f"{directory} was trained on a different backbone than '{preset.model.backbone}' "
                         f"({'; '.join(diffs)}); pass --backbone with the original model directory")
    load_adapter_state(model, read_tensors(directory / ADAPTER_WEIGHTS), str(directory / ADAPTER_WEIGHTS))
    return model, tokenizer, preset


# ---- projector, folded model, bundle ----------------------------------------------------------------------
def load_projector(model: VLModel, directory: Path) -> None:
    """Strictly load projector.safetensors into model.projector."""
    path = directory / PROJECTOR_WEIGHTS
    if not path.exists():
        raise VlpetError(f"{directory}: {PROJECTOR_WEIGHTS} is missing")
    try:
        model.projector.load_state_dict(read_tensors(path), strict=True)
    except RuntimeError as exc:
        raise VlpetError(f"{path} does not fit this model's visual projector: {exc}") from None


def load_folded(directory: Path):
    """(VLModel, tokenizer, preset) from a folded directory: its own weights, projector and a PET-free preset."""
    directory = Path(directory)
    path = directory / FOLDED_CONFIG
    if not path.exists():
        raise VlpetError(f"{directory} is not a folded vlpet model: {FOLDED_CONFIG} is missing")
    data = json.loads(path.read_text())["preset"]
    data["model"]["backbone"] = str(directory)
    preset = validate(data, str(path))
    model, tokenizer = build_model(preset, weights=True)
    load_projector(model, directory)
    return model, tokenizer, preset


def load_bundle(directory: Path):
    """(VLModel, tokenizer, preset) from a bundle: its adapter loaded onto its own `backbone/` folder."""
    directory = Path(directory)
    meta = read_adapter_config(directory)
    if meta.get("format") != BUNDLE_FORMAT:
        raise VlpetError(f"{directory} is not a vlpet bundle (format {meta.get('format')!r})")
    model, tokenizer, preset = load_adapter(directory, backbone=str(directory / BUNDLE_BACKBONE))
    load_projector(model, directory)
    return model, tokenizer, preset


def kind_of(path: Path) -> str:
    """'adapter', 'bundle' or 'folded' for a directory vlpet can load (what a run directory means is
    `runs.locate`'s to say)."""
    path = Path(path)
    if (path / FOLDED_CONFIG).exists():
        return "folded"
    if (path / ADAPTER_CONFIG).exists():
        return "bundle" if read_adapter_config(path).get("format") == BUNDLE_FORMAT else "adapter"
    raise VlpetError(f"{path} is neither an adapter directory ({ADAPTER_CONFIG}), a bundle nor a folded model "
                     f"({FOLDED_CONFIG}); give one written by `vlpet train` or `vlpet merge`")


def load_any(path: Path, backbone: str | None = None):
    """(VLModel, tokenizer, preset) from an adapter, bundle or folded directory (a path a user gave goes through
    `runs.locate` first); `backbone` only for adapters."""
    path = Path(path)
    kind = kind_of(path)
    if kind == "folded":
        return load_folded(path)
    if kind == "bundle":
        return load_bundle(path)
    return load_adapter(path, backbone=backbone)


# ---- model cards ------------------------------------------------------------------------------------------
def model_name(directory: Path) -> str:
    """The name a card gives: the run's for a run's adapter/ (RUN-best for checkpoints/best), else the folder's."""
    located = place(Path(directory).resolve())
    if located.run is None:
        return located.directory.name
    return f"{located.run.name}-{located.checkpoint}" if located.checkpoint else located.run.name


def _notes(meta: dict) -> list[str]:
    """Where a directory came from, as 'label: text' lines for its card."""
    notes = []
    if isinstance(meta.get("merge"), dict):
        merge = meta["merge"]
        sources = merge.get("sources") or []
        notes.append(f"made by: `vlpet merge average` ({merge.get('mode')}) of {len(sources)} adapters "
                     f"({', '.join(Path(s).name for s in sources)}) with coefficients {merge.get('coefficients')}")
    if meta.get("imported_from"):
        notes.append(f"imported from: the reference checkpoint `{Path(meta['imported_from']).name}`")
    if isinstance(meta.get("epoch"), int) and isinstance(meta.get("score"), (int, float)):
        notes.append(f"selected: the best validation of the run, epoch {meta['epoch'] + 1} (selection score "
                     f"{meta['score']:.2f})")
    if meta.get("source"):
        notes.append(f"made from: the adapter `{meta['source']}` (`vlpet merge`)")
    if meta.get("folded"):
        notes.append(f"folded into the weights: {'; '.join(map(str, meta['folded']))}")
    if meta.get("kept"):
        notes.append(f"kept as modules: {'; '.join(map(str, meta['kept']))}")
    return notes


def card_facts(directory: Path, files: Path | None = None) -> CardFacts:
    """What the card of an adapter, bundle or folded directory says, from its vlpet JSON (read from `files`, the
    directory being staged, when given); evaluations are left for the caller to add."""
    directory = Path(directory)
    files = Path(files) if files is not None else directory
    if (files / FOLDED_CONFIG).exists():
        kind, meta = "folded", json.loads((files / FOLDED_CONFIG).read_text(encoding="utf-8"))
        model_type = json.loads((files / "config.json").read_text()).get("model_type") \
            if (files / "config.json").exists() else None
    else:
        meta = read_adapter_config(files)
        kind = "bundle" if meta.get("format") == BUNDLE_FORMAT else "adapter"
        model_type = (meta.get("backbone") or {}).get("model_type")
    preset = meta.get("trained_preset") or meta.get("preset") or {}  # a fold records the preset it was trained with
    base = (preset.get("model") or {}).get("backbone") or "unknown"
    return CardFacts(kind=kind, name=model_name(directory), preset=preset, base_model=base, model_type=model_type,
                     parameters=meta.get("parameters"), notes=_notes(meta))


def weights_time(files: Path) -> float:
    """When the directory's vlpet JSON was written: evaluations older than it scored other weights."""
    for name in (ADAPTER_CONFIG, FOLDED_CONFIG):
        if (Path(files) / name).exists():
            return (Path(files) / name).stat().st_mtime
    return 0.0


def write_model_card(directory: Path, eval_dir: Path | None = None, files: Path | None = None) -> Path:
    """(Re)write the README.md of an adapter, bundle or folded directory: its facts and every evaluation of these
    weights in the folder `vlpet eval` writes them to by default (`layout.place`: RUN/eval for a run's adapter,
    RUN/eval/best for its best checkpoint, DIR/eval otherwise) and in `eval_dir` (`vlpet eval --out` passes the
    folder it wrote). `files` is the staged copy being written, when the directory is not in place yet."""
    files = Path(files) if files is not None else Path(directory)
    facts = card_facts(directory, files)
    facts.evaluations = read_evaluations(place(directory).eval_dir, eval_dir, newer_than=weights_time(files))
    return write_card(files, facts)


def refresh_model_card(directory: Path, eval_dir: Path | None = None) -> Path | None:
    """write_model_card after an evaluation; a card that cannot be written is a warning (the scores are safe)."""
    import warnings

    from vlpet_cli.atomic import WriteError

    try:
        return write_model_card(directory, eval_dir)
    except WriteError as exc:
        warnings.warn(f"the model card was not updated: {exc}", UserWarning, stacklevel=2)
        return None


def write_peft_card(adapter: Path, out: Path, files: Path, preset: Preset, model_type: str, counts: dict,
                    exported: str, base: str | None) -> Path:
    """The README.md of a PEFT export (written into `files`, the staged `out`): vlpet cannot evaluate a PEFT
    export, so it shows the scores of the adapter it came from; `base` is the base model folder shipped with it."""
    scores = read_evaluations(place(adapter).eval_dir, newer_than=weights_time(adapter))
    name = Path(out).resolve().name
    return write_card(files, CardFacts(
        kind="peft", name=name, preset=preset.model_dump(mode="json"), base_model=preset.model.backbone,
        model_type=model_type, parameters=counts, evaluations=scores, peft_base=base,
        notes=[f"exported from: the vlpet adapter `{adapter}`", f"PEFT adapter: {exported}"],
        scores_of=f"the vlpet adapter it was exported from (`{adapter}`)" if scores else None))
