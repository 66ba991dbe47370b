"""End-to-end learning on the toy world: every task clearly beats the untrained model and the majority answer,
and README.md's quick-start table is what the quick start prints."""

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from vlpet_cli.artifacts import load_adapter
from vlpet_cli.inference import score
from vlpet_cli.quickstart import TABLE_COLUMNS, quickstart, table_rows
from vlpet_cli.vl.model import build_model

pytestmark = pytest.mark.slow  # end-to-end runs: `make test-fast` skips them


def majority_rate(data: Path, task: str) -> float:
    """The score of always predicting the most frequent training answer, on the test split."""
    if task == "vqa":
        train = json.loads((data / "vqa" / "karpathy_train.json").read_text())
        common = Counter(max(r["label"], key=r["label"].get) for r in train).most_common(1)[0][0]
        test = json.loads((data / "vqa" / "karpathy_test.json").read_text())
        ann = {a["question_id"]: a for a in json.loads(
            (data / "vqa" / "v2_mscoco_val2014_annotations.json").read_text())["annotations"]}
        preds = [{**ann[r["question_id"]], "prediction": common, "label": r["label"]} for r in test]
        return score("vqa", preds)["vqa"]
    if task == "gqa":
        train = json.loads((data / "GQA" / "train.json").read_text())
        common = Counter(next(iter(r["label"])) for r in train).most_common(1)[0][0]
        test = json.loads((data / "GQA" / "testdev.json").read_text())
        return 100 * sum(r["label"].get(common, 0) for r in test) / len(test)
    test = json.loads((data / "nlvr" / "test.json").read_text())
    return 100 * max(Counter(r["label"] for r in test).values()) / len(test)


README = Path(__file__).resolve().parents[2] / "README.md"


def readme_quickstart_table(nth: int = 0) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the nth markdown table in README.md's "Quick start" section (0: the image quick start's,
    1: the video quick start's)."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Quick start", 1)[1].split("\n## ", 1)[0]
    tables: list[list[list[str]]] = []
    previous = False
    for line in (line.strip() for line in section.splitlines()):
        if line.startswith("|"):
            if not previous:
                tables.append([])
            tables[-1].append([cell.strip() for cell in line.strip("|").split("|")])
        previous = line.startswith("|")
    header, rule, *rows = tables[nth]
    assert all(set(cell) <= set("-: ") for cell in rule), rule
    return header, rows


def test_readme_quickstart_table_is_a_table():
    header, rows = readme_quickstart_table()
    assert tuple(header) == TABLE_COLUMNS  # the columns `vlpet quickstart` prints, no others
    assert [r[0] for r in rows] == ["vqa", "gqa", "nlvr", "coco"]
    header, rows = readme_quickstart_table(1)
    assert tuple(header) == TABLE_COLUMNS
    assert [r[0] for r in rows] == ["tvqa", "how2qa", "tvc", "yc2c"]


def test_quickstart_learns_every_task(tmp_path):
    summary = quickstart(tmp_path, say=lambda *a: None)
    # README.md shows what the command prints (update its table from `vlpet quickstart` when they differ)
    header, rows = readme_quickstart_table()
    assert (tuple(header), [tuple(r) for r in rows]) == (TABLE_COLUMNS, table_rows(summary))
    after = re.search(r"\(now ([\d.]+), ([\d.]+), ([\d.]+), ([\d.]+)\)", README.read_text(encoding="utf-8"))
    if after:  # the toy world section quotes the quick start's scores after training
        assert list(after.groups()) == [row[3] for row in table_rows(summary)]
    rows = {r["task"]: r for r in summary["rows"]}
    assert set(rows) == {"vqa", "gqa", "nlvr", "coco"}
    assert rows["coco"]["after"] >= max(3 * rows["coco"]["before"], 30)
    data = tmp_path / "quickstart-data"
    for task in ("vqa", "gqa"):
        assert rows[task]["after"] > rows[task]["before"] + 20, rows[task]
        assert rows[task]["after"] > majority_rate(data, task) + 20, (task, rows[task])
    assert rows["nlvr"]["after"] > max(rows["nlvr"]["before"], majority_rate(data, "nlvr")) + 8, rows["nlvr"]
    run = Path(summary["run"])
    assert (run / "plots" / "loss.png").exists() and (run / "eval" / "coco-test.json").exists()
    # the frozen backbone is the shipped one, bit for bit
    model, _, preset = load_adapter(run / "adapter")
    fresh, _ = build_model(preset)
    for (name, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters()):
        if not p.requires_grad and name.startswith("backbone."):
            assert torch.equal(p, q), name
