"""train.gradient_checkpointing recomputes the backbone's layers in backward and changes nothing: the losses and
the trainable gradients of a few training steps (dropout on) equal those without it, for hook-based methods with
gates (vlpet-large), wrapped Linears (lora), encoder prompts (prompt-tuning) and task-conditioned modules
(hyperformer), on both tiny backbones.

The comparison runs in float64 with atol 1e-10 / rtol 1e-7 (observed: ~1e-12 relative). In float32 the recompute's
different summation order in backward gives ~1e-5 relative differences after one step, which a few SGD steps on
a random tiny T5 amplify to percents, so float32 would only test the noise."""

from __future__ import annotations

import pytest
import torch

from vlpet_cli.presets import resolve
from vlpet_cli.vl.model import build_model

PRESETS = ("vlpet-large", "lora", "prompt-tuning", "hyperformer")


def _batch(model, tok, step: int) -> dict:
    gen = torch.Generator().manual_seed(100 + step)
    enc = tok(["vqa: what color is the circle ?", "vqa: how many"], padding=True, return_tensors="pt")
    labels = tok(["red", "2 circle"], padding=True, return_tensors="pt").input_ids
    labels[labels == tok.pad_token_id] = -100
    feats = torch.randn(2, 1, 49, model.projector.feat_embedding[0].in_features, generator=gen)
    return {"task": "vqa", "input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "vis_feats": feats,
            "labels": labels, "loss_weights": torch.ones(2), "loss_reduction": "example"}


def _steps(preset_name: str, backbone: str, checkpointing: bool, n: int = 3, dtype=torch.float32):
    """Losses and gradients of n SGD steps in train mode (dropout active); layer-forward count."""
    torch.manual_seed(0)
    model, tok = build_model(resolve(preset_name, backbone=backbone), weights=True)
    model.to(dtype)
    if checkpointing:
        model.enable_gradient_checkpointing()
    calls = []
    layer = model.backbone.get_encoder().block[0] if hasattr(model.backbone.get_encoder(), "block") else \
        model.backbone.get_encoder().layers[0]
    next(layer.children()).register_forward_hook(lambda *a: calls.append(1))
    model.train()
    params = [(n_, p) for n_, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.SGD([p for _, p in params], lr=0.05)
    losses, grads = [], []
    torch.manual_seed(1)
    for step in range(n):
        batch = _batch(model, tok, step)
        batch["vis_feats"] = batch["vis_feats"].to(dtype)
        loss = model(batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append({name: p.grad.clone() for name, p in params if p.grad is not None})
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, grads, len(calls)


@pytest.mark.parametrize("backbone", ["tiny-bart", "tiny-t5"])
# `make test-fast` keeps lora and hyperformer; the others are slow-marked (0.4-0.9 s each)
@pytest.mark.parametrize("preset", [p if p in PRESETS[1::2] else pytest.param(p, marks=pytest.mark.slow)
                                    for p in PRESETS])
def test_checkpointing_keeps_losses_and_gradients(preset, backbone):
    plain_losses, plain_grads, plain_calls = _steps(preset, backbone, False, dtype=torch.float64)
    ckpt_losses, ckpt_grads, ckpt_calls = _steps(preset, backbone, True, dtype=torch.float64)
    assert ckpt_calls == 2 * plain_calls  # every layer forward ran again in backward: checkpointing is on
    for a, b in zip(plain_losses, ckpt_losses):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-7)
    for step, (a, b) in enumerate(zip(plain_grads, ckpt_grads)):
        assert a.keys() == b.keys() and a, f"step {step}: different trainable tensors got gradients"
        for name in a:
            torch.testing.assert_close(b[name], a[name], atol=1e-10, rtol=1e-7, msg=f"step {step} {name}")


def test_checkpointing_only_in_training():
    """Evaluation (no grad) runs every layer once, checkpointing or not."""
    torch.manual_seed(0)
    model, tok = build_model(resolve("vlpet-large", backbone="tiny-bart"), weights=True)
    model.enable_gradient_checkpointing()
    calls = []
    model.backbone.get_encoder().layers[0].self_attn.register_forward_hook(lambda *a: calls.append(1))
    model.eval()
    with torch.no_grad():
        model(_batch(model, tok, 0))
    assert len(calls) == 1
