"""Apply a PetConfig to a stock BART/T5 instance with hooks, and choose which parameters train."""

from __future__ import annotations

import torch
from torch import nn

from vlpet_cli.config import DECODER_SITES, ENCODER_SITES, PetConfig, TrainablePolicy
from vlpet_cli.errors import VlpetError
from vlpet_cli.pet import anatomy
from vlpet_cli.pet.gates import Gate
from vlpet_cli.pet.modules import HyperNetwork, LoRA, PromptEncoder, build_module, up_layers


def _sites(spec, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    sites = tuple(spec.sites) if spec.sites is not None else allowed
    bad = [s for s in sites if s not in allowed]
    if bad:
        raise VlpetError(f"pet.{what}.sites: unknown site(s) {bad}; choose from {list(allowed)}")
    return sites


def _pkey(name: str) -> str:
    return name.replace(".", "_")


class PetModules(nn.Module):
    """Every module a PET method adds to one backbone, plus the forward hooks that run them.

    The backbone's own parameter names and state dict stay untouched; the added weights live here.
    `task` (HyperFormer) and `encoder_mask` (masked small gate) are set by the caller before a forward pass.
    """

    def __init__(self, cfg: PetConfig, backbone: nn.Module, extra_norms: list[tuple[str, nn.Module]] = ()):
        """extra_norms: LayerNorms outside the backbone (the visual projector's) that `add_biases` also covers."""
        super().__init__()
        self.cfg = cfg
        self.family = anatomy.family(backbone)
        d = backbone.config.d_model
        self.encoder_modules = nn.ModuleDict()
        self.gates = nn.ModuleDict()
        self.decoder_modules = nn.ModuleDict()
        self.value = nn.ModuleDict()
        self.lora = nn.ModuleDict()
        self.added_biases = nn.ParameterDict()
        self.prompt = PromptEncoder(d, cfg.prompt.length, cfg.prompt.mid_dim) if cfg.prompt else None
        self.hyper = None
        self.task: str | None = None
        self.encoder_mask: torch.Tensor | None = None
        self._x: dict[str, torch.Tensor] = {}
        self._handles: list = []

        subs = anatomy.sublayers(backbone)
        enc_sites = _sites(cfg.encoder, ENCODER_SITES, "encoder") if cfg.encoder else ()
        dec_sites = _sites(cfg.decoder, DECODER_SITES, "decoder") if cfg.decoder else ()
        for sub in subs:
            if sub.stack == "encoder" and sub.kind in enc_sites:
                self.encoder_modules[sub.key] = build_module(cfg.encoder, d)
            if sub.stack == "encoder" and cfg.gate:
                g = cfg.gate
                self.gates[sub.key] = Gate(g.granularity, d, g.r, g.scale, g.masked_mean)
            if sub.stack == "decoder" and sub.kind in dec_sites:
                self.decoder_modules[sub.key] = build_module(cfg.decoder, d)
            if sub.stack == "decoder" and sub.kind == "cross" and cfg.value:
                self.value[sub.key] = build_module(cfg.value, d)
        if cfg.hyperformer:
            n_enc, n_dec = anatomy.num_layers(backbone)
            self.task_embeddings = nn.Parameter(torch.randn(len(cfg.hyperformer.tasks), cfg.hyperformer.task_dim))
            self.hyper = nn.ModuleDict({
                "encoder": HyperNetwork(cfg.hyperformer, d, n_enc, ENCODER_SITES),
                "decoder": HyperNetwork(cfg.hyperformer, d, n_dec, DECODER_SITES),
            })
        self._lora_targets = []
        if cfg.lora:
            for proj in anatomy.projections(backbone):
                if proj.which in cfg.lora.targets:
                    lin = proj.linear
                    self.lora[proj.key] = LoRA(lin.in_features, lin.out_features, cfg.lora.r, cfg.lora.alpha,
                                               cfg.lora.dropout)
                    self._lora_targets.append(proj)
        self._bias_targets: list[tuple[str, nn.Module]] = []
        if cfg.add_biases:
            for name, lin in anatomy.bias_free_linears(backbone):
                self._bias_targets.append((name, lin))
            for name, norm in [*anatomy.norm_modules(backbone), *extra_norms]:
                if getattr(norm, "bias", None) is None:
                    self._bias_targets.append((name, norm))
            for name, module in self._bias_targets:
                width = module.out_features if isinstance(module, nn.Linear) else module.weight.shape[0]
                self.added_biases[_pkey(name)] = nn.Parameter(torch.zeros(width))
        self._init_weights()
        self._attach(backbone, subs)

    # ---- initialisation -------------------------------------------------------------------------------
    def _init_weights(self) -> None:
        """Reference init: BART N(0, 0.02) for new Linears/Embeddings; T5 PyTorch default; optional zero ups."""
        if self.cfg.init == "normal":
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(module.weight, 0.0, 0.02)
                    if getattr(module, "bias", None) is not None:
                        nn.init.zeros_(module.bias)
        if self.cfg.zero_init_up:
            layers = [layer for d in (self.encoder_modules, self.decoder_modules, self.value) for m in d.values()
                      for layer in up_layers(m)]
            layers += [layer for g in self.gates.values() for layer in g.output_layers() if layer is not None]
            for layer in layers:
                for p in layer.parameters(recurse=False):
                    nn.init.zeros_(p)
            for g in self.gates.values():
                if g.granularity == "middley":
                    nn.init.zeros_(g.z)

    # ---- hooks ------------------------------------------------------------------------------------------
    def _attach(self, backbone: nn.Module, subs: list[anatomy.SubLayer]) -> None:
        for sub in subs:
            touched = (sub.key in self.encoder_modules or sub.key in self.gates or sub.key in self.decoder_modules
                       or self.hyper is not None)
            if not touched:
                continue
            if sub.key in self.gates:
                self._handles.append(sub.x_module.register_forward_pre_hook(self._capture(sub.key), with_kwargs=True))
            self._handles.append(sub.h_module.register_forward_hook(self._sublayer_hook(sub)))
        for sub in subs:
            if sub.key in self.value:
                v = anatomy.projections_of(sub.h_module, self.family)["v"]
                self._handles.append(v.register_forward_hook(self._add_hook(self.value[sub.key])))
        for proj in self._lora_targets:
            self._handles.append(proj.linear.register_forward_hook(self._add_hook(self.lora[proj.key])))
        for name, module in self._bias_targets:
            self._handles.append(module.register_forward_hook(self._bias_hook(_pkey(name))))

    def _capture(self, key: str):
        def hook(module, args, kwargs):
            self._x[key] = args[0] if args else kwargs["hidden_states"]
        return hook

    def _sublayer_hook(self, sub: anatomy.SubLayer):
        def hook(module, args, output):
            h = output if sub.h_index is None else output[sub.h_index]
            h = self.transform(sub, h)
            if sub.h_index is None:
                return h
            return tuple(output[:sub.h_index]) + (h,) + tuple(output[sub.h_index + 1:])
        return hook

    @staticmethod
    def _add_hook(module: nn.Module):
        def hook(linear, args, output):
            return output + module(args[0])
        return hook

    def _bias_hook(self, key: str):
        def hook(module, args, output):
            return output + self.added_biases[key]
        return hook

    def transform(self, sub: anatomy.SubLayer, h: torch.Tensor) -> torch.Tensor:
        """H → H + ΔH(H) (+ HyperFormer adapter) → s · G(X, H1) ⊙ H1 for one sub-layer."""
        key = sub.key
        mods = self.encoder_modules if sub.stack == "encoder" else self.decoder_modules
        if key in mods:
            h = h + mods[key](h)
        if self.hyper is not None:
            h = h + self.hyper[sub.stack](self.task_embedding(), sub.layer, sub.kind, h)
        if key in self.gates:
            h = self.gates[key](self._x.pop(key), h, self.encoder_mask)
        return h

    def task_embedding(self) -> torch.Tensor:
        tasks = self.cfg.hyperformer.tasks
        if self.task not in tasks:
            raise VlpetError(f"HyperFormer needs the current task, one of {tasks}; got {self.task!r}")
        return self.task_embeddings[tasks.index(self.task)]

    def remove_hooks(self) -> None:
        """Detach from the backbone (the backbone then computes as if no PET were applied)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def set_trainable(backbone: nn.Module, pet: PetModules, projector: nn.Module, policy: TrainablePolicy) -> None:
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
