"""What a PET method declares about itself; `inject` composes methods from these declarations.

A method owns one PetConfig field (its spec) and one or more PetModules attributes (its "slots": the parameter
names of its tensors are `pet.<slot>.…`). It says how its modules are built (per sub-layer and/or once per
backbone), how they enter the backbone (an output hook, or a wrapped Linear for methods that are not additive),
its row in the `vlpet params` table, its tensors that skip weight decay under the corrected rule, and whether it
folds into a Linear (and how) or why it cannot, its PEFT export mapping where one exists, and one
`ReferenceNaming` record: how the reference code's checkpoints name its tensors (`ReferenceRule`s, the preset fields
that size them, the preset it identifies), which `vlpet import-reference` reads, and from whose rules training takes
the reference's weight-decay groups. Its spec (the PetConfig field's model) is in `pet/specs.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sized
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from vlpet_cli.pet.anatomy import SubLayer
    from vlpet_cli.pet.specs import PetConfig


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


# Pieces of the reference's key names that several methods' rules share.
REF_PARAM = r"(?P<p>weight|bias)"
REF_TASK = r"(?P<task>[^.]+)"  # the reference task a per-task copy belongs to


@dataclass(frozen=True)
class ReferenceRule:
    """How the reference code's checkpoints name one kind of a method's tensors, and where it lands in vlpet.

    pattern: a regex over the checkpoint key; `{ROOT}`, `{ENC}`, `{DEC}`, `{CROSS}` and `{ATT}` stand for the
             backbone family's paths (`reference_names.SITES`), whose groups (layer, kind, dkind, stack, att, proj) the
             importer translates into vlpet's sub-layer words.
    target:  the vlpet parameter name, a format string over the match's groups (after `words`).
    role:    "tensor"; "head" (one of the N_h down heads, joined in head order); "task" (one copy per reference
             task, all equal under `--use_single_*`); "task embedding" (one row per reference task).
    tag:     the module family the key reveals ("vlpet", "adapter", "lora", ...), for choosing the preset.
    gate:    the gate granularity the key reveals.
    words:   group -> {reference word: vlpet word}, for the method's own words (PHM names, layer indices).
    layer:   where the reference names the same vlpet tensors differently per kind of layer, the kind this rule is
             for: the `reference_layer` of the module holding them (Compacter's PHM layers: "phm"); None: any.
    """

    pattern: str
    target: str | None
    role: str = "tensor"
    tag: str = ""
    gate: str | None = None
    words: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    layer: str | None = None


@dataclass(frozen=True)
class ReferenceNaming:
    """How the reference code's checkpoints name one method's tensors: read by `vlpet import-reference`
    (`reference.py`) and, for its rules, by `reference_names`, which also gives training the reference's decay groups.

    rules:       a `ReferenceRule` per kind of tensor; none: the method has no reference layout (IA3, LST, biases).
    label:       how import messages name the reference's copies of its modules.
    single_flag: the reference flag that shares its modules between tasks.
    tag:         the module family its keys reveal (`ReferenceRule.tag`).
    preset:      the preset of a checkpoint holding only this family.
    identify:    `(tags, gates, names) -> preset or None`, for a method that tells its preset otherwise.
    sizes:       (name suffix, preset field, dimension of the tensor that holds it), for the override hints.
    hint:        `(name, shape) -> 'set FIELD=VALUE' or None`, for the sizes a suffix cannot tell.
    """

    rules: tuple[ReferenceRule, ...] = ()
    label: str = "modules"
    single_flag: str = "--use_single_adapter"
    tag: str = ""
    preset: str | None = None
    identify: Callable[[set[str], set[str], set[str]], str | None] | None = None
    sizes: tuple[tuple[str, str, int], ...] = ()
    hint: Callable[[str, tuple], str | None] | None = None

    def preset_of(self, tags: set[str], gates: set[str], names: set[str]) -> str | None:
        """The preset of a checkpoint whose keys revealed `tags` and `gates` and mapped onto `names`, when this
        method identifies it."""
        if self.identify is not None:
            return self.identify(tags, gates, names)
        return self.preset if self.tag and tags == {self.tag} else None

    def size_hint(self, name: str, shape: tuple) -> str | None:
        """'set FIELD=VALUE' giving the method's tensor `name` the checkpoint's `shape`, or None."""
        for suffix, key, dim in self.sizes:
            if name.endswith(suffix):
                return f"set {key}={shape[dim]}"
        return self.hint(name, shape) if self.hint is not None else None


class Method:
    """One modification. The defaults describe a method that does nothing at that step."""

    field: str = ""  # the PetConfig field holding its spec (None or False: the method is off)
    group: str = ""  # its row in the `vlpet params` table
    label: str = ""  # how messages name it
    unfoldable: str | None = None  # why no edit of a Linear's weights reproduces it; None: `fold` does it
    peft_type: str | None = None  # the PEFT adapter type it exports to, if any
    peft_unit: str = ""  # what an export counts ("LoRA modules")
    reference: ReferenceNaming = ReferenceNaming()  # how the reference's checkpoints name its tensors (none: no layout)

    @property
    def slots(self) -> tuple[str, ...]:
        """The PetModules attributes it fills, in registration order: one named as its field unless it says."""
        return (self.field,)

    def spec(self, cfg: PetConfig) -> Any:
        return getattr(cfg, self.field)

    def containers(self) -> dict[str, Any]:
        """The empty slots registered on PetModules before anything is built."""
        return {slot: nn.ModuleDict() for slot in self.slots}

    def build_site(self, pet, spec: Any, sub: SubLayer, d: int) -> None:
        """Build this method's module for one residual sub-layer (called in execution order)."""

    def build(self, pet, spec: Any, backbone: PreTrainedModel, extra_norms: list[tuple[str, nn.Module]]) -> None:
        """Build what is not per sub-layer (called once, after every sub-layer)."""

    def zero_init(self, pet) -> list[torch.Tensor]:
        """Tensors that `zero_init_up` zeroes (the layers producing the method's output)."""
        return []

    def on_sublayer(self, pet, sub: SubLayer) -> bool:
        """Whether `transform` changes this sub-layer's output H."""
        return False

    def transform(self, pet, sub: SubLayer, h: torch.Tensor) -> torch.Tensor:
        """H -> H' for a sub-layer `on_sublayer` claims (module, HyperFormer, then the gate)."""
        return h

    def attachments(self, pet, backbone: PreTrainedModel) -> list[Attachment]:
        """Hooks and wraps on backbone modules other than the sub-layer outputs."""
        return []

    def encoder_prefix(self, pet, spec: Any, batch_size: int) -> torch.Tensor | None:
        """[B, P, d] vectors placed in front of the text in the encoder input (prompt tuning), or None."""
        return None

    def prefix_length(self, spec: Any) -> int:
        """P of `encoder_prefix`."""
        return 0

    def no_decay(self, pet) -> list[str]:
        """Parameter names under `pet.` that the corrected decay rule exempts (the reference rule is by name)."""
        return []

    def fold(self, pet) -> str:
        """Edit the backbone Linears so that they compute what the method adds; returns what was folded."""
        raise NotImplementedError(f"{self.label} cannot be folded: {self.unfoldable}")

    def peft(self, pet, spec: Any, backbone: PreTrainedModel, base: str) -> PeftExport:
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
        return len(value) if isinstance(value, Sized) else None

    def owns(self, name: str) -> bool:
        """Whether a VLModel parameter name (`pet.<slot>…`) belongs to this method."""
        return any(name == f"pet.{slot}" or name.startswith(f"pet.{slot}.") for slot in self.slots)

    def why_unfoldable(self, pet) -> str:
        """'label (count): reason' for messages."""
        count = self.size(pet)
        return f"{self.label}{f' ({count})' if count is not None else ''}: {self.unfoldable}"


class Vectors(Method):
    """A method whose tensors are bare vectors in one ParameterDict slot (the added biases, IA3's scales); the
    corrected decay rule exempts every one (a bias, or a scale initialised to 1 that decay would pull to zero)."""

    def containers(self) -> dict[str, Any]:
        return {self.slots[0]: nn.ParameterDict()}

    def no_decay(self, pet) -> list[str]:
        slot = self.slots[0]
        return [f"{slot}.{key}" for key in getattr(pet, slot)]


def bottleneck_width(name: str, shape: tuple) -> int | None:
    """r of a bottleneck tensor: Linear down (r, d) / up (d, r), PHM down (n, d/n, r/n) / up (n, r/n, d/n)."""
    if name.endswith(".rule") or name.endswith("up.bias"):
        return None
    if len(shape) == 3:
        return shape[0] * (shape[2] if ".down." in name else shape[1])
    return shape[1] if name.endswith(".up.weight") else shape[0]


def bottleneck_hint(field_name: str, name: str, shape: tuple) -> str | None:
    """The `pet.<field>.phm_n` / `.r` override that gives a bottleneck (or gate) tensor the checkpoint's shape."""
    if name.endswith(".rule"):
        return f"set pet.{field_name}.phm_n={shape[0]}"
    width = bottleneck_width(name, shape)
    return f"set pet.{field_name}.r={width}" if width else None


def pkey(name: str) -> str:
    """A dotted module path as a ModuleDict/ParameterDict key."""
    return name.replace(".", "_")


def zero_layer_params(layers: list[nn.Module]) -> list[torch.Tensor]:
    """The direct parameters of some layers (weight and bias of a Linear, PHM rule/weight/bias)."""
    return [p for layer in layers for p in layer.parameters(recurse=False)]


def peft_module_names(backbone: PreTrainedModel, names: list[str]) -> list[str]:
    """PEFT target_modules: leaf names (q_proj, fc2) when they select exactly these Linears, else the full names."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    matched = {n for n, m in backbone.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in leaves}
    return leaves if matched == set(names) else list(names)
