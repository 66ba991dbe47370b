"""`vlpet train` on the toy world: learning, exact resume, frozen backbone, DDP, and errors for bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlpet_cli.errors import VlpetError
from vlpet_cli.train import resolve_train_preset, train
from vlpet_cli.vl.model import build_model

pytestmark = pytest.mark.slow  # end-to-end runs: `make test-fast` skips them


def events(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def train_run(tmp_path, preset="vlpet-small", tasks=("coco",), backbone="tiny-bart", overrides=(), name="run",
              **kwargs):
    resolved = resolve_train_preset(preset, list(tasks), "toy", backbone, list(overrides))
    return train(resolved, tmp_path / name, **kwargs), resolved


def test_coco_loss_falls_adapter_small_backbone_frozen(tmp_path):
    result, preset = train_run(tmp_path, overrides=["train.epochs=3", "eval.every=0"])
    run = tmp_path / "run"
    losses = [e["loss"] for e in events(run, "train")]
    assert losses[-1] < 0.8 * losses[0]
    adapter = run / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == ["README.md", "adapter.safetensors", "vlpet_config.json"]
    assert result.summary["adapter_bytes"] < 2_000_000
    assert (run / "config.yaml").exists() and (run / "plots" / "loss.png").exists()
    torch.manual_seed(preset.train.seed)
    fresh, _ = build_model(preset)
    trained = dict(result.model.named_parameters())
    for name, p in fresh.named_parameters():
        if not p.requires_grad and not name.startswith("projector."):
            assert torch.equal(p, trained[name]), name


def test_resume_gives_the_same_weights_as_one_go(tmp_path):
    overrides = ["data.limit=200", "train.epochs=2", "eval.every=0", "train.batch_size=48"]  # 5 steps/epoch
    train_run(tmp_path, overrides=overrides, name="one-go")
    first, _ = train_run(tmp_path, overrides=overrides, name="paused", stop_after=3)
    assert first.summary["paused"] and not (tmp_path / "paused" / "adapter").exists()
    saved = load_file(tmp_path / "paused" / "checkpoints" / "step-3" / "optimizer.safetensors")
    assert {"rng/torch", "rng/generator/train", "rng/numpy"} <= set(saved)  # the loader's generator too
    resolved = resolve_train_preset("vlpet-small", ["coco"], "toy", "tiny-bart", overrides)
    train(resolved, tmp_path / "paused", resume=True, stop_after=4)  # crosses the epoch boundary
    train(resolved, tmp_path / "paused", resume=True)
    a = load_file(tmp_path / "one-go" / "adapter" / "adapter.safetensors")
    b = load_file(tmp_path / "paused" / "adapter" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert len(events(tmp_path / "paused", "end")) == 1


def test_multitask_t5_with_validation(tmp_path):
    train_run(tmp_path, tasks=("vqa", "gqa", "nlvr", "coco"), backbone="tiny-t5",
              overrides=["data.limit=48", "train.epochs=1", "eval.every=1", "eval.limit=12"])
    run = tmp_path / "run"
    assert {e["task"] for e in events(run, "train")} == {"vqa", "gqa", "nlvr", "coco"}
    val = events(run, "val")[-1]["metrics"]
    assert set(val) == {"vqa", "gqa", "nlvr", "coco"}
    assert {"vqa", "acc", "cider"} <= {k for m in val.values() for k in m}
    best = load_file(run / "checkpoints" / "best" / "adapter.safetensors")
    final = load_file(run / "adapter" / "adapter.safetensors")
    assert best.keys() == final.keys() and all(torch.equal(best[k], final[k]) for k in best)  # one epoch: the same


def test_refuses_to_overwrite_a_run(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("x: 1")
    with pytest.raises(VlpetError, match="already exists"):
        train_run(tmp_path, overrides=["data.limit=8"])


def cli(*args, cwd=None):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "vlpet_cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env)


def test_two_processes_under_accelerate_write_one_run(tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "vlpet_cli", "train",
           "--preset", "vlpet-small", "--task", "coco", "--data-root", "toy", "--backbone", "tiny-bart",
           "--runs-dir", str(tmp_path), "--name", "ddp", "data.limit=120", "train.epochs=1", "eval.every=0"]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "MASTER_PORT": "29533"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert events(tmp_path / "ddp", "start")[0]["processes"] == 2
    assert (tmp_path / "ddp" / "adapter" / "adapter.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ddp"]


@pytest.fixture()
def bad_root(tmp_path):
    from vlpet_cli.toy.images import toy_root

    root = tmp_path / "root"
    shutil.copytree(toy_root(), root, ignore=shutil.ignore_patterns("images"))
    return root


def assert_clean_error(out, *needles):
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    for needle in needles:
        assert needle in out.stderr, out.stderr


def test_missing_features_named_and_nothing_written(bad_root, tmp_path):
    import h5py

    feats = bad_root / "COCO" / "clip_features" / "data_clip_RN101_att.h5"
    with h5py.File(feats, "r") as f:
        ids = [i.decode() for i in f["ids"][:]]
        keep = {k: f[k][...][10:] for k in ("features", "ids")}  # the first images are training images
        attrs = dict(f.attrs)
    with h5py.File(feats, "w") as f:
        for k, v in keep.items():
            f.create_dataset(k, data=v)
        f.attrs.update(attrs)
    out = cli("train", "--preset", "vlpet-small", "--task", "coco", "--data-root", str(bad_root), "--backbone",
              "tiny-bart", "--runs-dir", str(tmp_path / "runs"), "model.feat_dim=64")
    assert_clean_error(out, "have no image features", ids[0], str(feats))
    assert not (tmp_path / "runs").exists()


def test_malformed_annotation_names_file_and_record(bad_root, tmp_path):
    path = bad_root / "vqa" / "karpathy_train.json"
    records = json.loads(path.read_text())
    del records[3]["sent"]
    path.write_text(json.dumps(records))
    out = cli("train", "--preset", "vlpet-small", "--task", "vqa", "--data-root", str(bad_root), "--backbone",
              "tiny-bart", "--runs-dir", str(tmp_path / "runs"), "model.feat_dim=64")
    qid = records[3]["question_id"]
    assert_clean_error(out, f"karpathy_train.json: record 3 (question_id={qid}): field 'sent'")


def test_unknown_task_and_unknown_key(tmp_path):
    assert_clean_error(cli("train", "--preset", "vlpet-small", "--task", "cocoo", "--data-root", "toy",
                           "--backbone", "tiny-bart", "--runs-dir", str(tmp_path)), "coco")
    assert_clean_error(cli("train", "--preset", "vlpet-small", "--task", "coco", "--data-root", "toy",
                           "--backbone", "tiny-bart", "--runs-dir", str(tmp_path), "train.lrate=1"),
                       "unknown key 'train.lrate'", "did you mean 'lr'")


def test_nan_loss_stops_with_a_clear_error(bad_root, tmp_path):
    import h5py

    with h5py.File(bad_root / "nlvr" / "clip_features" / "data_clip_RN101_att.h5", "r+") as f:
        f["features"][...] = float("nan")
    out = cli("train", "--preset", "vlpet-small", "--task", "nlvr", "--data-root", str(bad_root), "--backbone",
              "tiny-bart", "--runs-dir", str(tmp_path / "runs"), "model.feat_dim=64", "eval.every=0")
    assert_clean_error(out, "loss became nan")
    assert not (tmp_path / "runs" / "vlpet-small-nlvr" / "adapter").exists()
