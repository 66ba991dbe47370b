"""Every PET method declares its spec, slots, budget group, decay rule and fold/export answer, and the composer,
`vlpet params`, the optimiser groups and `vlpet merge` read only those declarations."""

import pytest
import torch
from torch import nn

from vlpet_cli.pet.budget import ORDER, budget, classify
from vlpet_cli.pet.decay import no_decay_names
from vlpet_cli.pet.gates import GATES
from vlpet_cli.pet.inject import METHODS, SUBLAYER_STEPS, fold, foldable, unfoldable, wrap
from vlpet_cli.pet.lst import LST
from vlpet_cli.pet.method import Method
from vlpet_cli.pet.specs import PetConfig
from vlpet_cli.presets import resolve
from vlpet_cli.vl.model import build_model

FEAT = 16
EVERYTHING = ["pet.encoder={kind: adapter, r: 8}", "pet.gate={granularity: middley}", "pet.decoder={r: 8}",
              "pet.value={kind: compacter, r: 8}", "pet.lora={r: 4}", "pet.prompt={length: 3, mid_dim: 8}",
              "pet.hyperformer={r: 4, task_dim: 8, layer_dim: 8, hidden: 8, projected: 4}", "pet.add_biases=true",
              "pet.ia3={}"]


# LST refuses modules inside the backbone (they would get no gradient); tests/pet/test_lst.py covers it alone.
COMBINABLE = [m for m in METHODS if m is not LST]


def everything(backbone):
    """A model with every combinable method present at once (tiny T5: no native biases, so add_biases applies)."""
    torch.manual_seed(0)
    preset = resolve("vlpet-middley", [f"model.feat_dim={FEAT}", *EVERYTHING], backbone=str(backbone))
    return build_model(preset, weights=True)[0]


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.label)
def test_each_method_declares_itself(method):
    assert method.field in PetConfig.model_fields
    assert method.slots and method.group in ORDER and method.label
    overrides = lambda name: getattr(type(method), name) is not getattr(Method, name)  # noqa: E731
    # a fold answer: either it folds (and says how) or it says why it cannot
    assert (method.unfoldable is None) == overrides("fold")
    assert isinstance(method.unfoldable, (str, type(None)))
    # a PEFT mapping exactly where a type is named; only foldable methods can be plain PEFT adapters
    assert bool(method.peft_type) == overrides("peft")
    assert not method.peft_type or method.unfoldable is None
    assert method.peft_type is None or method.peft_unit
    assert METHODS.count(method) == 1
    # it enters the backbone somehow: at the sub-layer outputs, through attachments, or as inputs (prompts)
    assert overrides("transform") or overrides("attachments") or method.field == "prompt"


def test_the_gate_runs_last_in_every_sub_layer():
    assert SUBLAYER_STEPS[-1] is GATES and set(SUBLAYER_STEPS) == set(METHODS)


def test_every_added_tensor_belongs_to_exactly_one_method(tiny_dirs):
    model = everything(tiny_dirs["t5"])
    assert model.pet.methods() == COMBINABLE
    for name, _ in model.named_parameters():
        if name.startswith("pet."):
            owners = [m for m in METHODS if m.owns(name)]
            assert len(owners) == 1, name
    groups = classify(model)
    for method in COMBINABLE:
        assert any(g == method.group for n, g in groups.items() if method.owns(n)), method.label
    assert {r["group"] for r in budget(model)["groups"]} >= {m.group for m in COMBINABLE}
    batch_loss = model(batch(model))
    batch_loss.backward()
    idle = [n for n, p in model.named_parameters() if n.startswith("pet.") and p.grad is None]
    assert sorted(idle) == [f"pet.task_embeddings.{t}" for t in ("coco", "gqa", "nlvr")]  # the batch is vqa


def batch(model):
    ids = torch.tensor([[5, 6, 7, 1], [5, 8, 1, 0]])
    return {"task": "vqa", "input_ids": ids, "attention_mask": ids.ne(0).long(),
            "vis_feats": torch.randn(2, 1, 49, FEAT), "labels": torch.tensor([[9, 1], [10, 1]])}


def test_fold_answers_come_from_the_declarations(tiny_dirs):
    model = everything(tiny_dirs["t5"])
    reasons = unfoldable(model.pet)
    assert [r.split(":")[0].split(" (")[0] for r in reasons] == [m.label for m in COMBINABLE if m.unfoldable]
    assert [m.label for m in foldable(model.pet)] == ["LoRA", "IA3 vectors"]
    lora_weight = model.pet.targets["lora"][0].linear.weight.detach().clone()
    with torch.no_grad():
        model.pet.lora[model.pet.targets["lora"][0].key].B.fill_(0.1)
    done = fold(model.pet)
    assert done[0].startswith("LoRA (") and done[1].startswith("IA3 (")
    assert not torch.equal(model.pet.targets["lora"][0].linear.weight, lora_weight)


def legacy_no_decay(model, rule):
    """The rule of train.param_groups before the declarations (written out here to pin its behaviour)."""
    from vlpet_cli.pet import anatomy

    norms = anatomy.layer_norm_names(model.backbone)
    norm_names = {f"backbone.{n}" for n in norms["encoder"] + norms["decoder"]}
    out = set()
    for name, _ in model.named_parameters():
        exempt = "bias" in name or "LayerNorm.weight" in name
        if rule == "corrected":
            exempt = exempt or name in norm_names or name.endswith(".z") or (
                name.startswith("projector.") and ".1." in name)
        if exempt:
            out.add(name)
    return out


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_decay_rules(family, tiny_dirs):
    """reference: the rule on the reference's names, which differ from vlpet's for Compacter's PHM biases (`b`:
    decayed) and HyperFormer's hyper-network LayerNorm (`LayerNorm.weight`: exempt); elsewhere as on vlpet's names."""
    model = everything(tiny_dirs[family])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    reference = no_decay_names(model, "reference")
    phm_biases = {n for n in trainable if n.startswith("pet.value.") and n.endswith(".bias")}  # value: compacter
    hyper_norms = {f"pet.hyper.{stack}.mlp.3.weight" for stack in ("encoder", "decoder")}
    assert phm_biases and hyper_norms <= trainable
    assert reference == (legacy_no_decay(model, "reference") & trainable) - phm_biases | hyper_norms
    assert "pet.gates.encoder_0_attn.z" not in reference  # the reference decays gate vectors and LN weights
    corrected = no_decay_names(model, "corrected")
    ia3 = {f"pet.ia3.{k}" for k in model.pet.ia3}
    assert corrected == (legacy_no_decay(model, "corrected") & trainable) | ia3 | hyper_norms
    assert phm_biases <= corrected and "pet.gates.encoder_0_attn.z" in corrected


def test_param_groups_split_by_the_rule(tiny_dirs):
    from vlpet_cli.optim import param_groups

    torch.manual_seed(0)
    preset = resolve("vlpet-middley", [f"model.feat_dim={FEAT}"], backbone=str(tiny_dirs["bart"]))
    model, _ = build_model(preset, weights=True)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, preset)
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == preset.train.weight_decay
    assert {names[id(p)] for p in no_decay["params"]} == {
        n for n, p in model.named_parameters() if p.requires_grad and "bias" in n}
    assert len(decay["params"]) + len(no_decay["params"]) == sum(p.requires_grad for p in model.parameters())


def test_wrap_replaces_the_instance_forward_and_removes_cleanly():
    linear, other = nn.Linear(3, 2), nn.Linear(3, 2)
    x = torch.randn(4, 3)
    plain = linear(x)
    seen = []
    linear.register_forward_hook(lambda m, a, o: seen.append(o))
    handle = wrap(linear, lambda forward, inp: 2 * forward(inp))
    torch.testing.assert_close(linear(x), 2 * plain)
    assert torch.equal(seen[-1], linear(x))  # hooks see the wrapped output
    inner = wrap(linear, lambda forward, inp: forward(inp) + 1)  # wraps compose
    torch.testing.assert_close(linear(x), 2 * plain + 1)
    inner.remove()
    handle.remove()
    torch.testing.assert_close(linear(x), plain)
    assert "forward" not in linear.__dict__ and list(linear.state_dict()) == ["weight", "bias"]
    torch.testing.assert_close(other(x), other(x))  # the class is untouched


def test_hyperformer_layernorm_eps_is_the_reference(tiny_dirs):
    model = everything(tiny_dirs["bart"])
    norms = [m for m in model.pet.hyper.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 and all(m.eps == 1e-6 for m in norms)
