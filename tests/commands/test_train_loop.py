"""The training loop never waits for the device per step: losses stay on the device and are read (one
`tolist` for all of them) only at log points; the non-finite check runs there too and still names the step."""

from __future__ import annotations

import json
import sys
from unittest import mock

import pytest
import torch

from vlpet_cli import train as train_mod
from vlpet_cli.errors import VlpetError
from vlpet_cli.progress import Progress


@pytest.mark.slow
def test_fit_reads_losses_only_at_log_points(tmp_path, monkeypatch):
    preset = train_mod.resolve_train_preset("vlpet-small", ["vqa", "gqa"], "toy", "tiny-bart",
                                            ["data.limit=48", "train.batch_size=8", "train.epochs=1",
                                             "eval.every=0"])
    session = train_mod.setup(preset, tmp_path / "run")
    steps = session.steps_per_epoch
    assert steps >= 8
    monkeypatch.setattr(train_mod.time, "time", lambda: 1000.0)  # no log line falls due by the clock
    calls = {"item": 0, "tolist": 0}
    item, tolist = torch.Tensor.item, torch.Tensor.tolist

    def counted(name, fn, where):
        """Count the calls made from `where` (the optimizers read their step counters, CPU tensors, themselves:
        torch's AdamW and vlpet_cli/optim.py's; the multitask plan lists each epoch's permutation once)."""
        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if where in caller and not caller.endswith("optim.py"):
                calls[name] += 1
            return fn(self, *args, **kwargs)
        return wrapper

    with mock.patch.object(torch.Tensor, "item", counted("item", item, "vlpet_cli")), \
            mock.patch.object(torch.Tensor, "tolist", counted("tolist", tolist, "train.py")):
        train_mod.fit(session, Progress(steps, enabled=False))
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [e for e in events if e.get("event") == "train"]
    assert {e["task"] for e in logged} == {"vqa", "gqa"} and all(e["loss"] > 0 for e in logged)
    assert calls["item"] == 0  # not once per step
    steps = [state["step"] for state in session.optimizer.state.values()]
    assert steps and all(s.device.type == "cpu" for s in steps)  # what the optimizer reads is on the host
    assert calls["tolist"] == 1  # one read at the end of the epoch, for all its steps


def test_non_finite_loss_is_found_at_the_log_point_with_its_step(tmp_path):
    window = {"vqa": [(0, 0, torch.tensor(1.0)), (0, 2, torch.tensor(0.5))],
              "gqa": [(0, 1, torch.tensor(float("inf"))), (0, 3, torch.tensor(float("nan")))]}
    checkpointer = mock.Mock(latest=lambda: None)
    with pytest.raises(VlpetError, match=r"the gqa loss became inf at epoch 0 step 1; lower train.lr"):
        train_mod.read_losses(window, "fp32", checkpointer)
    good = {"vqa": window["vqa"]}
    assert train_mod.read_losses(good, "fp32", checkpointer) == {"vqa": [1.0, 0.5]}
