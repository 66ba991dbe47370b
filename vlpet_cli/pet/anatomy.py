"""The only place that knows Hugging Face module paths: sub-layers, projections and norms of the BART family
(BART, mBART) and the T5 family (T5 v1.0, T5 v1.1 / Flan-T5, mT5, UMT5).

Within a family the module names are the same; what differs is said here once: mBART is pre-LayerNorm with final
encoder/decoder LayerNorms (X of a sub-layer is then the normed input), T5 v1.1/mT5/UMT5 have a gated FFN
(`wi_0`, `wi_1`, `wo`) and an untied LM head, UMT5 has a relative position bias in every self-attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from torch import nn

from vlpet_cli.backbones import FAMILIES
from vlpet_cli.errors import VlpetError

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass
class SubLayer:
    """One residual sub-layer. X is the first input of `x_module`; H is the output of `h_module` (tuple item
    `h_index`, or the tensor itself when None), taken before dropout, residual add and (BART) post-LayerNorm."""

    stack: str  # "encoder" | "decoder"
    layer: int
    kind: str  # encoder: attn, ffn; decoder: self, cross, ffn
    x_module: nn.Module
    h_module: nn.Module
    h_index: int | None

    @property
    def key(self) -> str:
        return f"{self.stack}_{self.layer}_{self.kind}"


@dataclass
class Projection:
    """A Linear inside an attention: q, k, v or o."""

    stack: str
    layer: int
    attention: str  # attn (encoder self), self, cross
    which: str  # q | k | v | o
    name: str  # dotted path in the backbone
    linear: nn.Linear

    @property
    def key(self) -> str:
        return f"{self.stack}_{self.layer}_{self.attention}_{self.which}"


def family(model: PreTrainedModel) -> str:
    """'bart' or 't5' (the family) from the model's config."""
    model_type = getattr(model.config, "model_type", "")
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    raise VlpetError(f"unsupported backbone type '{model_type}': vlpet supports the encoder-decoders of model_type "
                     f"{', '.join(FAMILIES)}")


def encoder_position_biases(model: PreTrainedModel) -> list[nn.Module]:
    """The encoder self-attentions that compute a relative position bias: the first one for T5 v1.0/v1.1 and mT5
    (later layers reuse it), every one for UMT5; none for the BART family (learned absolute positions)."""
    if family(model) != "t5":
        return []
    attentions = [block.layer[0].SelfAttention for block in model.get_encoder().block]
    return [a for a in attentions if getattr(a, "has_relative_attention_bias", False)]


def shares_position_bias(model: PreTrainedModel) -> bool:
    """Whether later layers reuse the first layer's bias (T5, mT5: passed as `position_bias`) rather than each
    computing its own inside the attention (UMT5, whose attention takes no `position_bias`)."""
    return getattr(model.config, "model_type", "") != "umt5"


def layers(stack: nn.Module) -> nn.ModuleList:
    """The blocks of an encoder or decoder stack (BART `layers`, T5 `block`)."""
    return _layers(stack)


def final_norm(stack: nn.Module) -> nn.Module | None:
    """The stack's final LayerNorm (T5 family `final_layer_norm`, mBART `layer_norm`; BART has none)."""
    return getattr(stack, "final_layer_norm", None) or getattr(stack, "layer_norm", None)


def stacks(model: PreTrainedModel) -> tuple[Any, Any]:
    """(encoder, decoder) of a seq2seq LM: BartEncoder, T5Stack, ..., whose children differ by family and are
    reached by name (torch types a Module's attributes as `Tensor | Module`)."""
    return model.get_encoder(), model.get_decoder()


def _layers(stack: nn.Module) -> nn.ModuleList:
    return cast(nn.ModuleList, stack.layers if hasattr(stack, "layers") else stack.block)


def num_layers(model: PreTrainedModel) -> tuple[int, int]:
    enc, dec = stacks(model)
    return len(_layers(enc)), len(_layers(dec))


def sublayers(model: PreTrainedModel) -> list[SubLayer]:
    """Every residual sub-layer of both stacks, in execution order."""
    enc, dec = stacks(model)
    out: list[SubLayer] = []
    if family(model) == "bart":
        for i, layer in enumerate(enc.layers):
            out.append(SubLayer("encoder", i, "attn", layer.self_attn, layer.self_attn, 0))
            out.append(SubLayer("encoder", i, "ffn", layer.fc1, layer.fc2, None))
        for i, layer in enumerate(dec.layers):
            out.append(SubLayer("decoder", i, "self", layer.self_attn, layer.self_attn, 0))
            out.append(SubLayer("decoder", i, "cross", layer.encoder_attn, layer.encoder_attn, 0))
            out.append(SubLayer("decoder", i, "ffn", layer.fc1, layer.fc2, None))
    else:
        for i, block in enumerate(enc.block):
            out.append(SubLayer("encoder", i, "attn", block.layer[0], block.layer[0].SelfAttention, 0))
            out.append(SubLayer("encoder", i, "ffn", block.layer[-1], block.layer[-1].DenseReluDense, None))
        for i, block in enumerate(dec.block):
            out.append(SubLayer("decoder", i, "self", block.layer[0], block.layer[0].SelfAttention, 0))
            out.append(SubLayer("decoder", i, "cross", block.layer[1], block.layer[1].EncDecAttention, 0))
            out.append(SubLayer("decoder", i, "ffn", block.layer[2], block.layer[2].DenseReluDense, None))
    return out


_PROJECTION_NAMES = {"bart": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"},
                     "t5": {"q": "q", "k": "k", "v": "v", "o": "o"}}


def projections_of(attention: nn.Module, family_name: str) -> dict[str, nn.Linear]:
    """{'q','k','v','o'} -> Linear of one attention module."""
    return {which: getattr(attention, attr) for which, attr in _PROJECTION_NAMES[family_name].items()}


def projections(model: PreTrainedModel) -> list[Projection]:
    """q/k/v/o Linears of every attention (encoder self, decoder self, decoder cross)."""
    fam = family(model)
    module_names = {id(m): n for n, m in model.named_modules()}
    out = []
    for sub in sublayers(model):
        if sub.kind == "ffn":
            continue
        for which, linear in projections_of(sub.h_module, fam).items():
            out.append(Projection(sub.stack, sub.layer, sub.kind, which, module_names[id(linear)], linear))
    return out


def ffn_outputs(model: PreTrainedModel) -> list[tuple[SubLayer, str, nn.Linear]]:
    """(sub-layer, dotted name, Linear) of the second FFN Linear of every layer (BART fc2, T5 DenseReluDense.wo,
    the gated FFN's wo too), whose input is the FFN's inner activation."""
    module_names = {id(m): n for n, m in model.named_modules()}
    out = []
    for sub in sublayers(model):
        if sub.kind == "ffn":
            linear = cast(nn.Linear, sub.h_module if family(model) == "bart" else sub.h_module.wo)
            out.append((sub, module_names[id(linear)], linear))
    return out


def layer_norm_names(model: PreTrainedModel) -> dict[str, list[str]]:
    """Parameter names of the backbone's LayerNorms, split into encoder and decoder."""
    enc, dec = stacks(model)
    found: dict[str, list[str]] = {"encoder": [], "decoder": []}
    norm_types = (nn.LayerNorm,)
    for name, module in model.named_modules():
        is_norm = isinstance(module, norm_types) or type(module).__name__.endswith("LayerNorm")
        if not is_norm:
            continue
        side = "encoder" if any(m is module for m in enc.modules()) else "decoder"
        found[side].extend(f"{name}.{p}" for p, _ in module.named_parameters(recurse=False))
    return found


def norm_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every LayerNorm/T5LayerNorm in the backbone."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("LayerNorm")]


def bias_free_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Linears without a bias where LST's T5 BitFit adds one: attention q/k/v/o, FFN wi/wo and lm_head."""
    out: list[tuple[str, nn.Linear]] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.bias is None:
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("q", "k", "v", "o", "wi", "wo", "wi_0", "wi_1", "lm_head"):
                out.append((name, module))
    return out


def text_embedding_modules(model: PreTrainedModel) -> tuple[nn.Module, nn.Module] | None:
    """The BART family's encoder (positions, layernorm_embedding), which the reference applies to text tokens
    only (mBART has both too, before its pre-LayerNorm layers)."""
    if family(model) != "bart":
        return None
    enc = model.get_encoder()
    return enc.embed_positions, enc.layernorm_embedding


def word_embedding(model: PreTrainedModel) -> nn.Embedding:
    """The shared token embedding (tied to the LM head)."""
    return cast(nn.Embedding, model.get_input_embeddings())


# The role of each axis of a block's Linear weights, by leaf name, for pruning a block into a narrower one:
# "d" the residual width, "inner" the attention's heads x d_kv, "ffn" the FFN's inner width.
PRUNE_AXES = {"q": ("inner", "d"), "k": ("inner", "d"), "v": ("inner", "d"), "o": ("d", "inner"),
              "q_proj": ("inner", "d"), "k_proj": ("inner", "d"), "v_proj": ("inner", "d"), "out_proj": ("d", "inner"),
              "wi": ("ffn", "d"), "wi_0": ("ffn", "d"), "wi_1": ("ffn", "d"), "wo": ("d", "ffn"),
              "fc1": ("ffn", "d"), "fc2": ("d", "ffn")}


def narrow_config(stack: PreTrainedModel, reduction: int):
    """A copy of a stack's config with the width, FFN and per-head sizes divided by `reduction` (heads kept)."""
    import copy

    cfg = copy.deepcopy(stack.config)
    cfg.d_model = cfg.d_model // reduction
    for name in ("d_ff", "d_kv", "encoder_ffn_dim", "decoder_ffn_dim"):
        if hasattr(cfg, name):
            setattr(cfg, name, getattr(cfg, name) // reduction)
    return cfg


def new_block(stack: nn.Module, config, index: int) -> nn.Module:
    """A fresh block of the stack's own class for `config` (T5 v1.0/v1.1/mT5: the relative bias in block 0 only)."""
    import inspect

    cls = type(_layers(stack)[index])
    kwargs = {"layer_idx": index} if "layer_idx" in inspect.signature(cls.__init__).parameters else {}
    if getattr(config, "model_type", "") in ("t5", "mt5"):
        kwargs["has_relative_attention_bias"] = index == 0
    return cls(config, **kwargs)


def block_attentions(block: nn.Module) -> list[nn.Module]:
    """The self-attention of a block that may hold a relative position bias (T5 family), else none."""
    layer = getattr(block, "layer", None)
    return [layer[0].SelfAttention] if layer is not None else []


def new_norm(model: PreTrainedModel, d: int) -> nn.Module:
    """A LayerNorm of the backbone family's kind (T5: RMS norm without bias) of width d."""
    norm = final_norm(model.get_encoder())
    if norm is not None and family(model) == "t5":
        return type(norm)(d, eps=model.config.layer_norm_epsilon)
    return nn.LayerNorm(d)


def dropout_rate(config) -> float:
    """The residual dropout of a family's config."""
    return getattr(config, "dropout_rate", 0.0) or getattr(config, "dropout", 0.0)
