"""`vlpet params` reproduces the paper's parameter budgets (spec modules §6.3) without weights."""

import json
import subprocess
import sys

import pytest

from vlpet_cli.pet.budget import budget
from vlpet_cli.presets import resolve
from vlpet_cli.vl.model import build_model

# spec/modules.md §6.3 (paper Table 2, BART-base): trainable, total
BART_ROWS = {
    "full-finetune": (141_156_864, 141_156_864),
    "bitfit": (1_708_800, 141_156_864),
    "prompt-tuning": (2_843_936, 142_417_952),
    "compacter": (3_870_240, 143_395_104),
    "hyperformer": (8_579_088, 148_103_952),
    "lora": (8_786_688, 148_234_752),
    "vl-adapter": (6_081_600, 145_606_464),
    "vlpet-small": (4_291_020, 143_845_068),
    "vlpet-middlex": (4_281_804, 143_835_852),
    "vlpet-middley": (4_281_792, 143_835_840),
    "vlpet-large": (6_052_416, 145_606_464),
}

# spec/modules.md §6.2 component counts for T5-base
T5_BASE_TOTAL = 224_540_160
T5_PROJECTOR = 1_581_312
T5_ENC_LN = 19_200
T5_DH_ALL = 7_100_928
T5_VPA_ALL = 1_779_840
T5_GATES = {"vlpet-small": 36_888, "vlpet-middlex": 18_456, "vlpet-middley": 18_432, "vlpet-large": 7_100_928}


def count(preset: str, backbone: str) -> dict:
    model, _ = build_model(resolve(preset, backbone=backbone), weights=False)
    return budget(model)


@pytest.mark.parametrize("preset", sorted(BART_ROWS))
def test_bart_rows_of_table_2(preset):
    b = count(preset, "bart-base")
    assert (b["trainable"], b["total"]) == BART_ROWS[preset]


@pytest.mark.parametrize("preset", sorted(T5_GATES))
def test_t5_vlpet_rows_follow_the_rules(preset):
    b = count(preset, "t5-base")
    added = T5_DH_ALL + T5_GATES[preset] + T5_VPA_ALL
    assert b["total"] == T5_BASE_TOTAL + added
    assert b["trainable"] == added + T5_ENC_LN + T5_PROJECTOR


def test_t5_baselines_use_the_reference_t5_configuration():
    assert count("full-finetune", "t5-base")["total"] == T5_BASE_TOTAL
    lora = count("lora", "t5-base")  # r = 150 on q and v of 36 attentions, no biases in T5
    assert lora["trainable"] == 72 * 150 * 2 * 768 + T5_PROJECTOR
    adapter = count("vl-adapter", "t5-base")  # r = 192, 60 adapters, LayerNorms frozen (reference quirk)
    assert adapter["trainable"] == 60 * 295_872 + T5_PROJECTOR
    bitfit = count("bitfit", "t5-base")  # LST adds 282,568 backbone biases + the projector's two LN biases
    assert bitfit["trainable"] == 282_568 + 1_536 + T5_PROJECTOR
    prompt = count("prompt-tuning", "t5-base")
    assert prompt["trainable"] == 1_261_088 + T5_PROJECTOR


def test_ia3_counts():
    """IA3 (not in the paper): a d-vector on k and v of every attention and a d_ff-vector on every FFN input.
    BART-base: 6 encoder layers x (768 + 768 + 3072) + 6 decoder layers x (4 x 768 + 3072) = 64,512;
    T5-base: 12 x 4,608 + 12 x 6,144 = 129,024. Only they and the projector train."""
    bart, t5 = count("ia3", "bart-base"), count("ia3", "t5-base")
    assert {g["group"]: g["trainable"] for g in bart["groups"]}["IA3"] == 64_512
    assert (bart["trainable"], bart["total"]) == (64_512 + 1_582_848, 141_156_864 + 64_512)
    assert (t5["trainable"], t5["total"]) == (129_024 + T5_PROJECTOR, T5_BASE_TOTAL + 129_024)


def test_groups_add_up_and_name_the_denominator():
    b = count("vlpet-large", "bart-base")
    assert sum(g["trainable"] for g in b["groups"]) == b["trainable"]
    assert sum(g["total"] for g in b["groups"]) == b["total"]
    groups = {g["group"]: g for g in b["groups"]}
    assert groups["gates"]["trainable"] == 1_779_840
    assert groups["decoder value modules"]["trainable"] == 889_920
    assert groups["encoder LayerNorms"]["trainable"] == 19_968
    assert groups["decoder LayerNorms"]["trainable"] == 0
    assert "projector" in b["denominator"]


@pytest.mark.slow
def test_cli_json_output():
    out = subprocess.run([sys.executable, "-m", "vlpet_cli", "params", "--preset", "vlpet-large", "--backbone",
                          "bart-base", "--json"], capture_output=True, text=True, check=True)
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert data["trainable"] == 6_052_416 and data["total"] == 145_606_464
    assert round(data["percent"], 2) == 4.16
    assert isinstance(data["groups"], list)
