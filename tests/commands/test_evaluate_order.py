"""Evaluation batches in record order by default; `by_length=True` forms them longest encoder text first and
still returns predictions in record order. On the toy sets below the predictions are identical either way (the
padded text rows are masked out of attention, BART's positions and T5's bias are per token); it stays opt-in
because other batch shapes round differently and can flip a prediction on larger sets."""

from __future__ import annotations

import pytest
import torch

from vlpet_cli.data.loading import load_task_data
from vlpet_cli.data.multitask import eval_order
from vlpet_cli.inference import predict
from vlpet_cli.toy.root import resolve_data_root
from vlpet_cli.train import resolve_train_preset
from vlpet_cli.vl.model import build_model

TASKS = ["vqa", "gqa", "nlvr", "coco"]

pytestmark = pytest.mark.slow  # every test evaluates on the toy world: `make test-fast` skips it


@pytest.mark.parametrize("backbone", ["tiny-bart", "tiny-t5"])
def test_sorted_batches_come_back_in_record_order(backbone):
    preset = resolve_train_preset("vlpet-small", TASKS, "toy", backbone, ["eval.limit=24"])
    torch.manual_seed(0)
    model, tok = build_model(preset, weights=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("pet."):
                p.add_(0.05 * torch.randn_like(p))
    data = load_task_data(preset, resolve_data_root("toy"), tok, splits=("val",))
    reordered = varied = 0
    for task, ds in data.val.items():
        order = eval_order(ds, by_length=True)
        assert sorted(order) == list(range(len(ds)))
        reordered += order != list(range(len(ds)))
        plain = predict(model, tok, ds, preset, 5)  # the default: record order
        assert plain == predict(model, tok, ds, preset, 5, by_length=False)
        fast = predict(model, tok, ds, preset, 5, by_length=True)
        assert fast == plain, task
        varied += len({p["prediction"] for p in plain}) > 1
    assert varied >= 2  # the predictions differ between records, so a mix-up would show
    assert reordered >= 2  # the questions' lengths vary, so sorting did change the batches


def test_eval_order_is_per_rank_and_stable():
    preset = resolve_train_preset("vlpet-small", ["vqa"], "toy", "tiny-bart", ["eval.limit=30"])
    model, tok = build_model(preset, weights=True)
    ds = load_task_data(preset, resolve_data_root("toy"), tok, splits=("val",)).val["vqa"]
    ranks = [eval_order(ds, r, 3, by_length=True) for r in range(3)]
    assert sorted(i for r in ranks for i in r) == list(range(len(ds)))
    assert all(i % 3 == r for r, idx in enumerate(ranks) for i in idx)
    lengths = {i: len(ds.item(i, 0)["input_ids"]) for i in range(len(ds))}
    for idx in ranks:
        assert [lengths[i] for i in idx] == sorted((lengths[i] for i in idx), reverse=True)
