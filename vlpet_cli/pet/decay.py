"""Which trainable tensors AdamW leaves undecayed: the reference's rule on the reference's names, or the corrected rule.

The reference exempts every parameter whose name contains "bias" or "LayerNorm.weight" (its trainer_base.py). Applied
to *its* names: vlpet renamed some tensors (Compacter's PHM bias is `b` there, HyperFormer's hyper-network LayerNorm
is `LayerNorm` there), so the names come from the methods' declared layouts (`reference_names.reference_key`), the
same declarations `vlpet import-reference` reads, and the groups cannot drift from the import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlpet_cli.pet import anatomy
from vlpet_cli.pet.reference_names import reference_key

if TYPE_CHECKING:
    from vlpet_cli.pet.inject import PetHost

# The reference's no-decay list, matched as substrings of its parameter names
REFERENCE_NO_DECAY = ("bias", "LayerNorm.weight")


def reference_decays(name: str, family: str, layer: str | None = None) -> bool:
    """Whether the reference decays the tensor vlpet names `name` (held by a module whose `reference_layer` is
    `layer`): its name in the reference holds none of REFERENCE_NO_DECAY. A tensor of a method without a reference
    layout (IA3, LST, the added biases) is judged by its vlpet name."""
    key = reference_key(name, family, layer) or name
    return not any(word in key for word in REFERENCE_NO_DECAY)


def layer_of(model: PetHost, name: str) -> str | None:
    """The `reference_layer` of the module holding parameter `name` (None: a plain layer)."""
    return getattr(model.get_submodule(name.rsplit(".", 1)[0]), "reference_layer", None) if "." in name else None


def no_decay_names(model: PetHost, rule: str) -> set[str]:
    """Names of a VLModel's trainable parameters that AdamW should not decay.

    reference: the reference's rule on the reference's names (`reference_decays`): HF BART/T5 LayerNorms are named
    layer_norm/layernorm_embedding, so their weights decay, and so do gate vectors and Compacter's PHM biases;
    HyperFormer's hyper-network LayerNorm weight does not.
    corrected: every tensor whose vlpet name holds "bias", every LayerNorm of the backbone and the projector, and
    what each method declares (gate vectors, HyperFormer's LayerNorms, IA3 vectors).
    """
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if rule == "reference":
        family = anatomy.family(model.backbone)
        return {n for n in trainable if not reference_decays(n, family, layer_of(model, n))}
    names = {n for n in trainable if "bias" in n}
    norms = anatomy.layer_norm_names(model.backbone)
    names |= {f"backbone.{n}" for n in norms["encoder"] + norms["decoder"]}
    names |= {f"projector.{n}.{p}" for n, m in anatomy.norm_modules(model.projector)
              for p, _ in m.named_parameters(recurse=False)}
    names |= {f"pet.{n}" for m in model.pet.methods() for n in m.no_decay(model.pet)}
    return names & set(trainable)
