"""Two processes on one run directory. `vlpet train` holds the run's lock while it writes the run (new,
--overwrite or --resume); a second writer is refused with one line naming the run and the holder, before any work.
Evaluating a run's best checkpoint while it trains writes into the run's eval/best/, never into the checkpoint,
which the trainer replaces. A run directory means its final adapter for every command (runs.locate)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from faultkit import (
    VLPET,
    console,
    console_env,
    hidden,
    nlvr_root,
    no_model,
    one_line_error,
    snapshot,
    untrained_run,
    vlpet,
)

from vlpet_cli.runs import HOLDER, LOCK, RunLock, locate

NLVR = ["--preset", "vlpet-small", "--task", "nlvr", "--backbone", "tiny-bart", "model.feat_dim=64"]


@pytest.fixture()
def world(tmp_path):
    root = nlvr_root(tmp_path / "data")
    return {"root": root, "run": untrained_run(tmp_path / "runs" / "r", root), "tmp": tmp_path}


@pytest.fixture()
def held(world):
    """The run's lock, held as a training process holds it (the holder is this process)."""
    with RunLock(world["run"]) as lock:
        yield lock


@pytest.mark.parametrize("how", [["--overwrite"], ["--resume"], []], ids=["overwrite", "resume", "new"])
def test_a_second_writer_is_refused_by_name_before_any_work(world, held, monkeypatch, capsys, how):
    if not how:  # a new run whose directory another `vlpet train --name r` has just made
        for p in world["run"].iterdir():
            if p.name not in (LOCK, HOLDER):
                p.rename(world["tmp"] / p.name)
    no_model(monkeypatch)
    before = snapshot(world["run"])
    args = ["--name", "r", "--runs-dir", world["tmp"] / "runs"]
    code, _, err = vlpet(monkeypatch, capsys, "train", *args, *how, *([] if how == ["--resume"] else
                                                                     [*NLVR, "--data-root", world["root"]]))
    one_line_error(code, err, f"run {world['run']} is in use by pid {os.getpid()}, vlpet train, since",
                   f"kill -INT {os.getpid()}", "choose another --name")
    assert snapshot(world["run"]) == before


@pytest.mark.parametrize("command", ["eval", "predict", "merge average", "merge fold"])
def test_a_run_still_training_is_named_as_such(world, held, monkeypatch, capsys, command):
    (world["run"] / "adapter").rename(world["tmp"] / "adapter")  # no final adapter yet
    image = world["tmp"] / "adapter" / "vlpet_config.json"
    args = {"eval": ["eval", world["run"]],
            "predict": ["predict", world["run"], "--task", "nlvr", "--image", image, "--image", image,
                        "--statement", "red"],
            "merge average": ["merge", "average", world["run"], world["run"], "--out", world["tmp"] / "avg"],
            "merge fold": ["merge", "fold", world["run"], "--out", world["tmp"] / "fold"]}[command]
    no_model(monkeypatch)
    code, _, err = vlpet(monkeypatch, capsys, *args)
    one_line_error(code, err, f"{world['run']} is a run without a final adapter yet: it is training now (pid "
                              f"{os.getpid()}", f"or use its best validation adapter {world['run']}/checkpoints/best")


def test_a_stopped_run_says_how_to_finish_it(world, monkeypatch, capsys):
    (world["run"] / "adapter").rename(world["tmp"] / "adapter")
    code, _, err = vlpet(monkeypatch, capsys, "eval", world["run"])
    one_line_error(code, err, "its training stopped before the end",
                   f"vlpet train --resume --name r --runs-dir {world['tmp'] / 'runs'}", "checkpoints/best")


def test_evaluating_the_best_checkpoint_writes_into_the_runs_eval_best(world, monkeypatch, capsys):
    best = world["run"] / "checkpoints" / "best"
    before = snapshot(best)
    code, out, err = vlpet(monkeypatch, capsys, "eval", best, "--limit", "2")
    assert code == 0, err
    assert snapshot(best) == before  # the trainer replaces this directory: nothing is written into it
    assert sorted(p.name for p in (world["run"] / "eval" / "best").iterdir()) == [
        "nlvr-test.json", "nlvr-test.predictions.json", "nlvr-test.submission.csv"]
    assert not list((world["run"] / "eval").glob("*.json"))  # `vlpet report` reads eval/*.json: the final adapter's


@pytest.mark.parametrize("inside", ["checkpoints/best/eval", "checkpoints", "checkpoints/step-3/x"])
def test_eval_output_inside_a_checkpoint_is_refused(world, monkeypatch, capsys, inside):
    no_model(monkeypatch)
    out = world["run"] / inside
    code, _, err = vlpet(monkeypatch, capsys, "eval", world["run"] / "checkpoints" / "best", "--out", out)
    one_line_error(code, err, f"--out {out} is inside the run's checkpoints", "which training replaces",
                   f"{world['run']}/eval/best")
    assert not out.exists() or inside == "checkpoints"


def test_a_resumable_checkpoint_is_not_an_adapter(world, monkeypatch, capsys):
    step = world["run"] / "checkpoints" / "step-3"
    step.mkdir()
    (step / "state.json").write_text("{}")
    code, _, err = vlpet(monkeypatch, capsys, "eval", step)
    one_line_error(code, err, f"{step} is a resumable training checkpoint, not an adapter",
                   f"{world['run']}/checkpoints/best")


def test_every_command_reads_a_run_directory_the_same_way(world):
    run = world["run"]
    assert locate(run).directory == run / "adapter" and locate(run).eval_dir == run / "eval"
    assert locate(run / "adapter").run == run
    best = locate(run / "checkpoints" / "best")
    assert (best.directory, best.run, best.eval_dir) == (run / "checkpoints" / "best", run, run / "eval" / "best")
    lone = locate(run / "adapter")
    assert lone.eval_dir == run / "eval"


@pytest.mark.slow
def test_the_lock_is_released_when_training_ends(world, monkeypatch, capsys):
    args = ["train", *NLVR, "--data-root", world["root"], "--runs-dir", world["tmp"] / "runs", "--name", "t",
            "eval.every=0", "train.epochs=1", "train.batch_size=4"]
    code, _, err = vlpet(monkeypatch, capsys, *args)
    assert code == 0, err
    assert not hidden(world["tmp"] / "runs" / "t")  # no lock file, no holder record left behind
    code, _, err = vlpet(monkeypatch, capsys, *args, "--overwrite")
    assert code == 0, err


@pytest.mark.slow
def test_a_second_trainer_on_a_training_run_is_refused_and_the_first_goes_on(tmp_path):
    """The issue's case: `vlpet train --name X --overwrite` while X trains wiped it under the first, and both
    reported success."""
    root = nlvr_root(tmp_path / "data", train=400)
    common = [*NLVR, "--data-root", str(root), "--runs-dir", str(tmp_path / "runs"), "--name", "x"]
    first = subprocess.Popen([str(VLPET), "train", *common, "train.epochs=50", "eval.every=0",
                              "train.batch_size=4", "train.checkpoint_every=5"], env=console_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "runs" / "x"
    deadline = time.time() + 120
    while not (run / "checkpoints").is_dir() and first.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert first.poll() is None, first.communicate()[1][-2000:]
    second = console("train", *common, "--overwrite")
    one_line_error(second.returncode, second.stderr, f"run {run} is in use by pid {first.pid}, vlpet train",
                   f"kill -INT {first.pid}")
    evaluated = console("eval", run)
    one_line_error(evaluated.returncode, evaluated.stderr, f"it is training now (pid {first.pid}")
    assert first.poll() is None  # the first trainer goes on
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 130 and "checkpoint saved in" in err, err[-2000:]
    assert (run / "config.yaml").exists() and not hidden(run)
