"""`vlpet train` stops cleanly on SIGINT/SIGTERM, and --resume skips damaged checkpoints."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from vlpet_cli import train as train_module
from vlpet_cli.errors import VlpetError
from vlpet_cli.progress import Progress
from vlpet_cli.train import TrainingInterrupted, resolve_train_preset, train

pytestmark = pytest.mark.slow  # end-to-end runs: `make test-fast` skips them

OVERRIDES = ["data.limit=200", "train.epochs=2", "eval.every=0", "train.batch_size=48"]  # 5 steps/epoch


def preset(*extra):
    return resolve_train_preset("vlpet-small", ["coco"], "toy", "tiny-bart", [*OVERRIDES, *extra])


def signal_at(monkeypatch, at: int, *signums: int) -> None:
    """Send these signals to this process when the progress reaches batch `at` (once)."""
    class Signalling(Progress):
        def update(self, completed, description=None, count=0):
            super().update(completed, description, count)
            if completed == at and not getattr(self, "sent", False):
                self.sent = True
                for signum in signums:
                    os.kill(os.getpid(), signum)

    monkeypatch.setattr(train_module, "Progress", Signalling)


def same_adapters(a, b) -> None:
    ta, tb = load_file(a / "adapter" / "adapter.safetensors"), load_file(b / "adapter" / "adapter.safetensors")
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


@pytest.fixture(scope="module")
def one_go(tmp_path_factory):
    run = tmp_path_factory.mktemp("one-go") / "run"
    train(preset(), run)
    return run


def test_sigint_saves_a_checkpoint_and_resume_finishes_identically(one_go, tmp_path, monkeypatch):
    before = signal.getsignal(signal.SIGINT)
    signal_at(monkeypatch, 3, signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as info:
        train(preset(), tmp_path / "run")
    assert info.value.exit_code == 130
    message = str(info.value)
    assert "SIGINT" in message and "update 3" in message and str(tmp_path / "run" / "checkpoints" / "step-3") in message
    assert f"vlpet train --resume --name run --runs-dir {tmp_path}" in message
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are put back
    stopped = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert stopped[-1] == {"event": "interrupted", "signal": "SIGINT", "epoch": 0, "step_in_epoch": 3, "update": 3}
    monkeypatch.undo()
    train(preset(), tmp_path / "run", resume=True)
    same_adapters(one_go, tmp_path / "run")


def test_sigterm_exits_143(tmp_path, monkeypatch):
    signal_at(monkeypatch, 6, signal.SIGTERM)  # the first batch of the second epoch
    with pytest.raises(TrainingInterrupted) as info:
        train(preset(), tmp_path / "run")
    assert info.value.exit_code == 143 and "SIGTERM" in str(info.value)
    assert (tmp_path / "run" / "checkpoints" / "step-6" / "state.json").exists()


def test_a_second_ctrl_c_aborts_at_once(tmp_path, monkeypatch):
    signal_at(monkeypatch, 2, signal.SIGINT, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train(preset(), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints" / "step-2").exists()  # no time was spent saving


def test_the_cli_prints_how_to_resume_and_exits_130(tmp_path):
    cmd = [sys.executable, "-m", "vlpet_cli", "train", "--preset", "vlpet-small", "--task", "coco", "--data-root",
           "toy", "--backbone", "tiny-bart", "--runs-dir", str(tmp_path), "--name", "cli", "data.limit=2000",
           "train.epochs=50", "eval.every=0", "train.batch_size=8"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "300"})
    metrics = tmp_path / "cli" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and '"event": "train"' not in (
            metrics.read_text() if metrics.exists() else ""):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-2000:]
    assert "checkpoint saved in" in err and "vlpet train --resume --name cli" in err
    assert "Traceback" not in err


def test_kill_int_of_a_training_process_then_resume_finishes_identically(one_go, tmp_path):
    """The acceptance of issue 13: exit 130, a checkpoint at the step it stopped, and a bit-identical finish."""
    common = ["--preset", "vlpet-small", "--task", "coco", "--data-root", "toy", "--backbone", "tiny-bart",
              "--runs-dir", str(tmp_path), "--name", "run"]
    overrides = [*OVERRIDES, "train.checkpoint_every=1"]  # a line in metrics.jsonl at every update
    env = {**os.environ, "COLUMNS": "300"}
    proc = subprocess.Popen([sys.executable, "-m", "vlpet_cli", "train", *common, *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and '"event": "train"' not in (
            metrics.read_text() if metrics.exists() else ""):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-2000:]
    stopped = [json.loads(x) for x in metrics.read_text().splitlines()][-1]
    assert stopped["event"] == "interrupted" and 0 < stopped["update"] < 10
    where = tmp_path / "run" / "checkpoints" / f"step-{stopped['update']}"
    assert f"checkpoint saved in {where}" in err
    saved = json.loads((where / "state.json").read_text())["progress"]
    assert saved["global_step"] == stopped["update"]
    assert not (tmp_path / "run" / "adapter").exists()
    resumed = subprocess.run([sys.executable, "-m", "vlpet_cli", "train", "--resume", "--name", "run",
                              "--runs-dir", str(tmp_path)], capture_output=True, text=True, env=env, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    same_adapters(one_go, tmp_path / "run")


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "state.json", "files.json"])
def test_a_truncated_file_of_the_newest_checkpoint_falls_back_and_finishes_identically(one_go, tmp_path, capsys,
                                                                                        name):
    every = preset("train.checkpoint_every=1", "train.keep_checkpoints=3")
    train(every, tmp_path / "run", stop_after=3)
    newest = tmp_path / "run" / "checkpoints" / "step-3"
    path = newest / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    capsys.readouterr()
    train(every, tmp_path / "run", resume=True)
    err = capsys.readouterr().err
    assert f"warning: checkpoint {newest} is damaged" in err and "resuming from step-2 instead" in err
    same_adapters(one_go, tmp_path / "run")


def damage_file(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_resume_skips_a_damaged_checkpoint_with_a_warning(one_go, tmp_path, capsys):
    every = preset("train.checkpoint_every=1", "train.keep_checkpoints=3")
    train(every, tmp_path / "run", stop_after=3)
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-1", "step-2", "step-3"]
    assert sorted(json.loads((ckpts / "step-3" / "files.json").read_text())) == [
        "model.safetensors", "optimizer.safetensors", "state.json"]
    damage_file(ckpts / "step-3" / "model.safetensors")
    capsys.readouterr()
    train(every, tmp_path / "run", resume=True)
    err = capsys.readouterr().err
    assert f"warning: checkpoint {ckpts / 'step-3'} is damaged (model.safetensors does not match the sha256" in err
    assert "resuming from step-2 instead" in err
    same_adapters(one_go, tmp_path / "run")


def test_resume_says_so_when_no_checkpoint_is_intact(tmp_path):
    every = preset("train.checkpoint_every=1")
    train(every, tmp_path / "run", stop_after=2)
    ckpts = tmp_path / "run" / "checkpoints"
    damage_file(ckpts / "step-2" / "optimizer.safetensors")
    (ckpts / "step-1" / "model.safetensors").write_bytes(b"")
    with pytest.raises(VlpetError, match=r"cannot resume .*: no intact checkpoint \(step-2: optimizer.safetensors "
                                         r"does not match .*; step-1: model.safetensors has 0 bytes, \d+ were "
                                         r"written\); start it again with --overwrite"):
        train(every, tmp_path / "run", resume=True)
