"""train.report_to: a toy run logs to TensorBoard and MLflow at once, into RUN/logs/, read back with each tracker's
own reader (TensorBoard's EventAccumulator, MLflow's client); a paused run resumed goes on logging to the same
TensorBoard folder and the same MLflow run; metrics.jsonl, the plot and config.yaml are as without trackers. A
tracker whose package is missing is refused in one line naming the extra, before anything is written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from vlpet_cli.errors import VlpetError
from vlpet_cli.extras import MissingExtraError
from vlpet_cli.presets import resolve
from vlpet_cli.trackers import build, check_trackers, hyperparameters, read_state

TENSORBOARD = ("logging to TensorBoard (train.report_to) needs tensorboard, which is not installed; install it "
               "with: pip install 'vlpet[tensorboard]'")


def events(run: Path, kind: str) -> list[dict]:
    return [e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if e["event"] == kind]


@pytest.mark.slow
def test_tensorboard_and_mlflow_hold_the_run_and_a_resume_continues_them(tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vlpet_cli.train import resolve_train_preset, train

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # MLflow must not fall back to ./mlruns
    overrides = ["data.limit=96", "eval.limit=16", "train.epochs=2", "eval.every=1", "train.batch_size=24",
                 "train.report_to=[tensorboard,mlflow]"]
    preset = resolve_train_preset("vlpet-small", ["vqa", "gqa"], "toy", "tiny-bart", overrides)
    run = tmp_path / "run"
    first = train(preset, run, stop_after=3)
    assert first.summary["paused"]
    train(preset, run, resume=True)

    spe = events(run, "start")[0]["steps_per_epoch"]
    batches, updates = 2 * spe, events(run, "end")[0]["updates"]
    logs = run / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["mlflow", "tensorboard", "trackers.json"]

    board = EventAccumulator(str(logs / "tensorboard"))
    board.Reload()
    scalars = board.Tags()["scalars"]
    steps = {tag: [e.step for e in board.Scalars(tag)] for tag in scalars}
    # a series per task loss, one point per batch of that task, every batch once across the pause
    assert sorted(steps["train/vqa/loss"] + steps["train/gqa/loss"]) == list(range(1, batches + 1))
    assert len(steps["train/lr"]) == len(steps["train/grad_norm"]) == updates
    assert "train/samples_per_s" in scalars
    validations = [e["step"] for e in events(run, "val")]
    assert len(validations) == 2
    for task in ("vqa", "gqa"):
        for metric, value in events(run, "val")[-1]["metrics"][task].items():
            series = board.Scalars(f"val/{task}/{metric}")
            assert [e.step for e in series] == [spe, 2 * spe]
            assert series[-1].value == pytest.approx(value)
    assert [e.step for e in board.Scalars("val/score")] == [spe, 2 * spe]

    state = read_state(run)
    assert state["started"] == ["mlflow", "tensorboard"]
    client = MlflowClient(state["mlflow"]["tracking_uri"])
    assert state["mlflow"]["tracking_uri"] == (logs / "mlflow").resolve().as_uri()
    experiment = client.get_experiment_by_name("vlpet")
    [found] = client.search_runs([experiment.experiment_id])  # the resumed leg logged to the same run
    assert found.info.run_id == state["mlflow"]["run_id"] and found.info.run_name == "run"
    params = found.data.params
    assert params["train.lr"] == str(preset.train.lr) and params["method"] == preset.method
    assert params["train.report_to"] == '["tensorboard", "mlflow"]' and params["data.tasks"] == '["vqa", "gqa"]'
    history = {key: client.get_metric_history(found.info.run_id, key) for key in found.data.metrics}
    assert sorted(m.step for m in history["train/vqa/loss"] + history["train/gqa/loss"]) == \
        list(range(1, batches + 1))
    assert [m.step for m in history["val/vqa/vqa"]] == [m.step for m in history["val/gqa/acc"]] == [spe, 2 * spe]
    assert len(history["train/lr"]) == updates

    # what does not depend on the trackers is as it was: the loss log, the plot, the recorded settings
    assert events(run, "train") and (run / "plots" / "loss.png").is_file()
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["train"]["report_to"] == ["tensorboard", "mlflow"]
    assert config["train"]["precision"] == "fp32" and config["eval"]["precision"] == "fp32"
    assert not (tmp_path / "mlruns").exists()

    # eval.precision (tested here on a trained run): bf16 autocast generates on the CPU; fp16 is refused before the
    # model loads
    from vlpet_cli.evaluate import evaluate

    scored = evaluate(run, ["vqa"], split="val", overrides=["eval.precision=bf16"], limit=8, progress=False,
                      out_dir=tmp_path / "eval-bf16")
    assert scored["vqa"]["n"] == 8 and "vqa" in scored["vqa"]["metrics"]
    with pytest.raises(VlpetError, match=r"^eval.precision=fp16: fp16 needs a CUDA GPU"):
        evaluate(run, ["vqa"], split="val", overrides=["eval.precision=fp16"], out_dir=tmp_path / "eval-fp16")
    assert not (tmp_path / "eval-fp16").exists()


def test_trackers_are_placed_in_the_run_and_resumed_by_id(tmp_path):
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    tensorboard, mlflow, wandb, aim = build(["tensorboard", "mlflow", "wandb", "aim"], run)
    assert tensorboard.logging_dir_param == str(run / "logs") and tensorboard.run_name == "tensorboard"
    assert mlflow.run_id is None and mlflow.run_name == "run" and aim == "aim"
    assert wandb.init_kwargs["dir"] == str(run / "logs") and wandb.init_kwargs["resume"] == "allow"
    assert not any((run / "logs").iterdir())  # building writes nothing

    (run / "logs" / "trackers.json").write_text(json.dumps({"mlflow": {"run_id": "abc"}, "wandb": {"id": "w1"}}))
    _, mlflow, wandb = build(["tensorboard", "mlflow", "wandb"], run, resume=True)
    assert mlflow.run_id == "abc" and wandb.init_kwargs["id"] == "w1"
    assert build([], run) == []


def test_hyperparameters_are_the_flattened_preset():
    preset = resolve("vlpet-small", ["train.report_to=[tensorboard]"], "tiny-bart")
    params = hyperparameters(preset)
    assert params["train.lr"] == preset.train.lr and params["train.report_to"] == '["tensorboard"]'
    assert params["model.backbone"] == "tiny-bart" and params["train.max_steps"] == "null"
    assert all(isinstance(v, (bool, int, float, str)) for v in params.values())


def test_an_unknown_tracker_is_refused_by_the_preset():
    with pytest.raises(VlpetError, match="tensorbord"):
        resolve("vlpet-small", ["train.report_to=[tensorbord]"], "tiny-bart")


@pytest.mark.parametrize("tracker,extra", [("tensorboard", "tensorboard"), ("mlflow", "mlflow"),
                                           ("wandb", "wandb")])
def test_a_missing_tracker_names_its_extra(tracker, extra, monkeypatch):
    monkeypatch.setitem(sys.modules, extra, None)
    with pytest.raises(MissingExtraError, match=rf"^logging to .* needs {extra}, which is not installed; install it "
                                                rf"with: pip install 'vlpet\[{extra}\]'$"):
        check_trackers([tracker])


def test_a_tracker_that_is_not_an_extra_names_its_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "aim", None)
    with pytest.raises(MissingExtraError, match=r"^logging to aim \(train.report_to\) needs aim, which does not "
                                                r"import \(.*\); install it with: pip install aim$"):
        check_trackers(["aim"])


def test_train_without_the_package_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from vlpet_cli.cli import main

    monkeypatch.setitem(sys.modules, "tensorboard", None)
    (tmp_path / "data").mkdir()  # refused before the data root is read
    monkeypatch.setattr(sys, "argv", ["vlpet", "train", "--preset", "vlpet-small", "--task", "vqa", "--backbone",
                                      "tiny-bart", "--data-root", str(tmp_path / "data"), "--runs-dir",
                                      str(tmp_path / "runs"), "train.report_to=[tensorboard]"])
    monkeypatch.setenv("COLUMNS", "400")
    with pytest.raises(SystemExit) as exit_:
        main()
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and err == f"error: {TENSORBOARD}\n"
    assert not (tmp_path / "runs").exists()


def test_a_tracker_that_fails_to_start_is_one_line(tmp_path, monkeypatch):
    from accelerate import Accelerator
    from accelerate.tracking import TensorBoardTracker

    from vlpet_cli.trackers import Tracking

    def refuse(self):
        raise PermissionError(13, "Permission denied", str(tmp_path / "run" / "logs" / "tensorboard"))

    monkeypatch.setattr(TensorBoardTracker, "start", refuse)
    accelerator = Accelerator(cpu=True, log_with=build(["tensorboard"], tmp_path / "run"))
    with pytest.raises(VlpetError, match=r"^train.report_to: a tracker did not start \(PermissionError: .*Permission "
                                         r"denied.*\); fix its settings .* start the run again with --overwrite, or "
                                         r"leave the tracker out of train.report_to$"):
        Tracking(accelerator, tmp_path / "run").start(resolve("vlpet-small", [], "tiny-bart"), 1)
    assert accelerator.trackers == []


def test_a_resumed_run_may_add_or_drop_a_tracker(tmp_path):
    from vlpet_cli.runs import write_config
    from vlpet_cli.train import resume_preset

    run = tmp_path / "run"
    run.mkdir()
    write_config(run, resolve("vlpet-small", ["train.report_to=[tensorboard]"], "tiny-bart"))
    preset, changes = resume_preset(run, overrides=["train.report_to=[tensorboard,mlflow]"])
    assert preset.train.report_to == ["tensorboard", "mlflow"]
    assert changes == ["train.report_to: ['tensorboard'] -> ['tensorboard', 'mlflow']"]


@pytest.mark.slow
def test_tensorboard_drops_what_an_interrupted_run_logged_after_its_checkpoint(tmp_path):
    """The first leg logged batches 1-10 but its last checkpoint was at batch 5: the resumed leg logs from 6 on, and
    TensorBoard's reader shows every batch once, the resumed leg's values from 6."""
    from accelerate import Accelerator
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vlpet_cli.trackers import Tracking

    run, preset = tmp_path / "run", resolve("vlpet-small", ["train.report_to=[tensorboard]"], "tiny-bart")
    for first, last, resume in ((1, 10, False), (6, 8, True)):
        tracking = Tracking(Accelerator(cpu=True, log_with=build(["tensorboard"], run, resume)), run)
        tracking.start(preset, first)
        tracking.log_train({"vqa": [(step, float(resume)) for step in range(first, last + 1)]}, 1.0, last)
        tracking.finish()
    board = EventAccumulator(str(run / "logs" / "tensorboard"))
    board.Reload()
    assert [(e.step, e.value) for e in board.Scalars("train/vqa/loss")] == \
        [(step, 0.0) for step in range(1, 6)] + [(step, 1.0) for step in range(6, 9)]
