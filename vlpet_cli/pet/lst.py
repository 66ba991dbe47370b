"""LST, Ladder Side-Tuning (Sung et al., NeurIPS 2022): a side network 1/r as wide as the backbone, in both stacks.

Side block i reads h_i = mu_i * h_{i-1} + (1 - mu_i) * down_i(backbone block i output), mu_i = sigmoid(alpha_i / T);
its first input is down_0(the backbone's input to block 0); each side stack ends in its own LayerNorm; the side
decoder cross-attends the side encoder's output; up(side decoder output) replaces the backbone decoder's output
before the LM head. The backbone runs as usual but on detached inputs, and its block outputs enter the ladders
detached: no backward pass ever goes through it. Side blocks are the backbone's own block classes at the narrow
width, initialised from the backbone's weights by structured pruning (below).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from vlpet_cli.errors import VlpetError
from vlpet_cli.pet import anatomy
from vlpet_cli.pet.method import Attachment, Method

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# the PetConfig fields whose modules live in the backbone: under LST they would get no gradient
BACKBONE_METHODS = ("encoder", "gate", "decoder", "value", "lora", "hyperformer", "ia3", "add_biases")


class SideStack(nn.Module):
    """One side stack: first and per-layer downsamplers, the ladder gates, narrow blocks, final norm, dropout."""

    def __init__(self, blocks: list[nn.Module], d: int, d_side: int, norm: nn.Module, alpha: float, dropout: float):
        super().__init__()
        self.first = nn.Linear(d, d_side)
        self.downsamples = nn.ModuleList(nn.Linear(d, d_side) for _ in blocks)
        self.gates = nn.Parameter(torch.full((len(blocks),), float(alpha)))
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm
        self.dropout = nn.Dropout(dropout)


class Ladder:
    """What one pass of a backbone stack leaves for its side stack: block-0 input, each block's call and output."""

    def __init__(self) -> None:
        self.first: torch.Tensor | None = None
        self.calls: dict[int, tuple[tuple, dict]] = {}
        self.outputs: dict[int, torch.Tensor] = {}


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return scores.topk(k).indices.sort().values


class LstMethod(Method):
    field = "lst"
    group = "side network (LST)"
    label = "LST side network"
    unfoldable = "a side network computes the output; no edit of the backbone's weights reproduces it"

    # ---- build --------------------------------------------------------------------------------------------
    def build(self, pet, spec, backbone: PreTrainedModel, extra_norms) -> None:
        others = [f for f in BACKBONE_METHODS if getattr(pet.cfg, f)]
        if others:
            raise VlpetError(f"LST cannot be combined with pet.{', pet.'.join(others)}: LST never back-propagates "
                             f"through the backbone, so modules inside it would not train; drop them")
        policy = pet.cfg.trainable
        if policy.backbone or policy.biases or policy.layernorms != "none" or policy.relative_attention_bias:
            raise VlpetError("LST trains only its side network and the projector: set pet.trainable.backbone, "
                             "biases and relative_attention_bias to false and layernorms to none")
        if spec.init == "prune" and pet.cfg.init == "normal":
            raise VlpetError("pet.init=normal would overwrite LST's pruned side network; set pet.init=default "
                             "(or pet.lst.init=random)")
        d = backbone.config.d_model
        heads = getattr(backbone.config, "num_heads", None) or backbone.config.encoder_attention_heads
        if d % spec.reduction or (d // spec.reduction) % heads:
            raise VlpetError(f"pet.lst.reduction={spec.reduction} does not divide d_model {d} into a width that "
                             f"{heads} heads share; pick a divisor of {d // heads}")
        d_side = d // spec.reduction
        keep_d = self._keep_residual(backbone, d_side) if spec.init == "prune" else None
        pet.lst = nn.ModuleDict()
        for name, stack in zip(("encoder", "decoder"), anatomy.stacks(backbone)):
            cfg = anatomy.narrow_config(stack, spec.reduction)
            blocks = [anatomy.new_block(stack, cfg, i) for i in range(len(anatomy.layers(stack)))]
            side = SideStack(blocks, d, d_side, anatomy.new_norm(backbone, d_side), spec.gate_alpha,
                             anatomy.dropout_rate(backbone.config))
            if keep_d is not None:
                self._prune(side, stack, keep_d)
            pet.lst[name] = side
        pet.lst["upsample"] = nn.Linear(d_side, d)
        pet.ladders = {"encoder": Ladder(), "decoder": Ladder()}
        pet.side_memory = None

    # ---- structured pruning ---------------------------------------------------------------------------------
    @staticmethod
    def _keep_residual(backbone: PreTrainedModel, d_side: int) -> torch.Tensor | None:
        """The residual dims every side block keeps: largest L1 mass of the backbone's Linears that read or write
        the residual stream (one set for both stacks, since the side decoder reads the side encoder's output)."""
        weight = anatomy.word_embedding(backbone).weight
        if weight.is_meta:
            return None
        scores = torch.zeros(backbone.config.d_model)
        for name, module in backbone.named_modules():
            axes = anatomy.PRUNE_AXES.get(name.rsplit(".", 1)[-1])
            if axes and isinstance(module, nn.Linear):
                w = module.weight.detach().abs().float()
                scores += w.sum(0) if axes[1] == "d" else w.sum(1)
        return _top(scores, d_side)

    def _prune(self, side: SideStack, stack: nn.Module, keep_d: torch.Tensor) -> None:
        """Copy each backbone block into its side block: residual dims `keep_d`; per attention, the d_kv/r dims
        of each head with the largest L1 mass over q, k, v rows and o columns; per FFN, the d_ff/r inner units
        with the largest L1 mass (the magnitude criterion of structured pruning, Li et al. 2017)."""
        with torch.no_grad():
            for block, small in zip(anatomy.layers(stack), side.blocks):
                modules = dict(block.named_modules())
                sources = dict(block.named_parameters())
                keep: dict[tuple[str, str], torch.Tensor] = {}
                for name, p in small.named_parameters():
                    src = sources[name].detach()
                    module_path, _, tensor = name.rpartition(".")  # e.g. layer.0.SelfAttention.q / weight
                    parent, _, leaf = module_path.rpartition(".")
                    axes = anatomy.PRUNE_AXES.get(leaf)  # None: a norm (residual axis) or an unchanged table
                    value = src
                    for axis, (want, have) in enumerate(zip(p.shape, src.shape)):
                        if want == have:
                            continue
                        role = "d" if axes is None else (axes[axis] if tensor == "weight" else axes[0])
                        if role == "d":
                            idx = keep_d
                        else:
                            if (parent, role) not in keep:
                                keep[(parent, role)] = self._keep_inner(modules, parent, role, want)
                            idx = keep[(parent, role)]
                        value = value.index_select(axis, idx)
                    p.copy_(value)
            final_weight = getattr(anatomy.final_norm(stack), "weight", None)
            if final_weight is not None:
                cast(torch.Tensor, side.norm.weight).copy_(final_weight.detach()[keep_d])

    @staticmethod
    def _keep_inner(modules: dict[str, nn.Module], parent: str, role: str, width: int) -> torch.Tensor:
        """Kept inner units of the attention or FFN at `parent`: per head for attentions, overall for FFNs."""
        scores = None
        heads = None
        for leaf, axes in anatomy.PRUNE_AXES.items():
            module = modules.get(f"{parent}.{leaf}" if parent else leaf)
            if not isinstance(module, nn.Linear) or role not in axes:
                continue
            w = module.weight.detach().abs().float()
            s = w.sum(1) if axes[0] == role else w.sum(0)
            scores = s if scores is None else scores + s
            heads = getattr(modules.get(parent), "n_heads", None) or getattr(modules.get(parent), "num_heads", None)
        assert scores is not None, f"no Linear of {parent!r} has a {role} axis"
        if role == "ffn" or not heads:
            return _top(scores, width)
        per_head = scores.view(heads, -1)
        k = width // heads
        picks = per_head.topk(k, dim=1).indices.sort(dim=1).values
        return (picks + torch.arange(heads)[:, None] * per_head.shape[1]).flatten()

    # ---- forward --------------------------------------------------------------------------------------------
    def attachments(self, pet, backbone: PreTrainedModel) -> list[Attachment]:
        out = []
        for name, stack in zip(("encoder", "decoder"), anatomy.stacks(backbone)):
            for i, block in enumerate(anatomy.layers(stack)):
                out.append(Attachment(block, "wrap", self._record(pet, name, i)))
        encoder, decoder = anatomy.stacks(backbone)
        out.append(Attachment(encoder, "wrap", self._side_encoder(pet)))
        out.append(Attachment(decoder, "wrap", self._side_decoder(pet)))
        return out

    @staticmethod
    def _record(pet, stack: str, i: int):
        """Block wrap: keep the call and the detached output; block 0 runs on a detached input (no graph)."""
        def fn(forward, *args, **kwargs):
            ladder = pet.ladders[stack]
            if i == 0:
                ladder.first = args[0]
                args = (args[0].detach(), *args[1:])
            ladder.calls[i] = (args, kwargs)
            output = forward(*args, **kwargs)
            ladder.outputs[i] = _first(output).detach()
            return output
        return fn

    def _side_encoder(self, pet):
        def fn(forward, *args, **kwargs):
            output = forward(*args, **kwargs)
            pet.side_memory = self._run(pet, "encoder", None)
            return output
        return fn

    def _side_decoder(self, pet):
        def fn(forward, *args, **kwargs):
            output = forward(*args, **kwargs)
            memory = pet.side_memory
            if memory is None:
                raise RuntimeError("LST: the decoder ran before the encoder (no side memory)")
            batch = output.last_hidden_state.shape[0]
            if memory.shape[0] != batch:  # generate expands the encoder outputs per beam, by repeat_interleave
                memory = memory.repeat_interleave(batch // memory.shape[0], dim=0)
            output.last_hidden_state = pet.lst["upsample"](self._run(pet, "decoder", memory))
            return output
        return fn

    @staticmethod
    def _run(pet, stack: str, memory: torch.Tensor | None) -> torch.Tensor:
        """The side stack over one recorded backbone pass (the side blocks get the backbone blocks' own call,
        with the side states, the side memory, no cache, and their own bias in block 0)."""
        side: SideStack = pet.lst[stack]
        ladder: Ladder = pet.ladders[stack]
        mu = torch.sigmoid(side.gates / pet.cfg.lst.gate_t)
        h = side.first(ladder.first)
        for i, block in enumerate(side.blocks):
            h = mu[i] * h + (1 - mu[i]) * side.downsamples[i](ladder.outputs[i])
            args, kwargs = ladder.calls[i]
            bound = inspect.signature(type(block).forward).bind(block, *args, **kwargs)
            call = dict(bound.arguments)
            call.pop("self")
            extra = call.pop("kwargs", {})
            call["hidden_states"] = h
            if memory is not None:
                call["encoder_hidden_states"] = memory
            for key in ("cache", "past_key_values"):
                if key in call:
                    call[key] = None
            if "use_cache" in call:
                call["use_cache"] = False
            if i == 0:
                for key in ("position_bias", "encoder_decoder_position_bias"):
                    if key in call:
                        call[key] = None
            h = _first(block(**call, **extra))
        ladder.calls.clear()
        ladder.outputs.clear()
        return side.dropout(side.norm(h))

    def position_biases(self, pet) -> list[nn.Module]:
        """The side encoder's attentions that compute a relative position bias (the text-only rule applies)."""
        if not self.present(pet):
            return []
        blocks = pet.lst["encoder"].blocks
        return [a for b in blocks for a in anatomy.block_attentions(b) if getattr(a, "has_relative_attention_bias",
                                                                                 False)]


LST = LstMethod()
