"""Model cards: every adapter, bundle, folded model and PEFT export carries a README.md whose YAML front matter
(the Hugging Face Hub's format) names the base model and the method, and the scores once it has been evaluated."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from vlpet_cli.artifacts import refresh_model_card, save_adapter, write_model_card, write_peft_card
from vlpet_cli.atomic import WriteError
from vlpet_cli.cards import CARD, read_front_matter
from vlpet_cli.cli import app
from vlpet_cli.merge import average_adapters, export_peft, fold_adapter
from vlpet_cli.presets import resolve
from vlpet_cli.runs import locate
from vlpet_cli.vl.model import build_model

FEAT = 16


def adapter_dir(directory: Path, backbone: Path, preset: str = "lora", *overrides: str) -> Path:
    """Save an adapter of `preset` on a tiny backbone (weights as built: the card does not read them)."""
    torch.manual_seed(0)
    resolved = resolve(preset, [f"model.feat_dim={FEAT}", "data.tasks=[vqa,coco]", *overrides],
                       backbone=str(backbone))
    model, _ = build_model(resolved, weights=True)
    save_adapter(directory, model, resolved)
    return directory


def seeded(fn, *args, **kwargs):
    """Building a tiny BART draws embedding rows from the global RNG; the backbone fingerprint covers them."""
    torch.manual_seed(0)
    return fn(*args, **kwargs)


def card(directory: Path) -> tuple[dict, str]:
    """(front matter parsed by yaml.safe_load, whole text) of a directory's card."""
    text = (directory / CARD).read_text(encoding="utf-8")
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta == read_front_matter(directory / CARD)
    return meta, text


def scores(meta: dict) -> dict[tuple[str, str, str], float]:
    """(task, split, metric) -> value from the front matter's model-index."""
    found = {}
    for entry in meta.get("model-index") or []:
        for result in entry["results"]:
            for metric in result["metrics"]:
                found[(result["task"]["name"], result["dataset"]["split"], metric["type"])] = metric["value"]
    return found


def write_eval(folder: Path, task: str, split: str, metrics: dict, n: int = 90, limit: int | None = None,
               trained: bool = True) -> Path:
    """An eval/<task>-<split>.json record as `vlpet eval` writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{task}-{split}.json"
    path.write_text(json.dumps({"task": task, "split": split, "metrics": metrics, "n": n, "limit": limit,
                                "trained": trained}))
    return path


# ---- adapters -----------------------------------------------------------------------------------------------
def test_an_adapter_card_names_base_model_method_tasks_and_parameters(tiny_dirs, tmp_path):
    adapter = adapter_dir(tmp_path / "lora-vqa", tiny_dirs["bart"])
    meta, text = card(adapter)
    assert meta["library_name"] == "vlpet" and meta["base_model"] == str(tiny_dirs["bart"])
    assert {"vision-language", "lora", "adapter", "bart"} <= set(meta["tags"])
    assert meta["datasets"] == ["vqa", "coco"]
    assert "model-index" not in meta and "metrics" not in meta  # nothing evaluated yet
    config = json.loads((adapter / "vlpet_config.json").read_text())
    p = config["parameters"]
    assert 0 < p["trainable"] < p["total"] and p["percent"] == pytest.approx(100 * p["trainable"] / p["total"])
    assert f"| trainable parameters | {p['trainable']:,} of {p['total']:,} ({p['percent']:.2f} %) |" in text
    assert "| method | LoRA |" in text and "lr: 0.001" in text and "seed: 42" in text
    assert "Not evaluated yet" in text and "vlpet eval ./lora-vqa" in text and "vlpet predict ./lora-vqa" in text
    assert "@inproceedings{hu2023vlpet" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora-vqa"]  # written in place, no temp files left


def test_a_built_in_backbone_is_named_by_its_hub_id(tmp_path):
    from vlpet_cli.cards import CardFacts, render

    text = render(CardFacts(kind="adapter", name="x", preset={"name": "vlpet-large", "method": "VL-PET-large",
                                                              "data": {"tasks": ["vqa"]}}, base_model="bart-base"))
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["base_model"] == "facebook/bart-base" and "vl-pet-large" in meta["tags"]


def test_evaluations_refresh_the_scores_and_leave_out_subsets_untrained_tasks_and_stale_ones(tiny_dirs, tmp_path):
    run = tmp_path / "run"
    adapter = adapter_dir(run / "adapter", tiny_dirs["bart"])
    (run / "config.yaml").write_text("name: lora\n")
    stale = write_eval(run / "eval", "nlvr", "test", {"acc": 99.0})  # scored other weights
    os.utime(stale, (1_000_000, 1_000_000))
    write_eval(run / "eval", "vqa", "test", {"vqa": 41.25, "topk": 40.0, "per_answer_type": {"yes/no": 80.0}})
    write_eval(run / "eval", "coco", "test", {"cider": 12.5}, n=8, limit=8)  # a --limit subset
    elsewhere = tmp_path / "other-eval"  # `vlpet eval --out DIR` passes the folder it wrote
    write_eval(elsewhere, "gqa", "val", {"acc": 30.0}, trained=False)
    write_eval(elsewhere, "vqa", "val", {"vqa": 38.5})
    assert refresh_model_card(adapter, elsewhere) == adapter / CARD
    meta, text = card(adapter)
    assert scores(meta) == {("vqa", "test", "vqa"): 41.25, ("vqa", "test", "topk"): 40.0,
                            ("vqa", "val", "vqa"): 38.5}
    assert meta["model-index"][0]["name"] == "run" and meta["metrics"] == ["vqa", "topk"]
    assert meta["base_model"] == str(tiny_dirs["bart"]) and "lora" in meta["tags"]
    assert "| vqa | test | 90 | 41.25 (VQA accuracy) |" in text
    assert "| coco | test (first 8 records only) | 8 | 12.50 (COCO CIDEr) |" in text
    assert "| gqa | val (not trained on this task) |" in text and "nlvr" not in text.split("## Evaluation")[1]
    # the Hub's own parser reads the same scores back
    from huggingface_hub import ModelCard

    parsed = ModelCard(text).data
    assert parsed.base_model == str(tiny_dirs["bart"]) and parsed.library_name == "vlpet"
    assert {(r.task_name, r.dataset_split, r.metric_type, r.metric_value) for r in parsed.eval_results} == {
        ("vqa", "test", "vqa", 41.25), ("vqa", "test", "topk", 40.0), ("vqa", "val", "vqa", 38.5)}


def test_new_weights_start_a_card_without_the_old_scores(tiny_dirs, tmp_path):
    (tmp_path / "config.yaml").write_text("name: lora\n")
    adapter = adapter_dir(tmp_path / "adapter", tiny_dirs["bart"])
    old = write_eval(tmp_path / "eval", "vqa", "test", {"vqa": 50.0})  # a run's adapter/: RUN/eval
    write_model_card(adapter)
    assert scores(card(adapter)[0]) == {("vqa", "test", "vqa"): 50.0}
    os.utime(old, (1_000_000, 1_000_000))  # as if scored before the weights below were written
    adapter_dir(tmp_path / "adapter", tiny_dirs["bart"], "lora", "train.lr=5e-4")
    assert "model-index" not in card(adapter)[0]


def test_a_best_checkpoints_cards_show_the_scores_where_vlpet_eval_writes_them(tiny_dirs, tmp_path):
    """`vlpet eval RUN/checkpoints/best` writes RUN/eval/best (never inside the checkpoint); the checkpoint's card and
    the card of a PEFT export made from it read its scores there, not the final adapter's in RUN/eval."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: lora\n")
    best = adapter_dir(run / "checkpoints" / "best", tiny_dirs["bart"])
    assert locate(best).eval_dir == run / "eval" / "best"  # where `vlpet eval` writes without --out
    write_eval(locate(best).eval_dir, "vqa", "val", {"vqa": 44.0})
    write_eval(run / "eval", "vqa", "test", {"vqa": 12.0})  # the final adapter's scores
    write_model_card(best)
    meta, _ = card(best)
    assert scores(meta) == {("vqa", "val", "vqa"): 44.0} and meta["model-index"][0]["name"] == "run-best"
    export = tmp_path / "peft"
    export.mkdir()
    preset = resolve("lora", [f"model.feat_dim={FEAT}"], backbone=str(tiny_dirs["bart"]))
    write_peft_card(best, export, export, preset, "bart", {}, "LORA, 12 LoRA modules", None)
    assert scores(card(export)[0]) == {("vqa", "val", "vqa"): 44.0}


def test_a_card_that_cannot_be_written_is_a_warning(tiny_dirs, tmp_path, monkeypatch):
    adapter = adapter_dir(tmp_path / "adapter", tiny_dirs["bart"])
    before = (adapter / CARD).read_text()

    def full_disk(path, text):
        raise WriteError(path, OSError(28, "No space left on device"))

    monkeypatch.setattr("vlpet_cli.cards.write_text", full_disk)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert refresh_model_card(adapter, None) is None
    assert any("No space left on device" in str(w.message) for w in caught)
    assert (adapter / CARD).read_text() == before


# ---- bundles, folded models, PEFT exports, averages -------------------------------------------------------
def test_a_folded_model_and_a_bundle_get_cards(tiny_dirs, tmp_path):
    lora = adapter_dir(tmp_path / "lora", tiny_dirs["t5"])
    seeded(fold_adapter, lora, tmp_path / "folded")
    meta, text = card(tmp_path / "folded")
    assert meta["base_model"] == str(tiny_dirs["t5"]) and {"lora", "folded", "t5"} <= set(meta["tags"])
    assert "a folded model" in text and "LoRA" in text and "lora:" in text  # the settings it was trained with
    source = json.loads((lora / "vlpet_config.json").read_text())["parameters"]
    assert f"{source['trainable']:,} of {source['total']:,}" in text

    small = adapter_dir(tmp_path / "small", tiny_dirs["bart"], "vlpet-small")
    seeded(fold_adapter, small, tmp_path / "bundle", bundle=True)
    meta, text = card(tmp_path / "bundle")
    assert meta["base_model"] == str(tiny_dirs["bart"]) and {"vl-pet-small", "bundle"} <= set(meta["tags"])
    assert "kept as modules" in text and "vlpet predict ./bundle" in text

    write_eval(tmp_path / "bundle" / "eval", "vqa", "test", {"vqa": 33.0})  # what `vlpet eval BUNDLE` writes
    refresh_model_card(tmp_path / "bundle", tmp_path / "bundle" / "eval")
    assert scores(card(tmp_path / "bundle")[0]) == {("vqa", "test", "vqa"): 33.0}


def test_a_peft_export_gets_a_card_with_its_source_scores(tiny_dirs, tmp_path):
    pytest.importorskip("peft")
    lora = adapter_dir(tmp_path / "lora", tiny_dirs["bart"])
    write_eval(lora / "eval", "vqa", "test", {"vqa": 44.0})
    seeded(export_peft, lora, tmp_path / "peft")
    meta, text = card(tmp_path / "peft")
    assert meta["base_model"] == str(tiny_dirs["bart"]) and {"lora", "peft"} <= set(meta["tags"])
    assert scores(meta) == {("vqa", "test", "vqa"): 44.0} and "Scores of the vlpet adapter" in text
    assert "PeftModel.from_pretrained(base, \"./peft\")" in text and "./peft/base" in text
    assert "projector.safetensors" in text and "| PEFT adapter | LORA, 12" in text


def test_an_average_gets_a_card_naming_its_sources(tiny_dirs, tmp_path):
    a = adapter_dir(tmp_path / "a", tiny_dirs["bart"])
    b = adapter_dir(tmp_path / "b", tiny_dirs["bart"])
    average_adapters([a, b], tmp_path / "avg")
    meta, text = card(tmp_path / "avg")
    assert meta["base_model"] == str(tiny_dirs["bart"]) and "lora" in meta["tags"]
    assert "`vlpet merge average` (mean) of 2 adapters (a, b)" in text and "trainable parameters" in text


# ---- end to end: train, then `vlpet eval` ----------------------------------------------------------------------
@pytest.mark.slow
def test_vlpet_eval_writes_its_scores_into_the_card_of_a_trained_run(tmp_path):
    runs = tmp_path / "runs"
    result = CliRunner().invoke(app, ["train", "--preset", "lora", "--task", "vqa", "--data-root", "toy",
                                      "--backbone", "tiny-bart", "--runs-dir", str(runs), "--name", "toy",
                                      "train.epochs=1", "data.limit=16", "eval.every=0"])
    assert result.exit_code == 0, result.output
    meta, _ = card(runs / "toy" / "adapter")
    assert meta["base_model"] == "tiny-bart" and "lora" in meta["tags"] and "model-index" not in meta
    result = CliRunner().invoke(app, ["eval", str(runs / "toy"), "--limit", "200", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads((runs / "toy" / "eval" / "vqa-test.json").read_text())
    meta, text = card(runs / "toy" / "adapter")
    assert scores(meta)[("vqa", "test", "vqa")] == round(record["metrics"]["vqa"], 4)
    assert meta["model-index"][0]["name"] == "toy" and f"| vqa | test | {record['n']} |" in text
