"""Folded models and bundles evaluate to the same metrics as their source adapter on the toy world."""

import pytest

from vlpet_cli.evaluate import evaluate
from vlpet_cli.merge import fold_adapter
from vlpet_cli.train import resolve_train_preset, train

pytestmark = pytest.mark.slow  # every test trains on the toy world: `make test-fast` skips it


def metrics(path, out):
    results = evaluate(path, split="test", limit=10, progress=False, out_dir=out, metrics=None)
    return {task: {k: v for k, v in r["metrics"].items() if isinstance(v, float)} for task, r in results.items()}


@pytest.mark.parametrize("preset,bundle", [("lora", False), ("vlpet-small", True)])
def test_folded_and_bundled_models_score_like_the_adapter(tmp_path, preset, bundle):
    resolved = resolve_train_preset(preset, ["vqa", "nlvr"], "toy", "tiny-bart",
                                    ["data.limit=32", "train.epochs=1", "eval.every=0"])
    train(resolved, tmp_path / "run")
    fold_adapter(tmp_path / "run" / "adapter", tmp_path / "folded", bundle=bundle)
    source = metrics(tmp_path / "run", tmp_path / "eval-a")
    folded = metrics(tmp_path / "folded", tmp_path / "eval-b")
    assert folded.keys() == source.keys()
    for task in source:
        for key, value in source[task].items():
            assert folded[task][key] == pytest.approx(value, abs=1e-6), (task, key)
