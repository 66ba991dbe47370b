"""HyperFormer: one hyper-network per stack generates task- and layer-conditioned adapters (spec modules §5)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from vlpet_cli.errors import VlpetError
from vlpet_cli.pet import anatomy
from vlpet_cli.pet.activation import gelu_new
from vlpet_cli.pet.method import REF_PARAM, REF_TASK, Method, ReferenceNaming, ReferenceRule
from vlpet_cli.pet.specs import DECODER_SITES, ENCODER_SITES, HyperSpec

if TYPE_CHECKING:
    from transformers import PreTrainedModel

LN_EPS = 1e-6  # the reference's hyper-network LayerNorm (issue 11, item 3); PyTorch's default is 1e-5
# The reference's words for the sub-layer an adapter generator serves, per stack.
REFERENCE_BLOCKS = {"encoder": {"self_attention": "attn", "feed_forward": "ffn"},
                    "decoder": {"self_attention": "self", "cross_attention": "cross", "feed_forward": "ffn"}}


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

    def __init__(self, spec: HyperSpec, d: int, n_layers: int, blocks: tuple[str, ...]):
        super().__init__()
        self.layer_embedding = nn.Embedding(n_layers, spec.layer_dim)
        self.mlp = nn.Sequential(
            nn.Linear(spec.task_dim + spec.layer_dim, spec.hidden),
            nn.ReLU(),
            nn.Linear(spec.hidden, spec.projected),
            nn.LayerNorm(spec.projected, eps=LN_EPS),
        )
        self.generators = nn.ModuleDict({b: AdapterGenerator(spec.projected, d, spec.r) for b in blocks})

    def forward(self, task_embedding: torch.Tensor, layer: int, block: str, h: torch.Tensor) -> torch.Tensor:
        layer_emb = self.layer_embedding.weight[layer]
        z = self.mlp(torch.cat([task_embedding, layer_emb]))
        return self.generators[block](z, h)


def _reference_rules() -> tuple[ReferenceRule, ...]:
    """The task embeddings, one per task (shared, or one table per stack: all must be equal; the reference's
    caption task is vlpet's coco) and each stack's `adapter_layers_hyper_net` (layer embeddings, task MLP, its
    LayerNorm, per-sub-layer generators)."""
    tag = "hyperformer"
    rules = [ReferenceRule(r"{ROOT}(?:shared_task_embed|(?:encoder|decoder)\.task_embed)\.task_to_embeddings\."
                           + REF_TASK, "pet.task_embeddings.{task}", "task embedding", tag,
                           words={"task": {"caption": "coco"}})]
    for stack, blocks in REFERENCE_BLOCKS.items():
        net, ours = r"{ROOT}" + stack + r"\.adapter_layers_hyper_net\.", f"pet.hyper.{stack}."
        rules += [
            ReferenceRule(net + r"layer_id_embeddings\.weight", ours + "layer_embedding.weight", tag=tag),
            ReferenceRule(net + r"task_hypernet\.task_embeding_generator\.(?P<idx>[02])\." + REF_PARAM,
                          ours + "mlp.{idx}.{p}", tag=tag),
            ReferenceRule(net + r"LayerNorm\." + REF_PARAM, ours + "mlp.3.{p}", tag=tag),
            ReferenceRule(net + f"(?P<block>{'|'.join(blocks)})" + r"_(?P<which>up|down)_sampler_hyper_net\."
                          r"(?P<gen>weight|bias)_generator\.0\." + REF_PARAM,
                          ours + "generators.{block}.{which}_{gen}.{p}", tag=tag, words={"block": blocks}),
        ]
    return tuple(rules)


def _task_dim_hint(name: str, shape: tuple) -> str | None:
    """A task embedding's length is the preset's task_dim."""
    if name.startswith("pet.task_embeddings.") and len(shape) == 1:
        return f"set pet.hyperformer.task_dim={shape[0]}"
    return None


class HyperMethod(Method):
    """Adds the generated adapter after every sub-layer of both stacks; needs `PetModules.task` set."""

    field = "hyperformer"
    slots = ("hyper", "task_embeddings")
    group = "hyper-networks"
    label = "HyperFormer hyper-networks"
    unfoldable = "they generate the adapters per task at run time"
    reference = ReferenceNaming(
        _reference_rules(), tag="hyperformer", preset="hyperformer", hint=_task_dim_hint,
        sizes=(("layer_embedding.weight", "pet.hyperformer.layer_dim", 1),
               ("mlp.0.weight", "pet.hyperformer.hidden", 0), ("mlp.2.weight", "pet.hyperformer.projected", 0),
               ("down_bias.weight", "pet.hyperformer.r", 0)))

    def containers(self) -> dict:
        return {"hyper": None}

    def build(self, pet, spec: HyperSpec, backbone: PreTrainedModel, extra_norms) -> None:
        d = backbone.config.d_model
        n_enc, n_dec = anatomy.num_layers(backbone)
        # One parameter per task, as the reference holds them: a task absent from a batch gets no gradient, so the
        # optimizer leaves its embedding alone (no moment update, no decay, its own step count).
        assert spec.tasks is not None, "resolving a preset sets pet.hyperformer.tasks"
        rows = torch.randn(len(spec.tasks), spec.task_dim)
        pet.task_embeddings = nn.ParameterDict({task: nn.Parameter(row.clone()) for task, row in zip(spec.tasks, rows)})
        pet.hyper = nn.ModuleDict({
            "encoder": HyperNetwork(spec, d, n_enc, ENCODER_SITES),
            "decoder": HyperNetwork(spec, d, n_dec, DECODER_SITES),
        })

    def on_sublayer(self, pet, sub) -> bool:
        return pet.hyper is not None

    def transform(self, pet, sub, h: torch.Tensor) -> torch.Tensor:
        return h + pet.hyper[sub.stack](task_embedding(pet), sub.layer, sub.kind, h)

    def no_decay(self, pet) -> list[str]:
        """Biases and the hyper-networks' LayerNorms (mlp.3)."""
        return [f"hyper.{n}" for n, _ in pet.hyper.named_parameters() if "bias" in n or ".mlp.3." in n]


def task_embedding(pet) -> torch.Tensor:
    """The embedding of the task the caller set on `pet.task`."""
    tasks = pet.cfg.hyperformer.tasks
    if pet.task not in tasks:
        raise VlpetError(f"HyperFormer needs the current task, one of {tasks}; got {pet.task!r}")
    return pet.task_embeddings[pet.task]


HYPER = HyperMethod()
