"""Importing the reference code's full .pth state dicts (VLBart / VLT5 names, `module.` prefix) as adapters."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlpet_cli.artifacts import ADAPTER_WEIGHTS, OBJ_ROWS, adapter_state, load_adapter
from vlpet_cli.errors import VlpetError
from vlpet_cli.presets import resolve
from vlpet_cli.reference import import_reference_checkpoint, map_keys, rules
from vlpet_cli.vl.model import build_model

FEAT = 16
HEADS = 4
TASKS = ("vqa", "gqa", "nlvr", "caption")


class NotATensor:
    """An arbitrary object: weights-only loading must refuse to unpickle it."""


def source_model(backbone: Path, preset: str):
    """A vlpet model whose trainable tensors and object-order rows hold distinctive random values."""
    torch.manual_seed(0)
    resolved = resolve(preset, [f"model.feat_dim={FEAT}"], backbone=str(backbone))
    model, _ = build_model(resolved, weights=True)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen))
        words = model.backbone.get_input_embeddings().weight
        words[-100:].copy_(torch.randn(100, words.shape[1], generator=gen))
    return model


def _gate_names(granularity: str, stem: str) -> dict[str, str]:
    """vlpet gate tensor name -> the reference's name, for one sub-layer (stem: encoder_attn / encoder_ff)."""
    if granularity == "large":
        return {f"{w}.{p}": f"{stem}_adapter_gating_large_x_{w}.{p}"
                for w in ("down", "up") for p in ("weight", "bias")}
    names = {"small": "small_xy_cat", "middlex": "middle_xy_add"}
    if granularity == "middley":
        return {"z": f"{stem}_adapter_gating_middle_ia3_add"}
    return {f"proj.{p}": f"{stem}_adapter_gating_{names[granularity]}.{p}" for p in ("weight", "bias")}


def reference_state(model, family: str) -> dict[str, torch.Tensor]:
    """The inverse mapping, written out by hand: what the reference's DDP-wrapped model would have saved."""
    root = "model." if family == "bart" else ""
    ref = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    words = model.backbone.get_input_embeddings().weight.detach()
    ref[f"{root}encoder.visual_embedding.obj_order_embedding.weight"] = words.clone()
    for name, tensor in model.projector.state_dict().items():
        ref[f"{root}encoder.visual_embedding.{name}"] = tensor.clone()
    for key, module in model.pet.encoder_modules.items():
        _, layer, kind = key.split("_")
        word = "attn" if kind == "attn" else "ff"
        site = (f"model.encoder.layers.{layer}." if family == "bart"
                else f"encoder.block.{layer}.layer.{0 if word == 'attn' else 1}.")
        for p in ("weight", "bias"):
            for h, chunk in enumerate(getattr(module.down, p).detach().chunk(HEADS, dim=0)):
                ref[f"{site}{word}_adapter_multihead_down.{h}.{p}"] = chunk.clone()
            ref[f"{site}{word}_adapter_multihead_up.{p}"] = getattr(module.up, p).detach().clone()
        gate = model.pet.gates[key]
        gate_state = gate.state_dict()
        for ours, theirs in _gate_names(gate.granularity, f"encoder_{word}").items():
            ref[site + theirs] = gate_state[ours].clone()
    for key, module in model.pet.value.items():
        layer = key.split("_")[1]
        site = (f"model.decoder.layers.{layer}.encoder_attn." if family == "bart"
                else f"decoder.block.{layer}.layer.1.EncDecAttention.")
        for task in TASKS:
            for which in ("down", "up"):
                for p in ("weight", "bias"):
                    ref[f"{site}attn_value_parallel_adapter.adapters.{task}.{which}_sampler.{p}"] = \
                        getattr(getattr(module, which), p).detach().clone()
    return {f"module.{k}": v for k, v in ref.items()}


def write(path: Path, state) -> Path:
    torch.save(state, path)
    return path


@pytest.mark.parametrize("family", ["bart", "t5"])
@pytest.mark.parametrize("preset", ["vlpet-large", "vlpet-middlex", "vlpet-middley", "vlpet-small"])
def test_import_round_trip(tmp_path, tiny_dirs, family, preset):
    model = source_model(tiny_dirs[family], preset)
    pth = write(tmp_path / "LAST.pth", reference_state(model, family))
    # Seeded here and before loading: tiny BART's random <extra_id> rows are part of the backbone fingerprint.
    torch.manual_seed(0)
    report = import_reference_checkpoint(pth, preset, tmp_path / "adapter", backbone=str(tiny_dirs[family]),
                                         overrides=[f"model.feat_dim={FEAT}"])
    imported = load_file(str(tmp_path / "adapter" / ADAPTER_WEIGHTS))
    # every added vocabulary row is carried: BART's 100 <extra_id_*> rows and the 100 object-order rows; T5 the latter
    assert report["carried_vocab_rows"] == (200 if family == "bart" else 100)
    model.carried_rows = report["carried_vocab_rows"]
    expected = adapter_state(model)
    assert sorted(imported) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(imported[name], tensor), name
    assert report["encoder_heads"] == HEADS
    assert report["value_tasks"] == sorted(TASKS)
    assert report["prefix_stripped"] is True
    assert report["backbone_differing"] == 0
    # the added rows travel with the adapter, so there is nothing to warn about
    assert report["warnings"] == []
    assert report["gates"] == [preset.split("-")[1]]
    assert any(k.endswith("obj_order_embedding.weight") for k in report["ignored"])
    # The directory is a normal adapter: it loads strictly on the same backbone.
    torch.manual_seed(0)
    loaded, _, _ = load_adapter(tmp_path / "adapter")
    for name, tensor in adapter_state(loaded).items():
        assert torch.equal(tensor, expected[name]), name


def test_nested_state_dict_and_no_prefix(tmp_path, tiny_dirs):
    model = source_model(tiny_dirs["t5"], "vlpet-small")
    state = {k[len("module."):]: v for k, v in reference_state(model, "t5").items()}
    pth = write(tmp_path / "ckpt.pth", {"state_dict": state, "epoch": 3})
    report = import_reference_checkpoint(pth, "vlpet-small", tmp_path / "out", backbone=str(tiny_dirs["t5"]),
                                         overrides=[f"model.feat_dim={FEAT}"])
    assert report["nested_under"] == "state_dict" and report["prefix_stripped"] is False
    assert torch.equal(load_file(str(tmp_path / "out" / ADAPTER_WEIGHTS))[OBJ_ROWS], adapter_state(model)[OBJ_ROWS])


def test_unmapped_adapter_key_is_refused(tmp_path, tiny_dirs):
    model = source_model(tiny_dirs["bart"], "vlpet-large")
    state = reference_state(model, "bart")
    stray = "model.encoder.layers.0.attn_adapter.adapters.vqa.side_sampler.weight"  # no module the reference has
    state[f"module.{stray}"] = torch.zeros(4, 32)
    pth = write(tmp_path / "LAST.pth", state)
    with pytest.raises(VlpetError, match=stray.replace(".", r"\.")):
        import_reference_checkpoint(pth, "vlpet-large", tmp_path / "out", backbone=str(tiny_dirs["bart"]),
                                    overrides=[f"model.feat_dim={FEAT}"])
    assert not (tmp_path / "out").exists()


def test_wrong_gate_preset_is_refused(tmp_path, tiny_dirs):
    model = source_model(tiny_dirs["bart"], "vlpet-large")
    pth = write(tmp_path / "LAST.pth", reference_state(model, "bart"))
    with pytest.raises(VlpetError) as err:
        import_reference_checkpoint(pth, "vlpet-small", tmp_path / "out", backbone=str(tiny_dirs["bart"]),
                                    overrides=[f"model.feat_dim={FEAT}"])
    message = str(err.value)
    assert "pet.gates.encoder_0_attn.proj.weight" in message
    assert "'large'" in message and "'small'" in message and "vlpet-large" in message


def test_wrong_bottleneck_is_refused_with_the_override(tmp_path, tiny_dirs):
    model = source_model(tiny_dirs["bart"], "vlpet-small")
    pth = write(tmp_path / "LAST.pth", reference_state(model, "bart"))
    with pytest.raises(VlpetError, match="set pet.encoder.r=96"):
        import_reference_checkpoint(pth, "vlpet-small", tmp_path / "out", backbone=str(tiny_dirs["bart"]),
                                    overrides=[f"model.feat_dim={FEAT}", "pet.encoder.r=48"])


def test_pickled_object_is_refused(tmp_path, tiny_dirs):
    pth = write(tmp_path / "LAST.pth", {"model": {"module.lm_head.weight": torch.zeros(2, 2)}, "args": NotATensor()})
    with pytest.raises(VlpetError, match="not a weights-only state dict: it holds a pickled .*NotATensor"):
        import_reference_checkpoint(pth, "vlpet-large", tmp_path / "out", backbone=str(tiny_dirs["bart"]))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint" * 8)
    with pytest.raises(VlpetError, match="damaged or is not a PyTorch checkpoint"):
        import_reference_checkpoint(tmp_path / "junk.pth", "vlpet-large", tmp_path / "out")


def test_non_tensor_values_are_refused(tmp_path, tiny_dirs):
    pth = write(tmp_path / "LAST.pth", {"module.lm_head.weight": torch.zeros(2, 2), "step": 7})
    with pytest.raises(VlpetError, match="not a plain state dict: step"):
        import_reference_checkpoint(pth, "vlpet-large", tmp_path / "out", backbone=str(tiny_dirs["bart"]))


def test_per_task_value_adapters_are_refused(tmp_path, tiny_dirs):
    model = source_model(tiny_dirs["t5"], "vlpet-small")
    state = reference_state(model, "t5")
    key = "module.decoder.block.1.layer.1.EncDecAttention.attn_value_parallel_adapter.adapters.gqa.up_sampler.bias"
    state[key] = state[key] + 1
    pth = write(tmp_path / "LAST.pth", state)
    with pytest.raises(VlpetError, match="decoder layer 1 .*'gqa'"):
        import_reference_checkpoint(pth, "vlpet-small", tmp_path / "out", backbone=str(tiny_dirs["t5"]),
                                    overrides=[f"model.feat_dim={FEAT}"])


def test_other_backbone_is_refused_unless_allowed(tmp_path, tiny_dirs):
    model = source_model(tiny_dirs["t5"], "vlpet-small")
    state = reference_state(model, "t5")
    name = "module.encoder.block.0.layer.1.DenseReluDense.wi.weight"
    state[name] = state[name] + 0.5
    pth = write(tmp_path / "LAST.pth", state)
    args = {"backbone": str(tiny_dirs["t5"]), "overrides": [f"model.feat_dim={FEAT}"]}
    with pytest.raises(VlpetError, match="DenseReluDense.wi.weight.*--allow-mismatch"):
        import_reference_checkpoint(pth, "vlpet-small", tmp_path / "out", **args)
    report = import_reference_checkpoint(pth, "vlpet-small", tmp_path / "out", allow_mismatch=True, **args)
    assert report["backbone_differing"] == 1
    assert report["backbone_differing_names"] == ["encoder.block.0.layer.1.DenseReluDense.wi.weight"]
    assert "1 of" in report["warnings"][0]


def test_family_mismatch_is_refused(tmp_path, tiny_dirs):
    model = source_model(tiny_dirs["t5"], "vlpet-small")
    pth = write(tmp_path / "LAST.pth", reference_state(model, "t5"))
    with pytest.raises(VlpetError, match="VLT5 checkpoint but backbone"):
        import_reference_checkpoint(pth, "vlpet-small", tmp_path / "out", backbone=str(tiny_dirs["bart"]),
                                    overrides=[f"model.feat_dim={FEAT}"])


def test_existing_non_adapter_directory_is_kept(tmp_path, tiny_dirs):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("keep me")
    with pytest.raises(VlpetError, match="not an adapter directory"):
        import_reference_checkpoint(tmp_path / "missing.pth", "vlpet-large", tmp_path / "run")
    assert (tmp_path / "run" / "notes.txt").read_text() == "keep me"


def test_t5_rules_pair_sublayers():
    """T5 attention modules live in layer.0, FFN modules in layer.1; a crossed pairing matches no rule."""
    good = "encoder.block.3.layer.1.ff_adapter_multihead_up.weight"
    crossed = "encoder.block.3.layer.0.ff_adapter_multihead_up.weight"
    mapped = map_keys({good: torch.zeros(1), crossed: torch.zeros(1)}, "t5", set())
    assert list(mapped.tensors) == ["pet.encoder_modules.encoder_3_ffn.up.weight"]
    assert mapped.unexpected == [crossed]


def test_bart_rule_table():
    """A few reference names and where they land."""
    table = rules("bart")
    cases = {
        "model.encoder.layers.5.encoder_attn_adapter_gating_middle_ia3_add": "pet.gates.encoder_5_attn.z",
        "model.encoder.layers.2.encoder_ff_adapter_gating_middle_xy_add.bias": "pet.gates.encoder_2_ffn.proj.bias",
        "model.encoder.visual_embedding.absolute_vis_pos_embedding.1.weight":
            "projector.absolute_vis_pos_embedding.1.weight",
    }
    for key, want in cases.items():
        rule, match = next((r, m) for r in table if (m := r.pattern.fullmatch(key)))
        groups = match.groupdict()
        groups["kind"] = {"attn": "attn", "ff": "ffn"}.get(groups.get("kind"))
        assert rule.target.format(**groups) == want
