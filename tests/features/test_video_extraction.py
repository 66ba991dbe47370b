"""`vlpet extract-features --videos`: frames at 1.5 s ticks, projected CLIP embeddings, resume, failures, selection."""

from __future__ import annotations

import json
import random
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from vlpet_cli.errors import DataError, VlpetError
from vlpet_cli.extract import extract_videos, videos_from
from vlpet_cli.features.extract.clip import TINY_CLIP, TINY_CLIP_PROJ
from vlpet_cli.features.extract.videos import decode_frames, square_crop
from vlpet_cli.features.extract.videos import extract as extract_video_features
from vlpet_cli.features.extract.videos import load_model as load_projected_model
from vlpet_cli.features.kinds import VIDEO
from vlpet_cli.tasks import annotation_images
from vlpet_cli.toy import videos as toy_video


def write_counting_video(path: Path, n_frames: int, fps: int, size: tuple[int, int] = (64, 48)) -> None:
    """A video whose frame i is a flat grey of value 8 * i + 4 (so a decoded frame tells its index)."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=Fraction(fps))
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "2", "g": "1"}
        for i in range(n_frames):
            rgb = np.full((size[1], size[0], 3), 8 * i + 4, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def frame_index(rgb: np.ndarray) -> int:
    return round((float(rgb.mean()) - 4) / 8)


@pytest.fixture(scope="module")
def clips_dir(tmp_path_factory) -> Path:
    """Five toy clips written as .mp4 files."""
    folder = tmp_path_factory.mktemp("videos")
    rng = random.Random(3)
    for i in range(5):
        clip = toy_video._clip(rng, f"clip{i}", "yc2", "train", "")
        frames = [toy_video.render_frame(clip, k / toy_video.FPS)
                  for k in range(int(toy_video.DURATION_S * toy_video.FPS))]
        toy_video.write_video(folder / f"clip{i}.mp4", frames)
    return folder


@pytest.mark.parametrize(("fps", "n_frames", "expected"), [
    (2, 20, [0, 3, 6, 9, 12, 15, 18]),  # 10 s: ticks 0, 1.5, ..., 9
    (5, 30, [0, 7, 15, 22]),  # 6 s: the frame on screen at 1.5 s started at 1.4 s
])
def test_frames_are_picked_at_each_1_5_s_tick(tmp_path, fps, n_frames, expected):
    path = tmp_path / "count.mp4"
    write_counting_video(path, n_frames, fps)
    frames = decode_frames(path)
    assert [frame_index(f) for f in frames] == expected
    assert frames[0].shape == (48, 64, 3)


def test_short_side_scaled_and_centre_cropped():
    rgb = np.zeros((100, 200, 3), dtype=np.uint8)
    rgb[:, 50:150] = 255  # the centre square of a 2:1 frame: white, the sides black
    out = square_crop(rgb, 50)
    assert out.shape == (50, 50, 3) and out[:, 2:-2].min() == 255 and out[:, [0, -1]].min() > 200
    assert square_crop(rgb.transpose(1, 0, 2), 50).shape == (50, 50, 3)


def test_one_row_per_frame_512_d_float16(clips_dir, tmp_path):
    summary = extract_video_features(videos_from(clips_dir), "tiny-clip-proj", tmp_path / "feats", progress=False)
    assert summary.written == 5 and not summary.failed and summary.units == 5 * 6
    store = VIDEO.open(tmp_path / "feats")
    assert store.layout == "npz" and sorted(store.ids()) == [f"clip{i}" for i in range(5)]
    feats = store.get("clip0")
    assert feats.shape == (6, 512) and feats.dtype == np.float16  # 9 s -> ticks 0, 1.5, ..., 7.5
    assert store.attrs["model"] == "tiny-clip-proj" and store.attrs["frame_step_s"] == 1.5
    with np.load(tmp_path / "feats" / "clip0.npz") as data:  # VALUE's own file format
        assert list(data) == ["features"]
    # the same embeddings as the model gives for the decoded frames; the packed layout holds the same rows
    import torch

    from vlpet_cli.features.extract.videos import image_embeds, preprocess_video

    vm = load_projected_model(TINY_CLIP_PROJ, "cpu")
    direct = image_embeds(vm, torch.from_numpy(preprocess_video(clips_dir / "clip0.mp4", vm.image_size, vm.mean,
                                                                vm.std))).numpy().astype(np.float16)
    assert np.array_equal(direct, feats)
    extract_video_features(videos_from(clips_dir), "tiny-clip-proj", tmp_path / "feats.h5", layout="packed",
                           progress=False, workers=0)
    packed = VIDEO.open(tmp_path / "feats.h5")
    assert packed.layout == "packed" and np.array_equal(packed.get("clip3"), store.get("clip3"))


def test_frames_that_differ_give_different_embeddings(clips_dir, tmp_path):
    extract_video_features(videos_from(clips_dir), TINY_CLIP_PROJ, tmp_path / "f", progress=False)
    feats = VIDEO.open(tmp_path / "f").get("clip1").astype(np.float32)
    assert np.abs(feats[0] - feats[-1]).max() > 0.05  # the shape moved or changed between first and last tick


def test_resumes_after_a_kill(clips_dir, tmp_path, monkeypatch):
    from vlpet_cli.features import videos as video_features

    full = tmp_path / "full"
    extract_video_features(videos_from(clips_dir), "tiny-clip-proj", full, progress=False)
    real_add = video_features.NpzVideoWriter.add
    calls = []

    def dying_add(self, vid, feats):
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while the third video is being written
        calls.append(vid)
        real_add(self, vid, feats)

    monkeypatch.setattr(video_features.NpzVideoWriter, "add", dying_add)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        extract_video_features(videos_from(clips_dir), "tiny-clip-proj", out, progress=False)
    monkeypatch.setattr(video_features.NpzVideoWriter, "add", real_add)
    assert len(VIDEO.open(out)) == 2
    summary = extract_video_features(videos_from(clips_dir), "tiny-clip-proj", out, progress=False)
    assert (summary.skipped_existing, summary.written) == (2, 3)
    a, b = VIDEO.open(full), VIDEO.open(out)
    for vid in a.ids():
        assert np.array_equal(a.get(vid), b.get(vid)), vid


def test_corrupt_and_empty_videos_are_listed_and_skipped(clips_dir, tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    for name in ("clip0.mp4", "clip1.mp4"):
        (folder / name).write_bytes((clips_dir / name).read_bytes())
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    (folder / "empty.mp4").write_bytes(b"")
    out = tmp_path / "feats"
    summary = extract_video_features(videos_from(folder), "tiny-clip-proj", out, progress=False)
    assert summary.written == 2 and sorted(f[0] for f in summary.failed) == ["broken", "empty"]
    assert summary.report == out / "errors.txt" and "failed videos are listed" in summary.describe()
    rows = [line.split("\t") for line in (out / "errors.txt").read_text().splitlines()[1:]]
    assert sorted(r[0] for r in rows) == ["broken", "empty"] and all(r[2] for r in rows)
    assert sorted(VIDEO.open(out).ids()) == ["clip0", "clip1"]
    # once the files are fixed a re-run extracts them and removes the report
    for name in ("broken", "empty"):
        (folder / f"{name}.mp4").write_bytes((clips_dir / "clip2.mp4").read_bytes())
    again = extract_video_features(videos_from(folder), "tiny-clip-proj", out, progress=False)
    assert (again.written, again.skipped_existing, again.report) == (2, 2, None)
    assert not (out / "errors.txt").exists()


def test_annotations_select_the_videos_a_value_file_names(clips_dir, tmp_path):
    ann = tmp_path / "tvqa_val.jsonl"
    lines = [{"vid_name": "clip3", "qid": 1}, {"vid_name": "clip1", "qid": 2}, {"vid_name": "clip3", "qid": 3},
             {"vid_name": "gone", "qid": 4}]
    ann.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert list(annotation_images(ann)) == ["clip3", "clip1", "gone"]
    selected = videos_from(clips_dir, ann)
    assert list(selected) == ["clip3", "clip1", "gone"] and selected["clip1"] == clips_dir / "clip1.mp4"
    summary = extract_videos(clips_dir, "tiny-clip-proj", tmp_path / "f", ann, progress=False)
    assert summary.written == 2 and [f[0] for f in summary.failed] == ["gone"]
    assert summary.failed[0][2] == "file not found"
    assert sorted(VIDEO.open(tmp_path / "f").ids()) == ["clip1", "clip3"]


def test_refusals(clips_dir, tmp_path):
    with pytest.raises(VlpetError, match="no visual projection"):
        load_projected_model(TINY_CLIP)  # the image tiny CLIP: hidden states only
    with pytest.raises(VlpetError, match="--layout"):
        extract_video_features(videos_from(clips_dir), "tiny-clip-proj", tmp_path / "x", layout="per-image")
    with pytest.raises(DataError, match="video directory not found"):
        videos_from(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no video files"):
        videos_from(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"qid": 1}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 1: names no image or video \(no .*'vid_name'"):
        videos_from(clips_dir, bad)
    bad.write_text('{"vid_name": "a"}\nnot json\n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 2: not valid JSON"):
        videos_from(clips_dir, bad)
    bad.write_text('{"vid_name": "elsewhere"}\n')
    with pytest.raises(DataError, match="none of its 1 videos were found"):
        videos_from(clips_dir, bad)
    extract_video_features(videos_from(clips_dir), "tiny-clip-proj", tmp_path / "dtype", progress=False,
                           limit=1)
    with pytest.raises(DataError, match="different settings"):
        extract_video_features(videos_from(clips_dir), "tiny-clip-proj", tmp_path / "dtype", dtype="float32",
                               progress=False)


def test_cli_extracts_videos_and_refuses_mixed_inputs(clips_dir, tmp_path):
    from typer.testing import CliRunner

    from vlpet_cli.cli import app

    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(app, ["extract-features", "--videos", str(clips_dir), "--model", "tiny-clip-proj",
                                 "--out", str(out), "--limit", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "2 videos written (12 frames)" in " ".join(result.output.split()) and len(VIDEO.open(out)) == 2
    result = runner.invoke(app, ["extract-features", "--videos", str(clips_dir), "--images", str(clips_dir),
                                 "--model", "tiny-clip-proj", "--out", str(out)])
    assert result.exit_code == 2 and "exactly one of --images DIR" in result.stderr
    result = runner.invoke(app, ["extract-features", "--videos", str(clips_dir), "--model", "tiny-clip",
                                 "--out", str(tmp_path / "no")])
    assert result.exit_code == 2 and "no visual projection" in result.stderr
    assert not (tmp_path / "no").exists()  # refused before anything is written


def test_shipped_projected_asset_is_what_the_script_builds(tmp_path):
    import importlib.util

    from safetensors.numpy import load_file

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("make_tiny_clip", root / "scripts" / "make_tiny_clip.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    built = module.build_tiny_clip(tmp_path / "m", projected=True)
    a, b = load_file(TINY_CLIP_PROJ / "model.safetensors"), load_file(built / "model.safetensors")
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert a["visual_projection.weight"].shape == (512, 64)
    shipped, fresh = (json.loads((d / "config.json").read_text()) for d in (TINY_CLIP_PROJ, built))
    shipped.pop("transformers_version"), fresh.pop("transformers_version")
    assert shipped == fresh and shipped["projection_dim"] == 512
    assert sum(p.stat().st_size for p in TINY_CLIP_PROJ.iterdir()) < 1_000_000
