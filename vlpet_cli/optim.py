"""The optimizer, its parameter groups, the learning-rate schedule and gradient clipping of `vlpet train`.

`train.py` builds its run from these functions and `scripts/check_reference.py` replays the reference's training
trajectories through the very same ones. The default optimizer is the reference's: transformers 4.2.1's AdamW
(`ReferenceAdamW`), whose eps sits inside the un-bias-corrected denominator and whose decoupled weight decay follows
the update; `train.optimizer=torch` picks `torch.optim.AdamW` (fused on CUDA). The schedule is linear warm-up then
linear decay to zero, stepped once per update; clipping happens only when `train.clip_grad_norm` is > 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, cast

import torch

from vlpet_cli.config import Preset, TrainConfig
from vlpet_cli.pet.decay import no_decay_names

if TYPE_CHECKING:
    from vlpet_cli.vl.model import VLModel


class ReferenceAdamW(torch.optim.Optimizer):
    """AdamW as transformers 4.2.1 computes it (`transformers.AdamW`, correct_bias=True), the reference's optimizer.

    For every tensor p with a gradient g, at its own step t:
        m ← β1·m + (1 − β1)·g
        v ← β2·v + (1 − β2)·g²
        p ← p − lr·√(1 − β2^t)/(1 − β1^t) · m / (√v + eps)
        p ← p − lr·wd·p
    eps is added to √v before the bias correction (torch.optim.AdamW adds it after, so its eps is in effect
    √(1 − β2^t) times smaller: 31.6x at t = 1) and the decay comes after the update (torch: before). A tensor without
    a gradient is skipped: no moment update, no decay, no step. `foreach` computes the same with one multi-tensor
    kernel per operation instead of a Python loop over the tensors (`_step_each` is the readable form).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, foreach: bool = True):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid AdamW settings: lr {lr}, betas {betas}, eps {eps}, weight_decay {weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                                  "foreach": foreach})

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("ReferenceAdamW does not support sparse gradients")
            states = [self._state(p) for p in params]
            (self._step_foreach if group["foreach"] else self._step_each)(group, params, states)
        return loss

    def _state(self, p: torch.Tensor) -> dict:
        """The moments and step count of one tensor, created at its first step (step kept as a CPU tensor, as
        torch.optim.AdamW keeps it, so that checkpoints hold tensors only)."""
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @staticmethod
    def _step_size(group: dict, step: float) -> float:
        """lr·√(1 − β2^t)/(1 − β1^t): the bias corrections fold into the step size."""
        beta1, beta2 = group["betas"]
        return group["lr"] * math.sqrt(1.0 - beta2 ** step) / (1.0 - beta1 ** step)

    def _step_each(self, group: dict, params: list[torch.Tensor], states: list[dict]) -> None:
        """One tensor at a time."""
        beta1, beta2 = group["betas"]
        for p, state in zip(params, states):
            grad, exp_avg, exp_avg_sq = p.grad, state["exp_avg"], state["exp_avg_sq"]
            state["step"] += 1
            exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            denom = exp_avg_sq.sqrt().add_(group["eps"])
            p.addcdiv_(exp_avg, denom, value=-self._step_size(group, state["step"].item()))
            if group["weight_decay"] > 0.0:
                p.add_(p, alpha=-group["lr"] * group["weight_decay"])

    def _step_foreach(self, group: dict, params: list[torch.Tensor], states: list[dict]) -> None:
        """The same operations, each over all the group's tensors at once."""
        beta1, beta2 = group["betas"]
        grads = cast("list[torch.Tensor]", [p.grad for p in params])  # step() passes the tensors with a gradient
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1)
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denoms, group["eps"])
        torch._foreach_addcdiv_(params, exp_avgs, denoms, [-self._step_size(group, s.item()) for s in steps])
        if group["weight_decay"] > 0.0:
            torch._foreach_add_(params, params, alpha=-group["lr"] * group["weight_decay"])


def param_groups(model: VLModel, preset: Preset) -> list[dict]:
    """The two AdamW groups: decayed, and exempt by `pet.decay.no_decay_names` under the preset's decay rule
    (reference: the reference's names holding 'bias' or 'LayerNorm.weight'; corrected: every bias, LayerNorm and
    the tensors each method declares)."""
    exempt = no_decay_names(model, preset.train.decay_rule)
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name in exempt else decay).append(p)
    return [{"params": decay, "weight_decay": preset.train.weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def optimizer_choice(train: TrainConfig, device: torch.device | str = "cpu") \
        -> tuple[type[ReferenceAdamW] | type[torch.optim.AdamW], dict[str, Any]]:
    """The optimizer class `train.optimizer` names and its form on `device`: torch's AdamW is one kernel for all
    tensors on CUDA and one per operation elsewhere; the reference AdamW is one per operation."""
    if train.optimizer == "torch":
        return torch.optim.AdamW, {"fused": True} if torch.device(device).type == "cuda" else {"foreach": True}
    return ReferenceAdamW, {"foreach": True}


def build_optimizer(model: VLModel, preset: Preset, device: torch.device | str = "cpu") -> torch.optim.Optimizer:
    """The optimizer `train.optimizer` names over the model's trainable tensors, in `param_groups`."""
    cls, form = optimizer_choice(preset.train, device)
    return cls(param_groups(model, preset), lr=preset.train.lr, eps=preset.train.adam_eps, **form)


def describe(optimizer: torch.optim.Optimizer | tuple[type[torch.optim.Optimizer], dict[str, Any]]) -> str:
    """The optimizer in words, for the run's log (the start event of metrics.jsonl): a built one, or an
    `optimizer_choice` (what `vlpet train --dry-run` says a run would use)."""
    cls, settings = optimizer if isinstance(optimizer, tuple) else (type(optimizer), optimizer.defaults)
    if issubclass(cls, ReferenceAdamW):
        form = "multi-tensor" if settings["foreach"] else "per tensor"
        return f"reference AdamW (transformers 4.2.1 math, {form})"
    form = "fused" if settings.get("fused") else "multi-tensor" if settings.get("foreach") else "per tensor"
    return f"torch.optim.AdamW ({form})"


def update_due(step: int, batches_per_epoch: int, accum: int) -> bool:
    """Whether the batch at `step` (0-based, within its epoch) ends an accumulation group and so is followed by an
    optimizer update: every `accum` batches of an epoch, and the epoch's last batch (a partial group counts)."""
    return (step + 1) % accum == 0 or step + 1 == batches_per_epoch


def total_updates(batches_per_epoch: int, train: TrainConfig) -> int:
    """Optimizer updates of a whole run (`update_due`): ceil(batches / grad_accum) an epoch, at most `max_steps`."""
    total = math.ceil(batches_per_epoch / train.grad_accum) * train.epochs
    return min(total, train.max_steps) if train.max_steps else total


def schedule(optimizer: torch.optim.Optimizer, train: TrainConfig, updates: int):
    """Linear warm-up over int(warmup_ratio · updates) updates, then linear decay to 0 at `updates` (the reference's
    get_linear_schedule_with_warmup), stepped after every update."""
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(optimizer, int(train.warmup_ratio * updates), updates)


def clip_gradients(params: Iterable[torch.Tensor], max_norm: float,
                   clip: Callable = torch.nn.utils.clip_grad_norm_) -> torch.Tensor | None:
    """Scale the gradients so that their total norm is at most `max_norm`, only when max_norm > 0 (the reference's
    rule: 0 or negative means no clipping, and its default is -1); returns the norm before clipping, or None.
    `clip` is the clipping function (Accelerate's under several processes or mixed precision)."""
    if max_norm <= 0:
        return None
    return clip(params, max_norm)
