"""The benchmark harness: configurations alternate (A B, B A, ...), ratios are per round, one JSON object last."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import harness  # noqa: E402


def test_alternate_reverses_order_on_odd_rounds():
    seen = []
    results = harness.alternate(["a", "b", "c"], 3, lambda n: seen.append(n) or {"t": float(len(seen))})
    assert seen == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert [r["t"] for r in results["a"]] == [1.0, 6.0, 7.0]


def test_ratio_is_per_round_median_with_spread():
    results = {"x": [{"t": 2.0}, {"t": 3.3}, {"t": 4.0}], "y": [{"t": 1.0}, {"t": 3.0}, {"t": 2.0}]}
    stats = harness.ratio(results, "x", "y", "t")
    assert stats["rounds"] == [2.0, pytest.approx(1.1), 2.0]
    assert stats["median"] == 2.0 and stats["min"] == pytest.approx(1.1) and stats["max"] == 2.0


def test_summary_holds_targets_and_whether_met():
    out = harness.summary("demo", {"r": {"median": 1.04, "min": 1.0, "max": 1.2}, "e": {"median": 0.9, "min": 0.8,
                                                                                      "max": 0.95}},
                          {"r": ("<=", 1.06), "e": (">=", 0.95)})
    assert out["r"] == 1.04 and out["r_spread"] == [1.0, 1.2]
    assert out["met"] == {"r": True, "e": False} and out["targets"]["e"] == [">=", 0.95]
    json.dumps(out)


def test_run_one_reads_the_last_json_line(tmp_path):
    script = tmp_path / "bench.py"
    script.write_text("import json, sys\nprint('noise')\nprint(json.dumps({'name': sys.argv[2], 'v': 1.5}))\n")
    assert harness.run_one(script, "cfg", ()) == {"name": "cfg", "v": 1.5}
    bad = tmp_path / "bad.py"
    bad.write_text("import sys\nsys.stderr.write('boom')\nsys.exit(3)\n")
    with pytest.raises(harness.MeasurementError, match="boom"):
        harness.run_one(bad, "cfg", ())
