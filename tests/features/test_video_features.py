"""Video feature stores: VALUE's npz folders, the packed layout, safe resume, and the reference's frame resize."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from vlpet_cli.errors import DataError
from vlpet_cli.features.hdf5 import missing_ids
from vlpet_cli.features.kinds import VIDEO
from vlpet_cli.features.videos import ATTRS_FILE, NpzVideoStore, resize_frames

D = 8
ATTRS = {"model": "tiny-clip", "fps": 0.6667, "size": [224, 224]}
VIDS = {"s03e02_seg02_clip_10": 5, "-2Ei0aXVVvk_1": 70, "yc2_abc_3": 64}


def frames(n: int, seed: int = 0, dim: int = D) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float16)


def value_folder(root: Path) -> Path:
    """A folder exactly as VALUE ships it: np.savez(<vid>.npz, features=float16 (n_frames, 512)), no attributes."""
    root.mkdir(parents=True, exist_ok=True)
    for seed, (vid, n) in enumerate(VIDS.items()):
        np.savez(root / f"{vid}.npz", features=frames(n, seed))
    return root


@pytest.mark.parametrize("layout", ["npz", "packed"])
def test_roundtrip_both_layouts(tmp_path, layout):
    path = tmp_path / ("clip-vit" if layout == "npz" else "clip-vit.h5")
    with VIDEO.writer(path, layout, (D,), attrs=ATTRS) as writer:
        assert writer.existing() == set()
        for seed, (vid, n) in enumerate(VIDS.items()):
            writer.add(vid, frames(n, seed))
    store = VIDEO.open(path)
    assert store.layout == layout and store.path == path and len(store) == 3
    assert sorted(store.ids()) == sorted(VIDS) and "yc2_abc_3" in store and "nope" not in store and 3 not in store
    for seed, (vid, n) in enumerate(VIDS.items()):
        got = store.get(vid)
        assert got.dtype == np.float16 and got.shape == (n, D)
        np.testing.assert_array_equal(got, frames(n, seed))
        assert store.frame_count(vid) == n
    assert store.dim == D and store.dtype == "float16"
    assert {k: store.attrs[k] for k in ATTRS} == ATTRS and store.attrs["dtype"] == "float16"
    clone = pickle.loads(pickle.dumps(store))
    np.testing.assert_array_equal(clone.get("-2Ei0aXVVvk_1"), frames(70, 1))
    with pytest.raises(DataError) as err:
        store.get("missing_vid")
    assert "missing_vid" in str(err.value) and str(path) in str(err.value) and "--videos" in str(err.value)
    assert missing_ids(store, ["yc2_abc_3", "x", "y", "x"]) == ["x", "y"]
    store.close()


def test_value_npz_folder_is_read(tmp_path):
    store = VIDEO.open(value_folder(tmp_path / "clip-vit"))
    assert store.layout == "npz" and store.attrs == {} and store.dim == D and len(store) == 3
    assert store.ids() == sorted(VIDS)
    np.testing.assert_array_equal(store.get("s03e02_seg02_clip_10"), frames(5, 0))
    assert store.frame_count("-2Ei0aXVVvk_1") == 70


def test_npz_written_is_value_format(tmp_path):
    with VIDEO.writer(tmp_path / "v", "npz", (D,), attrs=ATTRS) as writer:
        writer.add("vid1", frames(3).astype(np.float32))
    with np.load(tmp_path / "v" / "vid1.npz") as data:
        assert list(data.keys()) == ["features"] and data["features"].dtype == np.float16
    assert json.loads((tmp_path / "v" / ATTRS_FILE).read_text())["model"] == "tiny-clip"


def test_locate_prefers_packed_then_folder(tmp_path):
    packed, folder = VIDEO.paths(tmp_path, "tv")
    assert packed == tmp_path / "video/vis_features/tv/clip-vit.h5" and folder == packed.with_suffix("")
    with pytest.raises(DataError) as err:
        VIDEO.locate(tmp_path, "tv")
    assert str(packed) in str(err.value) and str(folder) in str(err.value) and "--videos" in str(err.value)
    value_folder(folder)
    assert VIDEO.locate(tmp_path, "tv") == folder
    VIDEO.writer(packed, "packed", (D,)).close()
    assert VIDEO.locate(tmp_path, "tv") == packed
    with pytest.raises(DataError, match="source 'how2'"):
        VIDEO.locate(tmp_path, "how2")


@pytest.mark.parametrize("layout", ["npz", "packed"])
def test_resume_and_refuse_other_settings(tmp_path, layout):
    path = tmp_path / ("v" if layout == "npz" else "v.h5")
    with VIDEO.writer(path, layout, (D,), attrs=dict(ATTRS, device=None)) as writer:
        writer.add("a", frames(4))
    with VIDEO.writer(path, layout, (D,), attrs=ATTRS) as writer:
        assert writer.existing() == {"a"}
        writer.add("b", frames(6, 1))
    assert sorted(VIDEO.open(path).ids()) == ["a", "b"]
    with pytest.raises(DataError, match="dim=8 .this run: 16."):
        VIDEO.writer(path, layout, (16,), attrs=ATTRS)
    with pytest.raises(DataError, match="model='tiny-clip' .this run: 'other'."):
        VIDEO.writer(path, layout, (D,), attrs=dict(ATTRS, model="other"))
    with pytest.raises(DataError, match="expected .n_frames, 8."):
        with VIDEO.writer(path, layout, (D,), attrs=ATTRS) as writer:
            writer.add("c", frames(3, dim=5))


def test_npz_resume_on_value_folder_checks_dim(tmp_path):
    folder = value_folder(tmp_path / "clip-vit")
    with pytest.raises(DataError, match="dim=8"):
        VIDEO.writer(folder, "npz", (512,))
    writer = VIDEO.writer(folder, "npz", (D,), attrs=ATTRS)
    assert writer.existing() == set(VIDS)


def test_npz_kill_leaves_no_half_file(tmp_path, monkeypatch):
    folder = tmp_path / "v"
    writer = VIDEO.writer(folder, "npz", (D,))
    writer.add("a", frames(2))

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(KeyboardInterrupt):
        writer.add("b", frames(2))
    monkeypatch.undo()
    (folder / "c.npz.123.tmp").write_bytes(b"half")  # a killed process's leftover
    writer = VIDEO.writer(folder, "npz", (D,))
    assert writer.existing() == {"a"} and sorted(p.name for p in folder.iterdir()) == ["a.npz", ATTRS_FILE]


def test_packed_interrupted_video_is_dropped(tmp_path):
    path = tmp_path / "v.h5"
    with VIDEO.writer(path, "packed", (D,)) as writer:
        writer.add("a", frames(4))
        writer.add("b", frames(3, 1))
    with h5py.File(path, "r+") as f:  # simulate a kill after the frames and span of 'c', before its id
        f["features"].resize(7 + 5, axis=0)
        f["spans"].resize(3, axis=0)
        f["spans"][2] = (7, 5)
        f["ids"].resize(3, axis=0)
    store = VIDEO.open(path)
    assert store.ids() == ["a", "b"]
    with VIDEO.writer(path, "packed", (D,)) as writer:
        assert writer.existing() == {"a", "b"}
        writer.add("c", frames(2, 2))
    with h5py.File(path, "r") as f:
        assert f["features"].shape == (9, D) and f["spans"][2].tolist() == [7, 2]
    np.testing.assert_array_equal(VIDEO.open(path).get("c"), frames(2, 2))
    np.testing.assert_array_equal(VIDEO.open(path).get("b"), frames(3, 1))


def test_bad_files_are_one_line_errors(tmp_path):
    folder = tmp_path / "v"
    folder.mkdir()
    (folder / "bad.npz").write_bytes(b"not a zip")
    with zipfile.ZipFile(folder / "nokey.npz", "w") as zf:
        zf.writestr("other.npy", b"")
    store = VIDEO.open(folder)
    for vid in ("bad", "nokey"):
        with pytest.raises(DataError, match=f"{vid}.npz: cannot read array 'features'"):
            store.get(vid)
    (tmp_path / "x.h5").write_bytes(b"junk")
    with pytest.raises(DataError, match="cannot read HDF5"):
        VIDEO.open(tmp_path / "x.h5")
    with h5py.File(tmp_path / "img.h5", "w") as f:
        f.create_dataset("features", data=np.zeros((1, 2, 3)))
    with pytest.raises(DataError, match="not a vlpet packed video feature file"):
        VIDEO.open(tmp_path / "img.h5")
    with pytest.raises(DataError, match="not found"):
        VIDEO.open(tmp_path / "none")
    with pytest.raises(DataError, match="unknown video feature layout"):
        VIDEO.writer(tmp_path / "w", "per-image", (D,))
    assert isinstance(store, NpzVideoStore)


@pytest.mark.parametrize("total", [1, 5, 63, 64, 65, 70, 100, 127, 128, 129, 300, 1000])
def test_resize_matches_reference(total):
    torch = pytest.importorskip("torch")
    feats = frames(total, seed=total, dim=16)
    out, mask = resize_frames(feats, 64)
    assert out.shape == (64, 16) and out.dtype == np.float32 and mask.dtype == np.int64 and mask.shape == (64,)
    ref = torch.from_numpy(feats.astype(np.float32))
    if total < 64:  # the reference: zero rows appended at the end, not masked there
        expected = torch.cat([ref, torch.zeros(64 - total, 16)])
        assert mask.tolist() == [1] * total + [0] * (64 - total)
    else:
        expected = torch.nn.functional.adaptive_max_pool1d(ref.t().unsqueeze(0), 64).squeeze(0).t()
        assert mask.tolist() == [1] * 64
    np.testing.assert_array_equal(out, expected.numpy())


def test_resize_other_sizes():
    out, mask = resize_frames(frames(10), 4)
    assert out.shape == (4, D) and mask.tolist() == [1, 1, 1, 1]
    np.testing.assert_array_equal(out[0], frames(10)[0:3].astype(np.float32).max(axis=0))
    with pytest.raises(ValueError):
        resize_frames(np.zeros(3), 4)


@pytest.mark.parametrize("layout", ["npz", "packed", "value"])
def test_inspect_video_stores(tmp_path, monkeypatch, layout):
    from typer.testing import CliRunner

    from vlpet_cli.cli import app
    from vlpet_cli.features.tools import describe_features, inspect_features
    from vlpet_cli.tasks import TASKS, CocoTask

    if layout == "value":
        path = value_folder(tmp_path / "clip-vit")
    else:
        path = tmp_path / ("v" if layout == "npz" else "v.h5")
        with VIDEO.writer(path, layout, (D,), attrs=ATTRS) as writer:
            for seed, (vid, n) in enumerate(VIDS.items()):
                writer.add(vid, frames(n, seed))
    info = inspect_features(path, ["yc2_abc_3", "lost_clip"], tmp_path / "ann.jsonl")
    assert info["kind"] == "video" and info["count"] == 3 and info["dim"] == D and info["dtype"] == "float16"
    assert info["layout"] == ("npz" if layout == "value" else layout)
    assert info["frames"] == {"min": 5, "max": 70, "mean": 46.33}
    assert info["missing_ids"] == ["lost_clip"] and info["annotation_ids"] == 2
    assert (info["attributes"] == {}) if layout == "value" else info["attributes"]["model"] == "tiny-clip"
    text = describe_features(info)
    assert "videos:     3" in text and "5-70 per video" in text and "missing: lost_clip" in text
    json.dumps(info)
    # The command, with a VALUE annotation file (its records name videos in `vid_name`).
    if not any("vid_name" in cls.image_fields for cls in TASKS.values()):
        monkeypatch.setitem(TASKS, "tvqa", type("FakeTvqa", (CocoTask,), {"name": "tvqa", "aliases": (),
                                                                          "image_fields": ("vid_name",)}))
    ann = tmp_path / "tvqa_val.jsonl"
    ann.write_text("\n".join(json.dumps({"qid": i, "vid_name": v, "q": "?"})
                             for i, v in enumerate(["s03e02_seg02_clip_10", "s09_clip_00"])) + "\n")
    result = CliRunner().invoke(app, ["features", "inspect", str(path), "--annotations", str(ann), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["missing_ids"] == ["s09_clip_00"] and out["count"] == 3


def test_inspect_empty_folder_is_still_an_image_store(tmp_path):
    from vlpet_cli.features.tools import inspect_features

    (tmp_path / "empty").mkdir()
    assert inspect_features(tmp_path / "empty")["layout"] == "per-image"
    VIDEO.writer(tmp_path / "v", "npz", (D,)).close()  # a started but empty video folder knows its dim
    info = inspect_features(tmp_path / "v")
    assert info["kind"] == "video" and info["count"] == 0 and info["dim"] == D and info["frames"] is None


def test_video_features_made_in_memory_read_like_a_store():
    """The video kind's memory store (`vlpet predict`) resizes and masks as the stores on disk do."""
    from vlpet_cli.config import VideoData

    store = VIDEO.memory({"short": frames(3), "long": frames(70, 1)})
    got = store.visual(["short"], VideoData(frames=4, mask_padding=True))
    expected, mask = resize_frames(frames(3), 4)
    assert got["vis_kind"] == "video" and got["vis_feats"].shape == (1, 4, D)
    np.testing.assert_array_equal(got["vis_feats"][0], expected)
    assert got["vis_mask"].tolist() == mask.tolist() == [1, 1, 1, 0]
    assert "vis_mask" not in store.visual(["long"], VideoData(frames=4))
    with pytest.raises(DataError, match="no features for video 'gone'"):
        store.visual(["gone"], VideoData())
