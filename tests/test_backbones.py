"""Backbone resolution (built-in names, local directories, hub ids offline) and the backbone-mismatch error."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlpet_cli import backbones
from vlpet_cli.artifacts import load_adapter, save_adapter
from vlpet_cli.errors import VlpetError
from vlpet_cli.presets import resolve
from vlpet_cli.vl.model import build_model


@pytest.mark.parametrize("name, family", [("tiny-bart", "bart"), ("tiny-t5", "t5")])
def test_tiny_backbones_resolve_to_the_shipped_folders(name, family):
    bb = backbones.resolve(name)
    assert (bb.family, bb.builtin, bb.directory) == (family, name, backbones.ASSETS / name)
    assert (bb.directory / "config.json").is_file() and (bb.directory / "model.safetensors").is_file()
    assert backbones.family_of(name) == family


@pytest.mark.parametrize("name, key, family", [("bart-base", "bart-base", "bart"),
                                               ("facebook/bart-base", "bart-base", "bart"),
                                               ("t5-base", "t5-base", "t5"), ("google-t5/t5-base", "t5-base", "t5")])
def test_base_backbones_resolve_without_weights(name, key, family):
    bb = backbones.resolve(name)
    assert (bb.family, bb.builtin) == (family, key)  # a built-in config: counting needs no download


def test_a_local_directory_is_read_from_its_config(tmp_path):
    shutil.copytree(backbones.ASSETS / "tiny-t5", tmp_path / "mine")
    bb = backbones.resolve(str(tmp_path / "mine"))
    assert (bb.family, bb.directory, bb.builtin) == ("t5", tmp_path / "mine", None)


def test_a_directory_without_config_or_of_another_family_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(VlpetError, match="empty is not a model directory: it has no config.json"):
        backbones.resolve(str(tmp_path / "empty"))
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(VlpetError, match="model type 'gpt2' is not supported; vlpet works with BART and T5"):
        backbones.resolve(str(tmp_path / "gpt"))


def test_a_hub_id_missing_offline_says_how_to_get_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(VlpetError) as info:
        backbones.resolve("nobody-here/no-such-model-xyz")
    message = str(info.value)
    assert "neither a built-in name" in message and "tiny-bart" in message
    assert "hf download nobody-here/no-such-model-xyz --local-dir DIR" in message
    assert "--backbone DIR" in message


def test_an_adapter_on_another_backbone_is_refused(tmp_path):
    """Same architecture, other pretrained weights: the embedding fingerprint differs, and loading says so."""
    other = tmp_path / "other-bart"
    shutil.copytree(backbones.ASSETS / "tiny-bart", other)
    weights = load_file(other / "model.safetensors")
    weights["model.shared.weight"] = weights["model.shared.weight"] + 0.01
    save_file(weights, other / "model.safetensors")
    preset = resolve("vlpet-small", ["model.feat_dim=16"], backbone="tiny-bart")
    torch.manual_seed(0)
    model, _ = build_model(preset)
    save_adapter(tmp_path / "adapter", model, preset)
    torch.manual_seed(0)
    load_adapter(tmp_path / "adapter")  # its own backbone loads
    torch.manual_seed(0)
    with pytest.raises(VlpetError, match=r"was trained on a different backbone than '.*other-bart' "
                                         r"\(fingerprint: adapter \w+ vs backbone \w+\); pass --backbone"):
        load_adapter(tmp_path / "adapter", backbone=str(other))
    with pytest.raises(VlpetError, match=r"model_type: adapter bart vs backbone t5"):
        load_adapter(tmp_path / "adapter", backbone="tiny-t5")
