"""End-to-end learning on the toy world: every task clearly beats the untrained model and the majority answer,
and the quick-start tables of README.md and docs/toy-world.md are what the quick start prints."""

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from test_docs import DOCS, quickstart_tables

from vlpet_cli.artifacts import load_adapter
from vlpet_cli.inference import score
from vlpet_cli.quickstart import quickstart, table_rows
from vlpet_cli.vl.model import build_model

pytestmark = pytest.mark.slow  # end-to-end runs: `make test-fast` skips them
TOY_WORLD = DOCS / "toy-world.md"


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


def test_quickstart_learns_every_task(tmp_path):
    summary = quickstart(tmp_path, say=lambda *a: None)
    # README.md and docs/toy-world.md show what the command prints (update them from `vlpet quickstart` when they
    # differ)
    for page, rows in quickstart_tables(["vqa", "gqa", "nlvr", "coco"]):
        assert [tuple(r) for r in rows] == table_rows(summary), page
    # the toy world page quotes the quick start's scores after training
    after = re.search(r"\(now ([\d.]+), ([\d.]+), ([\d.]+), ([\d.]+)\)", TOY_WORLD.read_text(encoding="utf-8"))
    assert after and list(after.groups()) == [row[3] for row in table_rows(summary)]
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
