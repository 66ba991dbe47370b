"""What each PET method's configuration holds: one pydantic spec per method, and `PetConfig` composing them.

A method's spec lives here, beside the method modules (`ModuleSpec`: adapter.py and compacter.py; `GateSpec`:
gates.py; `LoraSpec`: lora.py; `IA3Spec`: ia3.py; `PromptSpec`: prompt.py; `HyperSpec`: hyperformer.py; `LstSpec`:
lst.py), rather than inside each of them, because the method modules import torch and a preset is validated
without it (`vlpet --help` and `vlpet presets` never import torch). The top-level `config` builds the preset from
`PetConfig`; `pet/` imports nothing above it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    """A configuration model whose unknown keys are errors (every preset model is one)."""

    model_config = ConfigDict(extra="forbid")


# The sub-layer kinds a module can follow (`anatomy.SubLayer.kind`), per stack
ENCODER_SITES = ("attn", "ffn")
DECODER_SITES = ("self", "cross", "ffn")


class ModuleSpec(Strict):
    """A bottleneck modification ΔH(H) = up(gelu_new(down(H))): a plain/multi-head adapter or a PHM (Compacter) one."""

    kind: Literal["adapter", "compacter"] = "adapter"
    r: int = Field(96, gt=0, description="bottleneck width")
    heads: int = Field(1, gt=0, description="down-projection heads (adapter); functionally one Linear(d, r)")
    phm_n: int = Field(2, gt=0, description="PHM division n (compacter)")
    sites: list[str] | None = Field(None, description="encoder attn/ffn or decoder self/cross/ffn; None = all")


class GateSpec(Strict):
    """Granularity-controlled gate on the encoder sub-layers (spec modules §1.3-1.4)."""

    granularity: Literal["small", "middlex", "middley", "large"]
    r: int = Field(96, gt=0, description="bottleneck of the large gate")
    scale: float = Field(1.0, description="scaling factor s applied after the gate")
    masked_mean: bool = Field(False, description="small gate: average over real tokens only (fix; reference: False)")


class LoraSpec(Strict):
    r: int = Field(128, gt=0)
    alpha: float = 32.0
    dropout: float = 0.1
    targets: list[Literal["q", "k", "v", "o"]] = ["q", "v"]


class IA3Spec(Strict):
    """IA3: learned vectors rescaling the outputs of k and v and the FFN's inner activation, initialised to ones."""

    targets: list[Literal["k", "v", "ffn"]] = Field(
        ["k", "v", "ffn"], description="k, v: every attention's projection outputs; ffn: the input of fc2 / wo")


class PromptSpec(Strict):
    length: int = Field(40, gt=0)
    mid_dim: int = Field(800, gt=0)


class HyperSpec(Strict):
    """HyperFormer: per-stack hyper-network generating task- and layer-conditioned adapters."""

    r: int = Field(96, gt=0)
    task_dim: int = Field(512, gt=0)
    layer_dim: int = Field(512, gt=0)
    hidden: int = Field(128, gt=0)
    projected: int = Field(8, gt=0)
    tasks: list[str] | None = Field(None, description="the tasks whose embeddings the hyper-network holds, in "
                                                       "order; None: the task table's default tasks (set when the "
                                                       "preset is resolved)")


class LstSpec(Strict):
    """Ladder Side-Tuning (Sung et al., 2022): a narrow side network fed by gated ladders from every backbone layer."""

    reduction: int = Field(4, gt=0, description="side width d_model / reduction (d_ff and d_kv too); LST's VL-T5 "
                                                "script LST.sh uses 4")
    gate_t: float = Field(0.1, gt=0, description="ladder gate mu_i = sigmoid(alpha_i / T): the temperature T")
    gate_alpha: float = Field(0.0, description="initial alpha_i (0: mu_i = 0.5)")
    init: Literal["prune", "random"] = Field(
        "prune", description="side blocks from the backbone's weights by structured pruning, or random init")


class TrainablePolicy(Strict):
    """Which existing parameters train besides the added modules."""

    layernorms: Literal["none", "encoder", "all"] = "none"
    biases: bool = False
    projector: bool = True
    backbone: bool = False
    relative_attention_bias: bool = Field(
        False, description="T5: train the relative_attention_bias tables too (the reference's --unfreeze_bias and "
                           "--use_lora do: they match any name containing 'bias')")


class PetConfig(Strict):
    encoder: ModuleSpec | None = Field(None, description="sequential module after encoder sub-layers")
    gate: GateSpec | None = None
    decoder: ModuleSpec | None = Field(None, description="sequential module after decoder sub-layers")
    value: ModuleSpec | None = Field(None, description="parallel module on the decoder cross-attention value")
    lora: LoraSpec | None = None
    prompt: PromptSpec | None = None
    hyperformer: HyperSpec | None = None
    ia3: IA3Spec | None = Field(None, description="IA3 rescaling vectors on k, v and the FFN activation")
    lst: LstSpec | None = Field(None, description="Ladder Side-Tuning side network (no backward through the backbone)")
    add_biases: bool = Field(False, description="create the biases a bias-free backbone (T5) lacks (LST BitFit)")
    trainable: TrainablePolicy = TrainablePolicy()
    init: Literal["normal", "default"] = Field(
        "normal", description="new Linear weights: N(0, 0.02) (BART reference) or PyTorch default (T5 reference)"
    )
    zero_init_up: bool = Field(False, description="zero the up-projections of modules, gates and value adapters")
