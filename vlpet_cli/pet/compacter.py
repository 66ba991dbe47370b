"""Compacter: bottleneck adapters whose two Linears are parameterised hypercomplex (PHM) layers.

Placed like the adapters (`ModuleSpec.kind = "compacter"`, built by `adapter.bottleneck`), so it shares their
slots, budget groups and decay rule; like them it cannot fold (gelu_new between the two PHM layers).
"""

from __future__ import annotations

import torch
from torch import nn

from vlpet_cli.pet.activation import gelu_new

KIND = "compacter"
# The reference's PHM layers name their tensors phm_rule / W / b (vlpet's rule / weight / bias); `PHMLinear`'s
# `reference_layer` tells the rules written for them (`ReferenceRule.layer`) from those of plain Linears.
LAYER = "phm"
REFERENCE_PARAM = r"(?P<p>phm_rule|W|b)"
REFERENCE_WORDS = {"p": {"phm_rule": "rule", "W": "weight", "b": "bias"}}


def holds_phm(names: set[str]) -> bool:
    """Whether some of these vlpet parameter names are PHM tensors (the modules are Compacter's)."""
    return any(n.endswith(".rule") for n in names)


class PHMLinear(nn.Module):
    """Parameterised hypercomplex Linear: W = Σ_i rule_i ⊗ weight_i, with its own n×n×n rule (Compacter)."""

    reference_layer = LAYER

    def __init__(self, d_in: int, d_out: int, n: int = 2):
        super().__init__()
        if d_in % n or d_out % n:
            raise ValueError(f"PHM division n={n} must divide {d_in} and {d_out}")
        self.n = n
        self.rule = nn.Parameter(torch.empty(n, n, n).normal_(0.0, 0.01))
        self.weight = nn.Parameter(torch.empty(n, d_in // n, d_out // n))
        self.bias = nn.Parameter(torch.zeros(d_out))
        for w in self.weight:
            nn.init.xavier_uniform_(w)

    def full_weight(self) -> torch.Tensor:
        """The (d_in, d_out) matrix this layer multiplies by."""
        terms = [torch.kron(self.rule[i], self.weight[i]) for i in range(self.n)]
        return sum(terms[1:], terms[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.full_weight() + self.bias


class PHMBottleneck(nn.Module):
    """Compacter adapter: PHM down, gelu_new, PHM up."""

    def __init__(self, d: int, r: int, n: int = 2):
        super().__init__()
        self.down = PHMLinear(d, r, n)
        self.up = PHMLinear(r, d, n)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(gelu_new(self.down(h)))


def build(spec, d: int) -> PHMBottleneck:
    """The PHM adapter a ModuleSpec with kind 'compacter' describes."""
    return PHMBottleneck(d, spec.r, spec.phm_n)
