"""Prompt tuning: learned encoder prompt vectors through a reparameterising MLP (spec modules §5).

`vl.model` reads `PetModules.prompt` and places the prompts in the encoder input; nothing hooks the backbone.
"""

from __future__ import annotations

import torch
from torch import nn

from vlpet_cli.pet.method import Method


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
    slots = ("prompt",)
    group = "prompts"
    label = "prompts"
    unfoldable = "extra encoder tokens, not weights of any layer"

    def containers(self) -> dict:
        return {"prompt": None}

    def build(self, pet, spec, backbone: nn.Module, extra_norms) -> None:
        pet.prompt = PromptEncoder(backbone.config.d_model, spec.length, spec.mid_dim)

    def no_decay(self, pet) -> list[str]:
        return [f"prompt.{n}" for n, _ in pet.prompt.named_parameters() if n.endswith("bias")]


PROMPT = PromptMethod()
