"""Bottleneck adapters: sequential after encoder / decoder sub-layers, and parallel to the cross-attention value.

ΔH(H) = up(gelu_new(down(H))). The reference's N_h down heads are one Linear(d, r) with stacked rows (spec
modules §1.2). A ModuleSpec's `kind` picks the bottleneck: a plain adapter here, a PHM one in `compacter`.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn

from vlpet_cli.errors import VlpetError
from vlpet_cli.pet import anatomy, compacter
from vlpet_cli.pet.activation import gelu_new
from vlpet_cli.pet.method import (
    REF_PARAM,
    REF_TASK,
    Attachment,
    Method,
    ReferenceNaming,
    ReferenceRule,
    bottleneck_hint,
    zero_layer_params,
)
from vlpet_cli.pet.specs import DECODER_SITES, ENCODER_SITES, ModuleSpec

if TYPE_CHECKING:
    from transformers import PreTrainedModel

NON_LINEAR = "ΔH = up(gelu_new(down(H))) is non-linear"


class Bottleneck(nn.Module):
    """ΔH(H) = up(gelu_new(down(H)))."""

    def __init__(self, d: int, r: int, heads: int = 1):
        super().__init__()
        if r % heads:
            raise ValueError(f"bottleneck r={r} is not divisible by heads={heads}")
        self.heads = heads
        self.down = nn.Linear(d, r)
        self.up = nn.Linear(r, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(gelu_new(self.down(h)))


def bottleneck(spec: ModuleSpec, d: int) -> nn.Module:
    """The bottleneck a ModuleSpec describes (adapter or compacter)."""
    if spec.kind == compacter.KIND:
        return compacter.build(spec, d)
    return Bottleneck(d, spec.r, spec.heads)


class _Bottlenecks(Method):
    """Shared by the three placements: zero-initialisable up layers, biases exempt from decay."""

    def zero_init(self, pet) -> list[torch.Tensor]:
        return zero_layer_params([m.up for m in getattr(pet, self.slots[0]).values()])

    def no_decay(self, pet) -> list[str]:
        slot = self.slots[0]
        return [f"{slot}.{n}" for n, _ in getattr(pet, slot).named_parameters() if n.endswith("bias")]


# ---- how the reference names them -------------------------------------------------------------------------------
def _per_task(site: str, word: str, target: str, tag: str) -> list[ReferenceRule]:
    """The reference's `<word>_adapter.adapters.<task>.{down,up}_sampler.*`, one copy per task: Linear layers
    (weight / bias) and Compacter's PHM layers (phm_rule / W / b)."""
    prefix = site + word + r"_adapter\.adapters\." + REF_TASK + r"\.(?P<which>down|up)_sampler\."
    return [ReferenceRule(prefix + REF_PARAM, target + ".{which}.{p}", "task", tag),
            ReferenceRule(prefix + compacter.REFERENCE_PARAM, target + ".{which}.{p}", "task", tag,
                          words=compacter.REFERENCE_WORDS, layer=compacter.LAYER)]


def _sequential_rules(stack: str, slot: str) -> tuple[ReferenceRule, ...]:
    """Encoder: VL-PET's multi-head modules (`*_adapter_multihead_{down.<head>,up}`) and VL-Adapter's /
    Compacter's per-task adapters; decoder: the per-task adapters (BART self_attn, T5 attn, enc_attn, ff)."""
    module = f"pet.{slot}.{stack}_{{layer}}"
    if stack == "decoder":
        return tuple(_per_task(r"{DEC}", r"(?P<dkind>self_attn|attn|enc_attn|ff)", module + "_{dkind}", "adapter"))
    site = r"{ENC}(?P<kind>attn|ff)_adapter_multihead_"
    return (ReferenceRule(site + r"down\.(?P<head>\d+)\." + REF_PARAM, module + "_{kind}.down.{p}", "head", "vlpet"),
            ReferenceRule(site + r"up\." + REF_PARAM, module + "_{kind}.up.{p}", "tensor", "vlpet"),
            *_per_task(r"{ENC}", r"(?P<kind>attn|ff)", module + "_{kind}", "adapter"))


def _adapter_preset(tags: set[str], gates: set[str], names: set[str]) -> str | None:
    """Only per-task adapters: VL-Adapter, or Compacter when they are PHM layers."""
    if tags == {"adapter"}:
        return "compacter" if compacter.holds_phm(names) else "vl-adapter"
    return None


class SequentialAdapters(_Bottlenecks):
    """H -> H + ΔH(H) after the chosen sub-layers of one stack (before dropout, residual and post-LN)."""

    unfoldable = NON_LINEAR

    def __init__(self, stack: str, allowed: tuple[str, ...]):
        self.stack, self.allowed = stack, allowed
        self.field = stack
        self.group = f"{stack} modules"
        self.label = f"{stack} adapters"
        self.reference = ReferenceNaming(_sequential_rules(stack, self.slots[0]), label=f"{stack} adapters",
                                         tag="adapter", identify=_adapter_preset, hint=partial(bottleneck_hint, stack))

    @property
    def slots(self) -> tuple[str, ...]:
        return (f"{self.stack}_modules",)

    def sites(self, spec: ModuleSpec) -> tuple[str, ...]:
        """The sub-layer kinds the spec names (all by default); an unknown one is the user's error."""
        sites = tuple(spec.sites) if spec.sites is not None else self.allowed
        bad = [s for s in sites if s not in self.allowed]
        if bad:
            raise VlpetError(f"pet.{self.field}.sites: unknown site(s) {bad}; choose from {list(self.allowed)}")
        return sites

    def build_site(self, pet, spec: ModuleSpec, sub, d: int) -> None:
        if sub.stack == self.stack and sub.kind in self.sites(spec):
            getattr(pet, self.slots[0])[sub.key] = bottleneck(spec, d)

    def on_sublayer(self, pet, sub) -> bool:
        return sub.key in getattr(pet, self.slots[0])

    def transform(self, pet, sub, h: torch.Tensor) -> torch.Tensor:
        return h + getattr(pet, self.slots[0])[sub.key](h)


class ValueAdapters(_Bottlenecks):
    """The decoder's parallel value adapter (VPA): v(E) -> v(E) + ΔH(E) in every cross-attention."""

    field = "value"
    group = "decoder value modules"
    label = "cross-attention value adapters"
    unfoldable = "a gelu_new bottleneck parallel to v is non-linear"
    # `attn_value_parallel_adapter.adapters.<task>.*` inside the cross-attention; VL-PET's decoder modules (the
    # gates name the preset)
    reference = ReferenceNaming(
        tuple(_per_task(r"{CROSS}", "attn_value_parallel", "pet.value.decoder_{layer}_cross", "vlpet")),
        label="value adapters", tag="vlpet", hint=partial(bottleneck_hint, "value"))

    def build_site(self, pet, spec: ModuleSpec, sub, d: int) -> None:
        if sub.stack == "decoder" and sub.kind == "cross":
            pet.value[sub.key] = bottleneck(spec, d)

    def attachments(self, pet, backbone: PreTrainedModel) -> list[Attachment]:
        out = []
        for sub in anatomy.sublayers(backbone):
            if sub.key in pet.value:
                module = pet.value[sub.key]
                v = anatomy.projections_of(sub.h_module, pet.family)["v"]
                out.append(Attachment(v, "hook", lambda lin, args, output, m=module: output + m(args[0])))
        return out


ENCODER = SequentialAdapters("encoder", ENCODER_SITES)
DECODER = SequentialAdapters("decoder", DECODER_SITES)
VALUE = ValueAdapters()
