"""Distributed evaluation: under torchrun / `accelerate launch` with 2 CPU processes (gloo), `vlpet eval` shards
the records, gathers the predictions in record order and gives exactly the metrics and prediction files of 1
process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlpet_cli.artifacts import save_adapter
from vlpet_cli.data.multitask import shard_batches
from vlpet_cli.inference import merge
from vlpet_cli.train import resolve_train_preset
from vlpet_cli.vl.model import build_model

ROOT = Path(__file__).resolve().parents[2]
TASKS = ("vqa", "nlvr", "coco")  # generation (greedy and beams) and choice scoring


def test_shards_are_one_process_batches_and_merge_back_in_record_order():
    order = list(range(11))
    shards = [shard_batches(order, 3, r, 2) for r in range(2)]
    assert shards == [[[0, 1, 2], [6, 7, 8]], [[3, 4, 5], [9, 10]]]  # the batches of one process, dealt out
    records = [{"i": i} for i in range(11)]
    held = [sorted(i for b in s for i in b) for s in shards]
    assert merge([[records[i] for i in h] for h in held], held) == records


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
            "VLPET_NO_RICH": "1"}


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    preset = resolve_train_preset("vlpet-small", list(TASKS), "toy", "tiny-bart")
    model, _ = build_model(preset, weights=True)
    with torch.no_grad():  # make the added modules act, so that predictions depend on them
        for name, p in model.named_parameters():
            if name.startswith("pet."):
                p.add_(0.05 * torch.randn_like(p))
    directory = tmp_path_factory.mktemp("adapter") / "adapter"
    save_adapter(directory, model, preset)
    return directory


def _eval(command: list[str], adapter: Path, out: Path, tasks: str = ",".join(TASKS), limit: int = 11) -> dict:
    args = [str(adapter), "--data-root", "toy", "--task", tasks, "--limit", str(limit), "--split", "val",
            "--batch-size", "4", "--out", str(out), "--json"]
    proc = subprocess.run([*command, *args], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed, decoder, at = [], json.JSONDecoder(), proc.stdout.find("{")
    while at != -1:  # each process prints its JSON object; two may share a line
        obj, end = decoder.raw_decode(proc.stdout, at)
        printed.append(obj)
        at = proc.stdout.find("{", end)
    assert printed and all(p == printed[0] for p in printed)  # every process returns the same metrics
    return printed[0]


@pytest.mark.slow
def test_two_processes_give_the_metrics_of_one(adapter, tmp_path):
    one = _eval([sys.executable, "-m", "vlpet_cli", "eval"], adapter, tmp_path / "one")
    # torchrun, which `accelerate launch --multi_gpu` wraps (accelerate's --cpu starts a single process)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                "vlpet_cli", "eval"]
    two = _eval(launcher, adapter, tmp_path / "two")
    assert two == one
    for task in TASKS:
        a = json.loads((tmp_path / "one" / f"{task}-val.predictions.json").read_text())
        b = json.loads((tmp_path / "two" / f"{task}-val.predictions.json").read_text())
        assert len(a) == 11 and a == b
        assert json.loads((tmp_path / "two" / f"{task}-val.json").read_text())["processes"] == 2
        assert json.loads((tmp_path / "one" / f"{task}-val.json").read_text())["processes"] == 1


@pytest.mark.slow
def test_validation_under_two_processes_scores_what_one_process_evaluation_does(tmp_path):
    """Validation during a 2-process run shards and gathers; its logged metrics equal a 1-process `vlpet eval`
    of the same adapter on the same records."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                "vlpet_cli", "train"]
    args = ["--preset", "vlpet-small", "--task", "vqa,coco", "--data-root", "toy", "--backbone", "tiny-bart",
            "--runs-dir", str(tmp_path), "--name", "ddp", "data.limit=96", "train.epochs=1", "eval.every=1",
            "eval.limit=13"]
    proc = subprocess.run([*launcher, *args], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [e for e in events if e["event"] == "start"][0]["processes"] == 2
    val = [e for e in events if e["event"] == "val"]
    assert len(val) == 1
    one = _eval([sys.executable, "-m", "vlpet_cli", "eval"], tmp_path / "ddp" / "adapter", tmp_path / "one",
                tasks="vqa,coco", limit=13)
    assert val[0]["metrics"]["vqa"]["vqa"] == one["vqa"]["vqa"]
    assert val[0]["metrics"]["coco"]["cider"] == one["coco"]["cider"]
