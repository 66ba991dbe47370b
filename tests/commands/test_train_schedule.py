"""Defaults that fit the data (issue 21, item 3): a run whose epochs are a handful of updates, or whose warm-up is as
long as the run, is warned about before training, with the overrides that fit; the run header names the CPU
threads it computes on."""

from __future__ import annotations

import sys

import pytest

from vlpet_cli.cli import main
from vlpet_cli.train import FEW_UPDATES, resolve_train_preset, schedule_warnings, updates_per_epoch


def preset(*overrides: str, tasks=("coco",)):
    return resolve_train_preset("vlpet-small", list(tasks), None, "tiny-bart", list(overrides))


def test_a_preset_batch_on_a_small_dataset_is_warned_with_a_batch_size_that_fits():
    # vlpet-small's batch 500 is 416 COCO captions: 1,200 records make 3 updates an epoch
    (warning,) = schedule_warnings(preset(), {"coco": 1200})
    assert "an epoch is 3 updates" in warning and "60 in the whole run" in warning
    assert "train.batch_size=76 (20 updates per epoch)" in warning
    assert "batches of 24 train at train.lr=3e-3" in warning  # the toy world shows a learning rate for a batch
    assert updates_per_epoch(preset("train.batch_size=76"), {"coco": 1200}) == 20


def test_enough_updates_per_epoch_are_not_warned():
    assert schedule_warnings(preset("train.batch_size=24"), {"coco": 1200}) == []
    few = preset("train.batch_size=24")
    records = {"coco": 20 * (FEW_UPDATES - 1)}  # 20 captions a batch
    assert len(schedule_warnings(few, records)) == 1
    assert schedule_warnings(few, {"coco": 20 * FEW_UPDATES}) == []


def test_processes_and_accumulation_count_in_the_updates():
    p = preset("train.batch_size=24", "train.grad_accum=4")
    assert updates_per_epoch(p, {"coco": 400}) == 5  # 20 batches of 20, 4 per update
    assert updates_per_epoch(p, {"coco": 400}, world_size=2) == 3  # 10 batches per process
    assert schedule_warnings(p, {"coco": 400}, world_size=2)


def test_a_warm_up_as_long_as_the_run_is_warned():
    (warning,) = schedule_warnings(preset("train.batch_size=24", "train.warmup_ratio=1.5"), {"coco": 1200})
    assert "warm-up (train.warmup_ratio=1.5: 1800 updates)" in warning and "(1200 updates)" in warning
    assert "never reaches train.lr" in warning and "train.warmup_ratio=0.1" in warning


@pytest.mark.slow  # builds the toy world and a model (about 10 s here)
def test_a_toy_run_with_few_updates_per_epoch_warns_before_training(tmp_path, monkeypatch, capsys):
    class Stopped(Exception):
        pass

    said = {}

    def stop(session, progress, *_, **__):
        said["out"], said["err"] = capsys.readouterr()
        raise Stopped

    monkeypatch.setattr("vlpet_cli.train.fit", stop)
    monkeypatch.setattr(sys, "argv", ["vlpet", "train", "--preset", "vlpet-small", "--task", "coco", "--data-root",
                                      "toy", "--backbone", "tiny-bart", "--runs-dir", str(tmp_path),
                                      "train.batch_size=500", "data.limit=800", "eval.every=0"])
    monkeypatch.setenv("COLUMNS", "400")
    monkeypatch.delenv("VLPET_THREADS", raising=False)
    with pytest.raises(Stopped):
        main()
    warnings = [line for line in said["err"].splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, said["err"]
    assert "an epoch is 2 updates (800 coco training records, train.batch_size=500)" in warnings[0]
    assert "give train.batch_size=" in warnings[0]
    assert "1 CPU thread (a tiny model" in said["out"]  # the run header
