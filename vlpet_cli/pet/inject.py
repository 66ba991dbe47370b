"""Apply a PetConfig to a stock BART/T5 instance from the methods' declarations, and choose what trains.

The backbone's own parameter names and state dict stay untouched; the added weights live in PetModules under the
slots each method declares. Methods enter the backbone in two ways (`method.Attachment`): a forward hook, or a
wrapped Linear (the instance's forward replaced, the class untouched) for methods that are not additive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Protocol, cast

import torch
from torch import nn

from vlpet_cli.pet import anatomy
from vlpet_cli.pet.adapter import DECODER, ENCODER, VALUE
from vlpet_cli.pet.biases import BIASES
from vlpet_cli.pet.gates import GATES
from vlpet_cli.pet.hyperformer import HYPER
from vlpet_cli.pet.ia3 import IA3
from vlpet_cli.pet.lora import LORA
from vlpet_cli.pet.lst import LST
from vlpet_cli.pet.method import Attachment, Method
from vlpet_cli.pet.prompt import PROMPT
from vlpet_cli.pet.specs import PetConfig, TrainablePolicy

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Every method, in the order they are built, registered and listed by `vlpet params`. A sub-layer's output goes
# through the modifications in this order and then through the gate, its own axis.
METHODS: tuple[Method, ...] = (ENCODER, GATES, DECODER, VALUE, LORA, PROMPT, HYPER, BIASES, IA3, LST)
SUBLAYER_STEPS: tuple[Method, ...] = (*(m for m in METHODS if m is not GATES), GATES)


class _Unwrap:
    """Handle of a wrapped module: `remove()` gives the instance back the forward it had."""

    def __init__(self, module: nn.Module, wrapper: Callable, previous: Callable | None):
        self.module, self.wrapper, self.previous = module, wrapper, previous

    def remove(self) -> None:
        if self.module.__dict__.get("forward") is not self.wrapper:
            return
        if self.previous is None:
            del self.module.__dict__["forward"]
        else:
            self.module.__dict__["forward"] = self.previous


def wrap(module: nn.Module, fn: Callable) -> _Unwrap:
    """Replace this instance's forward by `fn(forward, *args, **kwargs)`; hooks on the module still run."""
    previous = module.__dict__.get("forward")
    inner = module.forward

    def forward(*args, **kwargs):
        return fn(inner, *args, **kwargs)

    module.__dict__["forward"] = forward
    return _Unwrap(module, forward, previous)


def attach(attachment: Attachment):
    """Perform one declared attachment; returns a handle with `remove()`."""
    if attachment.how == "hook":
        return attachment.module.register_forward_hook(attachment.fn)
    return wrap(attachment.module, attachment.fn)


class PetModules(nn.Module):
    """Every module a PET method adds to one backbone, plus the hooks and wraps that run them.

    The caller sets the context of a forward pass with `set_context(task, encoder_mask)` (HyperFormer needs the
    task, the masked small gate the mask) and places `prompts(batch_size)` in front of the encoder's text.
    """

    def __init__(self, cfg: PetConfig, backbone: PreTrainedModel, extra_norms: Sequence[tuple[str, nn.Module]] = ()):
        """extra_norms: LayerNorms outside the backbone (the visual projector's) that `add_biases` also covers."""
        super().__init__()
        self.cfg = cfg
        self.family = anatomy.family(backbone)
        self.task: str | None = None
        self.encoder_mask: torch.Tensor | None = None
        self.targets: dict[str, list] = {}  # backbone modules a method acts on, by slot
        self._x: dict[str, torch.Tensor] = {}
        self._handles: list = []
        for method in METHODS:
            for slot, value in method.containers().items():
                setattr(self, slot, value)
        self.specs = [(m, m.spec(cfg)) for m in METHODS if m.spec(cfg)]
        subs = anatomy.sublayers(backbone)
        d = backbone.config.d_model
        for sub in subs:
            for method, spec in self.specs:
                method.build_site(self, spec, sub, d)
        for method, spec in self.specs:
            method.build(self, spec, backbone, list(extra_norms))
        self._init_weights()
        self._attach(backbone, subs)

    def methods(self) -> list[Method]:
        """The methods that placed tensors in this PetModules, in METHODS order."""
        return [m for m in METHODS if m.present(self)]

    def set_context(self, task: str | None, encoder_mask: torch.Tensor | None) -> None:
        """The current batch's task and joint encoder attention mask, read by the hooks of the next forward."""
        self.task, self.encoder_mask = task, encoder_mask

    def prompts(self, batch_size: int) -> torch.Tensor | None:
        """[B, P, d] encoder input rows the methods place in front of the text (prompt tuning), or None."""
        parts = [p for m, spec in self.specs if (p := m.encoder_prefix(self, spec, batch_size)) is not None]
        return torch.cat(parts, dim=1) if parts else None

    def side_position_biases(self) -> list[nn.Module]:
        """Attentions of an added network that compute their own relative position bias (LST's side encoder),
        to which the VL model applies the same text-only rule as to the backbone's."""
        return LST.position_biases(self)

    def recomputes_decoder(self) -> bool:
        """Whether generation must run the decoder over the whole prefix each step (LST's side decoder keeps no
        key/value cache of its own)."""
        return LST.present(self)

    def prompt_length(self) -> int:
        """How many rows `prompts` places in front of the text (0 without prompt tuning)."""
        return sum(m.prefix_length(spec) for m, spec in self.specs)

    # ---- initialisation -------------------------------------------------------------------------------
    def _init_weights(self) -> None:
        """Reference init: BART N(0, 0.02) for new Linears/Embeddings; T5 PyTorch default; optional zero ups."""
        if self.cfg.init == "normal":
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(module.weight, 0.0, 0.02)
                    if getattr(module, "bias", None) is not None:
                        nn.init.zeros_(cast(torch.Tensor, module.bias))
        if self.cfg.zero_init_up:
            for method, _ in self.specs:
                for tensor in method.zero_init(self):
                    nn.init.zeros_(tensor)

    # ---- hooks ------------------------------------------------------------------------------------------
    def _attach(self, backbone: PreTrainedModel, subs: list[anatomy.SubLayer]) -> None:
        for sub in subs:
            steps = [m for m in SUBLAYER_STEPS if m.on_sublayer(self, sub)]
            if not steps:
                continue
            if GATES in steps:
                self._handles.append(sub.x_module.register_forward_pre_hook(self._capture(sub.key), with_kwargs=True))
            self._handles.append(sub.h_module.register_forward_hook(self._sublayer_hook(sub, steps)))
        for method, _ in self.specs:
            self._handles.extend(attach(a) for a in method.attachments(self, backbone))

    def _capture(self, key: str):
        def hook(module, args, kwargs):
            self._x[key] = args[0] if args else kwargs["hidden_states"]
        return hook

    def take_input(self, key: str) -> torch.Tensor:
        """The sub-layer input X captured for this forward pass (the gate reads it once)."""
        return self._x.pop(key)

    def _sublayer_hook(self, sub: anatomy.SubLayer, steps: list[Method]):
        def hook(module, args, output):
            h = output if sub.h_index is None else output[sub.h_index]
            h = self.transform(sub, h, steps)
            if sub.h_index is None:
                return h
            return tuple(output[:sub.h_index]) + (h,) + tuple(output[sub.h_index + 1:])
        return hook

    def transform(self, sub: anatomy.SubLayer, h: torch.Tensor, steps: list[Method] | None = None) -> torch.Tensor:
        """H → H + ΔH(H) (+ HyperFormer adapter) → s · G(X, H1) ⊙ H1 for one sub-layer."""
        if steps is None:
            steps = [m for m in SUBLAYER_STEPS if m.on_sublayer(self, sub)]
        for method in steps:
            h = method.transform(self, sub, h)
        return h

    def remove_hooks(self) -> None:
        """Detach from the backbone (the backbone then computes as if no PET were applied); last attached first,
        so that stacked wraps unwind."""
        for handle in reversed(self._handles):
            handle.remove()
        self._handles.clear()


class PetHost(Protocol):
    """What the PET accounting and the decay groups read of the model holding a PetModules (`vl.model.VLModel`, a
    layer above)."""

    @property
    def backbone(self) -> PreTrainedModel: ...

    @property
    def projector(self) -> nn.Module: ...

    @property
    def pet(self) -> PetModules: ...

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]: ...

    def get_submodule(self, target: str) -> nn.Module: ...


def set_trainable(backbone: PreTrainedModel, pet: PetModules, projector: nn.Module, policy: TrainablePolicy) -> None:
    """Freeze everything, then unfreeze what the policy names (spec modules §3 and §5)."""
    names: set[str] = set()
    if policy.layernorms != "none":
        norms = anatomy.layer_norm_names(backbone)
        names.update(norms["encoder"])
        if policy.layernorms == "all":
            names.update(norms["decoder"])
    for name, p in backbone.named_parameters():
        wanted = policy.backbone or name in names or (policy.biases and name.endswith("bias"))
        wanted = wanted or (policy.relative_attention_bias and "relative_attention_bias" in name)
        p.requires_grad_(wanted)
    for p in projector.parameters():
        p.requires_grad_(policy.projector or policy.backbone)
    for p in pet.parameters():
        p.requires_grad_(True)


# ---- what the commands ask of the declarations --------------------------------------------------------
def owner(name: str) -> Method | None:
    """The method a VLModel parameter name (`pet.<slot>…`) belongs to, or None (backbone, projector)."""
    return next((m for m in METHODS if m.owns(name)), None)


def unfoldable(pet: PetModules) -> list[str]:
    """'label (count): reason' for each method present that no edit of the backbone's weights reproduces."""
    return [m.why_unfoldable(pet) for m in pet.methods() if m.unfoldable]


def foldable(pet: PetModules) -> list[Method]:
    """The methods present that fold into the backbone's Linears."""
    return [m for m in pet.methods() if not m.unfoldable]


def fold(pet: PetModules) -> list[str]:
    """Detach every hook and wrap, then fold each foldable method into its Linears; returns what was folded."""
    pet.remove_hooks()
    with torch.no_grad():
        return [m.fold(pet) for m in foldable(pet)]
