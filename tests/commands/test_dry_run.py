"""`vlpet train --dry-run`: every check of a run and its plan (parameters, steps, checkpoints, validations,
optimizer), written nowhere; `--time N` times N real steps. The plan is checked against the toy world's data and
against what the same run, trained for real, logs and writes."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults.faultkit import vlpet
from vlpet_cli.config import EvalConfig, Preset, TrainConfig
from vlpet_cli.dryrun import save_points

VLPET = Path(sys.executable).with_name("vlpet")
TOY = ["-p", "vlpet-small", "-t", "coco,vqa", "--data-root", "toy", "--backbone", "tiny-bart"]
# 60 records per task: coco's batch 20 and vqa's 24 (the toy world's 24 x the tasks' ratios) make 3 + 3 steps
SMALL = ["data.limit=60", "train.epochs=2", "train.checkpoint_every=2", "train.keep_checkpoints=20",
         "eval.every=1", "eval.limit=8"]


def snapshot(root: Path) -> dict[str, tuple[int, int] | None]:
    """Every file under root with its size and modification time, and every folder (whose time changes with the
    writability probe `vlpet train` makes: a file created and removed at once)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None
            for p in root.rglob("*")}


def test_save_points_follow_the_training_loop():
    """Checkpoints every checkpoint_every updates and at each epoch end, one where max_steps stops the run;
    validation after whole epochs only."""
    def preset(every: int = 1, **train) -> Preset:
        return Preset(name="p", method="m", description="d", train=TrainConfig(**train), eval=EvalConfig(every=every))

    assert save_points(5, preset(epochs=2, checkpoint_every=2)) == ([2, 4, 5, 6, 8, 10], [(1, 5), (2, 10)])
    assert save_points(5, preset(epochs=2, checkpoint_every=2, max_steps=7)) == ([2, 4, 5, 6, 7], [(1, 5)])
    assert save_points(3, preset(every=2, epochs=4)) == ([3, 6, 9, 12], [(2, 6), (4, 12)])
    assert save_points(3, preset(every=0, epochs=1)) == ([3], [])
    # accumulation groups restart every epoch: 3 batches in groups of 2 are 2 updates an epoch, every epoch trained
    assert save_points(3, preset(epochs=2, grad_accum=2)) == ([2, 4], [(1, 2), (2, 4)])


@pytest.mark.parametrize(("args", "said"), [
    (["--time", "2"], "--time N goes with --dry-run"),
    (["--json"], "--json goes with --dry-run"),
    (["--dry-run", "--seeds", "42,43"], "--dry-run plans one run"),
    (["--dry-run", "--time", "0"], "--time 0: time at least 1 step"),
])
def test_dry_run_options_misused_are_one_line(args, said, monkeypatch, capsys, tmp_path):
    code, out, err = vlpet(monkeypatch, capsys, "train", *args, *TOY, "--runs-dir", tmp_path / "runs")
    assert code == 2 and out == ""
    assert err.startswith(f"error: {said}") and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_toy_dry_run_plans_what_training_does_and_writes_nothing(monkeypatch, capsys, tmp_path):
    runs = tmp_path / "runs"
    code, out, err = vlpet(monkeypatch, capsys, "train", "--dry-run", "--time", "2", *TOY, "--runs-dir", runs, *SMALL)
    assert code == 0, err
    assert not runs.exists()
    assert "steps: 6 per epoch x 2 epochs; 12 updates, the first 1 warm-up (train.warmup_ratio=0.1)" in out
    assert "coco: 60 training records, 8 validation, batch 20, 3 steps/epoch" in out
    assert "after updates 2, 4, 6, 8, 10, 12" in out and "validation: after epochs 1, 2 (updates 6, 12)" in out
    timing = re.search(r"timing: 2 real steps on cpu: ([\d.]+) s per step; an epoch ~(\d+):(\d\d)", out)
    assert timing and float(timing[1]) > 0
    assert re.search(r"peak memory [\d,]+ MiB \(peak RSS growth\)", out)

    code, out, err = vlpet(monkeypatch, capsys, "train", "--dry-run", "--json", *TOY, "--runs-dir", runs, *SMALL)
    assert code == 0, err
    plan = json.loads(out)
    assert not runs.exists()
    records, sizes = plan["records"]["train"], plan["batch_sizes"]
    assert records == {"coco": 60, "vqa": 60} and sizes == {"coco": 20, "vqa": 24}
    assert plan["steps_per_epoch"] == sum(math.ceil(records[t] / sizes[t]) for t in records) == 6

    # the same run, trained: what it logs and writes is what the plan said
    code, _, err = vlpet(monkeypatch, capsys, "train", *TOY, "--runs-dir", runs, "--name", "real", *SMALL)
    assert code == 0, err
    run = runs / "real"
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    start = next(e for e in events if e["event"] == "start")
    assert start["steps_per_epoch"] == plan["steps_per_epoch"] and start["batch_sizes"] == sizes
    assert (start["trainable"], start["total"]) == (plan["parameters"]["trainable"], plan["parameters"]["total"])
    assert start["optimizer"] == plan["optimizer"]["name"]
    assert next(e for e in events if e["event"] == "end")["updates"] == plan["updates"]
    steps = sorted(int(p.name[5:]) for p in (run / "checkpoints").glob("step-*"))
    assert steps == plan["checkpoints"]["updates"]
    assert [e["epoch"] + 1 for e in events if e["event"] == "val"] == plan["validations"]["epochs"]

    # the output-directory check is the run's own; --overwrite and --resume plan without touching the run
    before = snapshot(runs)
    code, out, err = vlpet(monkeypatch, capsys, "train", "--dry-run", *TOY, "--runs-dir", runs, "--name", "real",
                           *SMALL)
    assert code == 2 and err.startswith(f"error: run directory {run} already exists")
    code, out, err = vlpet(monkeypatch, capsys, "train", "--dry-run", "--overwrite", *TOY, "--runs-dir", runs,
                           "--name", "real", *SMALL)
    assert code == 0, err
    assert "(replaces the run there (--overwrite))" in out
    code, out, err = vlpet(monkeypatch, capsys, "train", "--dry-run", "--resume", "--name", "real", "--runs-dir",
                           runs, "train.epochs=3")
    assert code == 0, err
    assert "resumes from step-12 (update 12)" in out and "3 in all (after updates 14, 16, 18)" in out
    assert snapshot(runs) == before


@pytest.mark.slow
@pytest.mark.cli
def test_installed_vlpet_prints_the_plan_as_json(tmp_path):
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(VLPET), "train", "--dry-run", "--json", *TOY, "--runs-dir", "runs",
                             "train.batch_size=2000"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["run_dir"] == str(Path("runs") / "vlpet-small-multitask") and plan["new_run"]
    assert plan["steps_per_epoch_by_task"] == {"coco": 1, "vqa": 1} and plan["updates"] == 2 * plan["epochs"]
    assert plan["warnings"][0].startswith("an epoch is 2 updates")  # what `vlpet train` would warn about
    assert sorted(p.name for p in tmp_path.iterdir()) == []
