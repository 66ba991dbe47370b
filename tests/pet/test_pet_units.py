"""Gates and modules against hand-written formulas on small tensors (spec modules §1.2-1.3, §5)."""

import math

import pytest
import torch

from vlpet_cli.pet.activation import gelu_new
from vlpet_cli.pet.adapter import Bottleneck
from vlpet_cli.pet.compacter import PHMBottleneck, PHMLinear
from vlpet_cli.pet.gates import Gate
from vlpet_cli.pet.lora import LoRA
from vlpet_cli.pet.prompt import PromptEncoder

torch.manual_seed(0)
B, L, D = 2, 5, 8


def ref_gelu_new(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def test_gelu_new_is_tanh_gelu():
    x = torch.linspace(-4, 4, 50)
    assert torch.allclose(gelu_new(x), ref_gelu_new(x), atol=1e-6)


def test_bottleneck_formula_and_multihead_equivalence():
    m = Bottleneck(D, 8, heads=4)
    h = torch.randn(B, L, D)
    expected = ref_gelu_new(h @ m.down.weight.T + m.down.bias) @ m.up.weight.T + m.up.bias
    assert torch.allclose(m(h), expected, atol=1e-6)
    # N_h heads of Linear(d, r/N_h) concatenated == one Linear(d, r) with stacked rows
    heads = [(m.down.weight[i * 2:(i + 1) * 2], m.down.bias[i * 2:(i + 1) * 2]) for i in range(4)]
    concat = torch.cat([h @ w.T + b for w, b in heads], -1)
    assert torch.allclose(concat, m.down(h), atol=1e-6)
    assert sum(p.numel() for p in Bottleneck(768, 96, 4).parameters()) == 148_320


def test_gate_large():
    g = Gate("large", D, r=4, scale=0.3)
    x, h1 = torch.randn(B, L, D), torch.randn(B, L, D)
    G = torch.sigmoid(ref_gelu_new(x @ g.down.weight.T + g.down.bias) @ g.up.weight.T + g.up.bias)
    assert torch.allclose(g(x, h1), 0.3 * G * h1, atol=1e-6)


def test_gate_middlex_reads_x_plus_h1():
    g = Gate("middlex", D)
    x, h1 = torch.randn(B, L, D), torch.randn(B, L, D)
    G = torch.sigmoid((x + h1) @ g.proj.weight.T + g.proj.bias)
    assert G.shape == (B, L, 1)
    assert torch.allclose(g(x, h1), G * h1, atol=1e-6)


def test_gate_middley_is_one_plus_z_without_sigmoid():
    g = Gate("middley", D)
    with torch.no_grad():
        g.z.fill_(2.0)
    x, h1 = torch.randn(B, L, D), torch.randn(B, L, D)
    assert torch.allclose(g(x, h1), 3.0 * h1)  # unbounded: 1 + 2


def test_gate_small_unmasked_mean_by_default_and_masked_option():
    g = Gate("small", D)
    x, h1 = torch.randn(B, L, D), torch.randn(B, L, D)
    per_token = torch.sigmoid(torch.cat([x, h1], -1) @ g.proj.weight.T + g.proj.bias)  # [B, L, 1]
    G = per_token.mean(dim=1, keepdim=True)
    assert torch.allclose(g(x, h1), G * h1, atol=1e-6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    masked = Gate("small", D, masked_mean=True)
    masked.load_state_dict(g.state_dict())
    G0 = per_token[0, :3].mean()
    assert torch.allclose(masked(x, h1, mask)[0], G0 * h1[0], atol=1e-6)
    assert not torch.allclose(g(x, h1, mask)[0], masked(x, h1, mask)[0])


def test_phm_linear_is_sum_of_kronecker_products():
    layer = PHMLinear(8, 4, n=2)
    W = torch.kron(layer.rule[0], layer.weight[0]) + torch.kron(layer.rule[1], layer.weight[1])
    x = torch.randn(3, 8)
    assert torch.allclose(layer(x), x @ W + layer.bias, atol=1e-6)
    assert sum(p.numel() for p in PHMBottleneck(768, 96, 2).parameters()) == 74_608


def test_lora_starts_at_zero_and_matches_delta_weight():
    lora = LoRA(D, 6, r=4, alpha=8, dropout=0.0)
    x = torch.randn(B, D)
    assert torch.equal(lora(x), torch.zeros(B, 6))
    with torch.no_grad():
        lora.B.normal_()
    assert lora.scale == 2.0
    assert torch.allclose(lora(x), x @ lora.delta_weight().T, atol=1e-5)


def test_prompt_encoder_count_and_shape():
    p = PromptEncoder(768, 40, 800)
    assert sum(t.numel() for t in p.parameters()) == 1_261_088
    assert PromptEncoder(D, 3, 5)(batch_size=2).shape == (2, 3, D)


@pytest.mark.parametrize("granularity", ["small", "middlex", "middley", "large"])
def test_gate_counts_match_spec(granularity):
    expected = {"small": 1_537, "middlex": 769, "middley": 768, "large": 148_320}[granularity]
    assert sum(p.numel() for p in Gate(granularity, 768, r=96).parameters()) == expected
