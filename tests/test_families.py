"""The backbone families: every preset x every supported model type builds, trains one step (gradients reach
exactly the trainable parameters), saves and reloads on a tiny config of that model type; the built-in configs
count; `vlpet train` runs on a tiny Flan-T5-style and a tiny mBART-style directory; other types are refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tokenizer

from vlpet_cli import backbones
from vlpet_cli.artifacts import load_adapter, save_adapter
from vlpet_cli.errors import VlpetError
from vlpet_cli.pet import anatomy
from vlpet_cli.pet.budget import budget
from vlpet_cli.presets import list_presets, load_raw, resolve
from vlpet_cli.vl.model import build_model

FEAT = 16
KINDS = ("t5", "flan-t5", "mt5", "umt5", "bart", "mbart")


def tiny_config(kind: str, vocab: int, d: int = 32, ffn: int = 64):
    """A tiny config of one supported model type (random weights are enough: the matrix tests mechanics)."""
    from transformers import BartConfig, MBartConfig, MT5Config, T5Config, UMT5Config

    t5 = dict(vocab_size=vocab, d_model=d, d_kv=d // 4, d_ff=ffn, num_layers=2, num_heads=4, pad_token_id=0,
              eos_token_id=1, decoder_start_token_id=0)
    bart = dict(vocab_size=vocab, d_model=d, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn, max_position_embeddings=64,
                pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=None,
                forced_eos_token_id=None)
    return {"t5": lambda: T5Config(**t5),
            "flan-t5": lambda: T5Config(**t5, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
            "mt5": lambda: MT5Config(**t5, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
            "umt5": lambda: UMT5Config(**t5, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
            "bart": lambda: BartConfig(**bart),
            "mbart": lambda: MBartConfig(**bart, scale_embedding=True)}[kind]()


def save_tiny(directory: Path, kind: str, tokenizer) -> Path:
    """A tiny random model of `kind` with `tokenizer`, saved as a Hugging Face model directory."""
    torch.manual_seed(0)
    if kind == "mbart":
        tokenizer.add_special_tokens({"additional_special_tokens": [backbones.MBART_LANGUAGE]})
    config = tiny_config(kind, len(tokenizer))
    model = backbones.model_class(config.model_type)(config)
    if backbones.head_is_untied(config):  # a head of its own, as the real checkpoints have
        backbones.untie_head(model, torch.randn_like(model.get_input_embeddings().weight))
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    fam = {k: "bart" if "bart" in k else "t5" for k in KINDS}
    return {k: save_tiny(root / k, k, make_tokenizer(fam[k])) for k in KINDS}


def batch_for(tok):
    enc = tok(["vqa: what color is the circle ?", "vqa: how many"], padding=True, return_tensors="pt")
    labels = tok(["red", "2 circle"], padding=True, return_tensors="pt").input_ids
    labels[labels == tok.pad_token_id] = -100
    return {"task": "vqa", "input_ids": enc.input_ids, "attention_mask": enc.attention_mask,
            "vis_feats": torch.randn(2, 2, 49, FEAT), "labels": labels}


def check_preset(preset: str, kind: str, directory: Path, tmp_path: Path) -> None:
    """Build, one training step on exactly the trainable parameters, save, reload, same loss."""
    family = "bart" if "bart" in kind else "t5"
    if family not in load_raw(preset).get("families", ["bart", "t5"]):
        pytest.skip(f"{preset} is not for {family}")
    torch.manual_seed(0)
    resolved = resolve(preset, [f"model.feat_dim={FEAT}"], backbone=str(directory))
    model, tok = build_model(resolved, weights=True)
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = model(batch_for(tok))
    assert torch.isfinite(loss)
    loss.backward()
    # HyperFormer: the other tasks' embeddings get no gradient (each task's is its own parameter, as the reference's)
    idle = {n for n in trainable if n.startswith("pet.task_embeddings.") and not n.endswith(".vqa")}  # a vqa batch
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable - idle
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n not in trainable)
    save_adapter(tmp_path / "adapter", model, resolved)
    model.eval()
    torch.manual_seed(1)
    batch = batch_for(tok)
    with torch.no_grad():
        want = model(batch)
    again, _, _ = load_adapter(tmp_path / "adapter")
    again.eval()
    with torch.no_grad():
        assert torch.allclose(again(batch), want, atol=1e-5)


FAST = ("vlpet-large", "lst", "lora")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("preset", FAST)
def test_family_matrix_fast(preset, kind, family_dirs, tmp_path):
    check_preset(preset, kind, family_dirs[kind], tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("preset", [p for p in list_presets() if p not in FAST])
def test_family_matrix(preset, kind, family_dirs, tmp_path):
    check_preset(preset, kind, family_dirs[kind], tmp_path)


@pytest.mark.parametrize("kind", KINDS)
def test_each_family_keeps_its_architecture(kind, family_dirs):
    model, tok = backbones.build(backbones.resolve(str(family_dirs[kind])))
    head, words = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    untied = kind in ("flan-t5", "mt5", "umt5")
    assert (head is not words) == untied  # resizing must not tie a checkpoint's own head back
    assert head.shape == words.shape == (len(tok), model.config.d_model)
    if untied:
        saved = backbones.model_class(model.config.model_type).from_pretrained(family_dirs[kind])
        assert torch.equal(head[: saved.lm_head.weight.shape[0]], saved.lm_head.weight)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    assert ({"wi_0", "wi_1"} <= names) == (kind in ("flan-t5", "mt5", "umt5"))
    assert len(anatomy.sublayers(model)) == 2 * 2 + 2 * 3
    biased = anatomy.encoder_position_biases(model)
    assert len(biased) == {"umt5": 2, "bart": 0, "mbart": 0}.get(kind, 1)
    if kind == "mbart":  # the decoder starts with the target language code
        assert model.config.decoder_start_token_id == tok.convert_tokens_to_ids("en_XX")
        assert model.generation_config.decoder_start_token_id == model.config.decoder_start_token_id
        assert {"model.encoder.layer_norm.weight", "model.decoder.layer_norm.weight"} <= {
            n for side in anatomy.layer_norm_names(model).values() for n in side}


def test_umt5_text_only_bias_in_every_layer(family_dirs):
    model, tok = build_model(resolve("vlpet-large", [f"model.feat_dim={FEAT}"], backbone=str(family_dirs["umt5"])))
    biases = []
    for attention in anatomy.encoder_position_biases(model.backbone):
        compute = attention.compute_bias
        attention.compute_bias = (lambda f: lambda *a, **k: biases.append(f(*a, **k)) or biases[-1])(compute)
    batch = batch_for(tok)
    model.encode(batch)
    text = batch["input_ids"].shape[1]
    assert len(biases) == 2
    for bias in biases:
        assert bias[..., :text, :text].abs().sum() > 0
        assert bias[..., text:, :].abs().sum() == 0 and bias[..., :, text:].abs().sum() == 0


BUILTIN_TOTALS = {  # the bare Hugging Face models, original vocabulary (their hub model cards' parameter counts)
    "bart-base": 139_420_416, "t5-base": 222_903_552, "bart-large": 406_291_456, "t5-large": 737_668_096,
    "flan-t5-base": 247_577_856, "mt5-base": 582_401_280}


@pytest.mark.parametrize("name", list(BUILTIN_TOTALS))
@pytest.mark.slow  # four full-size models on the meta device: 0.1-0.7 s each
def test_builtin_configs_count(name):
    bb = backbones.resolve(name)
    config = backbones.load_config(bb)
    with torch.device("meta"):
        bare = backbones.model_class(config.model_type)(config)
        if backbones.head_is_untied(config):
            backbones.untie_head(bare, torch.empty_like(bare.get_input_embeddings().weight))
    assert sum(p.numel() for p in bare.parameters()) == BUILTIN_TOTALS[name]
    for preset in ("vlpet-large", "lst", "full-finetune"):
        model, _ = build_model(resolve(preset, backbone=name), weights=False)
        b = budget(model)
        assert 0 < b["trainable"] <= b["total"] and b["total"] > BUILTIN_TOTALS[name]
        assert (b["percent"] == 100.0) == (preset == "full-finetune")


def test_other_model_types_are_refused_with_the_supported_list(tmp_path):
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(VlpetError, match="model type 'gpt2' is not supported.*bart, mbart, t5, mt5, umt5"):
        backbones.resolve(str(tmp_path / "gpt"))


def shipped_tokenizer_dir(directory: Path, kind: str) -> Path:
    """A tiny model directory of `kind` with the shipped tiny tokenizer of its family copied in."""
    from transformers import AutoTokenizer

    source = backbones.ASSETS / ("tiny-bart" if "bart" in kind else "tiny-t5")
    tmp = directory.parent / f"{directory.name}-tok"
    tmp.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, tmp / name)
    return save_tiny(directory, kind, AutoTokenizer.from_pretrained(tmp))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["flan-t5", "mbart"])
def test_vlpet_train_on_a_family_directory(kind, tmp_path):
    directory = shipped_tokenizer_dir(tmp_path / kind, kind)
    out = subprocess.run([sys.executable, "-m", "vlpet_cli", "train", "--preset", "vlpet-small", "--task", "coco",
                          "--data-root", "toy", "--backbone", str(directory), "--runs-dir", str(tmp_path / "runs"),
                          "--name", kind, "data.limit=16", "train.epochs=1", "eval.every=0",
                          "train.batch_size=8"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "runs" / kind / "adapter" / "adapter.safetensors").is_file()


@pytest.mark.parametrize("kind", ["flan-t5", "mbart", "umt5"])
def test_folded_lora_keeps_the_family(kind, family_dirs, tmp_path):
    """A folded LoRA model of an untied-head / pre-LN family gives the adapter's logits, and is a plain HF model
    that keeps its own head."""
    from transformers import AutoModelForSeq2SeqLM

    from vlpet_cli.artifacts import load_folded
    from vlpet_cli.merge import fold_adapter

    torch.manual_seed(0)
    resolved = resolve("lora", [f"model.feat_dim={FEAT}"], backbone=str(family_dirs[kind]))
    model, tok = build_model(resolved, weights=True)
    with torch.no_grad():
        for lora in model.pet.lora.values():
            lora.B.normal_(0, 0.1)
    save_adapter(tmp_path / "adapter", model, resolved)
    model.eval()
    batch = batch_for(tok)
    with torch.no_grad():
        want = model(batch)
    fold_adapter(tmp_path / "adapter", tmp_path / "folded")
    folded, _, _ = load_folded(tmp_path / "folded")
    folded.eval()
    with torch.no_grad():
        torch.testing.assert_close(folded(batch), want, atol=1e-5, rtol=0)
    plain = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "folded")
    head = model.backbone.get_output_embeddings().weight
    assert torch.equal(plain.get_output_embeddings().weight, head)
    assert (plain.get_output_embeddings().weight is plain.get_input_embeddings().weight) == (kind == "mbart")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bart-large", "t5-large", "flan-t5-base", "mt5-base"])
def test_vlpet_params_on_each_new_builtin_config(name):
    out = subprocess.run([sys.executable, "-m", "vlpet_cli", "params", "--preset", "vlpet-large", "--backbone", name,
                          "--json"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert 0 < report["percent"] < 10 and report["total"] > BUILTIN_TOTALS[name]
