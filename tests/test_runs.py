"""The run directory: config.yaml, metrics lines, and checkpoints that save and restore every random state."""

import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from vlpet_cli import runs
from vlpet_cli.errors import VlpetError
from vlpet_cli.presets import resolve
from vlpet_cli.runs import Checkpointer, TrainState
from vlpet_cli.vl.model import build_model


@pytest.fixture()
def parts():
    """A tiny VL model with an optimizer that has moments, and a scheduler."""
    preset = resolve("vlpet-small", ["model.feat_dim=16"], backbone="tiny-bart")
    torch.manual_seed(0)
    model, _ = build_model(preset)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / 10)
    sum(p.sum() for p in params).backward()
    optimizer.step()
    scheduler.step()
    return preset, model, optimizer, scheduler


class FakeCuda:
    """Stands in for torch.cuda on a machine with two GPUs: it hands out and records RNG states."""

    def __init__(self, monkeypatch):
        self.states = [torch.full((16,), 3, dtype=torch.uint8), torch.full((16,), 7, dtype=torch.uint8)]
        self.restored: list[list[torch.Tensor]] = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in self.states])
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: self.restored.append(list(states)))


def test_a_checkpoint_holds_and_restores_every_cuda_rng_state(parts, tmp_path, monkeypatch):
    _, model, optimizer, scheduler = parts
    cuda = FakeCuda(monkeypatch)
    path = Checkpointer(tmp_path, keep=2).save(model, optimizer, scheduler, TrainState(1, 2, 3, 0.5))
    saved = load_file(path / "optimizer.safetensors")
    assert torch.equal(saved["rng/cuda/0"], cuda.states[0]) and torch.equal(saved["rng/cuda/1"], cuda.states[1])
    cuda.states = [torch.zeros(16, dtype=torch.uint8)] * 2  # the GPUs moved on
    state = Checkpointer(tmp_path, keep=2).load(path, model, optimizer, scheduler)
    assert state == TrainState(1, 2, 3, 0.5)
    assert len(cuda.restored) == 1
    assert [t.tolist() for t in cuda.restored[0]] == [[3] * 16, [7] * 16]


def test_cpu_numpy_python_and_loader_generators_are_restored(parts, tmp_path):
    _, model, optimizer, scheduler = parts
    loader_gen = torch.Generator().manual_seed(5)
    torch.rand(4, generator=loader_gen)  # not at its seed any more
    ckpt = Checkpointer(tmp_path, keep=1)
    path = ckpt.save(model, optimizer, scheduler, TrainState(), {"train": loader_gen})
    expected = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(2, generator=loader_gen))
    ckpt.load(path, model, optimizer, scheduler, {"train": loader_gen})
    again = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(2, generator=loader_gen))
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2] == again[2] and torch.equal(expected[3], again[3])


def test_without_cuda_nothing_of_cuda_is_written_or_set(parts, tmp_path, monkeypatch):
    _, model, optimizer, scheduler = parts
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = Checkpointer(tmp_path, keep=1).save(model, optimizer, scheduler, TrainState())
    assert not [k for k in load_file(path / "optimizer.safetensors") if k.startswith("rng/cuda")]
    cuda = FakeCuda(monkeypatch)  # resumed on a GPU machine: the GPUs keep their own states
    Checkpointer(tmp_path, keep=1).load(path, model, optimizer, scheduler)
    assert cuda.restored == []


def test_layout_is_kept_and_old_checkpoints_pruned(parts, tmp_path):
    _, model, optimizer, scheduler = parts
    ckpt = Checkpointer(tmp_path, keep=2)
    for step in (1, 2, 3):
        ckpt.save(model, optimizer, scheduler, TrainState(global_step=step))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-2", "step-3"]
    assert ckpt.latest() == tmp_path / "checkpoints" / "step-3"
    files = sorted(p.name for p in ckpt.latest().iterdir())
    assert files == ["files.json", "model.safetensors", "optimizer.safetensors", "state.json"]
    meta = json.loads((ckpt.latest() / "state.json").read_text())
    assert meta["progress"] == {"epoch": 0, "step_in_epoch": 0, "global_step": 3, "best": None}


def test_a_checkpoint_of_an_older_version_still_loads(parts, tmp_path):
    """Checkpoints written before the RNG entries existed hold only rng/torch: they restore what they have."""
    _, model, optimizer, scheduler = parts
    ckpt = Checkpointer(tmp_path, keep=1)
    path = ckpt.save(model, optimizer, scheduler, TrainState(global_step=4))
    tensors = load_file(path / "optimizer.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.startswith("rng/") or k == "rng/torch"},
              path / "optimizer.safetensors")
    (path / "files.json").unlink()  # older versions wrote no manifest
    meta = json.loads((path / "state.json").read_text())
    del meta["rng"]
    meta["progress"]["future_field"] = 1
    (path / "state.json").write_text(json.dumps(meta))
    assert ckpt.latest_intact() == (path, [])
    assert ckpt.load(path, model, optimizer, scheduler).global_step == 4


def test_run_files(tmp_path):
    preset = resolve("vlpet-small", ["model.feat_dim=16"], backbone="tiny-bart")
    with pytest.raises(VlpetError, match="is not a run directory \\(no config.yaml\\)"):
        runs.load_run_preset(tmp_path)
    runs.write_config(tmp_path, preset)
    assert runs.load_run_preset(tmp_path) == preset
    runs.append_event(tmp_path, {"event": "start"})
    runs.append_event(tmp_path, {"event": "end"})
    assert (tmp_path / "metrics.jsonl").read_text() == '{"event": "start"}\n{"event": "end"}\n'
    assert not list(tmp_path.glob(".*tmp"))
