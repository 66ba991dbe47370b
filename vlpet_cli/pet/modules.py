"""The modifications PET methods add: bottleneck adapters, PHM (Compacter) adapters, LoRA, prompts, HyperFormer."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """tanh-approximate GELU, the activation of every adapter and gate in the reference."""
    return F.gelu(x, approximate="tanh")


class Bottleneck(nn.Module):
    """ΔH(H) = up(gelu_new(down(H))). The reference's N_h down heads are one Linear(d, r) with stacked rows."""

    def __init__(self, d: int, r: int, heads: int = 1):
        super().__init__()
        if r % heads:
            raise ValueError(f"bottleneck r={r} is not divisible by heads={heads}")
        self.heads = heads
        self.down = nn.Linear(d, r)
        self.up = nn.Linear(r, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(gelu_new(self.down(h)))


class PHMLinear(nn.Module):
    """Parameterised hypercomplex Linear: W = Σ_i rule_i ⊗ weight_i, with its own n×n×n rule (Compacter)."""

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
        return sum(torch.kron(self.rule[i], self.weight[i]) for i in range(self.n))

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


class PromptEncoder(nn.Module):
    """Prompt tuning: P learned vectors reparameterised by Linear(d, mid) → tanh → Linear(mid, d)."""

    def __init__(self, d: int, length: int, mid_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(length, d)
        self.mlp = nn.Sequential(nn.Linear(d, mid_dim), nn.Tanh(), nn.Linear(mid_dim, d))

    def forward(self, batch_size: int) -> torch.Tensor:
        prompts = self.mlp(self.embedding.weight)
        return prompts.unsqueeze(0).expand(batch_size, -1, -1)


class AdapterGenerator(nn.Module):
    """Linear maps from a conditioning vector z to the weights and biases of one adapter."""

    def __init__(self, z_dim: int, d: int, r: int):
        super().__init__()
        self.d, self.r = d, r
        self.down_weight = nn.Linear(z_dim, r * d)
        self.down_bias = nn.Linear(z_dim, r)
        self.up_weight = nn.Linear(z_dim, d * r)
        self.up_bias = nn.Linear(z_dim, d)

    def forward(self, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """ΔH(H) with the adapter generated from z."""
        down = F.linear(h, self.down_weight(z).view(self.r, self.d), self.down_bias(z))
        return F.linear(gelu_new(down), self.up_weight(z).view(self.d, self.r), self.up_bias(z))


class HyperNetwork(nn.Module):
    """HyperFormer for one stack: (task embedding ; layer embedding) → MLP → LN → per-block adapter generators."""

    def __init__(self, spec, d: int, n_layers: int, blocks: tuple[str, ...]):
        super().__init__()
        self.layer_embedding = nn.Embedding(n_layers, spec.layer_dim)
        self.mlp = nn.Sequential(
            nn.Linear(spec.task_dim + spec.layer_dim, spec.hidden),
            nn.ReLU(),
            nn.Linear(spec.hidden, spec.projected),
            nn.LayerNorm(spec.projected, eps=1e-6),
        )
        self.generators = nn.ModuleDict({b: AdapterGenerator(spec.projected, d, spec.r) for b in blocks})

    def forward(self, task_embedding: torch.Tensor, layer: int, block: str, h: torch.Tensor) -> torch.Tensor:
        layer_emb = self.layer_embedding.weight[layer]
        z = self.mlp(torch.cat([task_embedding, layer_emb]))
        return self.generators[block](z, h)


def build_module(spec, d: int) -> nn.Module:
    """The bottleneck a ModuleSpec describes."""
    if spec.kind == "compacter":
        return PHMBottleneck(d, spec.r, spec.phm_n)
    return Bottleneck(d, spec.r, spec.heads)


def up_layers(module: nn.Module) -> list[nn.Module]:
    """The layers that produce a module's output, zeroed by `zero_init_up`."""
    if isinstance(module, (Bottleneck, PHMBottleneck)):
        return [module.up]
    return []
