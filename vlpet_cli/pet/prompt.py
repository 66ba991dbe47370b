"""Prompt tuning: learned encoder prompt vectors through a reparameterising MLP (spec modules §5).

`vl.model` asks `PetModules.prompts(batch_size)` and places them in the encoder input; nothing hooks the backbone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from vlpet_cli.pet.method import REF_PARAM, REF_TASK, Method, ReferenceNaming, ReferenceRule
from vlpet_cli.pet.specs import PromptSpec

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class PromptEncoder(nn.Module):
    """P learned vectors reparameterised by Linear(d, mid) → tanh → Linear(mid, d)."""

    def __init__(self, d: int, length: int, mid_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(length, d)
        self.mlp = nn.Sequential(nn.Linear(d, mid_dim), nn.Tanh(), nn.Linear(mid_dim, d))

    def forward(self, batch_size: int) -> torch.Tensor:
        prompts = self.mlp(self.embedding.weight)
        return prompts.unsqueeze(0).expand(batch_size, -1, -1)


class PromptMethod(Method):
    field = "prompt"
    group = "prompts"
    label = "prompts"
    unfoldable = "extra encoder tokens, not weights of any layer"
    # `encoder.prompt_modules.prompts.<task>.prefix_embedding.{0,1,3}`: Embedding, Linear, (Tanh), Linear
    reference = ReferenceNaming(
        (ReferenceRule(r"{ROOT}encoder\.prompt_modules\.prompts\." + REF_TASK + r"\.prefix_embedding\.(?P<idx>[013])\."
                       + REF_PARAM, "pet.prompt.{idx}.{p}", "task", "prompt",
                       words={"idx": {"0": "embedding", "1": "mlp.0", "3": "mlp.2"}}),),
        label="prompts", single_flag="--use_single_prompt", tag="prompt", preset="prompt-tuning",
        sizes=(("embedding.weight", "pet.prompt.length", 0), ("mlp.0.weight", "pet.prompt.mid_dim", 0)))

    def containers(self) -> dict:
        return {"prompt": None}

    def build(self, pet, spec: PromptSpec, backbone: PreTrainedModel, extra_norms) -> None:
        pet.prompt = PromptEncoder(backbone.config.d_model, spec.length, spec.mid_dim)

    def encoder_prefix(self, pet, spec: PromptSpec, batch_size: int) -> torch.Tensor:
        return pet.prompt(batch_size)

    def prefix_length(self, spec: PromptSpec) -> int:
        return spec.length

    def no_decay(self, pet) -> list[str]:
        return [f"prompt.{n}" for n, _ in pet.prompt.named_parameters() if n.endswith("bias")]


PROMPT = PromptMethod()
