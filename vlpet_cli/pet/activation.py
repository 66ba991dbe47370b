"""The activation every adapter, gate and hyper-network of the reference uses."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """tanh-approximate GELU 0.5·x·(1+tanh(√(2/π)(x+0.044715x³))) (spec modules, notation)."""
    return F.gelu(x, approximate="tanh")
