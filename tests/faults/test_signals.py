"""Ctrl-C (SIGINT) and SIGTERM stop every command the same way: one line saying what was kept and how to go on,
exit code 130 (SIGINT) or 143 (SIGTERM), so that `cmd1 && cmd2` stops; nothing is left half-written, and what was
written is kept (an interrupted extraction resumes where it stopped). `vlpet train`'s own checkpoint-and-stop is
tested in test_train_interrupt.py."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from faultkit import VLPET, console_env, hidden, nlvr_root, untrained_run, vlpet
from PIL import Image

SIGNALS = [pytest.param(signal.SIGINT, 130, "SIGINT", id="sigint"),
           pytest.param(signal.SIGTERM, 143, "SIGTERM", id="sigterm")]


def interrupted_line(err: str, name: str) -> str:
    """The single `interrupted (NAME): ...` line, with no traceback; returns it."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1 and lines[0].startswith(f"interrupted ({name}): "), err
    return lines[0]


# ---- the console script, signalled while it works ----------------------------------------------------------
def images(folder: Path, n: int, fifo_at: int) -> Path:
    """n small PNGs; image number `fifo_at` is a named pipe, so extraction blocks there until the test lets go."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        path = folder / f"img-{i:02d}.png"
        if i == fifo_at:
            os.mkfifo(path)
        else:
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(path)
    return folder / f"img-{fifo_at:02d}.png"


def wait_for_reader(fifo: Path, proc: subprocess.Popen, seconds: float = 120) -> int:
    """Block until the process opens the pipe for reading; returns the write end (kept open: the reader waits)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO or proc.poll() is not None:
                raise AssertionError(proc.communicate()[1][-2000:]) from exc
            time.sleep(0.05)
    raise AssertionError("extraction never reached the blocking image")


@pytest.mark.cli
@pytest.mark.parametrize("signum, code, name", SIGNALS)
def test_extract_features_stops_keeps_what_it_wrote_and_resumes(tmp_path, signum, code, name):
    from vlpet_cli.extract import extract
    from vlpet_cli.features.kinds import IMAGE

    fifo = images(tmp_path / "images", 12, fifo_at=7)
    out = tmp_path / "features.h5"
    proc = subprocess.Popen([str(VLPET), "extract-features", "--images", str(tmp_path / "images"), "--model",
                             "tiny-clip", "--out", str(out), "--batch-size", "1", "--workers", "1",
                             "--no-progress"], env=console_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    writer = wait_for_reader(fifo, proc)
    time.sleep(1.0)  # the images before the pipe go through the model and into the store
    proc.send_signal(signum)
    time.sleep(1.0)
    os.close(writer)  # the pipe's reader gets end-of-file, so the decoding thread can finish
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    line = interrupted_line(err, name)
    with IMAGE.open(out) as store:
        kept = set(store.ids())
    assert 0 < len(kept) < 12 and "img-07" not in kept
    assert f"{len(kept)} of 12 images extracted into {out}; run the same command again to resume" in line
    assert not hidden(tmp_path)
    fifo.unlink()
    Image.fromarray(np.zeros((24, 24, 3), dtype=np.uint8)).save(fifo)
    summary = extract(tmp_path / "images", "tiny-clip", out, progress=False, workers=1)
    assert (summary.skipped_existing, summary.written, summary.failed) == (len(kept), 12 - len(kept), [])
    with IMAGE.open(out) as store:
        assert sorted(store.ids()) == [f"img-{i:02d}" for i in range(12)]


def torch_loaded(pid: int) -> bool:
    """Whether a process has torch mapped: the command is past start-up and inside its work."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.cli
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see the command at work")
@pytest.mark.parametrize("signum, code, name", SIGNALS)
def test_eval_stops_with_one_line_and_writes_nothing(tmp_path, signum, code, name):
    root = nlvr_root(tmp_path / "data", test=64)
    run = untrained_run(tmp_path / "runs" / "r", root)
    proc = subprocess.Popen([str(VLPET), "eval", str(run), "--batch-size", "1"], env=console_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not torch_loaded(proc.pid) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, (out, err[-2000:])  # exit 0 before: `vlpet eval R && next` went on
    line = interrupted_line(err, name)
    assert "no evaluation file was written" in line and "run the same command again" in line
    assert not (run / "eval").exists() and not hidden(run)


# ---- every command, in this process: the signal arrives while the command works ------------------------------
def signal_during(monkeypatch, target: str, signum: int = signal.SIGINT, before=None) -> None:
    """Replace `target` (module.function) by one that delivers `signum` to this process while it runs."""
    def working(*args, **kwargs):
        if before is not None:
            before(*args, **kwargs)
        if signal.getsignal(signum) in (signal.SIG_DFL, None):
            pytest.fail(f"no handler for {signal.Signals(signum).name}: the command would die without a word")
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler raises here
        pytest.fail("the signal did not stop the command")

    monkeypatch.setattr(target, working)


@pytest.fixture()
def world(tmp_path):
    root = nlvr_root(tmp_path / "data")
    run = untrained_run(tmp_path / "runs" / "r", root)
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((24, 24, 3), dtype=np.uint8)).save(tmp_path / "images" / "a.png")
    return {"root": root, "run": run, "tmp": tmp_path}


COMMANDS = {  # command line, the function it works in, what the line says was kept
    "train": (["train", "--preset", "vlpet-small", "--task", "nlvr", "--data-root", "{root}", "--backbone",
               "tiny-bart", "--runs-dir", "{tmp}/runs", "--name", "t", "model.feat_dim=64"],
              "vlpet_cli.train.train", "no checkpoint was written yet; run the same command again"),
    "eval": (["eval", "{run}"], "vlpet_cli.evaluate.evaluate", "no evaluation file was written"),
    "predict": (["predict", "{run}", "--task", "nlvr", "--image", "{tmp}/images/a.png", "--image",
                 "{tmp}/images/a.png", "--statement", "red"], "vlpet_cli.predict.predict",
                "no answer was printed and nothing was written"),
    "extract-features": (["extract-features", "--images", "{tmp}/images", "--model", "tiny-clip", "--out",
                          "{tmp}/f.h5"], "vlpet_cli.extract.extract", "0 of 1 images extracted into"),
    "merge average": (["merge", "average", "{run}", "{run}", "--out", "{tmp}/avg"],
                      "vlpet_cli.merge.average_adapters", "avg was not written (it is written whole or not at all)"),
    "merge fold": (["merge", "fold", "{run}", "--out", "{tmp}/fold"], "vlpet_cli.merge.fold_adapter",
                   "fold was not written"),
    "merge export-peft": (["merge", "export-peft", "{run}", "--out", "{tmp}/peft"], "vlpet_cli.merge.export_peft",
                          "peft was not written"),
    "import-reference": (["import-reference", "{tmp}/ref.pth", "--out", "{tmp}/imported"],
                         "vlpet_cli.reference.import_reference_checkpoint", "imported was not written"),
    "report": (["report", "{run}", "--out", "{tmp}/report.png"], "vlpet_cli.report.report",
               "nothing was left half-written"),
    "features convert": (["features", "convert", "{root}/nlvr/clip_features/data_clip_RN101_att.h5",
                          "{tmp}/per-image", "--layout", "per-image"], "vlpet_cli.cli.convert_features",
                         "the images converted so far are kept in"),
    "features inspect": (["features", "inspect", "{root}/nlvr/clip_features/data_clip_RN101_att.h5"],
                         "vlpet_cli.cli.inspect_features", "nothing was left half-written"),
    "presets show": (["presets", "show", "vlpet-small"], "vlpet_cli.cli.resolve", "nothing was left half-written"),
    "params": (["params", "--preset", "vlpet-small", "--backbone", "tiny-bart"], "vlpet_cli.pet.budget.budget",
               "nothing was left half-written"),
    "quickstart": (["quickstart", "--runs-dir", "{tmp}/qs"], "vlpet_cli.quickstart.quickstart",
                   "the toy world and the features extracted so far are kept"),
}


@pytest.mark.parametrize("signum, code, name", SIGNALS)
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_stops_with_one_line(world, monkeypatch, capsys, command, signum, code, name):
    args, target, kept = COMMANDS[command]
    (world["tmp"] / "ref.pth").write_bytes(b"")
    signal_during(monkeypatch, target, signum)
    before = signal.getsignal(signal.SIGTERM)
    got, _, err = vlpet(monkeypatch, capsys, *[a.format(**world) for a in args])
    assert got == code, err
    assert kept in interrupted_line(err, name)
    assert signal.getsignal(signal.SIGTERM) is before  # the handlers are put back


def test_an_interrupted_merge_leaves_nothing_half_written(world, monkeypatch, capsys):
    out = world["tmp"] / "avg"
    signal_during(monkeypatch, "safetensors.torch.save_file",
                  before=lambda tensors, path, *a, **k: Path(path).write_bytes(b"half"))
    code, _, err = vlpet(monkeypatch, capsys, "merge", "average", world["run"], world["run"], "--out", out)
    assert code == 130 and "was not written" in interrupted_line(err, "SIGINT")
    assert not out.exists() and not hidden(world["tmp"])


def test_an_evaluation_signalled_while_writing_writes_every_file(world, monkeypatch, capsys):
    """A signal that arrives while eval writes its files waits until all of them are written."""
    from vlpet_cli import evaluate as evaluate_module

    real = evaluate_module.write_json
    sent = []

    def write_json(path, data):
        if not sent:
            sent.append(path)
            os.kill(os.getpid(), signal.SIGINT)
        real(path, data)

    monkeypatch.setattr(evaluate_module, "write_json", write_json)
    code, _, err = vlpet(monkeypatch, capsys, "eval", world["run"], "--limit", "2")
    assert code == 130, err
    interrupted_line(err, "SIGINT")
    written = sorted(p.name for p in (world["run"] / "eval").iterdir())
    assert written == ["nlvr-test.json", "nlvr-test.predictions.json", "nlvr-test.submission.csv"]
    assert json.loads((world["run"] / "eval" / "nlvr-test.json").read_text())["n"] == 2


def test_a_signal_the_shell_ignores_stays_ignored(world, monkeypatch, capsys):
    """A script's background job ignores SIGINT (the shell says so): vlpet keeps it that way."""
    monkeypatch.setattr(signal, "getsignal", lambda sig: signal.SIG_IGN if sig == signal.SIGINT else signal.SIG_DFL)
    installed = []
    real = signal.signal
    monkeypatch.setattr(signal, "signal", lambda sig, handler: installed.append(sig) or real(sig, handler))
    code, out, err = vlpet(monkeypatch, capsys, "presets", "show", "vlpet-small")
    assert code == 0, err
    assert signal.SIGINT not in installed and signal.SIGTERM in installed
