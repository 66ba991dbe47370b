"""End-to-end learning on the toy videos: `vlpet quickstart --video` trains vlpet-small on TVQA, How2QA, TVC and
YC2C, and every task clearly beats the untrained model (and, for QA, chance and the majority answer) on val."""

import json
from collections import Counter
from pathlib import Path

import pytest
from test_docs import quickstart_tables

from vlpet_cli.quickstart import VIDEO_TASKS, quickstart, table_rows

pytestmark = pytest.mark.slow  # an end-to-end run: `make test-fast` skips it

QA = {"tvqa": ("tvqa", "tvqa_train", "tvqa_val", 5), "how2qa": ("how2qa", "how2qa_train_release",
                                                                "how2qa_val_release", 4)}


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def majority_rate(data: Path, task: str) -> float:
    """Accuracy on val of always answering the most frequent training letter."""
    folder, train, val, _ = QA[task]
    ann = data / "video" / "ann" / folder
    common = Counter(r["answer_idx"] for r in read(ann / f"{train}.jsonl")).most_common(1)[0][0]
    rows = read(ann / f"{val}.jsonl")
    return 100 * sum(r["answer_idx"] == common for r in rows) / len(rows)


def test_quickstart_video_learns_every_task(tmp_path):
    summary = quickstart(tmp_path, say=lambda *a: None, video=True)
    # docs/toy-world.md shows what the command prints (update its video quick-start table when they differ)
    tables = quickstart_tables(VIDEO_TASKS)
    assert tables
    for page, table in tables:
        assert [tuple(r) for r in table] == table_rows(summary), page
    rows = {r["task"]: r for r in summary["rows"]}
    assert list(rows) == VIDEO_TASKS == ["tvqa", "how2qa", "tvc", "yc2c"] and summary["split"] == "val"
    data = tmp_path / "quickstart-data"
    for task, (*_, n) in QA.items():
        floor = max(rows[task]["before"], majority_rate(data, task), 100 / n)
        assert rows[task]["after"] > floor + 15, (task, rows[task], floor)
    for task in ("tvc", "yc2c"):
        assert rows[task]["after"] >= max(3 * rows[task]["before"], 20), rows[task]
    run = Path(summary["run"])
    assert (run / "adapter").is_dir() and (run / "eval" / "tvqa-val.json").exists()
