"""Saving and loading what a run adds to a backbone: the adapter directory and resumable checkpoints."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from vlpet_cli.atomic import atomic_dir, write_json
from vlpet_cli.backbones import N_VIS
from vlpet_cli.config import Preset
from vlpet_cli.errors import VlpetError
from vlpet_cli.pet import anatomy

ADAPTER_CONFIG = "vlpet_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
OBJ_ROWS = "obj_order_rows"


def backbone_identity(model) -> dict:
    """What an adapter must match: architecture numbers and a fingerprint of the pretrained word embedding,
    taken when the model is built (so full fine-tuning, which trains the embedding, keeps its identity)."""
    if getattr(model, "identity", None) is not None:
        return model.identity
    cfg = model.backbone.config
    words = anatomy.word_embedding(model.backbone).weight
    head = words.detach()[: -N_VIS][:256].float().contiguous().cpu().numpy().tobytes()
    return {"model_type": cfg.model_type, "d_model": cfg.d_model, "vocab_size": int(words.shape[0]),
            "layers": list(anatomy.num_layers(model.backbone)), "fingerprint": hashlib.sha256(head).hexdigest()[:16]}


def adapter_state(model) -> dict[str, torch.Tensor]:
    """Every trainable tensor, plus the frozen random object-order rows (they are not in the pretrained file)."""
    state = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    words = anatomy.word_embedding(model.backbone).weight
    if not words.requires_grad:
        # the object-order codes; an imported reference checkpoint carries all its added rows (`carried_rows`)
        state[OBJ_ROWS] = words.detach()[-getattr(model, "carried_rows", N_VIS):].cpu().contiguous()
    return state


def load_adapter_state(model, state: dict[str, torch.Tensor], source: str) -> None:
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


def save_adapter(directory: Path, model, preset: Preset, extra: dict | None = None) -> int:
    """Write <directory>/vlpet_config.json + adapter.safetensors atomically; returns the size in bytes."""
    from safetensors.torch import save_file

    from vlpet_cli import __version__

    tmp, commit = atomic_dir(directory)
    save_file(adapter_state(model), str(tmp / ADAPTER_WEIGHTS))
    write_json(tmp / ADAPTER_CONFIG, {"format": "vlpet-adapter/1", "vlpet_version": __version__,
                                      "preset": preset.model_dump(mode="json"),
                                      "backbone": backbone_identity(model), **(extra or {})})
    commit()
    return sum(f.stat().st_size for f in directory.iterdir())


def read_adapter_config(directory: Path) -> dict:
    path = directory / ADAPTER_CONFIG
    if not path.exists():
        raise VlpetError(f"{directory} is not an adapter directory: {ADAPTER_CONFIG} is missing")
    return json.loads(path.read_text())


def load_adapter(directory: Path, backbone: str | None = None):
    """(VLModel, tokenizer, Preset) from an adapter directory; the backbone must be the one it was trained on."""
    from safetensors.torch import load_file

    from vlpet_cli.presets import validate
    from vlpet_cli.vl.model import build_model

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
    load_adapter_state(model, load_file(str(directory / ADAPTER_WEIGHTS)), str(directory / ADAPTER_WEIGHTS))
    return model, tokenizer, preset
