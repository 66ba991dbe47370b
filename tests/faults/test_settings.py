"""Settings that would be silently ignored are errors (issue 21, item 2): a block under the wrong section, a YAML key
given twice (PyYAML keeps the last), `--stop-after 0` and negative counts, a `t5.`/`video.` setting or a T5-only
key on a run it cannot affect, a per-task entry for no task. Each ends in one line naming the file or key and the
fix, exit 2, before any model is built and without writing anything."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from faultkit import vlpet

from vlpet_cli.config import Preset
from vlpet_cli.presets import to_yaml

HEADER = "name: mine\nmethod: VL-PET-small\ndescription: a copy\n"
TRAIN = ["train", "--preset", "vlpet-small", "--task", "coco", "--backbone", "tiny-bart"]


def one_line_error(code: int, err: str, *needles: str) -> str:
    """Exit 2 and a single `error:` line holding every needle; returns the line."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def no_model(monkeypatch):
    """Building a model (or loading one) fails the test: every refusal comes before it."""
    def refuse(*_, **__):
        raise AssertionError("a model was built before the settings were checked")

    monkeypatch.setattr("vlpet_cli.train.build_model", refuse)
    monkeypatch.setattr("vlpet_cli.train.setup", refuse)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---- preset files: misplaced blocks and duplicate keys -------------------------------------------------------
PRESET_FILES = {
    "lora under train": (HEADER + "pet:\n  encoder: {r: 8}\ntrain:\n  lr: 1.0e-3\n  lora: {r: 8}\n",
                         ["train.lora.r", "'lora' belongs under pet", "pet.lora.r"]),
    "lr under pet": (HEADER + "pet:\n  lr: 3.0e-4\n  encoder: {r: 8}\n", ["pet.lr", "belongs under train",
                                                                        "train.lr"]),
    "lora under the t5 section": (HEADER + "t5:\n  lora: {r: 8}\n", ["t5.lora.r", "write t5.pet.lora.r"]),
    "t5 inside t5": (HEADER + "t5:\n  t5:\n    train: {lr: 1.0e-4}\n", ["t5.t5.train.lr", "write t5.train.lr"]),
    "video inside t5": (HEADER + "t5:\n  video:\n    train: {lr: 1.0e-4}\n",
                        ["t5.video.train.lr", "write video.t5.train.lr"]),
    "duplicate section": (HEADER + "train: {lr: 1.0e-3}\ntrain: {epochs: 3}\n",
                          ["appears twice", "'train'", "lines 4 and 5", "remove one of them"]),
    "duplicate key in a section": (HEADER + "train:\n  lr: 1.0e-3\n  epochs: 3\n  lr: 5.0e-4\n",
                                   ["appears twice", "'lr'", "lines 5 and 7"]),
    "ratio for no task": (HEADER + "train:\n  task_ratios: {cocoo: 0.5}\n",
                          ["train.task_ratios.cocoo", "Did you mean 'coco'"]),
    "generation for no task": (HEADER + "eval:\n  generation:\n    vqaa: {num_beams: 3}\n",
                               ["eval.generation.vqaa", "Known tasks"]),
    "prompt for no task": (HEADER + "data:\n  prompts: {captions2: 'describe:'}\n", ["data.prompts.captions2"]),
}


@pytest.mark.parametrize("text, needles", PRESET_FILES.values(), ids=PRESET_FILES.keys())
def test_a_preset_file_with_a_setting_that_would_be_ignored_is_refused(tmp_path, monkeypatch, capsys, no_model,
                                                                      text, needles):
    preset = write(tmp_path / "mine.yaml", text)
    args = ["train", "--preset", preset, "--task", "coco", "--backbone", "tiny-bart", "--data-root", tmp_path,
            "--runs-dir", tmp_path / "runs"]
    line = one_line_error(*vlpet(monkeypatch, capsys, *args)[::2], *needles)
    assert str(preset) in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.cli  # the installed console script in a subprocess
def test_the_installed_vlpet_refuses_a_duplicate_key_with_exit_2(tmp_path):
    """Through the console script in a subprocess, as a user meets it."""
    preset = write(tmp_path / "mine.yaml", HEADER + "pet:\n  encoder: {r: 8}\npet:\n  lora: {r: 4}\n")
    script = Path(sys.executable).with_name("vlpet")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "COLUMNS": "400"}
    done = subprocess.run([str(script), "presets", "show", str(preset)], capture_output=True, text=True, env=env,
                          timeout=300)
    one_line_error(done.returncode, done.stderr, str(preset), "'pet' appears twice", "lines 4 and 6")
    assert done.stdout == ""


def test_a_run_config_with_a_duplicate_key_is_refused_on_resume(tmp_path, monkeypatch, capsys, no_model):
    run = tmp_path / "runs" / "mine"
    run.mkdir(parents=True)
    text = to_yaml(Preset(name="vlpet-small", method="VL-PET-small", description="d"))
    config = write(run / "config.yaml", text + "train:\n  lr: 0.5\n")
    before = config.read_text()
    code, _, err = vlpet(monkeypatch, capsys, "train", "--resume", "--name", "mine", "--runs-dir", tmp_path / "runs")
    one_line_error(code, err, str(config), "'train' appears twice")
    assert config.read_text() == before and sorted(p.name for p in run.iterdir()) == ["config.yaml"]


# ---- counts and options that would be ignored -----------------------------------------------------------------
COUNTS = {
    "stop-after 0": (["--stop-after", "0"], ["--stop-after 0", "at least 1", "leave --stop-after out"]),
    "stop-after negative": (["--stop-after", "-2"], ["--stop-after -2", "at least 1"]),
    "max_steps 0": (["train.max_steps=0"], ["train.max_steps 0", "at least 1"]),
    "data.limit negative": (["data.limit=-5"], ["data.limit -5", "at least 1"]),
    "num_workers negative": (["data.num_workers=-1"], ["data.num_workers -1", "at least 0"]),
    "eval.limit 0": (["eval.limit=0"], ["eval.limit 0", "at least 1"]),
    "eval.batch_size 0": (["eval.batch_size=0"], ["eval.batch_size 0", "at least 1"]),
    "num_beams 0": (["eval.generation.coco.num_beams=0"], ["eval.generation.coco.num_beams 0", "at least 1"]),
    "warmup negative": (["train.warmup_ratio=-0.1"], ["train.warmup_ratio -0.1", "at least 0"]),
    "threads 0": (["train.threads=0"], ["train.threads 0", "at least 1"]),
}


@pytest.mark.parametrize("extra, needles", COUNTS.values(), ids=COUNTS.keys())
def test_counts_out_of_range_are_refused_before_the_model(tmp_path, monkeypatch, capsys, no_model, extra, needles):
    code, _, err = vlpet(monkeypatch, capsys, *TRAIN, "--data-root", tmp_path, "--runs-dir", tmp_path / "runs",
                         *extra)
    one_line_error(code, err, *needles)
    assert not (tmp_path / "runs").exists()


def test_a_bad_vlpet_threads_is_refused_before_the_model(tmp_path, monkeypatch, capsys, no_model):
    monkeypatch.setenv("VLPET_THREADS", "many")
    code, _, err = vlpet(monkeypatch, capsys, *TRAIN, "--data-root", tmp_path, "--runs-dir", tmp_path / "runs")
    one_line_error(code, err, "VLPET_THREADS='many'", "at least 1", "unset it")


def test_extract_refuses_negative_workers(tmp_path, monkeypatch, capsys):
    code, _, err = vlpet(monkeypatch, capsys, "extract-features", "--images", tmp_path, "--model", "tiny-clip",
                         "--out", tmp_path / "f.h5", "--workers", "-1")
    one_line_error(code, err, "--workers -1", "at least 0")
    assert not (tmp_path / "f.h5").exists()


# ---- family- and task-specific settings on a run they cannot affect -------------------------------------------
NO_EFFECT = {
    "t5 override on bart": (["t5.train.lr=1e-4"], ["t5.train.lr=0.0001", "only on T5 backbones", "tiny-bart",
                                                   "give train.lr=0.0001"]),
    "t5 nested override": (["t5.pet.lora.r=4"], ["t5.pet.lora.r=4", "give pet.lora.r=4"]),
    "video override on an image run": (["video.train.lr=1e-4"], ["video.train.lr=0.0001", "video task",
                                                                 "trains coco", "give train.lr=0.0001"]),
    "video.t5 override on bart": (["video.t5.train.batch_size=8"], ["video.t5.train.batch_size=8", "video task"]),
    "relative attention bias on bart": (["pet.trainable.relative_attention_bias=true"],
                                        ["relative_attention_bias", "no effect on tiny-bart", "only T5"]),
    "ratio for no task": (["train.task_ratios.coco2=1"], ["train.task_ratios.coco2", "unknown task 'coco2'"]),
    "a block under the wrong section": (["train.lora.r=4"], ["train.lora.r", "write pet.lora.r"]),
}


@pytest.mark.parametrize("extra, needles", NO_EFFECT.values(), ids=NO_EFFECT.keys())
def test_settings_a_run_would_not_read_are_refused(tmp_path, monkeypatch, capsys, no_model, extra, needles):
    code, _, err = vlpet(monkeypatch, capsys, *TRAIN, "--data-root", tmp_path, "--runs-dir", tmp_path / "runs",
                         *extra)
    one_line_error(code, err, *needles)
    assert not (tmp_path / "runs").exists()


def test_a_t5_override_on_a_t5_run_still_applies(tmp_path):
    from vlpet_cli.train import resolve_train_preset

    preset = resolve_train_preset("vlpet-small", ["coco"], str(tmp_path), "tiny-t5",
                                  ["t5.train.lr=1e-4", "pet.trainable.relative_attention_bias=true"])
    assert preset.train.lr == pytest.approx(1e-4) and preset.pet.trainable.relative_attention_bias


@pytest.mark.parametrize("override", ["t5.eval.batch_size=8", "video.eval.batch_size=8"])
def test_eval_refuses_section_overrides_it_would_not_read(tmp_path, monkeypatch, capsys, override):
    """An evaluation reads the run's resolved settings: a t5./video. override would sit in a section never read."""
    import json

    def no_model(*_, **__):
        raise AssertionError("a model was loaded before the overrides were checked")

    monkeypatch.setattr("vlpet_cli.artifacts.load_any", no_model)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    preset = Preset(name="vlpet-small", method="VL-PET-small", description="d").model_dump(mode="json")
    (adapter / "vlpet_config.json").write_text(json.dumps({"format": "vlpet-adapter/1", "preset": preset}))
    code, _, err = vlpet(monkeypatch, capsys, "eval", adapter, "--data-root", tmp_path, override)
    one_line_error(code, err, override.split("=")[0], "without '")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_hyperformer_task_embedding_for_no_task_is_refused(tmp_path, monkeypatch, capsys, no_model):
    code, _, err = vlpet(monkeypatch, capsys, "train", "--preset", "hyperformer", "--task", "coco", "--backbone",
                         "tiny-bart", "--data-root", tmp_path, "--runs-dir", tmp_path / "runs",
                         "pet.hyperformer.tasks=[coco,cocoo]")
    one_line_error(code, err, "pet.hyperformer.tasks", "unknown task 'cocoo'")
