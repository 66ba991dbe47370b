"""File-system faults in every command: an input the user may not read, an output on a read-only disk or in a
folder the user may not write. Each ends in one line naming the file and the fix, exit code 2, found before
the model loads where it can be, with nothing written.

Root reads every file whatever its mode, so the tests in this process simulate the faults (the file calls fail
with EACCES or EROFS); those through the console script run as an unprivileged user (setpriv), where real file
modes hold."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from faultkit import (
    console,
    hidden,
    nlvr_root,
    no_model,
    one_line_error,
    open_to_all,
    read_only,
    shared_dir,
    snapshot,
    unreadable,
    untrained_run,
    vlpet,
)

from vlpet_cli.presets import preset_path

NLVR = ["--preset", "vlpet-small", "--task", "nlvr", "--backbone", "tiny-bart", "model.feat_dim=64"]


@pytest.fixture()
def world(tmp_path):
    root = nlvr_root(tmp_path / "data")
    run = untrained_run(tmp_path / "runs" / "r", root)
    shutil.copy(preset_path("vlpet-small"), tmp_path / "mine.yaml")
    (tmp_path / "ref.pth").write_bytes(b"\0")
    (tmp_path / "ro").mkdir()
    return {"root": root, "run": run, "tmp": tmp_path, "store": root / "nlvr" / "clip_features" /
            "data_clip_RN101_att.h5"}


# ---- inputs the user may not read -------------------------------------------------------------------------
# command line, the unreadable file, whether the model must not have been built when it is found
UNREADABLE = {
    "train: annotation file": (["train", *NLVR, "--data-root", "{root}", "--runs-dir", "{tmp}/new"],
                               "{root}/nlvr/train.json", True),
    "train: validation annotation file": (["train", *NLVR, "--data-root", "{root}", "--runs-dir", "{tmp}/new",
                                           "eval.every=1"], "{root}/nlvr/valid.json", True),
    "train: preset file": (["train", "--preset", "{tmp}/mine.yaml", "--task", "nlvr", "--data-root", "{root}",
                            "--backbone", "tiny-bart", "--runs-dir", "{tmp}/new"], "{tmp}/mine.yaml", True),
    "train --resume: the run's config.yaml": (["train", "--resume", "--name", "r", "--runs-dir", "{tmp}/runs"],
                                              "{run}/config.yaml", True),
    "eval: annotation file": (["eval", "{run}"], "{root}/nlvr/test.json", True),
    "eval: adapter config": (["eval", "{run}"], "{run}/adapter/vlpet_config.json", True),
    "eval: adapter weights": (["eval", "{run}"], "{run}/adapter/adapter.safetensors", False),
    "predict: adapter config": (["predict", "{run}", "--task", "nlvr", "--image", "{tmp}/mine.yaml", "--image",
                                 "{tmp}/mine.yaml", "--statement", "red"], "{run}/adapter/vlpet_config.json", True),
    "merge average: adapter weights": (["merge", "average", "{run}", "{run}", "--out", "{tmp}/avg"],
                                       "{run}/adapter/adapter.safetensors", True),
    "import-reference: checkpoint": (["import-reference", "{tmp}/ref.pth", "--out", "{tmp}/imported", "--preset",
                                      "vlpet-small", "--backbone", "tiny-bart"], "{tmp}/ref.pth", True),
    "report: metrics.jsonl": (["report", "{run}", "--out", "{tmp}/report.png"], "{run}/metrics.jsonl", True),
    "report: config.yaml": (["report", "{run}", "--out", "{tmp}/report.png"], "{run}/config.yaml", True),
    "presets show: preset file": (["presets", "show", "{tmp}/mine.yaml"], "{tmp}/mine.yaml", True),
    "params: preset file": (["params", "--preset", "{tmp}/mine.yaml", "--backbone", "tiny-bart"], "{tmp}/mine.yaml",
                            True),
    "features inspect: annotation file": (["features", "inspect", "{store}", "--annotations",
                                           "{root}/nlvr/test.json"], "{root}/nlvr/test.json", True),
    "extract-features: annotation file": (["extract-features", "--images", "{tmp}", "--model", "tiny-clip", "--out",
                                           "{tmp}/f.h5", "--annotations", "{root}/nlvr/test.json"],
                                          "{root}/nlvr/test.json", True),
}


@pytest.mark.parametrize("case", UNREADABLE)
def test_an_unreadable_input_is_one_line(world, monkeypatch, capsys, case):
    args, denied, early = UNREADABLE[case]
    denied = Path(denied.format(**world))
    before = snapshot(world["tmp"])
    unreadable(monkeypatch, denied)
    if early:
        no_model(monkeypatch)
    code, _, err = vlpet(monkeypatch, capsys, *[a.format(**world) for a in args])
    monkeypatch.undo()
    line = one_line_error(code, err, str(denied))
    assert "permission denied" in line.lower(), line
    assert "read access" in line or "its permissions" in line, line  # the fix, not "damaged" or "not JSON"
    assert snapshot(world["tmp"]) == before and not hidden(world["tmp"])


# ---- outputs on a read-only disk --------------------------------------------------------------------------
READ_ONLY = {  # command line, the output named in the line
    "train: --runs-dir": (["train", *NLVR, "--data-root", "{root}", "--runs-dir", "{tmp}/ro/runs"], "--runs-dir"),
    "eval: --out": (["eval", "{run}", "--out", "{tmp}/ro/eval"], "--out {tmp}/ro/eval"),
    "merge average: --out": (["merge", "average", "{run}", "{run}", "--out", "{tmp}/ro/avg"], "--out {tmp}/ro/avg"),
    "merge fold: --out": (["merge", "fold", "{run}", "--out", "{tmp}/ro/fold"], "--out {tmp}/ro/fold"),
    "merge export-peft: --out": (["merge", "export-peft", "{run}", "--out", "{tmp}/ro/peft"], "--out {tmp}/ro/peft"),
    "import-reference: --out": (["import-reference", "{tmp}/ref.pth", "--out", "{tmp}/ro/imported", "--preset",
                                 "vlpet-small", "--backbone", "tiny-bart"], "--out {tmp}/ro/imported"),
    "report: --out": (["report", "{run}", "--out", "{tmp}/ro/report.png"], "--out {tmp}/ro/report.png"),
    "presets cp: FILE": (["presets", "cp", "vlpet-small", "{tmp}/ro/mine.yaml"], "{tmp}/ro/mine.yaml"),
    "features convert: DST": (["features", "convert", "{store}", "{tmp}/ro/per-image", "--layout", "per-image"],
                              "{tmp}/ro/per-image"),
    "quickstart: --runs-dir": (["quickstart", "--runs-dir", "{tmp}/ro/qs"], "{tmp}/ro/qs"),
}


@pytest.mark.parametrize("case", READ_ONLY)
def test_a_read_only_output_is_one_line_before_any_work(world, monkeypatch, capsys, case):
    args, named = READ_ONLY[case]
    read_only(monkeypatch, world["tmp"] / "ro")
    no_model(monkeypatch)
    monkeypatch.setattr("vlpet_cli.artifacts.read_tensors", lambda *a: pytest.fail("an input was loaded"))
    before = snapshot(world["tmp"])
    code, _, err = vlpet(monkeypatch, capsys, *[a.format(**world) for a in args])
    monkeypatch.undo()
    line = one_line_error(code, err, named.format(**world))
    assert "read-only file system" in line.lower(), line
    assert snapshot(world["tmp"]) == before and list((world["tmp"] / "ro").iterdir()) == []


# ---- through the console script, as a user whose rights the file modes limit -------------------------------
@pytest.mark.cli
def test_the_console_script_names_an_unreadable_annotation_file():
    """The issue's case: an annotation file without read permission was a PermissionError traceback."""
    with shared_dir() as tmp:
        root = nlvr_root(tmp / "data")
        open_to_all(tmp)
        (root / "nlvr" / "train.json").chmod(0o000)
        runs = tmp / "runs"
        runs.mkdir(mode=0o777)
        runs.chmod(0o777)
        result = console("train", *NLVR, "--data-root", root, "--runs-dir", runs, unprivileged=True,
                         VLPET_CACHE=str(tmp / "cache"), HOME=str(tmp))
        line = one_line_error(result.returncode, result.stderr, f"cannot read {root / 'nlvr' / 'train.json'}",
                              "permission denied", "give your user read access")
        assert line and list(runs.iterdir()) == []


@pytest.mark.cli
def test_the_console_script_names_unreadable_and_unwritable_files_of_report_and_presets():
    with shared_dir() as tmp:
        run = untrained_run(tmp / "runs" / "r", nlvr_root(tmp / "data"))
        open_to_all(tmp)
        (tmp / "plots").mkdir()  # root's, mode 755: the unprivileged user may not write in it
        result = console("report", run, "--out", tmp / "plots" / "report.png", unprivileged=True, HOME=str(tmp))
        one_line_error(result.returncode, result.stderr, f"--out {tmp / 'plots' / 'report.png'}",
                       "Permission denied", "choose a writable --out")
        (run / "metrics.jsonl").chmod(0o000)
        (tmp / "out").mkdir(mode=0o777)
        (tmp / "out").chmod(0o777)
        result = console("report", run, "--out", tmp / "out" / "report.png", unprivileged=True, HOME=str(tmp))
        one_line_error(result.returncode, result.stderr, f"cannot read {run / 'metrics.jsonl'}", "permission denied")
        shutil.copy(preset_path("vlpet-small"), tmp / "mine.yaml")
        (tmp / "mine.yaml").chmod(0o000)
        result = console("presets", "show", tmp / "mine.yaml", unprivileged=True, HOME=str(tmp))
        one_line_error(result.returncode, result.stderr, str(tmp / "mine.yaml"), "permission denied")
        assert list((tmp / "out").iterdir()) == []


@pytest.mark.cli
def test_the_console_script_names_unreadable_adapter_weights():
    with shared_dir() as tmp:
        run = untrained_run(tmp / "runs" / "r", nlvr_root(tmp / "data"))
        open_to_all(tmp)
        weights = run / "adapter" / "adapter.safetensors"
        weights.chmod(0o000)
        (run / "eval").mkdir(mode=0o777)
        (run / "eval").chmod(0o777)
        result = console("eval", run, unprivileged=True, HOME=str(tmp), VLPET_CACHE=str(tmp / "cache"))
        one_line_error(result.returncode, result.stderr, f"cannot read {weights}", "permission denied")
        assert list((run / "eval").iterdir()) == []  # safetensors calls it missing; it is not damaged either
        assert json.loads((run / "adapter" / "vlpet_config.json").read_text())["format"] == "vlpet-adapter/1"
