"""IA3: rescaling vectors on k, v and the FFN activation; identity at init, trains only its vectors and the
projector, folds into the Linears, and exports to a PEFT IA3 adapter that gives the same logits."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_merge import FEAT, batch_for, logits, seeded, trained_adapter

from vlpet_cli.artifacts import OBJ_ROWS, load_adapter, load_folded
from vlpet_cli.merge import export_peft, fold_adapter
from vlpet_cli.pet import anatomy
from vlpet_cli.presets import resolve
from vlpet_cli.train import param_groups
from vlpet_cli.vl.model import build_model


def make(backbone, *overrides):
    torch.manual_seed(0)
    preset = resolve("ia3", [f"model.feat_dim={FEAT}", *overrides], backbone=str(backbone))
    model, tok = build_model(preset, weights=True)
    return model, tok, preset


def ia3_adapter(directory, backbone, preset="ia3", *overrides):
    """A saved adapter whose IA3 vectors are far from one (U(0.5, 1.5)), so that they change the logits a lot."""
    from safetensors.torch import save_file

    trained_adapter(directory, backbone, preset, *overrides)
    tensors = load_file(str(directory / "adapter.safetensors"))
    gen = torch.Generator().manual_seed(3)
    for name in tensors:
        if name.startswith("pet.ia3."):
            tensors[name] = 0.5 + torch.rand(tensors[name].shape, generator=gen)
    save_file(tensors, str(directory / "adapter.safetensors"))
    return directory


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_vectors_sit_on_k_v_and_the_ffn_input_and_start_at_one(family, tiny_dirs):
    model, tok, _ = make(tiny_dirs[family])
    n_enc, n_dec = anatomy.num_layers(model.backbone)
    keys = set(model.pet.ia3)
    assert len(keys) == n_enc * 3 + n_dec * 5  # enc: k, v, ffn; dec: self k/v, cross k/v, ffn
    assert {"encoder_0_attn_k", "encoder_0_attn_v", "encoder_0_ffn", "decoder_1_cross_k", "decoder_1_ffn"} <= keys
    ffn_in = model.backbone.config.encoder_ffn_dim if family == "bart" else model.backbone.config.d_ff
    assert model.pet.ia3["encoder_0_ffn"].shape == (ffn_in,)
    assert all(torch.equal(v, torch.ones_like(v)) for v in model.pet.ia3.values())
    batch = batch_for(tok)
    want = logits(model, batch)
    model.pet.remove_hooks()
    torch.testing.assert_close(logits(model, batch), want, atol=0, rtol=0)  # ones: exactly the backbone


def test_scales_outputs_of_k_and_inputs_of_fc2(tiny_dirs):
    model, _, _ = make(tiny_dirs["bart"])
    layer = model.backbone.get_encoder().layers[0]
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        model.pet.ia3["encoder_0_attn_k"].uniform_(0.5, 1.5)
        model.pet.ia3["encoder_0_ffn"].uniform_(0.5, 1.5)
        k = x @ layer.self_attn.k_proj.weight.T + layer.self_attn.k_proj.bias
        torch.testing.assert_close(layer.self_attn.k_proj(x), k * model.pet.ia3["encoder_0_attn_k"])
        a = torch.randn(2, 5, 64)
        torch.testing.assert_close(layer.fc2(a), (a * model.pet.ia3["encoder_0_ffn"]) @ layer.fc2.weight.T
                                   + layer.fc2.bias)
    assert "weight" in dict(layer.fc2.named_parameters())  # wrapping leaves the backbone's names stock


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_a_few_steps_change_exactly_the_vectors_and_the_projector(family, tiny_dirs):
    model, tok, preset = make(tiny_dirs[family])
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"pet.ia3.{k}" for k in model.pet.ia3} | {n for n in before if n.startswith("projector.")}
    opt = torch.optim.AdamW(param_groups(model, preset), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(batch_for(tok)).backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bart", "t5"])
def test_trains_on_the_toy_world(family, tmp_path):
    from vlpet_cli.train import resolve_train_preset, train

    backbone = f"tiny-{family}"
    preset = resolve_train_preset("ia3", ["vqa"], "toy", backbone, ["train.max_steps=4", "eval.every=0"])
    train(preset, tmp_path / "run")
    saved = load_file(str(tmp_path / "run" / "adapter" / "adapter.safetensors"))
    torch.manual_seed(preset.train.seed)
    fresh, _ = build_model(preset)
    start = dict(fresh.named_parameters())
    names = set(saved) - {OBJ_ROWS}
    assert {n for n in names if n.startswith("pet.")} == {f"pet.ia3.{k}" for k in fresh.pet.ia3}
    assert names == {n for n, p in start.items() if p.requires_grad}
    moved = [n for n in names if n.startswith("pet.ia3.") and not torch.equal(saved[n], start[n])]
    assert moved, "the IA3 vectors did not train"


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_fold_gives_the_same_logits(family, tiny_dirs, tmp_path):
    adapter = ia3_adapter(tmp_path / "adapter", tiny_dirs[family])
    model, tok, _ = seeded(load_adapter, adapter)
    batch = batch_for(tok)
    want = logits(model, batch)
    summary = seeded(fold_adapter, adapter, tmp_path / "folded")
    n = len(model.pet.ia3)
    assert summary["folded"] == [f"IA3 ({n} vectors)"] and not summary["kept"]
    folded, _, preset = load_folded(tmp_path / "folded")
    assert preset.pet.ia3 is None and len(folded.pet.ia3) == 0
    torch.testing.assert_close(logits(folded, batch), want, atol=1e-5, rtol=0)
    unfolded, _, _ = seeded(load_adapter, adapter)
    unfolded.pet.remove_hooks()
    assert (logits(unfolded, batch) - want).abs().max() > 1e-3  # the vectors really change the output


def test_bundle_folds_ia3_and_keeps_the_adapters(tiny_dirs, tmp_path):
    from vlpet_cli.artifacts import load_bundle

    adapter = ia3_adapter(tmp_path / "adapter", tiny_dirs["t5"], "vlpet-small", "pet.ia3={}")
    model, tok, _ = seeded(load_adapter, adapter)
    batch = batch_for(tok)
    summary = seeded(fold_adapter, adapter, tmp_path / "bundle", bundle=True)
    assert summary["folded"][0].startswith("IA3") and len(summary["kept"]) == 3
    meta = json.loads((tmp_path / "bundle" / "vlpet_config.json").read_text())
    assert meta["preset"]["pet"]["ia3"] is None
    assert not any(k.startswith("pet.ia3.") for k in load_file(str(tmp_path / "bundle" / "adapter.safetensors")))
    bundled, _, _ = load_bundle(tmp_path / "bundle")
    torch.testing.assert_close(logits(bundled, batch), logits(model, batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_peft_export_gives_the_same_logits(family, tiny_dirs, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSeq2SeqLM

    adapter = ia3_adapter(tmp_path / "adapter", tiny_dirs[family])
    out = tmp_path / "peft"
    summary = seeded(export_peft, adapter, out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["task_type"] == "SEQ_2_SEQ_LM"
    leaves = ["fc2", "k_proj", "v_proj"] if family == "bart" else ["k", "v", "wo"]
    assert sorted(config["target_modules"]) == leaves
    assert config["feedforward_modules"] == [leaves[0] if family == "bart" else "wo"]
    assert summary["exported"] == f"{summary['modules']} IA3 vectors"

    model, tok, _ = seeded(load_adapter, adapter)
    model.eval()
    base = AutoModelForSeq2SeqLM.from_pretrained(out / "base")
    loaded = peft.PeftModel.from_pretrained(base, out).eval()
    n_vectors = sum(1 for n, _ in loaded.named_parameters() if "ia3_l" in n)
    assert n_vectors == len(model.pet.ia3)
    batch = batch_for(tok)
    with torch.no_grad():
        embeds, mask, _ = model.embed(batch)
        dec = model.decoder_inputs(batch["labels"])
        want = model.backbone(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=dec).logits
        got = loaded(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=dec).logits
        model.pet.remove_hooks()
        without = model.backbone(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=dec).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (without - want).abs().max() > 1e-3


def test_peft_export_refuses_ia3_with_adapters(tiny_dirs, tmp_path):
    pytest.importorskip("peft")
    from vlpet_cli.errors import VlpetError

    adapter = trained_adapter(tmp_path / "adapter", tiny_dirs["bart"], "vlpet-small", "pet.ia3={}")
    with pytest.raises(VlpetError, match="is more than IA3 vectors: encoder adapters"):
        seeded(export_peft, adapter, tmp_path / "out")
