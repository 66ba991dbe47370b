"""Video records through TaskDataset, collate and VLModel: frame resize, the optional padded-frame mask (in the
encoder's attention and the decoder's cross-attention), feature checks, and a mixed image/video run refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vlpet_cli.config import VideoData
from vlpet_cli.data.loading import check_feature_dims, check_features, feature_kind, load_task_data, open_task_features
from vlpet_cli.errors import DataError, VlpetError
from vlpet_cli.features.kinds import VIDEO
from vlpet_cli.features.videos import resize_frames
from vlpet_cli.presets import resolve
from vlpet_cli.tasks import TASKS, CocoTask, TaskDataset, collate
from vlpet_cli.vl.model import build_model

DIM = 8
FRAMES = {"vid0": 10, "vid1": 64, "vid2": 100, "vid3": 3}


class FakeVideoTask(CocoTask):
    """COCO's Karpathy-file records, but each 'image' is a video of source 'tv' (a stand-in for the VALUE tasks)."""

    name = "fakevid"
    aliases = ()
    feature_kind = "video"

    def feature_source(self, split_name: str) -> str:
        return "tv"


def video_root(root: Path, frames: dict[str, int] = FRAMES, layout: str = "npz") -> Path:
    """A data root with a Karpathy file naming the videos (train and val) and their frame features."""
    images = [{"split": split, "filename": f"{vid}.mp4", "cocoid": i,
               "sentences": [{"raw": "a red circle"}, {"raw": "the blue square"}]}
              for i, vid in enumerate(frames) for split in ("train",)]
    images += [dict(img, split="val") for img in images]
    (root / "COCO").mkdir(parents=True, exist_ok=True)
    (root / "COCO" / "dataset_coco.json").write_text(json.dumps({"images": images}))
    base = root / "video" / "vis_features" / "tv"
    path = base / "clip-vit" if layout == "npz" else base / "clip-vit.h5"
    with VIDEO.writer(path, layout, (DIM,), attrs={"model": "test"}) as writer:
        for seed, (vid, n) in enumerate(frames.items()):
            writer.add(vid, np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float16))
    return root


@pytest.fixture
def fake_task(monkeypatch):
    monkeypatch.setitem(TASKS, "fakevid", FakeVideoTask)
    return FakeVideoTask


def tokenizer():
    from vlpet_cli import backbones

    return backbones.load_tokenizer(backbones.resolve("tiny-bart"))


@pytest.mark.parametrize("layout", ["npz", "packed"])
@pytest.mark.parametrize("mask", [False, True])
def test_dataset_resizes_frames_and_masks_padding_on_request(tmp_path, fake_task, layout, mask):
    root = video_root(tmp_path, layout=layout)
    task = FakeVideoTask(None, VideoData(mask_padding=mask))
    records = task.load(root, "train")
    assert [r.image_ids for r in records[::2]] == [("vid0",), ("vid1",), ("vid2",), ("vid3",)]
    stores = open_task_features(records, root, "clip-vit", "video")
    assert stores["tv"].layout == layout
    check_features(task, records, stores)
    ds = TaskDataset(task, records, stores, tokenizer())
    for i, (vid, n) in zip(range(0, 8, 2), FRAMES.items()):
        item = ds[i]
        expected, real = resize_frames(stores["tv"].get(vid), 64)
        assert item["vis_feats"].shape == (1, 64, DIM) and item["vis_feats"].dtype == np.float32
        np.testing.assert_array_equal(item["vis_feats"][0], expected)
        assert item["vis_kind"] == "video"
        if mask:
            assert item["vis_mask"].tolist() == real.tolist() and int(item["vis_mask"].sum()) == min(n, 64)
        else:
            assert "vis_mask" not in item
    batch = collate([ds[0], ds[2], ds[6]], ds.pad_id)
    assert batch["vis_feats"].shape == (3, 1, 64, DIM) and batch["vis_kind"] == "video"
    if mask:
        assert batch["vis_mask"].shape == (3, 64) and batch["vis_mask"].sum(1).tolist() == [10, 64, 3]
    else:
        assert "vis_mask" not in batch


def test_frames_option_sets_the_visual_tokens(tmp_path, fake_task):
    root = video_root(tmp_path)
    task = FakeVideoTask(None, VideoData(frames=16, mask_padding=True))
    records = task.load(root, "train")
    ds = TaskDataset(task, records, open_task_features(records, root, "clip-vit", "video"), tokenizer())
    assert ds[0]["vis_feats"].shape == (1, 16, DIM) and ds[0]["vis_mask"].tolist() == [1] * 10 + [0] * 6
    assert ds[6]["vis_mask"].tolist() == [1] * 3 + [0] * 13


def test_image_batches_carry_no_video_keys(tmp_path):
    items = [{"task": "coco", "input_ids": [0, 2], "vis_feats": np.zeros((1, 4, 3), np.float32), "target_ids": None,
              "weight": 0.0, "loss_reduction": "token", "meta": {}}]
    assert set(collate(items, 1)) == {"task", "input_ids", "attention_mask", "vis_feats", "labels", "loss_weights",
                                      "loss_reduction", "meta"}


def test_missing_videos_are_one_message(tmp_path, fake_task):
    root = video_root(tmp_path, {"vid0": 4, "vid1": 5})
    data = json.loads((root / "COCO" / "dataset_coco.json").read_text())
    data["images"] += [dict(data["images"][0], filename="lost7.mp4"), dict(data["images"][0], filename="lost8.mp4")]
    (root / "COCO" / "dataset_coco.json").write_text(json.dumps(data))
    task = FakeVideoTask()
    records = task.load(root, "train")
    with pytest.raises(DataError) as err:
        check_features(task, records, open_task_features(records, root, "clip-vit", "video"))
    msg = str(err.value)
    assert "fakevid: 4 of 8 records have no video features" in msg and "lost7, lost8" in msg
    assert str(root / "video/vis_features/tv/clip-vit") in msg and "extract-features --videos" in msg
    with pytest.raises(DataError, match="neither the packed file .*clip-vit.h5 nor the folder"):
        open_task_features(records, tmp_path / "elsewhere", "clip-vit", "video")


def small_preset(tasks: list[str], mask: bool = False, feat_dim: int = DIM, root: Path | None = None):
    # G_small averages over every token; its masked_mean fix keeps padded frames out of that mean too
    return resolve("vlpet-small", [f"data.tasks=[{','.join(tasks)}]", f"model.feat_dim={feat_dim}",
                                   f"data.video.mask_padding={str(mask).lower()}", f"data.data_root={root}",
                                   f"pet.gate.masked_mean={str(mask).lower()}"],
                   "tiny-bart", task_kind=feature_kind)


def video_batch(tmp_path, mask: bool):
    root = video_root(tmp_path)
    preset = small_preset(["fakevid"], mask, root=root)
    assert preset.model.n_boxes == 64 and preset.train.lr == pytest.approx(7e-4)  # the video section applied
    model, tok = build_model(preset)
    data = load_task_data(preset, root, tok, splits=("train",))
    ds = data.train["fakevid"]
    return model.eval(), collate([ds[0], ds[6]], ds.pad_id)  # 10 and 3 real frames


def test_mask_enters_encoder_and_cross_attention(tmp_path, fake_task):
    torch.manual_seed(0)
    model, batch = video_batch(tmp_path, mask=True)
    _, mask = model.encode(batch)
    assert mask.shape == (2, batch["input_ids"].shape[1] + 64)
    assert torch.equal(mask[:, batch["input_ids"].shape[1]:], batch["vis_mask"])
    # Padded frames are invisible: changing them changes neither the loss nor what is generated.
    noisy = dict(batch, vis_feats=batch["vis_feats"].clone())
    noisy["vis_feats"][0, 0, 10:] = 5.0
    noisy["vis_feats"][1, 0, 3:] = -5.0
    with torch.no_grad():
        assert torch.allclose(model(batch), model(noisy), atol=1e-6)
        gen = {"max_length": 6, "num_beams": 2, "do_sample": False}
        assert torch.equal(model.generate(batch, **gen), model.generate(noisy, **gen))
        # Without the mask they are attended (the reference): the same change moves the loss.
        plain = {k: v for k, v in batch.items() if k != "vis_mask"}
        plain_noisy = {k: v for k, v in noisy.items() if k != "vis_mask"}
        assert not torch.allclose(model(plain), model(plain_noisy), atol=1e-4)
        # The mask is the cross-attention mask too: the decoder alone, on fixed encoder outputs, sees it.
        enc, mask = model.encode(batch)
        dec = model.decoder_inputs(batch["labels"])
        hidden = enc.last_hidden_state.clone()
        hidden[0, batch["input_ids"].shape[1] + 10:] = 7.0
        enc.last_hidden_state = hidden
        a = model.backbone(encoder_outputs=(enc.last_hidden_state,), attention_mask=mask,
                           decoder_input_ids=dec).logits
        enc2, _ = model.encode(batch)
        b = model.backbone(encoder_outputs=(enc2.last_hidden_state,), attention_mask=mask,
                           decoder_input_ids=dec).logits
        assert torch.allclose(a, b, atol=1e-5)


def test_unmasked_video_batch_is_all_ones(tmp_path, fake_task):
    model, batch = video_batch(tmp_path, mask=False)
    _, mask = model.encode(batch)
    assert "vis_mask" not in batch and bool(mask[:, batch["input_ids"].shape[1]:].eq(1).all())
    loss = model(batch)
    loss.backward()
    assert torch.isfinite(loss) and model.projector.feat_embedding[0].weight.grad is not None


def test_mixed_image_and_video_run_is_refused_unless_sizes_agree(tmp_path, fake_task, monkeypatch):
    from vlpet_cli.features.images import PackedImageWriter

    root = video_root(tmp_path)
    (root / "COCO" / "clip_features").mkdir(parents=True)
    ids = [f"vid{i}" for i in range(4)]
    for dim in (16, DIM):
        writer = PackedImageWriter(root / "COCO" / "clip_features" / "data_clip_RN101_att.h5", (4, dim))
        writer.add(ids, np.zeros((4, 4, dim), np.float16))
        writer.close()
        preset = small_preset(["coco", "fakevid"], feat_dim=DIM, root=root)
        assert preset.model.feat_dim == DIM and preset.train.lr == pytest.approx(1e-3)  # no video section
        if dim == 16:
            with pytest.raises(VlpetError) as err:
                check_feature_dims(root, preset)
            msg = str(err.value)
            assert "image tasks (coco) and video tasks (fakevid) in one run" in msg
            assert "16-dimensional" in msg and "8-dimensional" in msg and "separate runs" in msg
            assert "model.feat_dim" in msg and "same CLIP" in msg
            (root / "COCO" / "clip_features" / "data_clip_RN101_att.h5").unlink()
        else:
            check_feature_dims(root, preset)  # sizes agree: allowed


def test_video_store_dim_is_checked_against_the_preset(tmp_path, fake_task):
    root = video_root(tmp_path)
    preset = small_preset(["fakevid"], feat_dim=512, root=root)
    with pytest.raises(VlpetError, match=r"fakevid karpathy_train: the features in .*clip-vit are 8-dimensional "
                                         r"but the preset expects model.feat_dim=512"):
        check_feature_dims(root, preset)
    assert VIDEO.open(root / "video/vis_features/tv/clip-vit").dim == DIM


@pytest.mark.slow
def test_training_a_video_task_end_to_end(tmp_path, fake_task, capsys):
    """`vlpet train` on a video task: the video section applies, frames are checked and read, validation keeps
    checkpoints/best; a resumed run refuses video.* overrides."""
    from vlpet_cli.train import resolve_train_preset, resume_preset, train

    root = video_root(tmp_path / "data")
    preset = resolve_train_preset("vlpet-small", ["fakevid"], str(root), "tiny-bart", [
        f"model.feat_dim={DIM}", "train.epochs=2", "train.batch_size=4", "train.task_ratios={fakevid: 1}",
        "data.video.mask_padding=true", "eval.batch_size=8", "eval.generation={fakevid: {num_beams: 1}}"])
    assert (preset.model.n_boxes, preset.train.lr) == (64, pytest.approx(7e-4))
    result = train(preset, tmp_path / "run")
    run = tmp_path / "run"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "2 steps/epoch x 2 epochs" in capsys.readouterr().out  # 8 rows / batch 4
    assert {e["task"] for e in lines if e["event"] == "train"} == {"fakevid"}
    assert "cider" in [e for e in lines if e["event"] == "val"][-1]["metrics"]["fakevid"]
    assert (run / "checkpoints" / "best" / "adapter.safetensors").exists() and result.summary
    with pytest.raises(VlpetError, match=r"video.train.lr: video.\* overrides are for new runs"):
        resume_preset(run, overrides=["video.train.lr=1"])


def test_toy_video_runs_take_the_toy_video_feature_size(tmp_path, fake_task, monkeypatch):
    from vlpet_cli.toy import root as toy_root
    from vlpet_cli.train import TOY_DEFAULTS, resolve_train_preset

    root = video_root(tmp_path)
    monkeypatch.setattr(toy_root, "toy_root", lambda: root)
    assert toy_root.toy_feature_dim(["fakevid"]) == DIM
    preset = resolve_train_preset("vlpet-small", ["fakevid"], "toy", "tiny-bart")
    assert preset.model.feat_dim == DIM and preset.model.n_boxes == 64  # the video section, toy feature size
    assert f"train.batch_size={preset.train.batch_size}" in TOY_DEFAULTS  # the toy world's defaults still win
