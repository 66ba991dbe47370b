"""A run's paths. `vlpet train` records the data root and a backbone directory as absolute paths (config.yaml and
the adapter), so that a run started in one directory evaluates, predicts and resumes from any other. Runs that
recorded a relative path (older versions) are looked for from the current directory and from the directory the
run was started in; when neither holds it, one line says where it was looked for and to pass --data-root."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from faultkit import console, nlvr_root, no_model, one_line_error, untrained_run, vlpet

from vlpet_cli.backbones import ASSETS
from vlpet_cli.train import resolve_train_preset

NLVR = ["--preset", "vlpet-small", "--task", "nlvr", "model.feat_dim=64"]


def test_a_new_run_records_absolute_paths(tmp_path, monkeypatch):
    nlvr_root(tmp_path / "data")
    shutil.copytree(ASSETS / "tiny-bart", tmp_path / "my-bart")
    monkeypatch.chdir(tmp_path)
    preset = resolve_train_preset("vlpet-small", ["nlvr"], "data", "my-bart", ["model.feat_dim=64"])
    assert preset.data.data_root == str(tmp_path / "data")
    assert preset.model.backbone == str(tmp_path / "my-bart")
    named = resolve_train_preset("vlpet-small", ["nlvr"], "data", "tiny-bart", ["model.feat_dim=64"])
    assert named.model.backbone == "tiny-bart"  # a built-in name stays a name (as 'toy' does)


@pytest.fixture()
def older_run(tmp_path):
    """A run started in tmp_path that recorded its data root as typed: 'data' (as runs did before)."""
    nlvr_root(tmp_path / "data")
    run = untrained_run(tmp_path / "runs" / "r", "data")
    (tmp_path / "elsewhere").mkdir()
    return run


def test_an_older_run_evaluates_from_another_directory(older_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, _, err = vlpet(monkeypatch, capsys, "eval", older_run, "--limit", "2")
    assert code == 0, err
    assert json.loads((older_run / "eval" / "nlvr-test.json").read_text())["n"] == 2


def test_an_older_run_whose_data_moved_says_where_it_looked(older_run, tmp_path, monkeypatch, capsys):
    (tmp_path / "data").rename(tmp_path / "moved")
    monkeypatch.chdir(tmp_path / "elsewhere")
    no_model(monkeypatch)
    code, _, err = vlpet(monkeypatch, capsys, "eval", older_run)
    one_line_error(code, err, f"the run {older_run} recorded its data root as the relative path 'data'",
                   f"not at {tmp_path / 'elsewhere' / 'data'} nor at {tmp_path / 'data'}", "pass --data-root")
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, _, err = vlpet(monkeypatch, capsys, "eval", older_run, "--data-root", tmp_path / "moved", "--limit", "2")
    assert code == 0, err


@pytest.mark.slow
def test_a_run_started_in_one_directory_evaluates_and_resumes_from_another(tmp_path, monkeypatch, capsys):
    """The acceptance of issue 21: relative --data-root and --backbone when training, the console script from
    another directory afterwards."""
    nlvr_root(tmp_path / "start" / "data")
    shutil.copytree(ASSETS / "tiny-bart", tmp_path / "start" / "my-bart")
    monkeypatch.chdir(tmp_path / "start")
    code, _, err = vlpet(monkeypatch, capsys, "train", *NLVR, "--data-root", "data", "--backbone", "my-bart",
                         "--name", "r", "--stop-after", "1", "eval.every=0", "train.epochs=2",
                         "train.batch_size=4")
    assert code == 0, err
    run = tmp_path / "start" / "runs" / "r"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["data"]["data_root"] == str(tmp_path / "start" / "data")
    assert config["model"]["backbone"] == str(tmp_path / "start" / "my-bart")
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path / "other")
    code, _, err = vlpet(monkeypatch, capsys, "train", "--resume", "--name", "r", "--runs-dir", run.parent,
                         "--backbone", tmp_path / "start" / "my-bart")  # the same backbone, given another way
    assert code == 0, err
    result = console("eval", run, "--limit", "2", cwd=tmp_path / "other")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((run / "eval" / "nlvr-test.json").read_text())["n"] == 2


@pytest.mark.slow
def test_an_older_paused_run_resumes_from_another_directory(tmp_path, monkeypatch, capsys):
    nlvr_root(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    code, _, err = vlpet(monkeypatch, capsys, "train", *NLVR, "--backbone", "tiny-bart", "--data-root", "data",
                         "--name", "r", "--stop-after", "1", "eval.every=0", "train.epochs=2", "train.batch_size=4")
    assert code == 0, err
    run = tmp_path / "runs" / "r"
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"]["data_root"] = "data"  # as runs recorded it before
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, _, err = vlpet(monkeypatch, capsys, "train", "--resume", "--name", "r", "--runs-dir", run.parent)
    assert code == 0, err
    assert (run / "adapter" / "adapter.safetensors").exists()


def test_an_older_run_whose_data_moved_resumes_with_data_root(tmp_path, monkeypatch, capsys):
    """Refused with where it looked, before the model loads; --data-root then says where the data is."""
    nlvr_root(tmp_path / "moved")
    run = untrained_run(tmp_path / "runs" / "r", "data")
    (run / "checkpoints" / "step-1").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    no_model(monkeypatch)
    code, _, err = vlpet(monkeypatch, capsys, "train", "--resume", "--name", "r", "--runs-dir", run.parent)
    one_line_error(code, err, "recorded its data root as the relative path 'data'", "pass --data-root")
    code, _, err = vlpet(monkeypatch, capsys, "train", "--resume", "--name", "r", "--runs-dir", run.parent,
                         "--data-root", tmp_path / "moved")
    # past the data root: the fake run has no intact checkpoint to resume from
    one_line_error(code, err, f"cannot resume {run}: no intact checkpoint")
    assert Path(run / "config.yaml").read_text().count("data_root: data") == 1  # the record is left as it was
