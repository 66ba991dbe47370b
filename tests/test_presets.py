"""Presets are data: validated, overridable with dotted keys, with T5 sections and helpful errors."""

import subprocess
import sys

import pytest
import yaml

from vlpet_cli.errors import VlpetError
from vlpet_cli.presets import list_presets, parse_overrides, resolve

REQUIRED = {"ia3", "full-finetune", "bitfit", "prompt-tuning", "compacter", "hyperformer", "lora", "vl-adapter",
            "vlpet-small", "vlpet-middlex", "vlpet-middley", "vlpet-large", "compacter-gsmall-lw",
            "compacter-gmiddlex-lw", "compacter-gmiddley-lw", "compacter-glarge-lw"}


def test_all_presets_ship_and_validate():
    assert REQUIRED <= set(list_presets())
    for name in list_presets():
        assert resolve(name).name == name
        assert resolve(name, backbone="t5-base").t5 is None


def test_overrides_parse_yaml_values_and_apply():
    assert parse_overrides(["train.lr=5e-4", "pet.gate=null", "data.tasks=[coco]"]) == [
        ("train.lr", 5e-4), ("pet.gate", None), ("data.tasks", ["coco"])]
    p = resolve("vlpet-large", ["train.lr=5e-4", "pet.gate.granularity=small", "data.tasks=[coco]"])
    assert p.train.lr == 5e-4 and p.pet.gate.granularity == "small" and p.data.tasks == ["coco"]
    assert resolve("vlpet-large", ["pet.gate=null"]).pet.gate is None


def test_t5_section_applies_only_to_t5_and_user_overrides_win():
    bart = resolve("vlpet-large")
    t5 = resolve("vlpet-large", backbone="t5-base")
    assert (bart.pet.encoder.r, bart.pet.gate.scale, bart.train.lr, bart.pet.zero_init_up) == (96, 1.0, 1e-3, False)
    assert (t5.pet.encoder.r, t5.pet.gate.r, t5.pet.gate.scale, t5.train.lr, t5.pet.zero_init_up) == (
        192, 192, 0.3, 3e-4, True)
    assert t5.pet.value.r == 96 and t5.train.batch_size == 300
    assert resolve("vlpet-large", ["train.lr=1e-3"], backbone="t5-base").train.lr == 1e-3


@pytest.mark.parametrize("override,message", [
    ("train.lrr=1", "did you mean 'lr'"),
    ("pet.gatee.r=3", "did you mean 'gate'"),
    ("train.lr", "key=value"),
    ("train.lr=abc", "train.lr"),
    ("pet.gate.granularity=huge", "pet.gate.granularity"),
])
def test_bad_overrides_are_clear_errors(override, message):
    with pytest.raises(VlpetError, match=message):
        resolve("vlpet-large", [override])


def test_unknown_preset_suggests_a_name():
    with pytest.raises(VlpetError, match="did you mean 'vlpet-small'"):
        resolve("vlpet-smal")


def run(*args):
    return subprocess.run([sys.executable, "-m", "vlpet_cli", *args], capture_output=True, text=True)


@pytest.mark.slow
def test_cli_presets_show_cp_and_errors(tmp_path):
    shown = run("presets", "show", "vlpet-small", "train.lr=2e-4")
    assert shown.returncode == 0
    assert yaml.safe_load(shown.stdout)["train"]["lr"] == 2e-4
    target = tmp_path / "mine.yaml"
    assert run("presets", "cp", "lora", str(target)).returncode == 0
    assert yaml.safe_load(target.read_text())["name"] == "lora"
    again = run("presets", "cp", "lora", str(target))
    assert again.returncode == 2 and "--force" in again.stderr
    bad = run("params", "--preset", str(target), "train.nope=1")
    assert bad.returncode == 2 and "unknown key 'train.nope'" in bad.stderr and "Traceback" not in bad.stderr
    listing = run("presets", "ls")
    assert "vlpet-large" in listing.stdout and "Compacter" in listing.stdout


def test_help_does_not_import_torch():
    code = "import sys, vlpet_cli.cli; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
