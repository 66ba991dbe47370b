"""Run plots (plots/loss.png) and `vlpet report` rows, table and scatter, on fake run directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from vlpet_cli.errors import VlpetError
from vlpet_cli.plots import loss_series, plot_run, val_events, val_series
from vlpet_cli.report import report, report_table, run_row
from vlpet_cli.runs import read_events

TASKS = ["vqa", "gqa", "nlvr", "coco"]


def val_metrics(base: float) -> dict:
    """Validation metrics shaped like train.py's: primary metric per task, plus extras to be ignored."""
    return {"vqa": {"vqa": base, "per_answer_type": {"yes/no": 80.0}}, "gqa": {"acc": base - 10},
            "nlvr": {"acc": base + 10, "consistency": 20.0}, "coco": {"cider": base + 50}}


def make_run(root: Path, name: str, method: str = "VL-PET-large", percent: float = 4.16, epochs: int = 3,
             steps_per_epoch: int = 10, validate: bool = True) -> Path:
    """A fake run directory: config.yaml, metrics.jsonl (start, train, val, end); no eval files."""
    run = root / name
    run.mkdir(parents=True)
    config = {"name": name, "method": method, "description": "fake", "model": {"backbone": "bart-base"},
              "data": {"tasks": TASKS}, "train": {"epochs": epochs}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    events: list[dict] = [{"event": "start", "trainable": 1000, "total": round(1000 * 100 / percent),
                           "percent": percent, "batch_sizes": {t: 4 for t in TASKS},
                           "steps_per_epoch": steps_per_epoch, "processes": 1}]
    step = 0
    for epoch in range(epochs):
        for _ in range(steps_per_epoch):
            step += 1
            for i, task in enumerate(TASKS):
                events.append({"event": "train", "epoch": epoch, "step": step, "update": step, "task": task,
                               "loss": 3.0 / step + i, "lr": 1e-3, "samples_per_s": 50.0})
        if validate:
            events.append({"event": "val", "epoch": epoch, "step": step, "metrics": val_metrics(40.0 + epoch),
                           "score": 50.0 + epoch})
    events.append({"event": "end", "updates": step, "seconds": 1.0, "adapter_bytes": 1234})
    write_events(run, events)
    return run


def write_events(run: Path, events: list[dict], tail: str = "") -> None:
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events) + tail)


def write_eval(run: Path, task: str, split: str, metrics: dict) -> None:
    (run / "eval").mkdir(exist_ok=True)
    (run / "eval" / f"{task}-{split}.json").write_text(json.dumps({"task": task, "split": split,
                                                                   "metrics": metrics, "n": 10}))


def assert_png(path: Path, min_bytes: int = 10_000) -> None:
    assert path.is_file() and path.stat().st_size > min_bytes
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.width > 400 and img.height > 300
        assert len(img.convert("L").getcolors(1 << 16) or []) > 10  # not a blank canvas


# ---- plot_run ---------------------------------------------------------------------------------------------
def test_plot_run_writes_png_with_val_panel(tmp_path):
    run = make_run(tmp_path, "large")
    out = plot_run(run)
    assert out == run / "plots" / "loss.png"
    assert_png(out)
    assert [p.name for p in (run / "plots").iterdir()] == ["loss.png"]  # no temp file left behind
    tall = Image.open(out).height
    plain = make_run(tmp_path, "no-val", validate=False)
    assert Image.open(plot_run(plain)).height < tall  # one panel without validation


def test_truncated_last_line_is_skipped(tmp_path):
    run = make_run(tmp_path, "crashed")
    events = read_events(run)
    write_events(run, events, tail='{"event": "train", "epoch": 2, "st')
    assert read_events(run) == events
    with (run / "metrics.jsonl").open("a") as f:
        f.write("\nnot json\n[1, 2]\n\n")
    assert read_events(run) == events
    assert_png(plot_run(run))
    assert run_row(run)["average"] == (42.0 + 32.0 + 52.0 + 92.0) / 4  # the last validation's, as if undamaged


def test_resumed_run_keeps_newest_history(tmp_path):
    events = [{"event": "train", "epoch": 0, "step": s, "update": s, "task": "vqa", "loss": 1.0} for s in (1, 2, 3, 4)]
    events += [{"event": "val", "epoch": 0, "step": 4, "metrics": {"vqa": {"vqa": 10.0}}, "score": 10.0}]
    # crash after step 4; the checkpoint was at step 2, so the resumed process logs steps 3.. again
    events += [{"event": "train", "epoch": 0, "step": s, "update": s, "task": "vqa", "loss": 0.5} for s in (3, 5)]
    events += [{"event": "val", "epoch": 0, "step": 5, "metrics": {"vqa": {"vqa": 20.0}}, "score": 20.0}]
    xs, ys = loss_series(events)["vqa"]
    assert xs == [1, 2, 3, 5] and ys == [1.0, 1.0, 0.5, 0.5]
    assert [e["score"] for e in val_events(events)] == [20.0]
    per_task, score = val_series(events)
    assert per_task == {"vqa": ([5], [20.0])} and score == ([5], [20.0])


def test_plot_run_errors(tmp_path):
    run = tmp_path / "empty"
    run.mkdir()
    with pytest.raises(VlpetError, match="metrics.jsonl does not exist"):
        plot_run(run)
    (run / "metrics.jsonl").write_text(json.dumps({"event": "start", "percent": 1.0}) + "\n{trunc")
    with pytest.raises(VlpetError, match="no training-loss records"):
        plot_run(run)


# ---- report -----------------------------------------------------------------------------------------------
def test_report_rows_from_last_val_event(tmp_path):
    run = make_run(tmp_path, "large", percent=4.16, epochs=3)
    result = report([run], out=tmp_path / "r.png")
    (row,) = result["rows"]
    # last val event is epoch 2: vqa 42, gqa 32, nlvr 52, coco 92
    assert row["scores"] == {"vqa": 42.0, "gqa": 32.0, "nlvr": 52.0, "coco": 92.0}
    assert row["average"] == pytest.approx((42 + 32 + 52 + 92) / 4)
    assert row["sources"]["vqa"] == "val epoch 3"
    assert (row["name"], row["method"], row["backbone"], row["percent"]) == ("large", "VL-PET-large",
                                                                             "bart-base", 4.16)
    assert row["trainable"] == 1000
    assert result["plot"] == str(tmp_path / "r.png") and result["not_plotted"] == []
    assert_png(tmp_path / "r.png")


def test_eval_file_takes_precedence(tmp_path):
    run = make_run(tmp_path, "large")
    write_eval(run, "vqa", "test", {"vqa": 61.25, "per_answer_type": {"yes/no": 80.0}})
    write_eval(run, "coco", "test", {"bleu4": 30.0, "cider": 112.5})
    write_eval(run, "gqa", "val", {"acc": 99.0})  # another split: not used for test
    (run / "eval" / "nlvr-test.predictions.json").write_text("[]")  # not a metrics file
    row = run_row(run, "test")
    assert row["scores"] == {"vqa": 61.25, "gqa": 32.0, "nlvr": 52.0, "coco": 112.5}
    assert row["sources"] == {"vqa": "eval/vqa-test.json", "gqa": "val epoch 3", "nlvr": "val epoch 3",
                              "coco": "eval/coco-test.json"}
    assert row["average"] == pytest.approx((61.25 + 32 + 52 + 112.5) / 4)
    assert run_row(run, "val")["scores"]["gqa"] == 99.0


def test_report_several_runs_table_and_scatter(tmp_path, monkeypatch):
    from rich.console import Console

    a = make_run(tmp_path / "runs", "vlpet-large", percent=4.16)
    b = make_run(tmp_path / "runs", "lora", method="LoRA", percent=7.54)
    c = make_run(tmp_path / "runs", "untrained", method="LoRA", percent=7.54, epochs=1, validate=False)
    write_eval(b, "vqa", "test", {"vqa": 70.0})
    monkeypatch.chdir(tmp_path)
    result = report([a, b, c])
    assert Path("report.png").is_file()
    assert_png(tmp_path / "report.png")
    names = [r["name"] for r in result["rows"]]
    assert names == ["vlpet-large", "lora", "untrained"]
    assert result["rows"][1]["scores"]["vqa"] == 70.0 and result["rows"][1]["sources"]["gqa"] == "val epoch 3"
    assert result["rows"][2]["scores"] == {} and result["rows"][2]["average"] is None
    assert result["not_plotted"] == ["untrained"]
    console = Console(width=200, record=True)
    console.print(report_table(result["rows"]))
    text = console.export_text()
    assert "vlpet-large" in text and "coco (cider)" in text and "4.16" in text and "70.00" in text
    assert "* from the run's last validation event" in text


def test_runs_of_the_same_name_are_told_apart(tmp_path):
    a = make_run(tmp_path / "first", "quickstart")
    b = make_run(tmp_path / "second", "quickstart")
    result = report([a, b], out=tmp_path / "r.png")
    assert [r["name"] for r in result["rows"]] == ["first/quickstart", "second/quickstart"]


def test_not_a_run_directory(tmp_path):
    with pytest.raises(VlpetError, match="does not exist"):
        report([tmp_path / "missing"])
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(VlpetError, match="is a file"):
        report([tmp_path / "file.txt"])
    make_run(tmp_path / "runs", "a")
    with pytest.raises(VlpetError, match=r"not a run directory \(no config.yaml\); it holds the runs a"):
        report([tmp_path / "runs"])
    with pytest.raises(VlpetError, match="unknown split"):
        report([tmp_path / "runs" / "a"], split="dev")
    with pytest.raises(VlpetError, match="at least one run"):
        report([])


def test_broken_eval_file_is_named(tmp_path):
    run = make_run(tmp_path, "a")
    (run / "eval").mkdir()
    (run / "eval" / "vqa-test.json").write_text("{")
    with pytest.raises(VlpetError, match="vqa-test.json is not readable JSON"):
        run_row(run)


# ---- tables at 80 columns ---------------------------------------------------------------------------------
def vlpet_at_80_columns(*args) -> str:
    """stdout of a vlpet command on an 80-column terminal; it must fit and cut nothing."""
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "vlpet_cli", *map(str, args)], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "80"})
    assert out.returncode == 0, out.stderr
    assert max(len(line) for line in out.stdout.splitlines()) <= 80, out.stdout
    assert "…" not in out.stdout, out.stdout
    return out.stdout


@pytest.mark.cli  # `python -m vlpet_cli` on an 80-column terminal
def test_presets_ls_fits_80_columns_with_whole_names():
    from vlpet_cli.presets import list_presets

    text = vlpet_at_80_columns("presets", "ls")
    firsts = {line.split()[0] for line in text.splitlines() if line.strip()}
    assert set(list_presets()) <= firsts  # every name whole, on its own row


@pytest.mark.cli  # `python -m vlpet_cli` on an 80-column terminal
def test_report_fits_80_columns(tmp_path):
    runs = [make_run(tmp_path / "runs", "vlpet-large-multitask", percent=4.16),
            make_run(tmp_path / "runs", "compacter-gmiddlex-lw", method="Compacter + Gmiddlex + LW", percent=2.7)]
    for run in runs:
        write_eval(run, "coco", "test", {"cider": 112.25})
    text = vlpet_at_80_columns("report", *runs, "--out", tmp_path / "r.png")
    lines = text.splitlines()
    for run in runs:
        (row,) = [line for line in lines if line.startswith(run.name + " ")]
        assert row.split()[1:] == ["4.16" if "vlpet" in run.name else "2.70", "42.00*", "32.00*", "52.00*",
                                   "112.25", f"{(42 + 32 + 52 + 112.25) / 4:.2f}*"]
    assert "* from the run's last validation event" in text and "includes validation scores" in text
