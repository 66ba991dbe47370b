"""`vlpet predict` (issue 16, item 3): inputs checked before loading, the vision model recorded by `vlpet train`, and
on the toy world the answers `vlpet eval` gives for the same records."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from vlpet_cli.cli import app
from vlpet_cli.errors import VlpetError
from vlpet_cli.predict import PredictInput, check_inputs, gather_inputs, vision_settings

RECORDED = {"COCO": {"model": "tiny-clip", "layer": -1, "image_size": 32, "grid": [7, 7], "dtype": "float16"}}


def _image(path: Path) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), (200, 20, 20)).save(path)
    return path


def test_inputs_are_checked_per_task(tmp_path):
    a, b = _image(tmp_path / "a.png"), _image(tmp_path / "b.png")
    check_inputs("vqa", [PredictInput([a], "What color is it?")])
    check_inputs("nlvr", [PredictInput([a, b], "Both images are red.")])
    check_inputs("coco", [PredictInput([a])])
    with pytest.raises(VlpetError, match="takes 2 image"):
        check_inputs("nlvr", [PredictInput([a], "Both images are red.")])
    with pytest.raises(VlpetError, match="needs a question"):
        check_inputs("vqa", [PredictInput([a])])
    with pytest.raises(VlpetError, match="takes no question"):
        check_inputs("coco", [PredictInput([a], "what?")])
    with pytest.raises(VlpetError, match=f"image {tmp_path / 'c.png'} not found"):
        check_inputs("coco", [PredictInput([tmp_path / "c.png"])])


def test_folder_and_jsonl_inputs(tmp_path):
    folder = tmp_path / "imgs"
    _image(folder / "x.png")
    _image(folder / "sub" / "y.jpg")
    (folder / "notes.txt").write_text("not an image")
    got = gather_inputs("vqa", [], "What shape?", folder)
    assert [p.images[0].name for p in got] == ["y.jpg", "x.png"]  # sorted by path: imgs/sub/... first
    assert all(p.text == "What shape?" for p in got)
    lines = tmp_path / "in.jsonl"
    lines.write_text('{"images": ["imgs/x.png", "imgs/sub/y.jpg"], "statement": "Both are red."}\n\n'
                     '{"image": "imgs/x.png", "statement": "One is red."}\n')
    got = gather_inputs("nlvr", [], None, lines)
    assert got[0].images == [tmp_path / "imgs" / "x.png", tmp_path / "imgs" / "sub" / "y.jpg"]
    assert got[1].text == "One is red." and got[1].where == f"{lines}: line 3"
    lines.write_text("{not json\n")
    with pytest.raises(VlpetError, match="line 1: not valid JSON"):
        gather_inputs("nlvr", [], None, lines)
    with pytest.raises(VlpetError, match="not both"):
        gather_inputs("coco", [folder / "x.png"], None, folder)


def test_vision_model_must_be_the_recorded_one(tmp_path):
    chosen = vision_settings(RECORDED, "COCO", None, None, False, tmp_path)
    assert (chosen.model, chosen.layer, chosen.dtype) == ("tiny-clip", -1, "float16")
    assert vision_settings(RECORDED, "COCO", "/models/tiny-clip", None, False, tmp_path).model == "/models/tiny-clip"
    with pytest.raises(VlpetError, match="vision model tiny-clip .*not /models/RN101.safetensors"):
        vision_settings(RECORDED, "COCO", "/models/RN101.safetensors", None, False, tmp_path)
    with pytest.raises(VlpetError, match="layer -1 of tiny-clip, not layer 3"):
        vision_settings(RECORDED, "COCO", None, 3, False, tmp_path)
    with pytest.raises(VlpetError, match="records no vision model.*--vision-model"):
        vision_settings({}, "COCO", None, None, False, tmp_path)
    assert vision_settings({}, "COCO", "tiny-clip", 5, False, tmp_path).layer == 5


# ---- on the toy world -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    from vlpet_cli.train import resolve_train_preset, train

    root = tmp_path_factory.mktemp("runs")
    preset = resolve_train_preset("vlpet-small", ["vqa", "nlvr", "coco"], "toy", "tiny-bart",
                                  ["data.limit=32", "train.epochs=1", "eval.every=0"])
    train(preset, root / "run")
    return root / "run"


def _toy_image(source: str, img_id: str) -> Path:
    from vlpet_cli.toy.images import toy_root

    return toy_root() / source / "images" / f"{img_id}.png"


@pytest.mark.slow
def test_predict_answers_what_eval_predicts(toy_run):
    from vlpet_cli.evaluate import evaluate
    from vlpet_cli.predict import predict

    adapter = json.loads((toy_run / "adapter" / "vlpet_config.json").read_text())
    assert adapter["features"]["COCO"]["model"] == "tiny-clip" and adapter["features"]["nlvr"]["layer"] == -1
    out = toy_run / "eval-test"
    evaluate(toy_run, tasks=["vqa", "nlvr", "coco"], split="test", limit=6, progress=False, out_dir=out)
    results = {t: json.loads((out / f"{t}-test.predictions.json").read_text()) for t in ("vqa", "nlvr", "coco")}
    vqa = results["vqa"]
    got = predict(toy_run, "vqa", [PredictInput([_toy_image("COCO", r["img_id"])], r["sent"]) for r in vqa],
                  batch_size=4, progress=False)
    assert [g["answer"] for g in got] == [r["prediction"] for r in vqa]
    assert all(g["score"] <= 0 and g["score_kind"] == "mean token log-probability" for g in got)
    nlvr = results["nlvr"]
    got = predict(toy_run, "nlvr", [PredictInput([_toy_image("nlvr", r["img0"]), _toy_image("nlvr", r["img1"])],
                                                 r["sent"]) for r in nlvr], progress=False)
    assert [g["answer"] for g in got] == [r["prediction"] for r in nlvr]
    assert all(0.5 <= g["score"] <= 1 and g["score_kind"] == "choice probability" for g in got)
    coco = results["coco"]
    # the features made on the fly are the stored ones the eval read (same model, preprocessing, fp16 rounding)
    from vlpet_cli.features.extract.images import embed_files, load_model
    from vlpet_cli.features.kinds import IMAGE
    from vlpet_cli.toy.images import toy_root

    paths = [_toy_image("COCO", r["img_id"]) for r in coco]
    made = embed_files(load_model("tiny-clip", "cpu"), paths, 4)
    store = IMAGE.open(IMAGE.locate(toy_root(), "COCO"))
    for r, p in zip(coco, paths):
        assert np.abs(made[str(p)] - store.get(r["img_id"]).astype(np.float32)).max() <= 2e-3
    got = predict(toy_run, "coco", [PredictInput([_toy_image("COCO", r["img_id"])]) for r in coco], progress=False)
    assert [g["answer"] for g in got] == [r["prediction"] for r in coco]


@pytest.mark.slow
def test_predict_cli_json_and_runs_without_a_record(toy_run, tmp_path):
    from vlpet_cli.toy.images import toy_root

    record = json.loads((toy_root() / "vqa" / "karpathy_test.json").read_text())[0]
    image = _toy_image("COCO", record["img_id"])
    runner = CliRunner()
    out = runner.invoke(app, ["predict", str(toy_run), "--task", "vqa", "--image", str(image), "--question",
                              record["sent"], "--json"])
    assert out.exit_code == 0, out.output
    line = json.loads(out.output.strip().splitlines()[-1])
    assert line["task"] == "vqa" and line["answer"] and line["images"] == [str(image)]
    bare = tmp_path / "adapter"
    shutil.copytree(toy_run / "adapter", bare)
    config = json.loads((bare / "vlpet_config.json").read_text())
    del config["features"]
    (bare / "vlpet_config.json").write_text(json.dumps(config))
    args = ["predict", str(bare), "--task", "vqa", "--image", str(image), "--question", record["sent"], "--json"]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and "--vision-model" in refused.output
    again = runner.invoke(app, [*args, "--vision-model", "tiny-clip"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.output.strip().splitlines()[-1])["answer"] == line["answer"]
    wrong = runner.invoke(app, ["predict", str(toy_run), "--task", "gqa", "--image", str(image), "--question", "?"])
    assert wrong.exit_code == 2 and "not on gqa" in wrong.output
