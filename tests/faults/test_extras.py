"""The optional extras: without `av` (vlpet[video]) or `matplotlib` (vlpet[plots]) the commands that need them say
in one line which extra to install (exit 2, before any work), and everything else works.

A missing package is simulated in the subprocess by a sitecustomize.py that puts None in sys.modules for it, so
`import av` fails as it does where av is not installed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vlpet_cli.extras import EXTRAS, MissingExtraError, require_extra
from vlpet_cli.plots import plot_run
from vlpet_cli.toy import images as toy

ROOT = Path(__file__).resolve().parents[2]
VLPET = Path(sys.executable).with_name("vlpet")
VIDEO = "reading and writing videos needs av, which is not installed; install it with: pip install 'vlpet[video]'"
PLOTS = "drawing plots needs matplotlib, which is not installed; install it with: pip install 'vlpet[plots]'"


def without(tmp_path: Path, *modules: str) -> dict:
    """The environment of a subprocess in which `modules` cannot be imported."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text("import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in modules))
    paths = [str(site), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}


def vlpet(tmp_path: Path, missing: tuple[str, ...], *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VLPET), *args], capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env={**without(tmp_path, *missing), **env})


def test_the_message_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(MissingExtraError) as err:
        require_extra("video")
    assert str(err.value) == VIDEO


def test_a_broken_install_says_why(monkeypatch):
    def broken(name):
        raise ImportError("libavformat.so.61: cannot open shared object file")

    monkeypatch.setattr("vlpet_cli.extras.importlib.import_module", broken)
    with pytest.raises(MissingExtraError, match=r"^reading and writing videos needs av, which does not import "
                                                r"\(libavformat.so.61: cannot open shared object file\); install "
                                                r"it with: pip install 'vlpet\[video\]'$"):
        require_extra("video")


def test_every_extra_is_declared_and_in_dev():
    """pyproject.toml declares each extra with its package, and `.[dev]` (make install) pulls every extra in."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]")[1].split("\n[")[0]
    declared = dict(re.findall(r"^([a-z-]+)\s*=\s*(\[.*\])$", section, re.M))
    package = {"mlflow": "mlflow-skinny"}  # the distribution that installs the module, where the names differ
    for extra, (module, _) in EXTRAS.items():
        assert f'"{package.get(module, module)}>=' in declared[extra], (extra, declared.get(extra))
        assert re.search(rf"vlpet\[[^\]]*\b{extra}\b", declared["dev"]), declared["dev"]
    dependencies = text.split("dependencies = [")[1].split("]")[0]
    assert '"av' not in dependencies and '"matplotlib' not in dependencies and '"huggingface_hub>=' in dependencies


def test_plot_without_matplotlib_names_the_extra(monkeypatch, tmp_path):
    """Training catches this VlpetError and says `no plot: ...`: the run itself does not need matplotlib."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingExtraError, match=re.escape(PLOTS)):
        plot_run(tmp_path)


@pytest.mark.parametrize("args", [
    ["extract-features", "--videos", "videos", "--model", "tiny-clip-proj", "--out", "out"],
    ["predict", "run", "--task", "tvqa", "--video", "a.mp4", "--question", "q", "--choices", "a"],
    ["predict", "run", "--task", "tvc", "--inputs", "inputs.jsonl"],
    ["quickstart", "--video", "--runs-dir", "out"],
], ids=lambda a: " ".join(a[:2]))
@pytest.mark.cli
def test_video_commands_without_av(args, tmp_path):
    (tmp_path / "videos").mkdir()
    result = vlpet(tmp_path, ("av",), *args)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"error: {VIDEO}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site", "videos"]  # nothing written


@pytest.mark.cli
def test_report_without_matplotlib(tmp_path):
    result = vlpet(tmp_path, ("matplotlib",), "report", "run-a", "run-b")
    assert result.returncode == 2 and result.stderr == f"error: {PLOTS}\n"


@pytest.mark.slow
def test_without_extras_the_image_quick_start_runs_and_toy_videos_name_the_extra(tmp_path, monkeypatch):
    """The image quick start runs with neither extra (no plot, one line saying why); the toy world is built
    without videos, so a toy video task names vlpet[video]; once av imports, that world is rebuilt."""
    cache = tmp_path / "cache"
    result = vlpet(tmp_path, ("av", "matplotlib"), "quickstart", "--runs-dir", "runs", "train.epochs=1",
                   "data.limit=96", "eval.limit=48", VLPET_CACHE=str(cache))
    assert result.returncode == 0, result.stderr
    assert f"no plot: {PLOTS}" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "coco" in result.stdout
    assert json.loads((tmp_path / "runs" / "quickstart-data" / "toy.json").read_text())["video"] is None

    result = vlpet(tmp_path, ("av", "matplotlib"), "train", "--preset", "vlpet-small", "--data-root", "toy",
                   "--task", "tvqa", "--backbone", "tiny-bart", "--runs-dir", "runs", VLPET_CACHE=str(cache))
    assert result.returncode == 2 and result.stderr.endswith(f"error: {VIDEO}\n"), result.stderr
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["quickstart", "quickstart-data"]

    monkeypatch.setenv("VLPET_CACHE", str(cache))
    root = cache / toy.TOY_VERSION
    assert json.loads((root / "toy.json").read_text())["video"] is None
    assert not toy._is_current(root)  # av imports here: the world without videos is out of date
    monkeypatch.setitem(sys.modules, "av", None)
    assert toy._is_current(root)  # without av it is current: not rebuilt on every run
