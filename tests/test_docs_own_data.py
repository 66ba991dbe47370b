"""The walk of docs/own-data.md runs as shown: its commands (the `$ vlpet ...` lines of the console blocks that
follow a `<!-- walk -->` comment, in page order) run through the installed console script in a fresh copy of
examples/own-data, each exits 0, `vlpet eval RUN --json` prints the task's accuracy and `--html` writes the page.
The kinds end to end, in process: tests/tasks/test_own.py."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from test_docs import console_script

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "own-data.md"
MARK = "<!-- walk -->"


def walk_commands(text: str) -> list[str]:
    """The `$ vlpet ...` lines (backslash continuations joined) of every code block right after a walk mark."""
    commands: list[str] = []
    lines = text.splitlines()
    for number, line in enumerate(lines):
        if line.strip() != MARK:
            continue
        assert lines[number + 1].startswith("```"), f"{PAGE.name}:{number + 2}: a code block must follow {MARK}"
        pending = ""
        for code in lines[number + 2:]:
            if code.startswith("```"):
                break
            if pending or code.startswith("$ vlpet "):
                pending += code.removeprefix("$ ").rstrip().removesuffix("\\")
                if not code.rstrip().endswith("\\"):
                    commands.append(" ".join(pending.split()))
                    pending = ""
    return commands


def test_the_walk_is_found_in_the_page():
    commands = walk_commands(PAGE.read_text(encoding="utf-8"))
    assert [shlex.split(c)[1] for c in commands] == ["train", "eval", "eval", "predict"], commands


@pytest.mark.slow
@pytest.mark.cli
def test_the_own_data_walk_runs_as_documented(tmp_path):
    shutil.copytree(ROOT / "examples" / "own-data", tmp_path / "examples" / "own-data",
                    ignore=shutil.ignore_patterns("features", "__pycache__"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    outputs = {}
    for command in walk_commands(PAGE.read_text(encoding="utf-8")):
        words = shlex.split(command)
        out = subprocess.run([console_script(), *words[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, f"`{command}` exited {out.returncode}: {out.stderr[-2000:]}"
        outputs[command] = out.stdout
    json_run = next(c for c in outputs if c.startswith("vlpet eval") and "--json" in c)
    scores = json.loads(outputs[json_run])
    assert 0 <= scores["shapes-qa"]["acc"] <= 100, scores
    assert (tmp_path / "examples/own-data/features/images.tiny-clip.h5").is_file()  # extracted on first use
    page = (tmp_path / "runs/vlpet-small-shapes-qa/eval/shapes-qa-test.html").read_text(encoding="utf-8")
    records = len((tmp_path / "examples/own-data/qa-test.csv").read_text(encoding="utf-8").splitlines()) - 1
    assert page.count('<tr class="row ') == records  # a row per test record
    assert '<img data-thumb="t0" alt="' in page  # thumbnails from the task's images folder
    predict = next(c for c in outputs if c.startswith("vlpet predict"))
    assert outputs[predict].strip(), "vlpet predict printed no answer"
