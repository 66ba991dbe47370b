"""`vlpet predict` on videos (issue 16, item 3): inputs checked before loading, records built as the task's reader
builds them, features made with the projected CLIP the run recorded, and on the toy world the answers `vlpet eval`
gives for the same records."""

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from vlpet_cli.cli import app
from vlpet_cli.errors import VlpetError
from vlpet_cli.predict import PredictInput, check_inputs, gather_inputs, parse_ts, task_records

CHOICES5 = ["left", "down", "up", "right", "nowhere"]


def _toy():
    from vlpet_cli.toy.images import toy_root

    return toy_root()


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _video(vid: str, source: str) -> Path:
    return _toy() / "video" / "videos" / source / f"{vid}.mp4"


def test_video_inputs_are_checked_per_task(tmp_path):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"")
    img = tmp_path / "a.png"
    img.write_bytes(b"")
    check_inputs("tvqa", [PredictInput([], "Where does it go?", video=clip, choices=CHOICES5, ts="1-2")])
    check_inputs("how2qa", [PredictInput([], "Where does it go?", video=clip, choices=CHOICES5[:4])])
    check_inputs("tvc", [PredictInput([], video=clip, ts="1.5,3")])
    check_inputs("yc2c", [PredictInput([], video=clip, subtitles="stir the soup")])
    with pytest.raises(VlpetError, match="tvqa takes 5 choices, got 4"):
        check_inputs("tvqa", [PredictInput([], "Where?", video=clip, choices=CHOICES5[:4])])
    with pytest.raises(VlpetError, match="how2qa takes 4 choices, got 5"):
        check_inputs("how2qa", [PredictInput([], "Where?", video=clip, choices=CHOICES5)])
    with pytest.raises(VlpetError, match="needs a question"):
        check_inputs("tvqa", [PredictInput([], video=clip, choices=CHOICES5)])
    with pytest.raises(VlpetError, match="takes a video .*not images"):
        check_inputs("tvc", [PredictInput([img])])
    with pytest.raises(VlpetError, match="needs a video"):
        check_inputs("tvc", [PredictInput([])])
    with pytest.raises(VlpetError, match="video .*nope.mp4 not found"):
        check_inputs("tvc", [PredictInput([], video=tmp_path / "nope.mp4")])
    with pytest.raises(VlpetError, match="yc2c takes no moment"):
        check_inputs("yc2c", [PredictInput([], video=clip, ts="1-2")])
    with pytest.raises(VlpetError, match="takes no question"):
        check_inputs("tvc", [PredictInput([], "what?", video=clip)])
    with pytest.raises(VlpetError, match="is not 'START-END'"):
        check_inputs("tvc", [PredictInput([], video=clip, ts="soon")])
    with pytest.raises(VlpetError, match="for the video tasks"):
        check_inputs("vqa", [PredictInput([img], "What?", video=clip)])
    with pytest.raises(VlpetError, match="not both"):
        gather_inputs("tvc", [img], None, None, video=clip)
    assert parse_ts("20.1-25.3") == parse_ts("20.1,25.3") == parse_ts("[20.1, 25.3]") == (20.1, 25.3)
    lines = tmp_path / "in.jsonl"
    lines.write_text('{"video": "clip.mp4", "question": "Where?", "choices": ["a", "b", "c", "d"], '
                     '"subtitles": "hi", "ts": [1, 2]}\n')
    (got,) = gather_inputs("how2qa", [], None, lines)
    assert (got.video, got.choices, got.subtitles, got.ts) == (clip, ["a", "b", "c", "d"], "hi", "1,2")


def test_cli_refuses_mixed_inputs_before_loading(tmp_path):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"")
    img = tmp_path / "a.png"
    img.write_bytes(b"")
    runner = CliRunner()
    base = ["predict", str(tmp_path / "no-run"), "--task"]
    cases = [(["tvqa", "--video", str(clip), "--image", str(img)], "not both"),
             (["tvqa", "--image", str(img), "--question", "?", *sum((["--choices", c] for c in CHOICES5), [])],
              "takes a video"),
             (["tvqa", "--video", str(clip), "--question", "?", "--choices", "a", "--choices", "b"],
              "takes 5 choices, got 2"),
             (["coco", "--video", str(clip)], "for the video tasks")]
    for args, message in cases:
        out = runner.invoke(app, [*base, *args])
        assert out.exit_code == 2 and message in out.output, (args, out.output)


@pytest.mark.slow
def test_records_are_the_readers(tmp_path):
    """The record built from command-line inputs is the one the task reads from an annotation line."""
    from vlpet_cli.tasks import get_task

    root = _toy()
    for task, folder, split, source in (("tvqa", "tvqa", "test_public", "tv"),
                                        ("how2qa", "how2qa", "test_public_release", "how2"),
                                        ("tvc", "tvc", "test_release", "tv"), ("yc2c", "yc2c", "test_release", "yc2")):
        spec = get_task(task)
        read = spec.load(root, "test", for_eval=True)[0]
        raw = _lines(root / "video" / "ann" / folder / f"{task}_{split}.jsonl")[0]
        subs = read.extra["subs"]
        choices = [raw[f"a{i}"] for i in range(spec.inputs.choices)]
        ts = raw.get("ts")
        ts = ",".join(map(str, ts)) if isinstance(ts, list) else ts
        (made,) = task_records(spec, [PredictInput([], raw.get("q", ""), video=_video(raw["vid_name"], source),
                                                   choices=choices, subtitles=subs, ts=ts)])
        assert spec.source_text(made) == spec.source_text(read), task
        if task in ("tvqa", "tvc"):  # the default moment is the whole video (the toy's moments are)
            (default,) = task_records(spec, [PredictInput([], raw.get("q", ""),
                                                          video=_video(raw["vid_name"], source),
                                                          choices=choices, subtitles=subs)])
            assert spec.source_text(default) == spec.source_text(read), task


# ---- on the toy world -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def video_run(tmp_path_factory):
    from vlpet_cli.train import resolve_train_preset, train

    root = tmp_path_factory.mktemp("vruns")
    preset = resolve_train_preset("vlpet-small", ["tvqa", "tvc"], "toy", "tiny-bart",
                                  ["data.limit=16", "train.epochs=1", "eval.every=0", "data.video.frames=8"])
    train(preset, root / "run")
    return root / "run"


@pytest.mark.slow
def test_predict_video_answers_what_eval_predicts(video_run):
    from vlpet_cli.evaluate import evaluate
    from vlpet_cli.predict import predict

    adapter = json.loads((video_run / "adapter" / "vlpet_config.json").read_text())
    assert adapter["features"]["tv"]["model"] == "tiny-clip-proj"
    out = video_run / "eval-test"
    evaluate(video_run, tasks=["tvqa", "tvc"], split="test", limit=4, progress=False, out_dir=out)
    root = _toy()
    subs = {r["vid_name"]: " ".join(x["text"].strip() for x in r["sub"])
            for r in _lines(root / "video" / "ann" / "tv_subtitles.jsonl")}
    tvqa = json.loads((out / "tvqa-test.predictions.json").read_text())
    assert len(tvqa) == 4
    raw = {r["qid"]: r for r in _lines(root / "video" / "ann" / "tvqa" / "tvqa_test_public.jsonl")}
    items = [PredictInput([], raw[p["question_id"]]["q"], video=_video(p["vid_name"], "tv"),
                          choices=[raw[p["question_id"]][f"a{i}"] for i in range(5)], subtitles=subs[p["vid_name"]],
                          ts=raw[p["question_id"]]["ts"]) for p in tvqa]
    got = predict(video_run, "tvqa", items, batch_size=3, progress=False)
    assert [g["answer"] for g in got] == [p["prediction"] for p in tvqa]
    assert all(g["score"] <= 0 and g["video"].endswith(".mp4") and "choice" in g for g in got)
    tvc = json.loads((out / "tvc-test.predictions.json").read_text())
    assert len(tvc) == 4 and all(p["prediction"] for p in tvc)
    clips = {r["clip_id"]: r for r in _lines(root / "video" / "ann" / "tvc" / "tvc_test_release.jsonl")}
    items = [PredictInput([], video=_video(p["vid_name"], "tv"), subtitles=subs[p["vid_name"]],
                          ts=",".join(map(str, clips[p["clip_id"]]["ts"]))) for p in tvc]
    got = predict(video_run, "tvc", items, progress=False)
    assert [g["answer"] for g in got] == [p["prediction"] for p in tvc]
    # the features made on the fly are the stored ones the eval read
    from vlpet_cli.features.extract.videos import embed_files, load_model
    from vlpet_cli.features.kinds import VIDEO

    vid = tvc[0]["vid_name"]
    made = embed_files(load_model("tiny-clip-proj", "cpu"), [_video(vid, "tv")])
    stored = VIDEO.open(VIDEO.locate(root, "tv")).get(vid)
    assert np.abs(next(iter(made.values())) - np.asarray(stored, dtype=np.float32)).max() <= 2e-3
    # the command line, --json, with the defaults (whole video, no subtitles)
    first = items[0]
    res = CliRunner().invoke(app, ["predict", str(video_run), "--task", "tvc", "--video", str(first.video),
                                   "--json"])
    assert res.exit_code == 0, res.output
    line = json.loads(res.output.strip().splitlines()[-1])
    assert line["task"] == "tvc" and line["answer"] and line["video"] == str(first.video)
