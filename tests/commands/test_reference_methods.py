"""import-reference for methods without a golden case: reference-layout state dicts built from the reference's key
names (the backbone's own names, `encoder.visual_embedding.*` for the projector, DDP `module.` prefix)."""

import pytest
import torch
from safetensors.torch import load_file

from vlpet_cli.artifacts import ADAPTER_WEIGHTS
from vlpet_cli.presets import resolve
from vlpet_cli.reference import import_reference_checkpoint
from vlpet_cli.vl.model import build_model

FEAT = 16


def randomised(backbone, preset: str, overrides: list[str]):
    """A vlpet model whose trainable tensors hold distinctive random values."""
    model, _ = build_model(resolve(preset, [f"model.feat_dim={FEAT}", *overrides], backbone=str(backbone)))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen))
    return model


def reference_layout(model, family: str) -> dict:
    """What the reference's VLBart/VLT5 would save for a model without added modules (BitFit, full fine-tuning)."""
    root = "model." if family == "bart" else ""
    state = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    state[f"{root}encoder.visual_embedding.obj_order_embedding.weight"] = \
        model.backbone.get_input_embeddings().weight.detach().clone()
    for name, tensor in model.projector.state_dict().items():
        state[f"{root}encoder.visual_embedding.{name}"] = tensor.clone()
    return {f"module.{k}": v for k, v in state.items()}


@pytest.mark.parametrize("family,preset,overrides", [
    ("bart", "bitfit", []),
    ("bart", "full-finetune", []),
    ("t5", "full-finetune", []),
    # the reference's T5 --unfreeze_bias: no biases to add, the relative-attention tables train instead
    ("t5", "bitfit", ["pet.add_biases=false", "pet.trainable.relative_attention_bias=true"]),
])
def test_methods_without_modules_round_trip(tmp_path, tiny_dirs, family, preset, overrides):
    torch.manual_seed(0)
    model = randomised(tiny_dirs[family], preset, overrides)
    pth = tmp_path / "LAST.pth"
    torch.save(reference_layout(model, family), pth)
    torch.manual_seed(0)
    report = import_reference_checkpoint(pth, preset, tmp_path / "a", str(tiny_dirs[family]),
                                         [f"model.feat_dim={FEAT}", *overrides])
    assert not report["warnings"] or preset == "full-finetune"
    saved = load_file(str(tmp_path / "a" / ADAPTER_WEIGHTS))
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for name, tensor in trained.items():
        assert torch.equal(saved[name], tensor.detach()), name
    if "pet.trainable.relative_attention_bias=true" in overrides:
        assert any("relative_attention_bias" in n for n in saved)


def test_relative_attention_bias_policy_trains_only_those_tables(tiny_dirs):
    model, _ = build_model(resolve("vl-adapter", ["pet.trainable.relative_attention_bias=true"],
                                   backbone=str(tiny_dirs["t5"])))
    names = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert {n for n in names if "relative_attention_bias" in n} == {
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"}
    default, _ = build_model(resolve("vl-adapter", [], backbone=str(tiny_dirs["t5"])))
    assert not any("relative_attention_bias" in n for n, p in default.backbone.named_parameters() if p.requires_grad)
