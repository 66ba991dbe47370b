"""LST: the Table 2 budget on T5-base, training with no gradient through the backbone, pruned initialisation,
generation through the side network, and refusals."""

import pytest
import torch

from vlpet_cli.errors import VlpetError
from vlpet_cli.pet import anatomy
from vlpet_cli.pet.budget import budget
from vlpet_cli.presets import resolve
from vlpet_cli.vl.model import build_model

FEAT = 16


def make(backbone, *overrides):
    torch.manual_seed(0)
    return build_model(resolve("lst", [f"model.feat_dim={FEAT}", *overrides], backbone=str(backbone)), weights=True)


def batch_for(tok):
    enc = tok(["vqa: what color is the circle ?", "vqa: how many"], padding=True, return_tensors="pt")
    labels = tok(["red", "2 circle"], padding=True, return_tensors="pt").input_ids
    labels[labels == tok.pad_token_id] = -100
    return {"task": "vqa", "input_ids": enc.input_ids, "attention_mask": enc.attention_mask,
            "vis_feats": torch.randn(2, 1, 49, FEAT), "labels": labels}


def test_t5_base_budget_is_the_papers_row():
    # LST's VL-T5 LST.sh (reduction 4): side network 16,386,072 (spec modules §5) + projector 1,581,312 over the
    # model as built 224,540,160 + 16,386,072: 7.46 % as in VL-PET's Table 2.
    model, _ = build_model(resolve("lst", backbone="t5-base"), weights=False)
    b = budget(model)
    side = next(g for g in b["groups"] if g["group"] == "side network (LST)")
    assert side["trainable"] == side["total"] == 16_386_072
    assert b["trainable"] == 17_967_384 and b["total"] == 240_926_232
    assert round(b["percent"], 2) == 7.46


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_lst_trains_without_gradients_reaching_the_backbone(family, tiny_dirs):
    model, tok = make(tiny_dirs[family])
    model.train()
    assert not any(p.requires_grad for p in model.backbone.parameters())
    blocks = [b for stack in anatomy.stacks(model.backbone) for b in anatomy.layers(stack)]
    grads = []
    hooks = [b.register_forward_hook(lambda m, a, o: grads.append((o[0] if isinstance(o, tuple) else o).requires_grad))
             for b in blocks]
    loss = model(batch_for(tok))
    for h in hooks:
        h.remove()
    assert grads and not any(grads), "the backbone must run without an autograd graph"
    loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    assert all(n.startswith(("pet.lst.", "projector.")) for n in trainable)
    gates = model.pet.lst["encoder"].gates
    assert torch.allclose(gates, torch.zeros_like(gates)) and gates.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_side_output_replaces_the_decoder_output_and_generation_uses_it(family, tiny_dirs):
    model, tok = make(tiny_dirs[family])
    model.eval()
    batch = batch_for(tok)
    with torch.no_grad():
        before = model(batch)
        model.pet.lst["upsample"].weight.mul_(3.0)
        after = model(batch)
    assert not torch.isclose(before, after), "the loss must come from the side network"
    ids = model.generate(batch, num_beams=2, max_length=5)
    assert ids.shape[0] == 2
    # greedy generation (no cache: the side decoder sees the whole prefix) agrees with the teacher-forced logits
    greedy = model.generate(batch, num_beams=1, max_length=6, min_length=6)
    enc, mask = model.encode(batch)
    with torch.no_grad():
        logits = model.backbone(encoder_outputs=enc, attention_mask=mask, decoder_input_ids=greedy[:, :-1]).logits
    assert torch.equal(logits.argmax(-1), greedy[:, 1:])


@pytest.mark.slow
@pytest.mark.parametrize("backbone,task", [("tiny-t5", "coco"), ("tiny-bart", "vqa,nlvr")])
def test_lst_trains_and_evaluates_on_the_toy_world(backbone, task, tmp_path):
    import os
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "vlpet_cli", *args], capture_output=True, text=True,
                              env={**os.environ, "COLUMNS": "200"})

    out = cli("train", "--preset", "lst", "--task", task, "--data-root", "toy", "--backbone", backbone,
              "--runs-dir", str(tmp_path), "--name", "lst", "data.limit=16", "train.epochs=1", "eval.limit=8",
              "train.batch_size=8")
    assert out.returncode == 0, out.stderr[-2000:]
    first = task.split(",")[-1]
    out = cli("eval", str(tmp_path / "lst"), "--task", first, "--limit", "8", "--json")
    assert out.returncode == 0, out.stderr[-2000:]


def test_pruned_init_copies_backbone_weights(tiny_dirs):
    from vlpet_cli.pet.lst import LST

    model, _ = make(tiny_dirs["t5"])
    backbone = model.backbone
    block = backbone.get_encoder().block[0]
    small = model.pet.lst["encoder"].blocks[0]
    d_side = backbone.config.d_model // 4
    keep_d = LST._keep_residual(backbone, d_side)
    inner = LST._keep_inner(dict(block.named_modules()), "layer.0.SelfAttention", "inner", d_side)
    assert len(set(inner.tolist())) == d_side and len(set(keep_d.tolist())) == d_side
    q = block.layer[0].SelfAttention.q.weight
    assert torch.equal(small.layer[0].SelfAttention.q.weight, q[inner][:, keep_d])
    o = block.layer[0].SelfAttention.o.weight
    assert torch.equal(small.layer[0].SelfAttention.o.weight, o[keep_d][:, inner])
    ffn = LST._keep_inner(dict(block.named_modules()), "layer.1.DenseReluDense", "ffn", backbone.config.d_ff // 4)
    wi = block.layer[1].DenseReluDense.wi.weight
    assert torch.equal(small.layer[1].DenseReluDense.wi.weight, wi[ffn][:, keep_d])
    bias = block.layer[0].SelfAttention.relative_attention_bias.weight
    assert torch.equal(small.layer[0].SelfAttention.relative_attention_bias.weight, bias)
    random, _ = make(tiny_dirs["t5"], "pet.lst.init=random")
    assert not torch.equal(random.pet.lst["encoder"].blocks[0].layer[0].SelfAttention.q.weight,
                           small.layer[0].SelfAttention.q.weight)


def test_lst_refuses_modules_inside_the_backbone(tiny_dirs):
    with pytest.raises(VlpetError, match="LST cannot be combined with pet.lora"):
        make(tiny_dirs["t5"], "pet.lora={r: 4}")
    with pytest.raises(VlpetError, match="pet.init=default"):
        make(tiny_dirs["t5"], "pet.init=normal")
    with pytest.raises(VlpetError, match="reduction"):
        make(tiny_dirs["t5"], "pet.lst.reduction=5")
