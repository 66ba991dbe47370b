"""What a PET method declares about itself; `inject` composes methods from these declarations.

A method owns one PetConfig field (its spec) and one or more PetModules attributes (its "slots": the parameter
names of its tensors are `pet.<slot>.…`). It says how its modules are built (per sub-layer and/or once per
backbone), how they enter the backbone (an output hook, or a wrapped Linear for methods that are not additive),
its row in the `vlpet params` table, its tensors that skip weight decay under the corrected rule, and whether it
folds into a Linear (and how) or why it cannot, and its PEFT export mapping where one exists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn


@dataclass
class Attachment:
    """How one method enters one backbone module.

    hook: `fn(module, args, output) -> output`, a forward hook (the module still computes its own output).
    wrap: `fn(forward, *args, **kwargs) -> output`, replaces this instance's forward, `forward` being the one it
          had; for methods that change what the module computes (rescaling inputs, re-parameterised weights).
    """

    module: nn.Module
    how: Literal["hook", "wrap"]
    fn: Callable[..., Any]


@dataclass
class PeftExport:
    """A method's PEFT adapter: the peft config object and the adapter_model.safetensors tensors."""

    config: Any
    state: dict[str, torch.Tensor]
    modules: int


class Method:
    """One modification. The defaults describe a method that does nothing at that step."""

    field: str = ""  # the PetConfig field holding its spec (None or False: the method is off)
    slots: tuple[str, ...] = ()  # PetModules attributes it fills, in registration order
    group: str = ""  # its row in the `vlpet params` table
    label: str = ""  # how messages name it
    unfoldable: str | None = None  # why no edit of a Linear's weights reproduces it; None: `fold` does it
    peft_type: str | None = None  # the PEFT adapter type it exports to, if any
    peft_unit: str = ""  # what an export counts ("LoRA modules")

    def spec(self, cfg) -> Any:
        return getattr(cfg, self.field)

    def containers(self) -> dict[str, Any]:
        """The empty slots registered on PetModules before anything is built."""
        return {slot: nn.ModuleDict() for slot in self.slots}

    def build_site(self, pet, spec, sub, d: int) -> None:
        """Build this method's module for one residual sub-layer (called in execution order)."""

    def build(self, pet, spec, backbone: nn.Module, extra_norms: list[tuple[str, nn.Module]]) -> None:
        """Build what is not per sub-layer (called once, after every sub-layer)."""

    def zero_init(self, pet) -> list[torch.Tensor]:
        """Tensors that `zero_init_up` zeroes (the layers producing the method's output)."""
        return []

    def on_sublayer(self, pet, sub) -> bool:
        """Whether `transform` changes this sub-layer's output H."""
        return False

    def transform(self, pet, sub, h: torch.Tensor) -> torch.Tensor:
        """H -> H' for a sub-layer `on_sublayer` claims (module, HyperFormer, then the gate)."""
        return h

    def attachments(self, pet, backbone: nn.Module) -> list[Attachment]:
        """Hooks and wraps on backbone modules other than the sub-layer outputs."""
        return []

    def no_decay(self, pet) -> list[str]:
        """Parameter names under `pet.` that the corrected decay rule exempts (the reference rule is by name)."""
        return []

    def fold(self, pet) -> str:
        """Edit the backbone Linears so that they compute what the method adds; returns what was folded."""
        raise NotImplementedError(f"{self.label} cannot be folded: {self.unfoldable}")

    def peft(self, pet, spec, backbone: nn.Module, base: str) -> PeftExport:
        """The PEFT adapter holding this method, for `backbone` saved at `base` (only where `peft_type` is set)."""
        raise NotImplementedError(f"{self.label} has no PEFT format")

    # ---- derived from the slots -------------------------------------------------------------------------
    def present(self, pet) -> bool:
        """Whether this PetModules holds any of the method's tensors."""
        value = getattr(pet, self.slots[0], None) if self.slots else None
        return value is not None and not (hasattr(value, "__len__") and len(value) == 0)

    def size(self, pet) -> int | None:
        """How many modules it placed (None when it is one thing, like the prompts)."""
        value = getattr(pet, self.slots[0], None)
        return len(value) if hasattr(value, "__len__") else None

    def owns(self, name: str) -> bool:
        """Whether a VLModel parameter name (`pet.<slot>…`) belongs to this method."""
        return any(name == f"pet.{slot}" or name.startswith(f"pet.{slot}.") for slot in self.slots)

    def why_unfoldable(self, pet) -> str:
        """'label (count): reason' for messages."""
        count = self.size(pet)
        return f"{self.label}{f' ({count})' if count is not None else ''}: {self.unfoldable}"


def pkey(name: str) -> str:
    """A dotted module path as a ModuleDict/ParameterDict key."""
    return name.replace(".", "_")


def zero_layer_params(layers: list[nn.Module]) -> list[torch.Tensor]:
    """The direct parameters of some layers (weight and bias of a Linear, PHM rule/weight/bias)."""
    return [p for layer in layers for p in layer.parameters(recurse=False)]


def peft_module_names(backbone: nn.Module, names: list[str]) -> list[str]:
    """PEFT target_modules: leaf names (q_proj, fc2) when they select exactly these Linears, else the full names."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    matched = {n for n, m in backbone.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in leaves}
    return leaves if matched == set(names) else list(names)
