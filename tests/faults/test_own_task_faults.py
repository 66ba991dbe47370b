"""Faults of task files and their split files (issue 22): each ends `vlpet train --task FILE.yaml` with exit code 2
and one line naming the file, the row and column where there is one, and the fix, before any model is built and
with no run directory written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.faults.faultkit import console, no_model, one_line_error, vlpet
from vlpet_cli.tasks import TASKS

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "own-data"
GOOD = {
    "task.yaml": "name: mine\nkind: qa\nimages: images\nsplits: {train: train.csv}\nvision: tiny-clip\n",
    "train.csv": "image,question,answer\na.png,what colour?,red\nb.png,what shape?,circle\n",
}


@pytest.fixture(autouse=True)
def _task_table():
    saved = dict(TASKS)
    yield
    TASKS.clear()
    TASKS.update(saved)


def world(folder: Path, **files: str) -> Path:
    """A task folder (two images, the good files, `files` replacing or adding some); returns the task file."""
    (folder / "images").mkdir(parents=True)
    for name in ("a.png", "b.png"):
        shutil.copy(EXAMPLE / "images" / "red-circle-0.png", folder / "images" / name)
    for name, text in {**GOOD, **{k.replace("_", "."): v for k, v in files.items()}}.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder / "task.yaml"


def train(monkeypatch, capsys, task: Path, tmp_path: Path) -> tuple[int, str, str]:
    no_model(monkeypatch)
    result = vlpet(monkeypatch, capsys, "train", "--preset", "vlpet-small", "--task", task, "--backbone",
                   "tiny-bart", "--runs-dir", tmp_path / "runs")
    assert not (tmp_path / "runs").exists()
    return result


CASES = {
    "missing column": ({"train_csv": "image,question\na.png,what?\n"},
                       ["train.csv: column 'answer' (answer) is missing", "Fix: add the column"]),
    "missing image": ({"train_csv": "image,question,answer\na.png,q,red\nnope.png,q,red\n"},
                      ["train.csv: row 2, column 'image': image 'nope.png' not found", "Fix: put the image there"]),
    "empty split": ({"train_csv": "image,question,answer\n"}, ["train.csv: the split is empty", "Fix: add rows"]),
    "answer index out of range": (
        {"task_yaml": GOOD["task.yaml"].replace("kind: qa", "kind: choice"),
         "train_csv": "image,question,choices,answer\na.png,q,red|blue,1\nb.png,q,red|blue,2\n"},
        ["train.csv: row 2, column 'answer': answer index 2 is out of range for 2 choices",
         "Fix: give an index from 0 to 1"]),
    "name shadowing a built-in task": ({"task_yaml": GOOD["task.yaml"].replace("name: mine", "name: VQA")},
                                       ["task.yaml: name 'vqa' is a built-in task's", "Fix: choose another name"]),
    "name shadowing an alias": ({"task_yaml": GOOD["task.yaml"].replace("name: mine", "name: nlvr2")},
                                ["task.yaml: name 'nlvr2' is a built-in task's"]),
    "unknown kind": ({"task_yaml": GOOD["task.yaml"].replace("kind: qa", "kind: vqa")},
                     ["task.yaml: kind 'vqa' is not a task kind", "Fix: use one of qa, caption, choice, classify"]),
    "bad YAML": ({"task_yaml": GOOD["task.yaml"] + "prompt: [unclosed\n"},
                 ["task.yaml: line", "not valid YAML", "Fix: correct the YAML"]),
    "unknown key": ({"task_yaml": GOOD["task.yaml"] + "imgaes: x\n"}, ["task.yaml: unknown key 'imgaes'"]),
    "label outside the declared set": (
        {"task_yaml": GOOD["task.yaml"].replace("kind: qa", "kind: classify") + "labels: [red, blue]\n",
         "train_csv": "image,label\na.png,red\nb.png,green\n"},
        ["train.csv: row 2, column 'label': label 'green' is not in the task's labels (red, blue)"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_malformed_task_or_split_file_is_one_line_before_training(case, tmp_path, monkeypatch, capsys):
    files, needles = CASES[case]
    code, _, err = train(monkeypatch, capsys, world(tmp_path / "task", **files), tmp_path)
    one_line_error(code, err, *needles)


@pytest.mark.slow
def test_an_image_that_cannot_be_decoded_names_its_row_after_extraction(tmp_path, monkeypatch, capsys):
    task = world(tmp_path / "task")
    (tmp_path / "task" / "images" / "b.png").write_bytes(b"not a png")
    code, _, err = train(monkeypatch, capsys, task, tmp_path)
    one_line_error(code, err, "train.csv: row 2, column 'image': image", "b.png cannot be read",
                   "Fix: replace the image")
    assert (tmp_path / "task" / "features" / "images.tiny-clip.h5").is_file()  # a.png's features are kept


@pytest.mark.cli
def test_the_installed_vlpet_refuses_a_missing_image_in_one_line(tmp_path):
    task = world(tmp_path / "task", train_csv="image,question,answer\nmissing.jpg,q,red\n")
    result = console("train", "--preset", "vlpet-small", "--task", task, "--backbone", "tiny-bart",
                     "--runs-dir", tmp_path / "runs")
    one_line_error(result.returncode, result.stderr, f"{tmp_path / 'task' / 'train.csv'}: row 1, column 'image'",
                   "'missing.jpg' not found")
