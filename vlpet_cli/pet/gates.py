"""Granularity-controlled gates G(X, H1) with scaling s (spec modules §1.3-1.4)."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from vlpet_cli.pet import compacter
from vlpet_cli.pet.activation import gelu_new
from vlpet_cli.pet.method import REF_PARAM, Method, ReferenceNaming, ReferenceRule, bottleneck_hint, zero_layer_params
from vlpet_cli.pet.specs import GateSpec

# The reference's gate modules after `encoder_{attn,ff}_adapter_gating_`, and the vlpet tensor each one holds.
REFERENCE_GATES = {"large": (r"large_x_(?P<which>down|up)\." + REF_PARAM, "{which}.{p}"),
                   "middlex": (r"middle_xy_add\." + REF_PARAM, "proj.{p}"),
                   "middley": (r"middle_ia3_add", "z"),
                   "small": (r"small_xy_cat\." + REF_PARAM, "proj.{p}")}


class Gate(nn.Module):
    """s · G(X, H1) ⊙ H1 for one encoder sub-layer.

    large:   G = σ(up(gelu_new(down(X))))            [B, L, d]  (reads X only)
    middlex: G = σ(wᵀ(X + H1) + b)                   [B, L, 1]
    middley: G = 1 + z                               [d]        (no sigmoid, as the reference code)
    small:   G = mean_n σ(wᵀ[X_n ; H1_n] + b)         [B, 1, 1]  (unmasked mean over the sequence by default)
    """

    def __init__(self, granularity: str, d: int, r: int = 96, scale: float = 1.0, masked_mean: bool = False):
        super().__init__()
        self.granularity = granularity
        self.scale = scale
        self.masked_mean = masked_mean
        if granularity == "large":
            self.down = nn.Linear(d, r)
            self.up = nn.Linear(r, d)
        elif granularity == "middlex":
            self.proj = nn.Linear(d, 1)
        elif granularity == "middley":
            self.z = nn.Parameter(torch.empty(d).normal_(0.0, 0.02))
        elif granularity == "small":
            self.proj = nn.Linear(2 * d, 1)
        else:
            raise ValueError(f"unknown gate granularity '{granularity}'")

    def gate(self, x: torch.Tensor, h1: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """G itself, broadcastable against H1."""
        if self.granularity == "large":
            return torch.sigmoid(self.up(gelu_new(self.down(x))))
        if self.granularity == "middlex":
            return torch.sigmoid(self.proj(x + h1))
        if self.granularity == "middley":
            return 1 + self.z
        g = torch.sigmoid(self.proj(torch.cat([x, h1], dim=-1)))
        if self.masked_mean and mask is not None:
            m = mask.to(g.dtype).unsqueeze(-1)
            return (g * m).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp(min=1)
        return g.mean(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor, h1: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        g = self.gate(x, h1, mask)
        # s = 1 (BART's presets): 1 · G is G bit for bit, so skip the product and the [B, L, d] copy backward keeps
        return (g if self.scale == 1 else self.scale * g) * h1

    def output_layers(self) -> list[nn.Module | None]:
        """Layers zeroed by `zero_init_up` (so that G = σ(0) = 0.5, or 1 for middleY)."""
        return {"large": [getattr(self, "up", None)], "middlex": [getattr(self, "proj", None)],
                "small": [getattr(self, "proj", None)]}.get(self.granularity, [])


def _reference_rules() -> tuple[ReferenceRule, ...]:
    """`encoder_{attn,ff}_adapter_gating_<granularity>*` in every encoder sub-layer; each reveals its gate."""
    return tuple(ReferenceRule(r"{ENC}encoder_(?P<kind>attn|ff)_adapter_gating_" + pattern,
                               f"pet.gates.encoder_{{layer}}_{{kind}}.{target}", "tensor", "vlpet", gate)
                 for gate, (pattern, target) in REFERENCE_GATES.items())


def _reference_preset(tags: set[str], gates: set[str], names: set[str]) -> str | None:
    """VL-PET's modules with one gate: vlpet-<gate>, or the Table 9 combination when the modules are PHM."""
    if "vlpet" in tags and len(gates) == 1:
        gate = next(iter(gates))
        return f"compacter-g{gate}-lw" if compacter.holds_phm(names) else f"vlpet-{gate}"
    return None


class Gates(Method):
    """The gate axis: one Gate per encoder sub-layer, applied after the modification (spec modules §1.1)."""

    field = "gate"
    slots = ("gates",)
    group = "gates"
    label = "VL-PET gates"
    unfoldable = ("G ⊙ (H + ΔH(H)) multiplies a non-linear adapter's output (and, except "
                  "middleY, G reads the input through a sigmoid)")
    reference = ReferenceNaming(_reference_rules(), identify=_reference_preset, hint=partial(bottleneck_hint, "gate"))

    def build_site(self, pet, spec: GateSpec, sub, d: int) -> None:
        if sub.stack == "encoder":
            pet.gates[sub.key] = Gate(spec.granularity, d, spec.r, spec.scale, spec.masked_mean)

    def zero_init(self, pet) -> list[torch.Tensor]:
        gates = list(pet.gates.values())
        layers = [layer for g in gates for layer in g.output_layers() if layer is not None]
        return zero_layer_params(layers) + [g.z for g in gates if g.granularity == "middley"]

    def on_sublayer(self, pet, sub) -> bool:
        return sub.key in pet.gates

    def transform(self, pet, sub, h: torch.Tensor) -> torch.Tensor:
        """s · G(X, H1) ⊙ H1, X being the sub-layer input the composer captured."""
        return pet.gates[sub.key](pet.take_input(sub.key), h, pet.encoder_mask)

    def no_decay(self, pet) -> list[str]:
        return [f"gates.{key}.z" for key, g in pet.gates.items() if g.granularity == "middley"]


GATES = Gates()
