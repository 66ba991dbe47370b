"""vlpet_cli/optim.py: the reference's AdamW (transformers 4.2.1 math), the decay groups, the schedule, clipping only
when > 0, and what a run records of them (issue 25)."""

import json
import math

import pytest
import torch
import yaml

from vlpet_cli.optim import (
    ReferenceAdamW,
    build_optimizer,
    clip_gradients,
    describe,
    param_groups,
    schedule,
    total_updates,
    update_due,
)
from vlpet_cli.presets import resolve
from vlpet_cli.vl.model import build_model

BETAS, EPS = (0.9, 0.999), 1e-6


def reference_update(p, grads, lr, wd, eps=EPS):
    """transformers 4.2.1 AdamW written out in float64 from its formula: eps on the un-bias-corrected sqrt(v),
    the bias corrections folded into the step size, the decoupled decay after the update."""
    p, m, v = p.double().clone(), torch.zeros_like(p, dtype=torch.float64), torch.zeros_like(p, dtype=torch.float64)
    for t, g in enumerate(grads, 1):
        g = g.double()
        m = BETAS[0] * m + (1 - BETAS[0]) * g
        v = BETAS[1] * v + (1 - BETAS[1]) * g * g
        p = p - lr * math.sqrt(1 - BETAS[1] ** t) / (1 - BETAS[0] ** t) * m / (v.sqrt() + eps)
        p = p - lr * wd * p
    return p


def run(optimizer_cls, start, grads, **kwargs):
    p = torch.nn.Parameter(start.clone())
    opt = optimizer_cls([p], **kwargs)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


@pytest.mark.parametrize("foreach", [True, False])
def test_reference_adamw_is_the_421_formula(foreach):
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(64, generator=gen)
    grads = [torch.randn(64, generator=gen) * 10 ** -k for k in range(6)]  # down to the size of eps
    got = run(ReferenceAdamW, start, grads, lr=1e-2, eps=EPS, weight_decay=0.01, foreach=foreach)
    assert torch.allclose(got.double(), reference_update(start, grads, 1e-2, 0.01), rtol=0, atol=1e-6)


def test_foreach_and_per_tensor_forms_are_identical():
    shapes = [(3, 4), (7,), (2, 2, 2)]
    results = []
    for foreach in (True, False):
        params = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)))
                  for i, s in enumerate(shapes)]
        opt = ReferenceAdamW([{"params": params[:2], "weight_decay": 0.01}, {"params": params[2:],
                                                                               "weight_decay": 0.0}],
                             lr=1e-3, foreach=foreach)
        torch.manual_seed(3)
        for step in range(4):
            for i, p in enumerate(params):
                p.grad = None if (i == 1 and step == 0) else torch.randn(p.shape)
            opt.step()
        results.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_small_gradients_move_far_less_than_under_torch_adamw():
    """At step 1 torch's eps is in effect 31.6x smaller: a gradient the size of eps moves a weight 16x further under
    torch.optim.AdamW, which is why a run with it drifts from the reference's."""
    start, grads = torch.zeros(1), [torch.full((1,), 1e-6)]
    ours = run(ReferenceAdamW, start, grads, lr=1.0, eps=EPS)
    theirs = run(torch.optim.AdamW, start, grads, lr=1.0, eps=EPS, weight_decay=0.0)
    root = math.sqrt(1 - BETAS[1])
    assert ours.item() == pytest.approx(-root * 1e-6 / (root * 1e-6 + EPS), rel=1e-5)  # -0.0306
    assert theirs.item() == pytest.approx(-1e-6 / (1e-6 + EPS), rel=1e-5)  # -0.5


def test_decay_follows_the_update():
    """p - lr*wd*p is applied to the updated weight (torch.optim.AdamW decays the weight before the update)."""
    start, grads = torch.ones(1), [torch.ones(1)]
    got = run(ReferenceAdamW, start, grads, lr=0.1, eps=0.0, weight_decay=0.5)
    assert got.item() == pytest.approx((1 - 0.1) * (1 - 0.1 * 0.5))


def test_a_tensor_without_gradient_is_skipped_and_keeps_its_own_step_count():
    """HyperFormer's task embeddings: a task absent from a batch is not touched (no moment, no decay) and its first
    update later is a first step (its own bias correction)."""
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = ReferenceAdamW([a, b], lr=0.1, weight_decay=0.1)
    for _ in range(3):
        a.grad, b.grad = torch.ones(3), None
        opt.step()
    assert torch.equal(b.detach(), torch.ones(3)) and b not in opt.state
    a.grad, b.grad = None, torch.full((3,), 0.5)
    opt.step()
    assert opt.state[b]["step"].item() == 1 and opt.state[a]["step"].item() == 3
    assert torch.allclose(b.detach().double(), reference_update(torch.ones(3), [torch.full((3,), 0.5)], 0.1, 0.1))


def test_state_holds_tensors_only_and_resumes_exactly():
    """Checkpoints save every state entry as a tensor (runs.Checkpointer): resuming continues bit for bit."""
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(5, generator=gen) for _ in range(6)]
    p = torch.nn.Parameter(torch.randn(5, generator=gen))
    q = torch.nn.Parameter(p.detach().clone())
    straight, first = ReferenceAdamW([p], lr=1e-2, weight_decay=0.01), ReferenceAdamW([q], lr=1e-2, weight_decay=0.01)
    for g in grads[:3]:
        p.grad, q.grad = g.clone(), g.clone()
        straight.step()
        first.step()
    saved = first.state_dict()
    assert all(isinstance(v, torch.Tensor) for st in saved["state"].values() for v in st.values())
    resumed = ReferenceAdamW([q], lr=1e-2, weight_decay=0.01)
    # as runs.Checkpointer stores them: the groups through JSON, the state tensors through safetensors
    resumed.load_state_dict({"param_groups": json.loads(json.dumps(saved["param_groups"])),
                             "state": {k: {n: v.clone() for n, v in st.items()} for k, st in saved["state"].items()}})
    for g in grads[3:]:
        p.grad, q.grad = g.clone(), g.clone()
        straight.step()
        resumed.step()
    assert torch.equal(p, q)


@pytest.mark.parametrize("max_norm", [-1.0, 0.0])
def test_zero_or_negative_clip_norm_means_no_clipping(max_norm):
    """The reference clips only when clip_grad_norm > 0; passing -1 to clip_grad_norm_ would multiply every gradient
    by a negative factor (gradient ascent)."""
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), 3.0)
    assert clip_gradients([p], max_norm) is None
    assert torch.equal(p.grad, torch.full((4,), 3.0))
    norm = clip_gradients([p], 1.0)
    assert norm.item() == pytest.approx(6.0) and p.grad.norm().item() == pytest.approx(1.0, rel=1e-5)


def test_schedule_is_the_references_linear_warmup(tmp_path):
    """30 updates, warm-up 3: the learning rates the reference's six logged steps used (golden-train README)."""
    preset = resolve("vlpet-small", ["train.lr=0.001", "train.epochs=3", "train.warmup_ratio=0.1"],
                     backbone="tiny-bart")
    assert total_updates(10, preset.train) == 30
    p = torch.nn.Parameter(torch.zeros(1))
    opt = ReferenceAdamW([p], lr=preset.train.lr)
    sched = schedule(opt, preset.train, 30)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # the `lr` of steps 1-6 in ../shared/golden-train/*/trajectory.pt, compared exactly
    assert lrs == [0.0, 0.0003333333333333333, 0.0006666666666666666, 0.001, 0.0009629629629629629,
                   0.000925925925925926]


def test_accumulation_and_max_steps_shorten_the_schedule_to_the_real_updates():
    preset = resolve("vlpet-small", ["train.grad_accum=4", "train.epochs=2"], backbone="tiny-bart")
    assert total_updates(10, preset.train) == 6  # ceil(10 / 4) an epoch: each epoch's partial group is an update
    assert [step for step in range(10) if update_due(step, 10, 4)] == [3, 7, 9]
    capped = resolve("vlpet-small", ["train.grad_accum=4", "train.epochs=2", "train.max_steps=3"], backbone="tiny-bart")
    assert total_updates(10, capped.train) == 3


def test_the_preset_picks_the_optimizer(tiny_dirs):
    preset = resolve("vlpet-small", ["model.feat_dim=16"], backbone=str(tiny_dirs["bart"]))
    model, _ = build_model(preset, weights=False)
    default = build_optimizer(model, preset)
    assert isinstance(default, ReferenceAdamW) and describe(default).startswith("reference AdamW")
    assert [g["weight_decay"] for g in default.param_groups] == [0.01, 0.0]
    assert default.defaults["eps"] == preset.train.adam_eps
    torch_preset = resolve("vlpet-small", ["model.feat_dim=16", "train.optimizer=torch"],
                           backbone=str(tiny_dirs["bart"]))
    other = build_optimizer(model, torch_preset)
    assert type(other) is torch.optim.AdamW and describe(other).startswith("torch.optim.AdamW")
    groups = param_groups(model, preset)
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("family,keys", [("bart", ("dropout", "attention_dropout", "activation_dropout")),
                                         ("t5", ("dropout_rate",))])
def test_model_dropout_sets_every_rate_of_the_backbone_config(tiny_dirs, tmp_path, family, keys):
    """The reference's trainer sets every dropout rate to --dropout (0.1 by default); null keeps the checkpoint's."""
    from conftest import make_backbone
    from transformers import AutoConfig

    directory = make_backbone(tmp_path / family, family)
    config = AutoConfig.from_pretrained(directory)
    config.update({k: 0.25 for k in keys})
    config.save_pretrained(directory)
    for value, want in ((None, 0.25), (0.1, 0.1), (0.0, 0.0)):
        override = f"model.dropout={'null' if value is None else value}"
        model, _ = build_model(resolve("vlpet-small", ["model.feat_dim=16", override], backbone=str(directory)))
        assert {k: getattr(model.backbone.config, k) for k in keys} == {k: want for k in keys}
        rates = {m.p for m in model.backbone.modules() if isinstance(m, torch.nn.Dropout)}
        rates |= {m.dropout for m in model.backbone.modules() if isinstance(getattr(m, "dropout", None), float)}
        assert rates <= {want}


# ---- what a run records ----------------------------------------------------------------------------------------
def toy_run(tmp_path, name, overrides):
    from vlpet_cli.train import resolve_train_preset, train

    preset = resolve_train_preset("vlpet-small", ["coco"], "toy", "tiny-bart",
                                  ["data.limit=48", "train.batch_size=24", "train.max_steps=2", "eval.every=0",
                                   *overrides])
    return train(preset, tmp_path / name)


@pytest.mark.slow
def test_negative_clip_norm_trains_exactly_as_no_clipping(tmp_path):
    """train.clip_grad_norm=-1 (the reference's default) updates as 0 (no clipping) does, bit for bit, and differs
    from a clipped run; before issue 25 it turned every update into gradient ascent."""
    runs = {clip: toy_run(tmp_path, f"clip{clip}", [f"train.clip_grad_norm={clip}"]).model for clip in (-1, 0, 1e-3)}
    trainable = [n for n, p in runs[0].named_parameters() if p.requires_grad]
    same = [torch.equal(runs[-1].get_parameter(n), runs[0].get_parameter(n)) for n in trainable]
    assert all(same)
    assert not all(torch.equal(runs[1e-3].get_parameter(n), runs[0].get_parameter(n)) for n in trainable)


@pytest.mark.slow
def test_config_yaml_records_the_optimizer_decay_groups_and_dropout(tmp_path):
    for name, overrides, optimizer in (("default", [], "reference"), ("torch", ["train.optimizer=torch",
                                                                               "model.dropout=null"], "torch")):
        toy_run(tmp_path, name, overrides)
        config = yaml.safe_load((tmp_path / name / "config.yaml").read_text())
        assert config["train"]["optimizer"] == optimizer and config["train"]["decay_rule"] == "reference"
        assert config["model"]["dropout"] == (0.1 if name == "default" else None)
        start = next(json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
                     if json.loads(line)["event"] == "start")
        assert start["optimizer"].startswith("reference AdamW" if name == "default" else "torch.optim.AdamW")
