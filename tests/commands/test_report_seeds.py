"""Seeds: `vlpet report` groups runs that differ only in train.seed (mean ± std and n per task, error bars in the
plot); `vlpet train --seeds 42,43,9595` trains NAME-s42, ... one after the other and prints their grouped table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from vlpet_cli.cli import app
from vlpet_cli.report import report, report_table

SEEDS = (42, 43, 9595)
METRIC = {"vqa": "vqa", "gqa": "acc", "nlvr": "acc", "coco": "cider"}


def fake_run(root: Path, name: str, seed: int, tests: dict[str, float], val: dict[str, float] | None = None,
             lr: float = 1e-3, percent: float = 4.16) -> Path:
    """A finished run directory as `vlpet train` leaves it, built directly: config.yaml (differing from its
    siblings only where asked), metrics.jsonl (start and, optionally, one validation) and eval/<task>-test.json."""
    run = root / name
    (run / "eval").mkdir(parents=True)
    config = {"name": "vlpet-large", "method": "VL-PET-large", "model": {"backbone": "bart-base"},
              "data": {"tasks": ["vqa", "coco"]}, "train": {"lr": lr, "epochs": 20, "seed": seed, "data_seed": 0}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    events = [{"event": "start", "trainable": 1000, "total": round(100_000 / percent), "percent": percent}]
    if val:
        events.append({"event": "val", "epoch": 19, "metrics": {t: {METRIC[t]: v} for t, v in val.items()}})
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    for task, value in tests.items():
        record = {"task": task, "split": "test", "metrics": {METRIC[task]: value}, "n": 90, "limit": None,
                  "trained": True}
        (run / "eval" / f"{task}-test.json").write_text(json.dumps(record))
    return run


def three_seeds(root: Path, name: str = "large", **kwargs) -> list[Path]:
    """Three runs NAME-s42, NAME-s43, NAME-s9595: vqa 40/42/44, coco 100/110/120 on test."""
    return [fake_run(root, f"{name}-s{seed}", seed, {"vqa": 40.0 + 2 * i, "coco": 100.0 + 10 * i}, **kwargs)
            for i, seed in enumerate(SEEDS)]


def cli(*args, columns: int = 120):
    return CliRunner(env={"COLUMNS": str(columns)}).invoke(app, [str(a) for a in args])


def test_report_over_three_seeds_prints_mean_std_and_n(tmp_path):
    runs = three_seeds(tmp_path / "runs")
    result = cli("report", *runs, "--out", tmp_path / "r.png")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    (first,) = [i for i, line in enumerate(lines) if line.startswith("large ")]
    # one row: the means (vqa 42, coco 110, avg (70 + 76 + 82) / 3 = 76) and beneath them ±std n=3
    assert lines[first].split()[1:] == ["4.16", "42.00", "110.00", "76.00"], result.stdout
    assert lines[first + 1].split() == ["VL-PET-large,", "seeds", "42,", "43,", "9595", "±2.00", "n=3", "±10.00",
                                        "n=3", "±6.00", "n=3"], result.stdout
    assert not any(line.startswith("large-s") for line in lines)  # the seeds' runs are not repeated
    assert "sample standard deviation" in result.stdout and (tmp_path / "r.png").is_file()


def test_the_seed_row_holds_its_runs_and_spread(tmp_path):
    result = report(three_seeds(tmp_path), out=tmp_path / "r.png")
    (row,) = result["rows"]
    assert (row["name"], row["seeds"], row["runs"]) == ("large", list(SEEDS), [f"large-s{s}" for s in SEEDS])
    assert row["scores"] == {"vqa": 42.0, "coco": 110.0} and row["n"] == {"vqa": 3, "coco": 3}
    assert row["std"]["vqa"] == pytest.approx(2.0) and row["std"]["coco"] == pytest.approx(10.0)
    assert (row["average"], row["average_std"], row["average_n"]) == (76.0, pytest.approx(6.0), 3)


def test_only_runs_that_differ_in_nothing_but_the_seed_are_grouped(tmp_path):
    runs = three_seeds(tmp_path / "runs")
    other_lr = fake_run(tmp_path / "runs", "large-lr-s42", 42, {"vqa": 10.0, "coco": 10.0}, lr=5e-4)
    rerun = fake_run(tmp_path / "again", "large-s42", 42, {"vqa": 50.0, "coco": 50.0})  # the same seed twice
    result = report([*runs, other_lr], draw=False)
    assert [r["name"] for r in result["rows"]] == ["large", "large-lr-s42"] and result["plot"] is None
    assert "seeds" not in result["rows"][1]
    result = report([runs[0], rerun], draw=False)  # two copies of one seed are not a spread: shown apart
    assert [r["name"] for r in result["rows"]] == ["runs/large-s42", "again/large-s42"]


def test_each_task_averages_the_best_scores_the_seeds_have(tmp_path):
    a = fake_run(tmp_path, "x-s42", 42, {"vqa": 40.0}, val={"vqa": 1.0, "coco": 100.0})
    b = fake_run(tmp_path, "x-s43", 43, {}, val={"vqa": 2.0, "coco": 110.0})
    (row,) = report([a, b], draw=False)["rows"]
    # vqa: the one test score beats the validation ones (n=1, no std); coco: both validations
    assert (row["scores"]["vqa"], row["n"]["vqa"], row["std"]["vqa"], row["marks"]["vqa"]) == (40.0, 1, None, "")
    assert (row["scores"]["coco"], row["n"]["coco"], row["marks"]["coco"]) == (105.0, 2, "*")
    from rich.console import Console

    console = Console(width=120, record=True)
    console.print(report_table([row]))
    text = console.export_text()
    assert "40.00" in text and "n=1" in text and "105.00*" in text and "±7.07 n=2" in text


def test_the_plot_draws_an_error_bar_of_one_std_per_seed_row(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    drawn = []
    original = Axes.errorbar
    monkeypatch.setattr(Axes, "errorbar", lambda self, x, y, **kw: drawn.append((x, y, kw["yerr"]))
                        or original(self, x, y, **kw))
    single = fake_run(tmp_path, "lora", 42, {"vqa": 30.0, "coco": 90.0}, lr=3e-4, percent=7.54)
    result = report([*three_seeds(tmp_path), single], out=tmp_path / "r.png")
    assert result["plot"] == str(tmp_path / "r.png") and (tmp_path / "r.png").stat().st_size > 10_000
    assert drawn == [([4.16], [76.0], [pytest.approx(6.0)])]  # the single run has no error bar


# ---- vlpet train --seeds ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seeds, words", [("42,x", "comma list of whole numbers"), ("42,42", "names a seed twice"),
                                          (",", "comma list of whole numbers"), ("-1", "comma list")])
def test_bad_seeds_are_refused_before_anything_is_written(tmp_path, seeds, words):
    result = cli("train", "--preset", "lora", "--task", "vqa", "--data-root", "toy", "--backbone", "tiny-bart",
                 "--runs-dir", tmp_path / "runs", "--seeds", seeds)
    assert result.exit_code == 2 and words in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_seeds_refuse_a_seed_override_and_an_existing_run_before_training(tmp_path):
    base = ["train", "--preset", "lora", "--task", "vqa", "--data-root", "toy", "--backbone", "tiny-bart",
            "--runs-dir", tmp_path / "runs", "--seeds", "42,43"]
    result = cli(*base, "train.seed=7")
    assert result.exit_code == 2 and "drop the train.seed override" in result.output, result.output
    (tmp_path / "runs" / "lora-vqa-s43").mkdir(parents=True)
    (tmp_path / "runs" / "lora-vqa-s43" / "config.yaml").write_text("name: lora\n")
    result = cli(*base)
    assert result.exit_code == 2 and "lora-vqa-s43 already exists" in result.output, result.output
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["lora-vqa-s43"]  # s42 was not trained
    result = cli(*base[:-2], "--seeds", "42", "--resume")
    assert result.exit_code == 2 and "--resume --seeds needs --name" in result.output, result.output


@pytest.mark.slow
def test_train_seeds_runs_each_seed_and_prints_the_grouped_table(tmp_path):
    runs = tmp_path / "runs"
    result = cli("train", "--preset", "lora", "--task", "vqa", "--data-root", "toy", "--backbone", "tiny-bart",
                 "--runs-dir", runs, "--name", "toy", "--seeds", "42,43", "train.epochs=1", "data.limit=16",
                 "eval.every=1", "eval.limit=8")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in runs.iterdir()) == ["toy-s42", "toy-s43"]
    configs = [yaml.safe_load((runs / f"toy-s{s}" / "config.yaml").read_text()) for s in (42, 43)]
    assert [c["train"]["seed"] for c in configs] == [42, 43]
    configs[1]["train"]["seed"] = 42
    assert configs[0] == configs[1]  # nothing else differs
    assert all((runs / f"toy-s{s}" / "adapter" / "README.md").is_file() for s in (42, 43))
    lines = result.stdout.splitlines()
    (row,) = [i for i, line in enumerate(lines) if line.startswith("toy ")]
    assert "seeds 42, 43" in lines[row + 1] and lines[row + 1].count("n=2") == 2, result.stdout
    # --resume continues the series: the finished runs are resumed, a new seed is started
    result = cli("train", "--preset", "lora", "--task", "vqa", "--data-root", "toy", "--backbone", "tiny-bart",
                 "--runs-dir", runs, "--name", "toy", "--seeds", "42,43,9595", "--resume", "train.epochs=1",
                 "data.limit=16", "eval.every=1", "eval.limit=8")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in runs.iterdir()) == ["toy-s42", "toy-s43", "toy-s9595"]
    assert "seeds 42, 43, 9595" in result.stdout and "n=3" in result.stdout, result.stdout
