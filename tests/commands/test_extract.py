"""`vlpet extract-features` with a tiny CLIP vision model built from config: layouts, resume, failures, inputs."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vlpet_cli.errors import DataError, VlpetError
from vlpet_cli.extract import images_from
from vlpet_cli.features.extract.clip import CLIP_MEAN, CLIP_STD, TINY_CLIP
from vlpet_cli.features.extract.images import extract as extract_features
from vlpet_cli.features.extract.images import load_image
from vlpet_cli.features.extract.images import load_model as load_vision_model
from vlpet_cli.features.extract.loop import report_path
from vlpet_cli.features.kinds import IMAGE
from vlpet_cli.features.tools import inspect_features
from vlpet_cli.tasks import annotation_images

ROOT = Path(__file__).resolve().parents[2]


def _make_tiny_clip_module():
    spec = importlib.util.spec_from_file_location("make_tiny_clip", ROOT / "scripts" / "make_tiny_clip.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny CLIP vision model built from config (seeded) and saved to a local directory."""
    return _make_tiny_clip_module().build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


def make_images(folder: Path, n: int, seed: int = 0) -> Path:
    """Small PNG/JPEG images of varied sizes and modes (RGB, grayscale, RGBA)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = 30 + 3 * i, 50 + 2 * (i % 5)
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        if i % 4 == 1:
            img = img.convert("L")
        elif i % 4 == 2:
            img = img.convert("RGBA")
        img.save(folder / f"img{i:03d}{'.jpg' if i % 4 == 3 else '.png'}")
    return folder


def values(path: Path) -> dict[str, np.ndarray]:
    store = IMAGE.open(path)
    return {i: store.get(i) for i in store.ids()}


def test_shipped_asset_has_the_script_architecture(model_dir):
    from safetensors.numpy import load_file

    a, b = load_file(TINY_CLIP / "model.safetensors"), load_file(model_dir / "model.safetensors")
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert sum(p.stat().st_size for p in TINY_CLIP.iterdir()) < 1_000_000
    shipped, built = (json.loads((d / "config.json").read_text()) for d in (TINY_CLIP, model_dir))
    shipped.pop("transformers_version"), built.pop("transformers_version")
    assert shipped == built


def test_shipped_tiny_clip_sees_the_toy_world(tmp_path):
    """Trained by the script, its features carry what a scene shows: a ridge read-out of the background
    colour from mean-pooled features, fitted on 160 new scenes, is right on 80 more (the random model: ~0.7)."""
    import random

    from vlpet_cli.toy import images as toy

    rng = random.Random("test-tiny-clip")
    scenes = [toy.random_scene(rng, f"s{i}", "COCO") for i in range(240)]
    for s in scenes:
        toy.render_scene(s).save(tmp_path / f"{s.img_id}.png")
    extract_features({s.img_id: tmp_path / f"{s.img_id}.png" for s in scenes}, TINY_CLIP, tmp_path / "f.h5",
                     progress=False)
    store = IMAGE.open(tmp_path / "f.h5")
    x = np.stack([store.get(s.img_id).astype(np.float64).mean(0) for s in scenes])
    x = np.hstack([x, np.ones((len(x), 1))])
    backgrounds = list(toy.BACKGROUNDS)
    y = np.eye(len(backgrounds))[[backgrounds.index(s.background) for s in scenes]]
    w = np.linalg.solve(x[:160].T @ x[:160] + np.eye(x.shape[1]), x[:160].T @ y[:160])
    assert np.mean((x[160:] @ w).argmax(1) == y[160:].argmax(1)) >= 0.95


def test_both_layouts_identical_and_attributes(model_dir, tmp_path):
    images = images_from(make_images(tmp_path / "imgs", 9))
    assert list(images) == [f"img{i:03d}" for i in range(9)]
    packed = extract_features(images, model_dir, tmp_path / "f.h5", batch_size=4, progress=False)
    per_image = extract_features(images, model_dir, tmp_path / "pi", layout="per-image", batch_size=4,
                                 progress=False)
    assert packed.written == per_image.written == 9 and not packed.failed and packed.report is None
    assert packed.rate > 0 and packed.seconds > 0
    a, b = values(tmp_path / "f.h5"), values(tmp_path / "pi")
    assert a.keys() == b.keys() == set(images)
    for img_id in a:
        assert a[img_id].shape == (49, 64) and a[img_id].dtype == np.float32
        np.testing.assert_array_equal(a[img_id], b[img_id])
    attrs = IMAGE.open(tmp_path / "f.h5").attrs
    assert attrs == {"model": str(model_dir.resolve()), "layer": -1, "image_size": 112, "grid": [7, 7],
                     "dtype": "float16"}
    assert IMAGE.open(tmp_path / "pi").attrs == attrs


def test_features_are_patch_tokens_of_the_chosen_layer(model_dir, tmp_path):
    import torch
    from PIL import Image
    from transformers import CLIPVisionModel

    images = images_from(make_images(tmp_path / "imgs", 3))
    extract_features(images, model_dir, tmp_path / "last.h5", dtype="float32", progress=False)
    extract_features(images, model_dir, tmp_path / "l1.h5", layer=1, dtype="float32", progress=False)
    model = CLIPVisionModel.from_pretrained(model_dir).eval()
    path = images["img001"]  # grayscale
    img = Image.open(path).convert("RGB").resize((112, 112), Image.Resampling.BICUBIC)
    x = torch.tensor(np.asarray(img), dtype=torch.float32).permute(2, 0, 1) / 255.0
    x = (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    with torch.no_grad():
        hidden = model(pixel_values=x[None], output_hidden_states=True).hidden_states
    np.testing.assert_allclose(IMAGE.open(tmp_path / "last.h5").get("img001"), hidden[-1][0, 1:].numpy(),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(IMAGE.open(tmp_path / "l1.h5").get("img001"), hidden[1][0, 1:].numpy(),
                               rtol=1e-4, atol=1e-4)
    assert load_image(path, 112).shape == (112, 112, 3)
    with pytest.raises(VlpetError, match="--layer 5 is out of range"):
        extract_features(images, model_dir, tmp_path / "x.h5", layer=5, progress=False)


def test_corrupt_and_missing_images_are_reported_and_retried(model_dir, tmp_path):
    folder = make_images(tmp_path / "imgs", 6)
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    good = (folder / "img000.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    images = images_from(folder)
    images["gone"] = folder / "gone.png"
    out = tmp_path / "f.h5"
    summary = extract_features(images, model_dir, out, batch_size=3, progress=False)
    assert summary.written == 6 and {f[0] for f in summary.failed} == {"corrupt", "truncated", "gone"}
    assert summary.report == report_path(out) == tmp_path / "f.h5.errors.txt"
    rows = [line.split("\t") for line in summary.report.read_text().splitlines() if not line.startswith("#")]
    assert {r[0] for r in rows} == {"corrupt", "truncated", "gone"}
    assert {r[0]: r[2] for r in rows}["gone"] == "file not found"
    assert str(folder / "corrupt.jpg") in {r[1] for r in rows}
    assert "corrupt" not in IMAGE.open(out) and len(IMAGE.open(out)) == 6
    # a re-run retries only the failures; once they are fixed the report goes away
    (folder / "corrupt.jpg").write_bytes(good)
    del images["gone"]
    again = extract_features(images, model_dir, out, progress=False)
    assert again.skipped_existing == 6 and again.written == 1 and [f[0] for f in again.failed] == ["truncated"]
    (folder / "truncated.png").unlink()
    del images["truncated"]
    final = extract_features(images, model_dir, out, progress=False)
    assert final.written == 0 and final.report is None and not report_path(out).exists()
    pi = extract_features({"corrupt": folder / "img000.png", "bad": folder / "nope.png"}, model_dir,
                          tmp_path / "pi", layout="per-image", progress=False)
    assert pi.report == tmp_path / "pi" / "errors.txt" and "bad" in pi.report.read_text()
    assert IMAGE.open(tmp_path / "pi").ids() == ["corrupt"]  # errors.txt is not an id


def test_limit_then_resume(model_dir, tmp_path):
    images = images_from(make_images(tmp_path / "imgs", 7))
    out = tmp_path / "pi"
    first = extract_features(images, model_dir, out, layout="per-image", limit=3, batch_size=2, workers=0,
                             progress=False)
    assert first.written == 3 and len(IMAGE.open(out)) == 3
    second = extract_features(images, model_dir, out, layout="per-image", batch_size=2, progress=False)
    assert second.skipped_existing == 3 and second.written == 4 and IMAGE.open(out).ids() == sorted(images)
    with pytest.raises(DataError, match="different settings"):
        extract_features(images, model_dir, out, layout="per-image", layer=0, progress=False)


CHILD = """
import sys, time
from pathlib import Path
from vlpet_cli.features import images as features
from vlpet_cli.extract import images_from
from vlpet_cli.features.extract.images import extract as extract_features

add = features.PackedImageWriter.add
def slow_add(self, ids, feats):
    add(self, ids, feats)
    print("batch", flush=True)
    time.sleep(0.05)
features.PackedImageWriter.add = slow_add
extract_features(images_from(Path(sys.argv[1])), sys.argv[2], Path(sys.argv[3]), batch_size=2, workers=1,
                 progress=False)
print("finished", flush=True)
"""


@pytest.mark.slow
def test_sigkill_midway_then_rerun_gives_every_id_once(model_dir, tmp_path):
    images = images_from(make_images(tmp_path / "imgs", 24))
    out = tmp_path / "f.h5"
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, str(child), str(tmp_path / "imgs"), str(model_dir), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    batches, deadline = 0, time.time() + 60
    while batches < 4 and time.time() < deadline:
        line = proc.stdout.readline()
        assert line and "finished" not in line, "the child ended before it could be killed"
        batches += line.strip() == "batch"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    partial = IMAGE.open(out)  # still a valid file
    assert 8 <= len(partial) < 24
    summary = extract_features(images, model_dir, out, batch_size=5, progress=False)
    assert summary.skipped_existing == len(partial) and summary.written == 24 - len(partial)
    ids = IMAGE.open(out).ids()
    assert len(ids) == len(set(ids)) == 24 and set(ids) == set(images)
    clean = extract_features(images, model_dir, tmp_path / "clean.h5", batch_size=5, progress=False)
    assert clean.written == 24
    a, b = values(out), values(tmp_path / "clean.h5")
    for img_id in images:
        np.testing.assert_allclose(a[img_id], b[img_id], atol=2e-3)


def test_images_from_annotations(model_dir, tmp_path):
    root = tmp_path / "COCO"
    make_images(root / "val2014", 2)
    for i, name in enumerate(["COCO_val2014_000000000001", "COCO_val2014_000000000002"]):
        (root / "val2014" / f"img{i:03d}.png").rename(root / "val2014" / f"{name}.png")
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps({"images": [
        {"filepath": "val2014", "filename": "COCO_val2014_000000000001.png", "split": "test"},
        {"filepath": "elsewhere", "filename": "COCO_val2014_000000000002.png", "split": "val"},
        {"filepath": "val2014", "filename": "COCO_val2014_000000000003.png", "split": "val"},
    ]}))
    images = images_from(root, karpathy)
    assert images == {
        "COCO_val2014_000000000001": root / "val2014" / "COCO_val2014_000000000001.png",
        "COCO_val2014_000000000002": root / "val2014" / "COCO_val2014_000000000002.png",  # found by id
        "COCO_val2014_000000000003": root / "val2014" / "COCO_val2014_000000000003.png",  # absent: reported
    }
    summary = extract_features(images, model_dir, tmp_path / "f.h5", progress=False)
    assert summary.written == 2 and [f[0] for f in summary.failed] == ["COCO_val2014_000000000003"]
    info = inspect_features(tmp_path / "f.h5", annotation_images(karpathy), karpathy)
    assert info["missing_ids"] == ["COCO_val2014_000000000003"] and info["count"] == 2

    nlvr_dir = make_images(tmp_path / "nlvr" / "dev" / "1", 2)
    (nlvr_dir / "img000.png").rename(nlvr_dir / "dev-1-0-img0.png")
    (nlvr_dir / "img001.png").rename(nlvr_dir / "dev-1-0-img1.png")
    nlvr = tmp_path / "valid.json"
    nlvr.write_text(json.dumps([{"identifier": "dev-1-0", "img0": "dev-1-0-img0", "img1": "dev-1-0-img1",
                                 "label": 1, "sent": "s", "uid": "nlvr2_dev_0"}]))
    assert images_from(tmp_path / "nlvr", nlvr) == {"dev-1-0-img0": nlvr_dir / "dev-1-0-img0.png",
                                                    "dev-1-0-img1": nlvr_dir / "dev-1-0-img1.png"}
    vqa = tmp_path / "karpathy_val.json"
    vqa.write_text(json.dumps([{"img_id": "unknown_image", "question_id": 1, "sent": "q?", "label": {}}]))
    with pytest.raises(DataError, match="none of its 1 images were found"):
        images_from(root, vqa)
    with pytest.raises(DataError, match="image directory not found"):
        images_from(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        images_from(tmp_path / "empty")


def test_duplicate_ids_in_image_tree(tmp_path):
    make_images(tmp_path / "a", 1)
    make_images(tmp_path / "b", 1)
    with pytest.raises(DataError, match="two images share the id 'img000'"):
        images_from(tmp_path)


def test_model_resolution(model_dir, tmp_path):
    with pytest.raises(VlpetError) as err:
        load_vision_model("someone/not-a-cached-clip")
    assert "hf download someone/not-a-cached-clip --local-dir DIR" in str(err.value)
    assert load_vision_model("tiny-clip").grid == 7
    not_clip = tmp_path / "bart"
    not_clip.mkdir()
    (not_clip / "config.json").write_text(json.dumps({"model_type": "bart"}))
    with pytest.raises(VlpetError, match="not a CLIP model"):
        load_vision_model(not_clip)


def test_full_clip_checkpoint_loads_its_vision_tower(tmp_path):
    import torch
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        vision_config={"image_size": 64, "patch_size": 16, "hidden_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "intermediate_size": 64},
        text_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    images = images_from(make_images(tmp_path / "imgs", 2))
    summary = extract_features(images, tmp_path / "clip", tmp_path / "f.h5", progress=False)
    store = IMAGE.open(tmp_path / "f.h5")
    assert summary.written == 2 and store.shape == (16, 32) and store.attrs["grid"] == [4, 4]


def test_plain_progress_lines_when_not_a_terminal(model_dir, tmp_path, capsys):
    images = images_from(make_images(tmp_path / "imgs", 2))
    extract_features(images, model_dir, tmp_path / "f.h5", progress=True)
    assert "extract: 2/2 images (0 failed)" in capsys.readouterr().err
