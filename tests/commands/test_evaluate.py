"""`vlpet eval`: explicit decoding settings, scoring, files written, and scoring prediction files without a model."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlpet_cli.config import GenerationSpec
from vlpet_cli.errors import VlpetError
from vlpet_cli.evaluate import evaluate
from vlpet_cli.inference import best_score, score
from vlpet_cli.train import resolve_train_preset, train
from vlpet_cli.vl.decoding import generation_kwargs


class Tok:
    pad_token_id, eos_token_id, bos_token_id = 1, 2, 0


def test_generation_settings_are_explicit_per_family():
    bart = generation_kwargs(GenerationSpec(num_beams=5, max_length=40), "bart", Tok())
    assert bart["num_beams"] == 5 and bart["max_length"] == 40 and bart["early_stopping"]
    # bart-base's config defaults as transformers 4.2.1 applied them (issue 11): no forced BOS, EOS forced in beams
    assert bart["no_repeat_ngram_size"] == 3 and bart["forced_bos_token_id"] is None
    assert bart["forced_eos_token_id"] == 2
    assert generation_kwargs(GenerationSpec(num_beams=1), "bart", Tok())["forced_eos_token_id"] is None
    t5 = generation_kwargs(GenerationSpec(num_beams=1, max_length=20), "t5", Tok())
    assert t5["no_repeat_ngram_size"] == 0 and t5["forced_bos_token_id"] is None and t5["num_beams"] == 1
    assert t5["forced_eos_token_id"] is None
    assert generation_kwargs(GenerationSpec(num_beams=1, max_length=20, no_repeat_ngram_size=0), "bart",
                             Tok())["no_repeat_ngram_size"] == 0


def test_caption_score_is_pycocoevalcap_cider_times_100():
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    preds = [{"img_id": "a", "prediction": "a red circle on the left", "references": ["a red circle", "red circle"]},
             {"img_id": "b", "prediction": "two blue squares", "references": ["two blue squares .", "blue squares"]}]
    ours = score("coco", preds, ["cider"])
    tok = PTBTokenizer()
    gts = tok.tokenize({p["img_id"]: [{"caption": r} for r in p["references"]] for p in preds})
    res = tok.tokenize({p["img_id"]: [{"caption": p["prediction"]}] for p in preds})
    assert ours["cider"] == pytest.approx(100 * Cider().compute_score(gts, res)[0])


def test_task_scores_and_selection():
    nlvr = [{"identifier": "dev-1-0-0", "prediction": "true", "label": 1},
            {"identifier": "dev-1-1-0", "prediction": "true", "label": 0}]
    assert score("nlvr", nlvr) == {"acc": 50.0, "consistency": 0.0}
    gqa = [{"question_id": "01", "prediction": "pipe", "label": {"pipe": 1.0}},
           {"question_id": "02", "prediction": "Pipe", "label": {"pipe": 1.0}}]
    assert score("gqa", gqa) == {"acc": 50.0}
    result = {"vqa": {"vqa": 60.0}, "coco": {"cider": 100.0}}
    assert best_score(result, "avg") == 80.0 and best_score(result, "coco.cider") == 100.0
    with pytest.raises(VlpetError, match="best_metric"):
        best_score(result, "gqa.acc")


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    preset = resolve_train_preset("vlpet-small", ["vqa", "gqa", "nlvr", "coco"], "toy", "tiny-bart",
                                  ["data.limit=32", "train.epochs=1", "eval.every=0"])
    train(preset, root / "run")
    return root / "run"


@pytest.mark.slow
def test_eval_scores_all_four_tasks_and_writes_files(toy_run):
    results = evaluate(toy_run, split="test", limit=12, progress=False)
    assert set(results) == {"vqa", "gqa", "nlvr", "coco"}
    out = toy_run / "eval"
    for task in results:
        record = json.loads((out / f"{task}-test.json").read_text())
        assert record["n"] == 12 and record["metrics"] and record["versions"]["vlpet"]
        assert len(json.loads((out / f"{task}-test.predictions.json").read_text())) == 12
    assert "num_beams" in json.loads((out / "coco-test.json").read_text())["settings"]
    assert set(json.loads((out / "vqa-test.submission.json").read_text())[0]) == {"question_id", "answer"}
    assert set(json.loads((out / "gqa-test.submission.json").read_text())[0]) == {"questionId", "prediction"}
    assert set(json.loads((out / "coco-test.submission.json").read_text())[0]) == {"image_id", "caption"}
    rows = list(csv.reader((out / "nlvr-test.submission.csv").read_text().splitlines()))
    assert len(rows) == 12 and all(r[1] in ("True", "False") for r in rows)
    assert {"bleu4", "meteor", "rougel", "cider"} <= set(results["coco"]["metrics"])


def cli(*args):
    return subprocess.run([sys.executable, "-m", "vlpet_cli", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"})


@pytest.mark.slow
def test_eval_cli_on_a_run_prints_json(toy_run):
    out = cli("eval", str(toy_run), "--task", "nlvr", "--limit", "8", "--json")
    assert out.returncode == 0, out.stderr
    assert set(json.loads(out.stdout.strip().splitlines()[-1])["nlvr"]) == {"acc", "consistency"}


@pytest.mark.cli  # `python -m vlpet_cli` in subprocesses
def test_scoring_a_predictions_file(tmp_path):
    ann = {"annotations": [{"question_id": 1, "answers": [{"answer": "red"}] * 10, "answer_type": "other",
                            "question_type": "what color"},
                           {"question_id": 2, "answers": [{"answer": "2"}] * 10, "answer_type": "number",
                            "question_type": "how many"}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    (tmp_path / "pred.json").write_text(json.dumps([{"question_id": 1, "answer": "Red"},
                                                    {"question_id": 2, "answer": "two"}]))
    out = cli("eval", "--task", "vqa", "--predictions", str(tmp_path / "pred.json"), "--annotations",
              str(tmp_path / "ann.json"), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["vqa"] == 100.0
    (tmp_path / "extra.json").write_text(json.dumps([{"question_id": 7, "answer": "red"}]))
    bad = cli("eval", "--task", "vqa", "--predictions", str(tmp_path / "extra.json"), "--annotations",
              str(tmp_path / "ann.json"))
    assert bad.returncode == 2 and "7" in bad.stderr and "Traceback" not in bad.stderr
    (tmp_path / "wrong.json").write_text(json.dumps({"questions": []}))
    wrong = cli("eval", "--task", "vqa", "--predictions", str(tmp_path / "pred.json"), "--annotations",
                str(tmp_path / "wrong.json"))
    assert wrong.returncode == 2 and "annotations" in wrong.stderr


def path_without_java() -> str:
    """PATH without the directories that hold a `java` executable (as on a machine without Java)."""
    dirs = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(d for d in dirs if d and not (Path(d) / "java").exists())


@pytest.mark.slow
def test_eval_cli_on_a_run_without_java_drops_meteor_and_scores_the_rest(toy_run, tmp_path):
    env = {**os.environ, "COLUMNS": "200", "PATH": path_without_java()}
    out = subprocess.run([sys.executable, "-m", "vlpet_cli", "eval", str(toy_run), "--task", "coco", "--limit", "6",
                          "--out", str(tmp_path), "--json"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    metrics = json.loads(out.stdout.strip().splitlines()[-1])["coco"]
    assert "meteor" not in metrics and {"cider", "bleu4", "rougel"} <= set(metrics)
    assert out.stderr.count("METEOR is left out") == 1
    assert "METEOR needs Java" not in out.stderr


def test_model_scoring_without_java_drops_meteor_from_defaults_only(monkeypatch):
    from vlpet_cli.metrics import caption

    monkeypatch.setattr(caption, "java_available", lambda: False)
    preds = [{"img_id": "a", "prediction": "a red circle", "references": ["a red circle", "red circle"]},
             {"img_id": "b", "prediction": "two squares", "references": ["two blue squares", "blue squares"]}]
    with pytest.warns(UserWarning, match="METEOR is left out"):
        result = score("coco", preds)
    assert set(result) == {"bleu1", "bleu2", "bleu3", "bleu4", "rougel", "cider"}
    with pytest.raises(VlpetError, match="METEOR needs Java"):
        score("coco", preds, ["meteor"])


@pytest.mark.cli  # `python -m vlpet_cli` in subprocesses
def test_scoring_captions_needs_a_split_only_for_karpathys_file(tmp_path):
    refs = {391895: ["a man riding a wave", "a surfer on a wave"], 184613: ["a dog on grass", "a brown dog"]}
    (tmp_path / "captions_val2014.json").write_text(json.dumps(
        {"images": [], "annotations": [{"image_id": k, "id": i * 10 + j, "caption": c}
                                       for i, (k, cs) in enumerate(refs.items()) for j, c in enumerate(cs)]}))
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": [
        {"filename": f"COCO_val2014_{k:012d}.jpg", "cocoid": k, "split": "test",
         "sentences": [{"raw": c} for c in cs]} for k, cs in refs.items()]}))
    (tmp_path / "p.json").write_text(json.dumps([{"image_id": 391895, "caption": "a man riding a wave"},
                                                 {"image_id": 184613, "caption": "a dog"}]))
    args = ["eval", "--task", "coco", "--predictions", str(tmp_path / "p.json"), "--metric", "cider", "--json",
            "--annotations"]
    pooled = cli(*args, str(tmp_path / "captions_val2014.json"))
    assert pooled.returncode == 0, pooled.stderr
    assert json.loads(pooled.stdout.strip().splitlines()[-1])["cider"] > 0
    karpathy = cli(*args, str(tmp_path / "dataset_coco.json"), "--split", "test")
    assert karpathy.returncode == 0, karpathy.stderr
    assert json.loads(karpathy.stdout.strip().splitlines()[-1]) == json.loads(pooled.stdout.strip().splitlines()[-1])
    unsplit = cli(*args, str(tmp_path / "dataset_coco.json"))
    assert unsplit.returncode == 2 and "choose the split" in unsplit.stderr and "--split test" in unsplit.stderr
    split_pool = cli(*args, str(tmp_path / "captions_val2014.json"), "--split", "val")
    assert split_pool.returncode == 2 and "has no splits" in split_pool.stderr
    (tmp_path / "q.json").write_text(json.dumps([{"question_id": 1, "answer": "red"}]))
    vqa = cli("eval", "--task", "vqa", "--predictions", str(tmp_path / "q.json"), "--annotations",
              str(tmp_path / "q.json"), "--split", "val")
    assert vqa.returncode == 2 and "split applies only to coco" in vqa.stderr and "Traceback" not in vqa.stderr
