"""IA3: learned vectors that rescale the outputs of k and v and the FFN's inner activation (the input of BART fc2
/ T5 wo), initialised to ones. Not additive, so it wraps those Linears; it folds into their weights (k, v: rows;
FFN: input columns) and exports as a PEFT IA3 adapter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from vlpet_cli.pet import anatomy
from vlpet_cli.pet.method import Attachment, PeftExport, Vectors, peft_module_names

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass
class Target:
    """One rescaled Linear: its vector's key, dotted name, and whether the input (FFN) or the output is scaled."""

    key: str
    name: str
    linear: nn.Linear
    feedforward: bool


def targets(backbone: PreTrainedModel, spec) -> list[Target]:
    """The Linears `IA3Spec.targets` names, attention projections first, in execution order."""
    out = [Target(p.key, p.name, p.linear, False) for p in anatomy.projections(backbone) if p.which in spec.targets]
    if "ffn" in spec.targets:
        out += [Target(sub.key, name, linear, True) for sub, name, linear in anatomy.ffn_outputs(backbone)]
    return out


class IA3Method(Vectors):
    field = "ia3"
    group = "IA3"
    label = "IA3 vectors"
    peft_type = "IA3"
    peft_unit = "IA3 vectors"

    def build(self, pet, spec, backbone: PreTrainedModel, extra_norms) -> None:
        found = targets(backbone, spec)
        for t in found:
            width = t.linear.in_features if t.feedforward else t.linear.out_features
            pet.ia3[t.key] = nn.Parameter(torch.ones(width))
        pet.targets["ia3"] = found

    def attachments(self, pet, backbone: PreTrainedModel) -> list[Attachment]:
        def scale_input(key: str):
            return lambda forward, x, *args, **kwargs: forward(x * pet.ia3[key], *args, **kwargs)

        def scale_output(key: str):
            return lambda forward, x, *args, **kwargs: forward(x, *args, **kwargs) * pet.ia3[key]

        return [Attachment(t.linear, "wrap", (scale_input if t.feedforward else scale_output)(t.key))
                for t in pet.targets["ia3"]]

    def fold(self, pet) -> str:
        """k, v: W ← diag(l) W, b ← l ⊙ b; FFN: W ← W diag(l) (the input columns)."""
        found = pet.targets["ia3"]
        for t in found:
            scale = pet.ia3[t.key].to(t.linear.weight.dtype)
            if t.feedforward:
                t.linear.weight.mul_(scale[None, :])
            else:
                t.linear.weight.mul_(scale[:, None])
                if t.linear.bias is not None:
                    t.linear.bias.mul_(scale)
        return f"IA3 ({len(found)} vectors)"

    def peft(self, pet, spec, backbone: PreTrainedModel, base: str) -> PeftExport:
        """peft's names: base_model.model.<module>.ia3_l, shaped (out, 1), or (1, in) for feed-forward modules."""
        import peft

        found = pet.targets["ia3"]
        state = {}
        for t in found:
            vector = pet.ia3[t.key].detach().cpu()
            state[f"base_model.model.{t.name}.ia3_l"] = (vector[None, :] if t.feedforward
                                                         else vector[:, None]).contiguous()
        names = [t.name for t in found]
        ff = [t.name for t in found if t.feedforward]
        target_modules = peft_module_names(backbone, names)
        feedforward = peft_module_names(backbone, ff) if ff else []
        if target_modules == names:  # full names: peft wants the feed-forward ones as full names too
            feedforward = ff
        config = peft.IA3Config(target_modules=target_modules, feedforward_modules=feedforward,
                                task_type="SEQ_2_SEQ_LM", base_model_name_or_path=base, inference_mode=True)
        return PeftExport(config, state, len(found))


IA3 = IA3Method()
