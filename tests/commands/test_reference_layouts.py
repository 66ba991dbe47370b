"""import-reference round trips for every preset on both backbones, from reference-layout state dicts.

The layouts are written from the key names of the reference's checkpoints (the golden `LAST.pth` files in
tests/golden and the spec's naming): per-task copies under `adapters.<task>` for `--use_single_*` modules, PHM
`phm_rule`/`W`/`b`, `lora_As`/`lora_Bs`, `prompt_modules.prompts.<task>.prefix_embedding.{0,1,3}`, HyperFormer's
`task_embed`/`adapter_layers_hyper_net`, T5 sub-layers `block.N.layer.{0,1,2}`. T5 LoRA has no reference layout (the
reference's T5 has no LoRA layers); the LoRA names are written as its BART ones would be on T5's projections."""

import pytest
import torch
from safetensors.torch import load_file

from vlpet_cli.artifacts import ADAPTER_WEIGHTS
from vlpet_cli.presets import resolve
from vlpet_cli.reference import import_reference_checkpoint
from vlpet_cli.vl.model import build_model

FEAT = 16
TASKS = ("vqa", "gqa", "nlvr", "caption")
PHM = {"rule": "phm_rule", "weight": "W", "bias": "b"}
PRESETS = ["vlpet-large", "vlpet-middlex", "vlpet-middley", "vlpet-small", "vl-adapter", "compacter", "lora",
           "prompt-tuning", "hyperformer", "compacter-glarge-lw", "compacter-gmiddlex-lw", "compacter-gmiddley-lw",
           "compacter-gsmall-lw", "bitfit", "full-finetune"]
GATES = {"large": None, "middlex": "middle_xy_add", "middley": "middle_ia3_add", "small": "small_xy_cat"}


def _sub(family: str, stack: str, layer: str, kind: str) -> str:
    """The reference's prefix of one sub-layer."""
    if family == "bart":
        return f"model.{stack}.layers.{layer}."
    index = {"attn": 0, "ffn": 1} if stack == "encoder" else {"self": 0, "cross": 1, "ffn": 2}
    return f"{stack}.block.{layer}.layer.{index[kind]}."


def _adapter_word(family: str, stack: str, kind: str) -> str:
    if stack == "encoder":
        return {"attn": "attn", "ffn": "ff"}[kind]
    return {"self": "self_attn" if family == "bart" else "attn", "cross": "enc_attn", "ffn": "ff"}[kind]


def _per_task(prefix: str, suffix: str, tensor) -> dict:
    return {f"{prefix}{task}{suffix}": tensor.clone() for task in TASKS}


def reference_name(name: str, tensor, family: str, heads: int, phm: bool) -> dict:
    """The reference checkpoint's key(s) holding the vlpet tensor `name`."""
    root = "model." if family == "bart" else ""
    parts = name.split(".")
    if parts[0] == "projector":
        return {f"{root}encoder.visual_embedding.{name[len('projector.'):]}": tensor}
    if parts[0] == "backbone":
        return {name[len("backbone."):]: tensor}
    group = parts[1]
    if group in ("encoder_modules", "decoder_modules"):
        stack, layer, kind = parts[2].split("_")
        which, p = parts[3], parts[4]
        site = _sub(family, stack, layer, kind)
        word = _adapter_word(family, stack, kind)
        if heads > 1:
            if which == "up":
                return {f"{site}{word}_adapter_multihead_up.{p}": tensor}
            return {f"{site}{word}_adapter_multihead_down.{h}.{p}": c for h, c in enumerate(tensor.chunk(heads, 0))}
        return _adapter(site, word, which, p, tensor, phm)
    if group == "gates":
        stack, layer, kind = parts[2].split("_")
        site = _sub(family, stack, layer, kind)
        stem = f"{site}encoder_{'attn' if kind == 'attn' else 'ff'}_adapter_gating_"
        rest = parts[3:]
        if rest[0] in ("down", "up"):
            return {f"{stem}large_x_{rest[0]}.{rest[1]}": tensor}
        if rest[0] == "z":
            return {f"{stem}middle_ia3_add": tensor}
        return {"GATE:" + stem + f".{rest[1]}": tensor}  # resolved by the caller: middlex or small
    if group == "value":
        _, layer, _ = parts[2].split("_")
        site = (f"model.decoder.layers.{layer}.encoder_attn." if family == "bart"
                else f"decoder.block.{layer}.layer.1.EncDecAttention.")
        return _adapter(site, "attn_value_parallel", parts[3], parts[4], tensor, phm)
    if group == "lora":
        stack, layer, att, proj = parts[2].split("_")
        if family == "bart":
            module = {"attn": "self_attn", "self": "self_attn", "cross": "encoder_attn"}[att]
            site = f"model.{stack}.layers.{layer}.{module}.{ {'o': 'out'}.get(proj, proj)}_proj."
        else:
            module = "EncDecAttention" if att == "cross" else "SelfAttention"
            site = f"{stack}.block.{layer}.layer.{1 if att == 'cross' else 0}.{module}.{proj}."
        return _per_task(f"{site}lora_{parts[3]}s.", "", tensor)
    if group == "prompt":
        index = {"embedding": "0", "mlp.0": "1", "mlp.2": "3"}[".".join(parts[2:-1])]
        return _per_task(f"{root}encoder.prompt_modules.prompts.", f".prefix_embedding.{index}.{parts[-1]}", tensor)
    if group == "task_embeddings":  # one per task; the reference's caption task is vlpet's coco
        task = {"coco": "caption"}.get(parts[2], parts[2])
        return {f"{root}{where}.task_to_embeddings.{task}": tensor.clone() for where in
                ("shared_task_embed", "encoder.task_embed", "decoder.task_embed")}
    if group == "hyper":
        stack = parts[2]
        base = f"{root}{stack}.adapter_layers_hyper_net."
        if parts[3] == "layer_embedding":
            return {f"{base}layer_id_embeddings.weight": tensor}
        if parts[3] == "mlp":
            if parts[4] == "3":
                return {f"{base}LayerNorm.{parts[5]}": tensor}
            return {f"{base}task_hypernet.task_embeding_generator.{parts[4]}.{parts[5]}": tensor}
        block = {"attn": "self_attention", "self": "self_attention", "cross": "cross_attention",
                 "ffn": "feed_forward"}[parts[4]]
        which, gen = parts[5].split("_")
        return {f"{base}{block}_{which}_sampler_hyper_net.{gen}_generator.0.{parts[6]}": tensor}
    raise AssertionError(f"no reference layout for {name}")


def _adapter(site: str, word: str, which: str, p: str, tensor, phm: bool) -> dict:
    """Per-task copies of one adapter tensor; PHM layers use phm_rule / W / b."""
    return _per_task(f"{site}{word}_adapter.adapters.", f".{which}_sampler.{PHM[p] if phm else p}", tensor)


def trainable_layout(model, family: str, preset) -> dict[str, dict]:
    """{vlpet name: {reference key: tensor}} for every trainable tensor of a vlpet model (a per-task module: every
    task's copy; a multi-head down projection: every head)."""
    heads = preset.pet.encoder.heads if preset.pet.encoder and preset.pet.encoder.kind == "adapter" else 1
    gate = preset.pet.gate.granularity if preset.pet.gate else None
    phm = {n.rsplit(".", 1)[0] for n, _ in model.named_parameters() if n.endswith(".rule")}
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        keys, in_phm = {}, name.rsplit(".", 1)[0] in phm
        for key, value in reference_name(name, p.detach().clone(), family, heads, in_phm).items():
            if key.startswith("GATE:"):
                stem, param = key[len("GATE:"):].rsplit(".", 1)
                key = f"{stem.rstrip('.')}{GATES[gate]}.{param}"
            keys[key] = value
        out[name] = keys
    return out


def reference_layout(model, family: str, preset) -> dict:
    """The whole reference state dict of a vlpet model: frozen backbone, projector, every module."""
    state = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    root = "model." if family == "bart" else ""
    state[f"{root}encoder.visual_embedding.obj_order_embedding.weight"] = \
        model.backbone.get_input_embeddings().weight.detach().clone()
    for keys in trainable_layout(model, family, preset).values():
        state.update(keys)
    return {f"module.{k}": v for k, v in state.items()}


def randomised(backbone, preset: str, overrides: list[str]):
    model, _ = build_model(resolve(preset, overrides, backbone=str(backbone)))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen))
    return model


# `make test-fast` imports three layouts (adapters with gates, PHM, the hyper-network) on both backbones; the
# others are slow-marked: ~0.2 s each, 4 s together.
FAST = ("vlpet-large", "compacter", "hyperformer")


@pytest.mark.parametrize("family", ["bart", "t5"])
@pytest.mark.parametrize("preset", [p if p in FAST else pytest.param(p, marks=pytest.mark.slow) for p in PRESETS])
def test_every_method_imports_from_its_reference_layout(tmp_path, tiny_dirs, family, preset):
    overrides = [f"model.feat_dim={FEAT}"]
    if family == "t5" and preset == "bitfit":  # the reference's T5 BitFit: no added biases, the position tables
        overrides += ["pet.add_biases=false", "pet.trainable.relative_attention_bias=true"]
    torch.manual_seed(0)
    model = randomised(tiny_dirs[family], preset, overrides)
    resolved = resolve(preset, overrides, backbone=str(tiny_dirs[family]))
    pth = tmp_path / "LAST.pth"
    torch.save(reference_layout(model, family, resolved), pth)
    torch.manual_seed(0)
    report = import_reference_checkpoint(pth, preset, tmp_path / "a", str(tiny_dirs[family]), overrides)
    saved = load_file(str(tmp_path / "a" / ADAPTER_WEIGHTS))
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(saved[name], p.detach()), name
    if preset not in ("bitfit", "full-finetune"):
        torch.manual_seed(0)
        guessed = import_reference_checkpoint(pth, None, tmp_path / "b", str(tiny_dirs[family]), overrides)
        assert guessed["preset"] == preset
    assert report["preset"] == preset


@pytest.mark.parametrize("family", ["bart", "t5"])
@pytest.mark.parametrize("preset", PRESETS)
def test_decay_groups_are_the_reference_rule_on_the_reference_names(tiny_dirs, family, preset):
    """The reference exempts from weight decay every tensor whose name *there* holds 'bias' or 'LayerNorm.weight'
    (its trainer_base.py); vlpet derives its groups from the methods' declared layouts (pet/reference_names.py),
    checked here against the layouts written out above."""
    from vlpet_cli.pet.decay import no_decay_names

    overrides = [f"model.feat_dim={FEAT}"]
    if family == "t5" and preset == "bitfit":  # as above: the reference's T5 BitFit
        overrides += ["pet.add_biases=false", "pet.trainable.relative_attention_bias=true"]
    resolved = resolve(preset, overrides, backbone=str(tiny_dirs[family]))
    model, _ = build_model(resolved, weights=False)
    exempt = set()
    for name, keys in trainable_layout(model, family, resolved).items():
        spared = {any(word in k for word in ("bias", "LayerNorm.weight")) for k in keys}
        assert len(spared) == 1, (name, keys)
        if spared.pop():
            exempt.add(name)
    assert no_decay_names(model, "reference") == exempt
