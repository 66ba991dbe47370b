"""vlpet merge: averaging adapters, folding into the backbone (and bundles), PEFT export, loading any of them."""

import json
from pathlib import Path

import pytest
import torch

from vlpet_cli.artifacts import OBJ_ROWS, kind_of, load_adapter, load_any, load_bundle, load_folded, save_adapter
from vlpet_cli.errors import VlpetError
from vlpet_cli.merge import average_adapters, export_peft, fold_adapter, merge_weights
from vlpet_cli.presets import resolve
from vlpet_cli.runs import locate
from vlpet_cli.vl.model import build_model

FEAT = 16


def trained_adapter(directory: Path, backbone: Path, preset: str = "lora", *overrides, seed: int = 0,
                    noise_seed: int = 1) -> Path:
    """Build a model (seed fixes the random object-order rows), perturb every trainable tensor, save an adapter."""
    torch.manual_seed(seed)
    resolved = resolve(preset, [f"model.feat_dim={FEAT}", *overrides], backbone=str(backbone))
    model, _ = build_model(resolved, weights=True)
    gen = torch.Generator().manual_seed(noise_seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    save_adapter(directory, model, resolved)
    return directory


def seeded(fn, *args, **kwargs):
    """Call fn after seeding: building a tiny BART draws its <extra_id> embedding rows from the global RNG, and
    the backbone fingerprint of state.backbone_identity covers those rows."""
    torch.manual_seed(0)
    return fn(*args, **kwargs)


def batch_for(tok):
    gen = torch.Generator().manual_seed(7)
    enc = tok(["vqa: what color is the circle ?", "vqa: how many"], padding=True, return_tensors="pt")
    labels = tok(["red", "2 circle"], padding=True, return_tensors="pt").input_ids
    labels[labels == tok.pad_token_id] = -100
    return {"task": "vqa", "input_ids": enc.input_ids, "attention_mask": enc.attention_mask,
            "vis_feats": torch.randn(2, 1, 49, FEAT, generator=gen), "labels": labels}


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    """Decoder logits of the full VL forward (visual tokens included) in eval mode."""
    model.eval()
    enc, mask = model.encode(batch)
    out = model.backbone(encoder_outputs=enc, attention_mask=mask,
                         decoder_input_ids=model.decoder_inputs(batch["labels"]), return_dict=True)
    return out.logits


# ---- average ----------------------------------------------------------------------------------------------
def test_average_is_the_weighted_mean_of_every_tensor(tiny_dirs, tmp_path):
    from safetensors.torch import load_file

    a = trained_adapter(tmp_path / "a", tiny_dirs["bart"], noise_seed=1)
    b = trained_adapter(tmp_path / "b", tiny_dirs["bart"], noise_seed=2)
    summary = average_adapters([a, b], tmp_path / "avg", weights=[1.0, 3.0])
    assert summary["coefficients"] == [0.25, 0.75]
    ta, tb = load_file(str(a / "adapter.safetensors")), load_file(str(b / "adapter.safetensors"))
    merged = load_file(str(tmp_path / "avg" / "adapter.safetensors"))
    assert set(merged) == set(ta)
    for name, tensor in merged.items():
        if name == OBJ_ROWS:
            assert torch.equal(tensor, ta[name])
            continue
        want = (0.25 * ta[name].double() + 0.75 * tb[name].double()).float()
        assert torch.equal(tensor, want), name
        assert not torch.equal(tensor, ta[name])
    meta = json.loads((tmp_path / "avg" / "vlpet_config.json").read_text())
    assert meta["merge"]["weights"] == [1.0, 3.0] and len(meta["merge"]["sources"]) == 2
    model, _, _ = seeded(load_adapter, tmp_path / "avg")  # a normal adapter directory
    assert torch.equal(model.pet.lora["encoder_0_attn_q"].A, merged["pet.lora.encoder_0_attn_q.A"])


def test_sum_mode_is_scaled_sum(tiny_dirs, tmp_path):
    from safetensors.torch import load_file

    a = trained_adapter(tmp_path / "a", tiny_dirs["t5"], noise_seed=1)
    b = trained_adapter(tmp_path / "b", tiny_dirs["t5"], noise_seed=2)
    average_adapters([a, b], tmp_path / "sum", weights=[1.0, -0.5], mode="sum", scale=2.0)
    ta, tb = load_file(str(a / "adapter.safetensors")), load_file(str(b / "adapter.safetensors"))
    merged = load_file(str(tmp_path / "sum" / "adapter.safetensors"))
    name = "projector.feat_embedding.0.weight"
    torch.testing.assert_close(merged[name], (2.0 * ta[name].double() - 1.0 * tb[name].double()).float())


def test_merge_weights_are_checked():
    assert merge_weights(2, None, "mean", 1.0) == [0.5, 0.5]
    with pytest.raises(VlpetError, match="one weight per adapter"):
        merge_weights(2, [1.0], "mean", 1.0)
    with pytest.raises(VlpetError, match="non-negative"):
        merge_weights(2, [1.0, -1.0], "mean", 1.0)


def test_average_refuses_a_different_preset(tiny_dirs, tmp_path):
    a = trained_adapter(tmp_path / "a", tiny_dirs["bart"])
    b = trained_adapter(tmp_path / "b", tiny_dirs["bart"], "lora", "pet.lora.alpha=16")
    with pytest.raises(VlpetError, match=r"pet\.lora\.alpha: 32\.0 vs 16\.0"):
        average_adapters([a, b], tmp_path / "avg")
    assert not (tmp_path / "avg").exists()


def test_average_refuses_a_different_backbone(tiny_dirs, tmp_path):
    a = trained_adapter(tmp_path / "a", tiny_dirs["bart"])
    b = trained_adapter(tmp_path / "b", tiny_dirs["bart"], noise_seed=2)
    meta = json.loads((b / "vlpet_config.json").read_text())
    meta["backbone"]["fingerprint"] = "0123456789abcdef"
    (b / "vlpet_config.json").write_text(json.dumps(meta))
    with pytest.raises(VlpetError, match="backbone fingerprint"):
        average_adapters([a, b], tmp_path / "avg")
    t5 = trained_adapter(tmp_path / "t5", tiny_dirs["t5"])
    with pytest.raises(VlpetError, match="backbone model_type: 'bart' vs 't5'"):
        average_adapters([a, t5], tmp_path / "avg")


def test_average_refuses_different_shapes_and_seeds(tiny_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    a = trained_adapter(tmp_path / "a", tiny_dirs["bart"])
    b = trained_adapter(tmp_path / "b", tiny_dirs["bart"], noise_seed=2)
    tensors = load_file(str(b / "adapter.safetensors"))
    tensors["pet.lora.encoder_0_attn_q.A"] = torch.zeros(4, 32)
    save_file(tensors, str(b / "adapter.safetensors"))
    with pytest.raises(VlpetError, match=r"pet\.lora\.encoder_0_attn_q\.A: shape \(128, 32\) vs \(4, 32\)"):
        average_adapters([a, b], tmp_path / "avg")
    with pytest.raises(VlpetError, match="one of the inputs"):
        average_adapters([a, b], a)
    # vlpet draws the object-order rows from a fixed generator, so runs with different seeds can be averaged ...
    c = trained_adapter(tmp_path / "c", tiny_dirs["t5"], seed=0)
    d = trained_adapter(tmp_path / "d", tiny_dirs["t5"], seed=5)
    average_adapters([c, d], tmp_path / "avg-seeds")
    # ... but adapters whose rows differ (e.g. imported from two reference runs) cannot
    tensors = load_file(str(d / "adapter.safetensors"))
    tensors["obj_order_rows"] = tensors["obj_order_rows"] + 1
    save_file(tensors, str(d / "adapter.safetensors"))
    with pytest.raises(VlpetError, match="object-order embedding rows"):
        average_adapters([c, d], tmp_path / "avg")


# ---- fold -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["bart", "t5"])
def test_folded_lora_gives_the_same_logits(family, tiny_dirs, tmp_path):
    adapter = trained_adapter(tmp_path / "adapter", tiny_dirs[family])
    model, tok, _ = seeded(load_adapter, adapter)
    batch = batch_for(tok)
    want = logits(model, batch)
    summary = seeded(fold_adapter, adapter, tmp_path / "folded")
    assert summary["folded"][0].startswith("LoRA") and not summary["kept"]
    folded_dir = tmp_path / "folded"
    assert (folded_dir / "config.json").exists() and (folded_dir / "projector.safetensors").exists()
    projector_meta = json.loads((folded_dir / "projector.json").read_text())
    assert projector_meta == {"format": "vlpet-projector/1", "family": family, "d_model": 32, "feat_dim": FEAT,
                              "n_boxes": 36}
    folded, _, preset = load_folded(folded_dir)
    assert preset.pet.lora is None and len(folded.pet.lora) == 0
    torch.testing.assert_close(logits(folded, batch), want, atol=1e-5, rtol=0)
    unfolded, _, _ = seeded(load_adapter, adapter)
    unfolded.pet.remove_hooks()
    assert (logits(unfolded, batch) - want).abs().max() > 1e-3  # the LoRA really changes the output
    # a folded directory is also a plain Hugging Face model
    from transformers import AutoModelForSeq2SeqLM

    plain = AutoModelForSeq2SeqLM.from_pretrained(folded_dir).eval()
    ids = batch["input_ids"]
    with torch.no_grad():
        with_hooks = model.backbone(input_ids=ids, decoder_input_ids=ids).logits
        torch.testing.assert_close(plain(input_ids=ids, decoder_input_ids=ids).logits, with_hooks, atol=1e-5,
                                   rtol=0)


def test_fold_keeps_trained_biases_bitfit(tiny_dirs, tmp_path):
    adapter = trained_adapter(tmp_path / "adapter", tiny_dirs["bart"], "bitfit")
    model, tok, _ = seeded(load_adapter, adapter)
    batch = batch_for(tok)
    seeded(fold_adapter, adapter, tmp_path / "folded")
    assert kind_of(tmp_path / "folded") == "folded"
    folded, _, _ = load_any(tmp_path / "folded")
    torch.testing.assert_close(logits(folded, batch), logits(model, batch), atol=1e-5, rtol=0)


def test_fold_refuses_t5_added_biases(tiny_dirs, tmp_path):
    adapter = trained_adapter(tmp_path / "adapter", tiny_dirs["t5"], "bitfit")
    with pytest.raises(VlpetError, match="added biases"):
        seeded(fold_adapter, adapter, tmp_path / "folded")


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_vlpet_small_needs_a_bundle(family, tiny_dirs, tmp_path):
    adapter = trained_adapter(tmp_path / "adapter", tiny_dirs[family], "vlpet-small")
    with pytest.raises(VlpetError) as err:
        seeded(fold_adapter, adapter, tmp_path / "folded")
    message = str(err.value)
    for word in ("encoder adapters", "VL-PET gates", "cross-attention value adapters", "--bundle"):
        assert word in message
    assert not (tmp_path / "folded").exists()
    model, tok, _ = seeded(load_adapter, adapter)
    batch = batch_for(tok)
    summary = seeded(fold_adapter, adapter, tmp_path / "bundle", bundle=True)
    assert len(summary["kept"]) == 3
    assert kind_of(tmp_path / "bundle") == "bundle"
    bundled, _, preset = load_bundle(tmp_path / "bundle")
    assert preset.pet.gate.granularity == "small"
    torch.testing.assert_close(logits(bundled, batch), logits(model, batch), atol=1e-5, rtol=0)


def test_bundle_folds_lora_and_is_self_contained(tiny_dirs, tmp_path):
    adapter = trained_adapter(tmp_path / "adapter", tiny_dirs["bart"], "vlpet-large", "pet.lora.r=4")
    model, tok, _ = seeded(load_adapter, adapter)
    batch = batch_for(tok)
    seeded(fold_adapter, adapter, tmp_path / "bundle", bundle=True)
    moved = tmp_path / "elsewhere"
    (tmp_path / "bundle").rename(moved)
    meta = json.loads((moved / "vlpet_config.json").read_text())
    assert meta["preset"]["pet"]["lora"] is None and meta["folded"][0] == "LoRA (12 matrices)"
    bundled, _, _ = load_any(moved)
    torch.testing.assert_close(logits(bundled, batch), logits(model, batch), atol=1e-5, rtol=0)


def test_load_any_reads_adapters_and_refuses_other_folders(tiny_dirs, tmp_path):
    adapter = trained_adapter(tmp_path / "run" / "adapter", tiny_dirs["t5"])
    assert kind_of(adapter) == "adapter"
    _, _, preset = seeded(load_any, locate(tmp_path / "run").directory)  # a folder holding adapter/ means it
    assert preset.pet.lora is not None
    with pytest.raises(VlpetError, match="neither an adapter"):
        load_any(tmp_path)


# ---- PEFT export ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["bart", "t5"])
def test_peft_export_loads_with_peft(family, tiny_dirs, tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file
    from transformers import AutoModelForSeq2SeqLM

    adapter = trained_adapter(tmp_path / "adapter", tiny_dirs[family])
    summary = seeded(export_peft, adapter, tmp_path / "peft")
    out = tmp_path / "peft"
    assert summary["lora_modules"] == 12 and any("projector" in n for n in summary["notes"])
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_2_SEQ_LM" and config["peft_type"] == "LORA"
    assert config["r"] == (128 if family == "bart" else 150) and config["lora_alpha"] == 32
    assert sorted(config["target_modules"]) == (["q_proj", "v_proj"] if family == "bart" else ["q", "v"])
    weights = load_file(str(out / "adapter_model.safetensors"))
    name = "model.encoder.layers.0.self_attn.q_proj" if family == "bart" else "encoder.block.0.layer.0.SelfAttention.q"
    assert weights[f"base_model.model.{name}.lora_A.weight"].shape[1] == 32
    assert weights[f"base_model.model.{name}.lora_B.weight"].shape[0] == 32

    model, tok, _ = seeded(load_adapter, adapter)
    model.eval()
    base = AutoModelForSeq2SeqLM.from_pretrained(out / "base")
    loaded = peft.PeftModel.from_pretrained(base, out).eval()
    enc = tok(["what color is the circle ?", "how many"], padding=True, return_tensors="pt")
    dec = tok(["red circle", "2"], padding=True, return_tensors="pt").input_ids
    with torch.no_grad():
        want = model.backbone(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                              decoder_input_ids=dec).logits
        got = loaded(input_ids=enc.input_ids, attention_mask=enc.attention_mask, decoder_input_ids=dec).logits
        model.pet.remove_hooks()
        without = model.backbone(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                                 decoder_input_ids=dec).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (without - want).abs().max() > 1e-3  # the LoRA really changes the output


def test_peft_export_refuses_what_lora_cannot_hold(tiny_dirs, tmp_path):
    pytest.importorskip("peft")
    bitfit = trained_adapter(tmp_path / "bitfit", tiny_dirs["bart"], "bitfit")
    with pytest.raises(VlpetError, match="no LoRA modules"):
        seeded(export_peft, bitfit, tmp_path / "out")
    small = trained_adapter(tmp_path / "small", tiny_dirs["bart"], "vlpet-small", "pet.lora.r=4")
    with pytest.raises(VlpetError, match="VL-PET gates"):
        seeded(export_peft, small, tmp_path / "out")


def test_peft_export_without_base_warns_about_biases(tiny_dirs, tmp_path):
    pytest.importorskip("peft")
    adapter = trained_adapter(tmp_path / "adapter", tiny_dirs["bart"])
    summary = seeded(export_peft, adapter, tmp_path / "out", with_base=False)
    assert not (tmp_path / "out" / "base").exists()
    assert any("NOT in this export" in n for n in summary["notes"])
