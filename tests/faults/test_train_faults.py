"""Faults on the training side (issue 13, items 3, 4, 5, 8 and 9): each ends in one line and exit 2 (or is applied
and said), checked before anything expensive, and leaves the run directory as it was: nothing lost, nothing
half-written, no temp files."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from faultkit import one_line_error, read_only, snapshot, vlpet
from safetensors.torch import load_file

from vlpet_cli.train import resolve_train_preset, train

pytestmark = pytest.mark.slow  # end-to-end runs: `make test-fast` skips them

SMALL = ["data.limit=200", "train.epochs=2", "eval.every=0", "train.batch_size=48"]  # 5 steps/epoch
TOY = ["--preset", "vlpet-small", "--task", "coco", "--data-root", "toy", "--backbone", "tiny-bart"]


def temp_leftovers(directory: Path) -> list[str]:
    """Temp files or directories of the atomic writers (`.NAME.*`) anywhere under `directory`."""
    return [str(p) for p in directory.rglob(".*")]


def events(run: Path, kind: str | None = None) -> list[dict]:
    found = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [e for e in found if kind is None or e["event"] == kind]


def same_adapters(a: Path, b: Path) -> None:
    ta, tb = load_file(a / "adapter.safetensors"), load_file(b / "adapter.safetensors")
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


def preset(*extra: str):
    return resolve_train_preset("vlpet-small", ["coco"], "toy", "tiny-bart", [*SMALL, *extra])


@pytest.fixture(scope="module")
def paused(tmp_path_factory) -> Path:
    """A run of 10 updates paused after 3 (mid-epoch), through the CLI's naming: RUNS/paused."""
    run = tmp_path_factory.mktemp("paused") / "paused"
    train(preset(), run, stop_after=3)
    return run


@pytest.fixture()
def paused_copy(paused, tmp_path) -> Path:
    run = tmp_path / "runs" / "paused"
    shutil.copytree(paused, run)
    return run


# ---- item 3: what --resume may change ----------------------------------------------------------------------
@pytest.mark.parametrize("args, needles", [
    (["--preset", "vlpet-large"], ["--preset vlpet-large", "vlpet-small"]),
    (["--task", "vqa"], ["--task vqa", "coco"]),
    (["--data-root", "/nowhere"], ["--data-root /nowhere", "toy"]),
    (["--backbone", "tiny-t5"], ["--backbone tiny-t5", "tiny-bart"]),
    (["train.lr=1e-2"], ["train.lr=0.01", "cannot be changed when resuming", "train.epochs"]),
    (["data.limit=10"], ["data.limit=10", "cannot be changed when resuming"]),
    (["train.lrr=1"], ["unknown key 'train.lrr'", "did you mean 'lr'"]),
    (["train.max_steps=2"], ["train.max_steps=2", "step-3 already made 3 updates"]),
    (["--overwrite"], ["--resume", "--overwrite"]),
], ids=["preset", "task", "data-root", "backbone", "lr", "data-limit", "typo", "max-steps-behind", "overwrite"])
def test_resume_refuses_what_cannot_change_and_touches_nothing(paused_copy, monkeypatch, capsys, args, needles):
    before = snapshot(paused_copy)
    code, _, err = vlpet(monkeypatch, capsys, "train", "--resume", "--name", "paused", "--runs-dir",
                         paused_copy.parent, *args)
    one_line_error(code, err, *needles)
    assert snapshot(paused_copy) == before


def test_resume_accepts_what_it_was_started_with(paused_copy, monkeypatch, capsys):
    code, out, err = vlpet(monkeypatch, capsys, "train", "--resume", "--name", "paused", "--runs-dir",
                           paused_copy.parent, *TOY)
    assert code == 0, err
    assert (paused_copy / "adapter" / "adapter.safetensors").exists()


def test_resume_applies_more_epochs_and_says_so(paused_copy, monkeypatch, capsys):
    code, out, err = vlpet(monkeypatch, capsys, "train", "--resume", "--name", "paused", "--runs-dir",
                           paused_copy.parent, "train.epochs=3", "eval.every=3")
    assert code == 0, err
    assert "train.epochs: 2 -> 3" in out + err and "eval.every: 0 -> 3" in out + err
    assert yaml.safe_load((paused_copy / "config.yaml").read_text())["train"]["epochs"] == 3
    assert [e["updates"] for e in events(paused_copy, "end")] == [15]  # 3 epochs of 5 steps
    assert [e["epoch"] for e in events(paused_copy, "val")] == [2]
    resumed = events(paused_copy, "resume")
    assert resumed[0]["checkpoint"] == "step-3" and resumed[0]["changes"] == ["eval.every: 0 -> 3",
                                                                           "train.epochs: 2 -> 3"]
    assert not temp_leftovers(paused_copy)


def test_resume_with_a_new_max_steps_stops_there(paused_copy, monkeypatch, capsys):
    code, out, err = vlpet(monkeypatch, capsys, "train", "--resume", "--name", "paused", "--runs-dir",
                           paused_copy.parent, "train.max_steps=7")
    assert code == 0, err
    assert "train.max_steps: None -> 7" in out + err
    assert [e["updates"] for e in events(paused_copy, "end")] == [7]


# ---- item 4: t5.* overrides ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone, override, lr", [
    ("tiny-t5", "t5.train.lr=1e-4", 1e-4),  # applied on a T5 backbone
    ("tiny-bart", "t5.train.lr=1e-4", 1e-3),  # kept for T5 only
])
def test_t5_overrides_apply_on_t5_backbones(monkeypatch, capsys, backbone, override, lr):
    code, out, err = vlpet(monkeypatch, capsys, "presets", "show", "vlpet-large", "--backbone", backbone, override)
    assert code == 0, err
    assert yaml.safe_load(out)["train"]["lr"] == pytest.approx(lr)


@pytest.mark.parametrize("command", ["presets-show", "params", "train"])
@pytest.mark.parametrize("backbone", ["tiny-bart", "tiny-t5"])
def test_t5_override_typos_are_refused_on_every_backbone(monkeypatch, capsys, tmp_path, command, backbone):
    args = {"presets-show": ["presets", "show", "vlpet-large", "--backbone", backbone],
            "params": ["params", "--preset", "vlpet-large", "--backbone", backbone],
            "train": ["train", "--preset", "vlpet-large", "--task", "coco", "--data-root", "toy", "--backbone",
                      backbone, "--runs-dir", tmp_path / "runs"]}[command]
    code, _, err = vlpet(monkeypatch, capsys, *args, "t5.train.lrr=1")
    one_line_error(code, err, "unknown key 't5.train.lrr'", "did you mean 'lr'")
    assert not (tmp_path / "runs").exists()


# ---- item 5: every task's features are checked ------------------------------------------------------------
def shrink_features(path: Path, dim: int = 32) -> None:
    """Rewrite a packed feature file with only the first `dim` feature channels."""
    import h5py

    with h5py.File(path, "r") as f:
        data = {k: f[k][...] for k in f}
        attrs = dict(f.attrs)
    data["features"] = data["features"][..., :dim]
    with h5py.File(path, "w") as f:
        for k, v in data.items():
            f.create_dataset(k, data=v)
        f.attrs.update(attrs)


@pytest.mark.parametrize("tasks, source, needle", [("coco,nlvr", "nlvr", "nlvr train"),
                                                   ("coco,gqa", "VG", "gqa train")])
def test_wrong_sized_features_of_a_later_task_stop_before_anything_is_written(monkeypatch, capsys, tmp_path,
                                                                              tasks, source, needle):
    from vlpet_cli.toy.images import toy_root
    from vlpet_cli.toy.root import toy_feature_dim

    root = tmp_path / "root"
    shutil.copytree(toy_root(), root, ignore=shutil.ignore_patterns("images"))
    feats = root / source / "clip_features" / "data_clip_RN101_att.h5"
    shrink_features(feats)
    code, _, err = vlpet(monkeypatch, capsys, "train", "--preset", "vlpet-small", "--task", tasks, "--data-root",
                         root, "--backbone", "tiny-bart", "--runs-dir", tmp_path / "runs",
                         f"model.feat_dim={toy_feature_dim()}", "data.limit=50", "eval.every=0")
    one_line_error(code, err, needle, str(feats), "32-dimensional", f"model.feat_dim={toy_feature_dim()}")
    assert not (tmp_path / "runs").exists()


# ---- item 8: file-system and runtime faults ---------------------------------------------------------------
def test_runs_dir_on_a_read_only_mount(monkeypatch, capsys, tmp_path):
    import vlpet_cli.train as train_module

    mount = tmp_path / "ro"
    mount.mkdir()
    read_only(monkeypatch, mount)
    monkeypatch.setattr(train_module, "build_model", lambda *a, **k: pytest.fail("the model was built"))
    code, _, err = vlpet(monkeypatch, capsys, "train", *TOY, "--runs-dir", mount / "runs", *SMALL)
    one_line_error(code, err, f"--runs-dir {mount / 'runs'}", "Read-only file system")
    assert list(mount.iterdir()) == []


def test_runs_dir_under_a_file(monkeypatch, capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("not a directory")
    code, _, err = vlpet(monkeypatch, capsys, "train", *TOY, "--runs-dir", tmp_path / "notes.txt" / "runs", *SMALL)
    one_line_error(code, err, str(tmp_path / "notes.txt"), "is a file, not a directory")
    assert (tmp_path / "notes.txt").read_text() == "not a directory"


def test_a_full_disk_at_the_best_adapter_loses_nothing(monkeypatch, capsys, tmp_path):
    import vlpet_cli.artifacts as artifacts

    validating = ["train.epochs=2", "eval.every=1", "eval.limit=20"]
    one_go = tmp_path / "one-go"
    train(preset(*validating), one_go)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    runs = tmp_path / "runs"
    with monkeypatch.context() as m:
        m.setattr(artifacts, "save_file", full)
        code, _, err = vlpet(m, capsys, "train", *TOY, "--runs-dir", runs, "--name", "full", *SMALL, *validating)
    run = runs / "full"
    one_line_error(code, err, f"cannot write {run / 'checkpoints' / 'best'}", "No space left on device",
                   "intact up to its last checkpoint", "step-5", "vlpet train --resume --name full")
    assert not temp_leftovers(run)
    assert not (run / "checkpoints" / "best").exists()
    assert (run / "checkpoints" / "step-5" / "files.json").exists()  # the epoch's training is kept
    code, _, err = vlpet(monkeypatch, capsys, "train", "--resume", "--name", "full", "--runs-dir", runs)
    assert code == 0, err
    same_adapters(one_go / "adapter", run / "adapter")
    same_adapters(one_go / "checkpoints" / "best", run / "checkpoints" / "best")
    assert [e["epoch"] for e in events(run, "val")] == [0, 1]  # validated once each, the lost one redone


def test_a_full_disk_at_a_checkpoint(monkeypatch, capsys, tmp_path):
    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", full)  # runs.Checkpointer imports it when it saves
    code, _, err = vlpet(monkeypatch, capsys, "train", *TOY, "--runs-dir", tmp_path, "--name", "full", *SMALL)
    one_line_error(code, err, f"cannot write {tmp_path / 'full' / 'checkpoints' / 'step-5'}",
                   "No space left on device", "no checkpoint was written", "--overwrite")
    assert not temp_leftovers(tmp_path / "full")


@pytest.mark.parametrize("command", ["train", "params"])
def test_a_backbone_directory_without_weights(monkeypatch, capsys, tmp_path, command):
    from vlpet_cli.backbones import ASSETS

    bare = tmp_path / "bare-bart"
    shutil.copytree(ASSETS / "tiny-bart", bare, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    if command == "params":  # a config is all `vlpet params` needs: it stays so
        code, out, err = vlpet(monkeypatch, capsys, "params", "--preset", "vlpet-small", "--backbone", bare,
                               "--json")
        assert code == 0, err
        assert json.loads(out)["trainable"] > 0
        return
    code, _, err = vlpet(monkeypatch, capsys, "train", "--preset", "vlpet-small", "--task", "coco", "--data-root",
                         "toy", "--backbone", bare, "--runs-dir", tmp_path / "runs", *SMALL)
    one_line_error(code, err, str(bare), "no weights", "model.safetensors")
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "done"
    train(preset("train.epochs=1"), run)
    return run


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing"])
def test_a_corrupt_adapter_on_eval(finished, monkeypatch, capsys, tmp_path, damage):
    run = tmp_path / "done"
    shutil.copytree(finished, run)
    weights = run / "adapter" / "adapter.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbage":
        weights.write_bytes(b"\xff" * 64)
    else:
        weights.unlink()
    before = snapshot(run)
    code, _, err = vlpet(monkeypatch, capsys, "eval", run, "--limit", "4")
    one_line_error(code, err, str(weights), "missing" if damage == "missing" else "damaged")
    assert snapshot(run) == before


@pytest.mark.parametrize("weights, needle", [("1,x", "--weights 1,x"), ("1", "got 1 weights for 2 adapters"),
                                             ("1,-1", "mean weights must be non-negative")])
def test_merge_average_bad_weights(finished, monkeypatch, capsys, tmp_path, weights, needle):
    code, _, err = vlpet(monkeypatch, capsys, "merge", "average", finished / "adapter", finished / "adapter",
                         "--out", tmp_path / "avg", "--weights", weights)
    one_line_error(code, err, needle)
    assert not (tmp_path / "avg").exists() and not temp_leftovers(tmp_path)


# ---- item 9: the smaller ones ---------------------------------------------------------------------------------
@pytest.mark.parametrize("task", [",", " , ", ""])
def test_an_empty_task_list_is_refused(monkeypatch, capsys, tmp_path, task):
    code, _, err = vlpet(monkeypatch, capsys, "train", "--preset", "vlpet-small", "--task", task, "--data-root",
                         "toy", "--backbone", "tiny-bart", "--runs-dir", tmp_path / "runs")
    one_line_error(code, err, "--task", "names no task")
    assert not (tmp_path / "runs").exists()


def test_merge_average_protects_an_existing_out_and_takes_run_directories(finished, monkeypatch, capsys, tmp_path):
    out = tmp_path / "avg"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    code, _, err = vlpet(monkeypatch, capsys, "merge", "average", finished, finished, "--out", out)
    one_line_error(code, err, f"--out {out} already exists", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    code, _, err = vlpet(monkeypatch, capsys, "merge", "average", finished, finished, "--out", out, "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter.safetensors", "vlpet_config.json"]
    same_adapters(finished / "adapter", out)
    assert not temp_leftovers(tmp_path)


def test_merge_average_of_an_unfinished_run_says_so(paused, monkeypatch, capsys, tmp_path):
    code, _, err = vlpet(monkeypatch, capsys, "merge", "average", paused, paused, "--out", tmp_path / "avg")
    one_line_error(code, err, str(paused), "without a final adapter", "--resume")


def test_a_killed_toy_build_leaves_nothing_behind():
    from vlpet_cli.toy.images import TOY_VERSION, toy_root

    root = toy_root()
    stale = root.parent / f".{TOY_VERSION}.building-killed"
    (stale / "COCO").mkdir(parents=True)
    (stale / "COCO" / "half.h5").write_bytes(b"\0" * 1024)
    assert toy_root() == root
    assert not stale.exists()
    assert (root / "toy.json").exists()


def test_the_nan_message_does_not_suggest_what_is_already_set(monkeypatch, capsys, tmp_path):
    import h5py

    from vlpet_cli.toy.images import toy_root
    from vlpet_cli.toy.root import toy_feature_dim

    root = tmp_path / "root"
    shutil.copytree(toy_root(), root, ignore=shutil.ignore_patterns("images"))
    with h5py.File(root / "nlvr" / "clip_features" / "data_clip_RN101_att.h5", "r+") as f:
        f["features"][...] = float("nan")
    code, _, err = vlpet(monkeypatch, capsys, "train", "--preset", "vlpet-small", "--task", "nlvr", "--data-root",
                         root, "--backbone", "tiny-bart", "--runs-dir", tmp_path / "runs",
                         f"model.feat_dim={toy_feature_dim()}", "eval.every=0", "train.precision=fp32")
    line = one_line_error(code, err, "loss became nan", "lower train.lr")
    assert "train.precision=fp32" not in line


@pytest.mark.parametrize("how", ["stop-after", "max-steps"])
def test_a_run_that_ends_mid_epoch_logs_its_last_losses(monkeypatch, capsys, tmp_path, how):
    extra = ["--stop-after", "3"] if how == "stop-after" else ["train.max_steps=3"]
    code, _, err = vlpet(monkeypatch, capsys, "train", *TOY, "--runs-dir", tmp_path, "--name", "r", *SMALL, *extra)
    assert code == 0, err
    logged = events(tmp_path / "r", "train")
    assert logged and logged[-1]["step"] == 3 and logged[-1]["update"] == 3


def test_a_resumed_run_does_not_repeat_the_events_of_the_interrupted_leg(monkeypatch, capsys, tmp_path):
    every = ["train.checkpoint_every=1", "train.keep_checkpoints=3"]
    one_go = tmp_path / "one-go"
    train(preset(*every), one_go)
    run = tmp_path / "runs" / "r"
    train(preset(*every), run, stop_after=4)
    shutil.rmtree(run / "checkpoints" / "step-4")  # as if killed before it: the run resumes from step-3
    code, _, err = vlpet(monkeypatch, capsys, "train", "--resume", "--name", "r", "--runs-dir", run.parent)
    assert code == 0, err
    steps = [(e["task"], e["step"]) for e in events(run, "train")]
    assert steps == sorted(set(steps)), steps  # each batch's losses logged once, in order
    assert [(e["task"], e["step"]) for e in events(one_go, "train")] == steps
    assert [e["checkpoint"] for e in events(run, "resume")] == ["step-3"]
    same_adapters(one_go / "adapter", run / "adapter")
