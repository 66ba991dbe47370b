"""train.precision and eval.precision: fp16 is Accelerate's mixed precision with its gradient scaler, on a CUDA GPU
and BART-family backbones; T5 and the CPU are refused in one line each, saying why and what to use instead. The
wiring is checked on the CPU: the Accelerator's arguments, the refusals, a GradScaler in use for fp16 on BART (CUDA
faked), and the reference optimizer skipping the steps the scaler skips."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from unittest import mock

import pytest
import torch

from vlpet_cli.errors import VlpetError
from vlpet_cli.evaluate import check_eval_precision
from vlpet_cli.inference import autocast
from vlpet_cli.optim import ReferenceAdamW
from vlpet_cli.presets import resolve
from vlpet_cli.train import accelerator_kwargs, check_precisions

T5 = ("{key}=fp16: T5-family backbones overflow in fp16 (their activations exceed its range, a known transformers "
      "problem, giving inf/nan losses); use {key}=bf16 or {key}=fp32")
CPU = ("{key}=fp16: fp16 needs a CUDA GPU and this run has none (on the CPU it is slow and unsupported by "
       "Accelerate's loss scaling); use {key}=bf16 or {key}=fp32")


def preset(backbone: str = "tiny-bart", *overrides: str):
    return resolve("vlpet-small", list(overrides), backbone)


@contextmanager
def faked_cuda():
    """torch and Accelerate see one CUDA device (nothing is moved to it); Accelerate's shared state is reset
    before and after, so that other tests get the CPU again."""
    from accelerate.state import AcceleratorState

    backend = ("cuda", torch.cuda)
    AcceleratorState._reset_state(True)
    try:
        with mock.patch("torch.cuda.is_available", return_value=True), \
                mock.patch("torch.cuda.is_bf16_supported", return_value=True), \
                mock.patch("accelerate.state.get_torch_accelerator_backend", return_value=backend), \
                mock.patch("accelerate.accelerator.get_torch_accelerator_backend", return_value=backend):
            yield
    finally:
        AcceleratorState._reset_state(True)


@pytest.mark.parametrize("precision,mixed", [("fp32", "no"), ("bf16", "bf16"), ("fp16", "fp16")])
def test_train_precision_is_accelerates_mixed_precision(precision, mixed, tmp_path):
    kwargs = accelerator_kwargs(preset("tiny-bart", f"train.precision={precision}"), tmp_path / "run")
    assert kwargs["mixed_precision"] == mixed
    assert kwargs["log_with"] is None  # no tracker unless train.report_to names one
    assert kwargs["project_config"].logging_dir == str(tmp_path / "run" / "logs")


@pytest.mark.parametrize("key", ["train.precision", "eval.precision"])
def test_fp16_on_a_t5_backbone_is_refused_saying_why(key):
    with mock.patch("torch.cuda.is_available", return_value=True), pytest.raises(VlpetError) as err:
        check_precisions(preset("tiny-t5", f"{key}=fp16"))
    assert str(err.value) == T5.format(key=key)


@pytest.mark.parametrize("key", ["train.precision", "eval.precision"])
def test_fp16_on_the_cpu_is_refused(key):
    with mock.patch("torch.cuda.is_available", return_value=False), pytest.raises(VlpetError) as err:
        check_precisions(preset("tiny-bart", f"{key}=fp16"))
    assert str(err.value) == CPU.format(key=key)


def test_bf16_on_a_gpu_without_it_says_what_to_use():
    with mock.patch("torch.cuda.is_available", return_value=True), \
            mock.patch("torch.cuda.is_bf16_supported", return_value=False), \
            mock.patch("torch.cuda.get_device_name", return_value="Tesla V100-SXM2-16GB"), \
            pytest.raises(VlpetError, match=r"^train.precision=bf16: this GPU \(Tesla V100-SXM2-16GB\) does not "
                                            r"support bf16; use train.precision=fp16 or train.precision=fp32$"):
        check_precisions(preset("tiny-bart", "train.precision=bf16"))


def test_eval_precision_is_checked_against_the_backbone_and_machine():
    with mock.patch("torch.cuda.is_available", return_value=False):
        check_eval_precision("bf16", "tiny-t5")  # bf16 autocast works on the CPU
        check_eval_precision("fp32", "tiny-t5")
        with pytest.raises(VlpetError, match=r"^eval.precision=fp16: fp16 needs a CUDA GPU"):
            check_eval_precision("fp16", "tiny-bart")
    with mock.patch("torch.cuda.is_available", return_value=True):
        with pytest.raises(VlpetError, match=r"^eval.precision=fp16: T5-family backbones overflow"):
            check_eval_precision("fp16", "tiny-t5")
        check_eval_precision("fp16", "tiny-bart")
        check_eval_precision("fp16", "no/such-backbone")  # not resolvable before loading: the loaded model's is checked


def test_fp16_on_bart_prepares_the_optimizer_with_a_gradient_scaler(tmp_path):
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    fp16 = preset("tiny-bart", "train.precision=fp16")
    with faked_cuda():
        check_precisions(fp16)  # accepted where there is a GPU
        accelerator = Accelerator(**accelerator_kwargs(fp16, tmp_path / "run"))
        assert isinstance(accelerator.scaler, torch.amp.GradScaler) and accelerator.scaler.is_enabled()
        optimizer = accelerator.prepare(ReferenceAdamW([torch.nn.Parameter(torch.zeros(3))]))
        assert isinstance(optimizer, AcceleratedOptimizer) and optimizer.scaler is accelerator.scaler
    with faked_cuda():
        assert Accelerator(**accelerator_kwargs(preset("tiny-bart", "train.precision=bf16"), tmp_path)).scaler is None


def test_the_reference_optimizer_skips_the_steps_the_scaler_skips():
    """Wrapped as Accelerate wraps it for fp16, ReferenceAdamW gets unscaled gradients, and a step whose
    gradients overflowed is skipped (no moment, no decay, no step count), reported by step_was_skipped (the
    training loop then leaves the schedule where it is) while the scale is lowered."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    Accelerator(cpu=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    optimizer = AcceleratedOptimizer(ReferenceAdamW([p], lr=0.1, weight_decay=0.01), device_placement=False,
                                     scaler=scaler)
    scaler.scale((p * torch.tensor([1.0, math.inf, 1.0])).sum()).backward()
    optimizer.step()
    assert optimizer.step_was_skipped and torch.equal(p.detach(), torch.tensor([1.0, -2.0, 3.0]))
    assert not optimizer.optimizer.state and scaler.get_scale() == 512.0

    optimizer.zero_grad()
    scaler.scale((p * torch.tensor([0.5, 1.0, 2.0])).sum()).backward()
    optimizer.step()
    plain = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    plain.grad = torch.tensor([0.5, 1.0, 2.0])
    ReferenceAdamW([plain], lr=0.1, weight_decay=0.01).step()
    assert not optimizer.step_was_skipped and torch.equal(p.detach(), plain.detach())


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_eval_precision_generates_under_autocast(precision, dtype):
    with autocast(precision, "cpu"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == dtype
    with autocast("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.slow
def test_the_loop_with_a_gradient_scaler_skips_an_overflowing_update_and_checkpoints_the_scale(tmp_path,
                                                                                             monkeypatch):
    """The training loop as fp16 runs it, on the CPU: Accelerate's fp16 path (its loss scaling, its unscaling
    clip, its scaler-driven optimizer step) with a CPU GradScaler. The first update's gradients overflow: that
    update is counted but skipped by the reference optimizer and by the schedule, the scale halves, and the
    checkpoint holds the scaler's state for a resume."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    from vlpet_cli import train as train_mod
    from vlpet_cli.progress import Progress

    preset = train_mod.resolve_train_preset("vlpet-small", ["vqa"], "toy", "tiny-bart",
                                            ["data.limit=32", "train.batch_size=8", "train.epochs=1",
                                             "eval.every=0"])
    session = train_mod.setup(preset, tmp_path / "run")
    accelerator = session.accelerator
    monkeypatch.setattr(Accelerator, "mixed_precision", property(lambda self: "fp16"))
    accelerator.native_amp = True
    accelerator.scaler = torch.amp.GradScaler("cpu")
    session.optimizer = AcceleratedOptimizer(session.optimizer.optimizer, device_placement=False,
                                             scaler=accelerator.scaler)
    accelerator._optimizers = [session.optimizer]
    first = next(p for p in session.model.parameters() if p.requires_grad)
    overflowed = []

    def overflow_once(grad):
        if overflowed:
            return grad
        overflowed.append(True)
        return grad * math.inf

    first.register_hook(overflow_once)
    norms = []
    clip = accelerator.clip_grad_norm_

    def recorded_clip(*args, **kwargs):
        norms.append(float(clip(*args, **kwargs)))
        return norms[-1]

    accelerator.clip_grad_norm_ = recorded_clip
    train_mod.fit(session, Progress(session.steps_per_epoch, enabled=False))

    updates = session.state.global_step
    assert updates == session.steps_per_epoch >= 3 and overflowed
    assert session.scheduler.last_epoch == updates - 1  # the skipped update did not advance the schedule
    inner = session.optimizer.optimizer
    assert {int(s["step"]) for s in inner.state.values()} == {updates - 1}  # nor the optimizer's step counts
    assert accelerator.scaler.get_scale() == 2.0 ** 15  # halved once from 2^16
    # clipping saw unscaled gradients (norms of 100-150 here; scaled ones would be 2^15 times larger)
    assert math.isinf(norms[0]) and len(norms) == updates and all(0 < n < 10_000 for n in norms[1:]), norms
    saved = json.loads((tmp_path / "run" / "checkpoints" / f"step-{updates}" / "state.json").read_text())
    assert saved["progress"]["grad_scaler"] == accelerator.scaler.state_dict()

    session.lock.release()

    def with_scaler(**kwargs):  # the Accelerator an fp16 resume builds, as far as the scaler goes
        made = Accelerator(**kwargs)
        made.scaler = torch.amp.GradScaler("cpu")
        return made

    monkeypatch.setattr(train_mod, "Accelerator", with_scaler)
    resumed = train_mod.setup(preset.model_copy(update={"train": preset.train.model_copy(update={"epochs": 2})}),
                              tmp_path / "run", resume=True)
    resumed.lock.release()
    assert resumed.accelerator.scaler.get_scale() == 2.0 ** 15  # the resumed run goes on with the scale it had
