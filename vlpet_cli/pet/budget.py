"""Parameter accounting by group: the numbers behind `vlpet params` (spec modules §6)."""

from __future__ import annotations

from typing import Any

from vlpet_cli.pet import anatomy
from vlpet_cli.pet.inject import METHODS, PetHost, owner

ORDER = [*dict.fromkeys(m.group for m in METHODS), "visual projector", "encoder LayerNorms", "decoder LayerNorms",
         "biases", "word embeddings", "backbone (other)"]


def _added_group(name: str) -> str | None:
    """The group of a PET method's tensor (as the method declares it) or of the visual projector."""
    if name.startswith("projector."):
        return "visual projector"
    method = owner(name)
    return method.group if method is not None else None


def classify(model: PetHost) -> dict[str, str]:
    """Parameter name -> group, for a VLModel (tied tensors appear once, under their first name)."""
    backbone = model.backbone
    norms = anatomy.layer_norm_names(backbone)
    enc_norms = {f"backbone.{n}" for n in norms["encoder"]}
    dec_norms = {f"backbone.{n}" for n in norms["decoder"]}
    words = anatomy.word_embedding(backbone).weight
    groups = {}
    for name, p in model.named_parameters():
        group = _added_group(name)
        if group is None:
            if name in enc_norms:
                group = "encoder LayerNorms"
            elif name in dec_norms:
                group = "decoder LayerNorms"
            elif name.endswith("bias"):
                group = "biases"
            elif p is words:
                group = "word embeddings"
            else:
                group = "backbone (other)"
        groups[name] = group
    return groups


def budget(model: PetHost) -> dict:
    """Trainable and total parameters per group, the reference percentage and the saved-state size.

    percent = trainable / all parameters of the model as built (resized vocabulary, projector and added
    modules; tied tensors once) x 100, as the reference's print_trainable_params_percentage computes it.
    """
    groups = classify(model)
    params = dict(model.named_parameters())
    rows: dict[str, dict[str, Any]] = {g: {"group": g, "trainable": 0, "total": 0} for g in ORDER}
    for name, group in groups.items():
        p = params[name]
        rows[group]["total"] += p.numel()
        if p.requires_grad:
            rows[group]["trainable"] += p.numel()
    trainable = sum(r["trainable"] for r in rows.values())
    total = sum(r["total"] for r in rows.values())
    words = anatomy.word_embedding(model.backbone).weight
    from vlpet_cli.backbones import N_VIS

    # The adapter stores the trainable tensors plus the frozen random object-order rows (fp32).
    extra = 0 if words.requires_grad else N_VIS * words.shape[1]
    return {
        "trainable": trainable,
        "total": total,
        "percent": 100.0 * trainable / total,
        "denominator": "all parameters of the model as built: backbone with resized vocabulary + visual "
                       "projector + added modules, tied tensors counted once",
        "saved_mb": (trainable + extra) * 4 / 1e6,
        "groups": [r for r in rows.values() if r["total"]],
    }
