"""LoRA: a low-rank update scale·B·A added to chosen attention projections; folds into their weights and exports
as a PEFT LoRA adapter."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from vlpet_cli.pet import anatomy
from vlpet_cli.pet.method import (
    REF_TASK,
    Attachment,
    Method,
    PeftExport,
    ReferenceNaming,
    ReferenceRule,
    peft_module_names,
)
from vlpet_cli.pet.specs import LoraSpec

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class LoRA(nn.Module):
    """Low-rank update added to a frozen Linear: scale · B A dropout(x), with B = 0 at init."""

    def __init__(self, d_in: int, d_out: int, r: int, alpha: float, dropout: float):
        super().__init__()
        self.scale = alpha / r
        self.A = nn.Parameter(torch.empty(r, d_in))
        self.B = nn.Parameter(torch.zeros(d_out, r))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.dropout(x) @ self.A.t() * self.scale) @ self.B.t()  # scale the narrow [.., r] tensor

    def delta_weight(self) -> torch.Tensor:
        """The (d_out, d_in) change this module makes to the Linear's weight."""
        return (self.B @ self.A) * self.scale


class LoraMethod(Method):
    """LoRA on the q/k/v/o projections `LoraSpec.targets` names, in every attention of both stacks."""

    field = "lora"
    group = "LoRA"
    label = "LoRA"
    peft_type = "LORA"
    peft_unit = "LoRA modules"
    # `<projection>.lora_As.<task>` / `lora_Bs.<task>` on the attention projections (BART; the reference's T5 has
    # no LoRA layers)
    reference = ReferenceNaming(
        (ReferenceRule(r"{ATT}lora_(?P<ab>A|B)s\." + REF_TASK, "pet.lora.{stack}_{layer}_{att}_{proj}.{ab}", "task",
                       "lora"),),
        label="LoRA matrices", single_flag="--use_single_lora", tag="lora", preset="lora",
        sizes=((".A", "pet.lora.r", 0), (".B", "pet.lora.r", 1)))

    def build(self, pet, spec: LoraSpec, backbone: PreTrainedModel, extra_norms) -> None:
        targets = [p for p in anatomy.projections(backbone) if p.which in spec.targets]
        for proj in targets:
            lin = proj.linear
            pet.lora[proj.key] = LoRA(lin.in_features, lin.out_features, spec.r, spec.alpha, spec.dropout)
        pet.targets["lora"] = targets

    def attachments(self, pet, backbone: PreTrainedModel) -> list[Attachment]:
        return [Attachment(p.linear, "hook", lambda lin, args, output, m=pet.lora[p.key]: output + m(args[0]))
                for p in pet.targets["lora"]]

    def fold(self, pet) -> str:
        targets = pet.targets["lora"]
        for proj in targets:
            weight = proj.linear.weight
            weight.add_(pet.lora[proj.key].delta_weight().to(weight.dtype))
        return f"LoRA ({len(targets)} matrices)"

    def peft(self, pet, spec, backbone: PreTrainedModel, base: str) -> PeftExport:
        """peft's names: base_model.model.<module>.lora_A.weight (r, in) and lora_B.weight (out, r)."""
        import peft

        targets = pet.targets["lora"]
        state = {}
        for proj in targets:
            lora = pet.lora[proj.key]
            state[f"base_model.model.{proj.name}.lora_A.weight"] = lora.A.detach().cpu().contiguous()
            state[f"base_model.model.{proj.name}.lora_B.weight"] = lora.B.detach().cpu().contiguous()
        config = peft.LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                                 target_modules=peft_module_names(backbone, [p.name for p in targets]),
                                 bias="none", task_type="SEQ_2_SEQ_LM", base_model_name_or_path=base,
                                 inference_mode=True)
        return PeftExport(config, state, len(targets))


LORA = LoraMethod()
