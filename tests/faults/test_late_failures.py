"""Failures that need only the annotations are found before the model loads: an empty training or validation
split (an empty validation split trained a whole epoch, then stopped), a missing annotation file of a split the
command reads. Nothing is written."""

from __future__ import annotations

import pytest
from faultkit import console, nlvr_root, no_model, one_line_error, snapshot, untrained_run, vlpet

NLVR = ["--preset", "vlpet-small", "--task", "nlvr", "--backbone", "tiny-bart", "model.feat_dim=64"]


@pytest.mark.parametrize("empty, needles", [
    ("valid", ["nlvr: the validation split has no records", "eval.every=0"]),
    ("train", ["nlvr: the training split has no records"]),
], ids=["validation", "training"])
def test_an_empty_split_stops_training_before_the_model_loads(tmp_path, monkeypatch, capsys, empty, needles):
    root = nlvr_root(tmp_path / "data")
    (root / "nlvr" / f"{empty}.json").write_text("[]")
    no_model(monkeypatch)
    code, _, err = vlpet(monkeypatch, capsys, "train", *NLVR, "--data-root", root, "--runs-dir", tmp_path / "runs",
                         "eval.every=1")
    one_line_error(code, err, *needles)
    assert not (tmp_path / "runs").exists()


@pytest.mark.cli  # the installed console script in a subprocess
def test_the_console_script_refuses_an_empty_validation_split_at_once(tmp_path):
    root = nlvr_root(tmp_path / "data")
    (root / "nlvr" / "valid.json").write_text("[]")
    result = console("train", *NLVR, "--data-root", root, "--runs-dir", tmp_path / "runs", "eval.every=1")
    one_line_error(result.returncode, result.stderr, "the validation split has no records", "eval.every=0")
    assert "epoch" not in result.stdout + result.stderr.replace("eval.every", "")  # no training happened
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command, split_file", [
    ("train", "valid.json"),  # validated every epoch: its file is read before the model loads
    ("eval", "test.json"),
])
def test_a_missing_annotation_file_is_found_before_the_model_loads(tmp_path, monkeypatch, capsys, command,
                                                                    split_file):
    root = nlvr_root(tmp_path / "data")
    run = untrained_run(tmp_path / "runs" / "r", root)
    (root / "nlvr" / split_file).unlink()
    no_model(monkeypatch)
    before = snapshot(tmp_path / "runs")
    args = {"train": ["train", *NLVR, "--data-root", root, "--runs-dir", tmp_path / "runs", "--name", "new",
                      "eval.every=1"],
            "eval": ["eval", run]}[command]
    code, _, err = vlpet(monkeypatch, capsys, *args)
    one_line_error(code, err, f"annotation file not found: {root / 'nlvr' / split_file}", "--data-root")
    assert snapshot(tmp_path / "runs") == before and not (tmp_path / "runs" / "new").exists()
