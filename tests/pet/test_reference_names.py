"""pet/reference_names.py: the reference's key for a vlpet tensor, derived from the same rules the import reads
(issue 25: the reference's decay groups are decided on these names)."""

import re

import pytest

from vlpet_cli.pet.reference_names import reference_key, vlpet_name


@pytest.mark.parametrize("family,name,layer,want", [
    ("bart", "pet.value.decoder_0_cross.down.bias", None,
     "model.decoder.layers.0.encoder_attn.attn_value_parallel_adapter.adapters.{task}.down_sampler.bias"),
    ("bart", "pet.value.decoder_0_cross.down.bias", "phm",  # Compacter's PHM layer: `b`, which the reference decays
     "model.decoder.layers.0.encoder_attn.attn_value_parallel_adapter.adapters.{task}.down_sampler.b"),
    ("t5", "pet.encoder_modules.encoder_1_ffn.down.rule", "phm",
     "encoder.block.1.layer.1.ff_adapter.adapters.{task}.down_sampler.phm_rule"),
    ("bart", "pet.hyper.encoder.mlp.3.weight", None, "model.encoder.adapter_layers_hyper_net.LayerNorm.weight"),
    ("t5", "pet.task_embeddings.coco", None, "shared_task_embed.task_to_embeddings.caption"),
    ("t5", "pet.lora.encoder_0_attn_o.A", None, "encoder.block.0.layer.{d}.SelfAttention.o.lora_As.{task}"),
    ("bart", "pet.lora.encoder_0_attn_o.A", None, "model.encoder.layers.0.self_attn.out_proj.lora_As.{task}"),
    ("t5", "pet.encoder_modules.encoder_0_attn.down.weight", None,
     "encoder.block.0.layer.0.attn_adapter_multihead_down.{d}.weight"),
    ("bart", "projector.feat_embedding.1.weight", None, "model.encoder.visual_embedding.feat_embedding.1.weight"),
    ("t5", "backbone.encoder.block.0.layer.0.layer_norm.weight", None, "encoder.block.0.layer.0.layer_norm.weight"),
])
def test_reference_key_is_the_reference_name_and_maps_back(family, name, layer, want):
    key = reference_key(name, family, layer)
    pattern = want.replace(".", r"\.").replace("{task}", r"[^.]+").replace("{d}", r"\d+")
    assert key is not None and re.fullmatch(pattern, key), key
    if not name.startswith("backbone."):
        assert vlpet_name(key, family) == name


def test_tensors_of_methods_without_a_reference_layout_have_no_key():
    assert reference_key("pet.ia3.encoder_0_attn_k", "bart") is None
    assert reference_key("pet.lst.encoder.gates", "t5") is None
    assert reference_key("pet.value.decoder_0_cross.down.rule", "bart") is None  # a rule tensor is PHM's only
