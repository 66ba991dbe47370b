"""Added biases: LST's T5 BitFit creates the biases a bias-free backbone lacks (attention q/k/v/o, FFN wi/wo,
lm_head, every T5LayerNorm incl. the projector's) and adds them to those layers' outputs (spec modules §5)."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from vlpet_cli.pet import anatomy
from vlpet_cli.pet.method import Attachment, Vectors, pkey

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class AddedBiases(Vectors):
    field = "add_biases"
    slots = ("added_biases",)
    group = "added biases"
    label = "added biases"
    unfoldable = "the backbone's Linear and LayerNorm layers have no bias to hold them (T5)"

    def build(self, pet, spec, backbone: PreTrainedModel, extra_norms) -> None:
        targets: list[tuple[str, nn.Module]] = list(anatomy.bias_free_linears(backbone))
        for name, norm in [*anatomy.norm_modules(backbone), *extra_norms]:
            if getattr(norm, "bias", None) is None:
                targets.append((name, norm))
        for name, module in targets:
            width = module.out_features if isinstance(module, nn.Linear) else cast(torch.Tensor, module.weight).shape[0]
            pet.added_biases[pkey(name)] = nn.Parameter(torch.zeros(width))
        pet.targets["added_biases"] = targets

    def attachments(self, pet, backbone: PreTrainedModel) -> list[Attachment]:
        def add(key: str):
            return lambda module, args, output: output + pet.added_biases[key]
        return [Attachment(module, "hook", add(pkey(name))) for name, module in pet.targets["added_biases"]]


BIASES = AddedBiases()
