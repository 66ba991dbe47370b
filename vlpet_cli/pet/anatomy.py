"""The only place that knows Hugging Face module paths: BART and T5 sub-layers, projections and norms."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vlpet_cli.errors import VlpetError


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


def family(model: nn.Module) -> str:
    """'bart' or 't5' from the model's config."""
    model_type = getattr(model.config, "model_type", "")
    if model_type in ("bart", "t5"):
        return model_type
    raise VlpetError(f"unsupported backbone type '{model_type}': vlpet supports BART and T5 encoder-decoders")


def stacks(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(encoder, decoder) of a seq2seq LM."""
    return model.get_encoder(), model.get_decoder()


def _layers(stack: nn.Module) -> nn.ModuleList:
    return stack.layers if hasattr(stack, "layers") else stack.block


def num_layers(model: nn.Module) -> tuple[int, int]:
    enc, dec = stacks(model)
    return len(_layers(enc)), len(_layers(dec))


def sublayers(model: nn.Module) -> list[SubLayer]:
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


def projections(model: nn.Module) -> list[Projection]:
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


def ffn_outputs(model: nn.Module) -> list[tuple[SubLayer, str, nn.Linear]]:
    """(sub-layer, dotted name, Linear) of the second FFN Linear of every layer (BART fc2, T5 DenseReluDense.wo),
    whose input is the FFN's inner activation."""
    module_names = {id(m): n for n, m in model.named_modules()}
    out = []
    for sub in sublayers(model):
        if sub.kind == "ffn":
            linear = sub.h_module if family(model) == "bart" else sub.h_module.wo
            out.append((sub, module_names[id(linear)], linear))
    return out


def layer_norm_names(model: nn.Module) -> dict[str, list[str]]:
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
    out = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.bias is None:
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("q", "k", "v", "o", "wi", "wo", "wi_0", "wi_1", "lm_head"):
                out.append((name, module))
    return out


def text_embedding_modules(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """BART's encoder (positions, layernorm_embedding), which the reference applies to text tokens only."""
    if family(model) != "bart":
        return None
    enc = model.get_encoder()
    return enc.embed_positions, enc.layernorm_embedding


def word_embedding(model: nn.Module) -> nn.Embedding:
    """The shared token embedding (tied to the LM head)."""
    return model.get_input_embeddings()
