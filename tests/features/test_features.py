"""Feature stores: both layouts, lazy per-process handles, safe resume, annotations, inspect and convert."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest

from vlpet_cli.errors import DataError
from vlpet_cli.features.hdf5 import missing_ids
from vlpet_cli.features.images import PackedImageWriter, PerImageWriter, check_compatible
from vlpet_cli.features.kinds import IMAGE
from vlpet_cli.features.tools import convert_features, describe_features, inspect_features
from vlpet_cli.tasks import annotation_images

T, D = 4, 6
ATTRS = {"model": "m", "layer": -1, "image_size": 32, "grid": [2, 2]}


def feats(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, T, D)).astype(np.float16)


def write_reference_dir(root: Path, ids: list[str], values: np.ndarray) -> Path:
    """Per-image files exactly as the reference extractor writes them: group <id>, dataset features, no attrs."""
    root.mkdir(parents=True, exist_ok=True)
    for img_id, value in zip(ids, values):
        with h5py.File(root / f"{img_id}.h5", "w") as f:
            f.create_dataset(f"{img_id}/features", data=value)
    return root


def write_packed(path: Path, ids: list[str], values: np.ndarray, dtype: str = "float16") -> Path:
    writer = PackedImageWriter(path, (T, D), dtype, ATTRS)
    writer.add(ids, values)
    writer.close()
    return path


IDS = ["COCO_val2014_000000000042", "COCO_val2014_000000000073", "train-10171-0-img0"]


def test_packed_roundtrip(tmp_path):
    values = feats(3)
    store = IMAGE.open(write_packed(tmp_path / "f.h5", IDS, values))
    assert store.layout == "packed" and len(store) == 3 and store.ids() == IDS
    assert IDS[1] in store and "nope" not in store and 3 not in store
    got = store.get(IDS[1])
    assert got.dtype == np.float32 and got.shape == (T, D)
    np.testing.assert_array_equal(got, values[1].astype(np.float32))
    assert store.dim == D and store.shape == (T, D) and store.dtype == "float16"
    assert store.attrs == dict(ATTRS, dtype="float16")
    with pytest.raises(DataError) as err:
        store.get("COCO_missing")
    assert "COCO_missing" in str(err.value) and "f.h5" in str(err.value) and "extract-features" in str(err.value)


def test_reference_per_image_layout_is_read(tmp_path):
    values = feats(3, seed=1)
    store = IMAGE.open(write_reference_dir(tmp_path / "data_clip_RN101_att", IDS, values))
    assert store.layout == "per-image" and len(store) == 3 and sorted(IDS) == store.ids()
    np.testing.assert_array_equal(store.get(IDS[2]), values[2].astype(np.float32))
    assert store.dim == D and store.attrs == {} and IDS[0] in store and "x" not in store
    with pytest.raises(DataError, match="no features for image id 'x'"):
        store.get("x")


def test_per_image_writer_matches_reference_and_is_atomic(tmp_path):
    out = tmp_path / "pi"
    out.mkdir()
    (out / f"{IDS[0]}.h5.999.tmp").write_bytes(b"half-written")  # leftover of a killed run
    writer = PerImageWriter(out, (T, D), "float16", ATTRS)
    writer.add(IDS, feats(3))
    assert not list(out.glob("*.tmp"))
    with h5py.File(out / f"{IDS[0]}.h5", "r") as f:  # the reference loader's access path
        assert f[f"{IDS[0]}/features"].shape == (T, D) and f[f"{IDS[0]}/features"].dtype == np.float16
    assert PerImageWriter(out, (T, D), "float16", ATTRS).existing() == set(IDS)


def test_both_layouts_give_identical_tensors_and_convert(tmp_path):
    values = feats(3, seed=2)
    packed = write_packed(tmp_path / "f.h5", IDS, values)
    assert convert_features(packed, tmp_path / "pi", "per-image") == 3
    assert convert_features(tmp_path / "pi", tmp_path / "back.h5", "packed") == 3
    assert convert_features(packed, tmp_path / "pi", "per-image") == 0  # resumable: nothing left to do
    a, b, c = IMAGE.open(packed), IMAGE.open(tmp_path / "pi"), IMAGE.open(tmp_path / "back.h5")
    assert b.attrs == a.attrs == c.attrs
    for img_id in IDS:
        np.testing.assert_array_equal(a.get(img_id), b.get(img_id))
        np.testing.assert_array_equal(a.get(img_id), c.get(img_id))


def test_locate_features(tmp_path):
    base = tmp_path / "COCO" / "clip_features"
    with pytest.raises(DataError) as err:
        IMAGE.locate(tmp_path, "COCO")
    assert "data_clip_RN101_att.h5" in str(err.value) and str(base / "data_clip_RN101_att") in str(err.value)
    write_reference_dir(base / "data_clip_RN101_att", IDS[:1], feats(1))
    assert IMAGE.locate(tmp_path, "COCO") == base / "data_clip_RN101_att"
    write_packed(base / "data_clip_RN101_att.h5", IDS[:1], feats(1))
    assert IMAGE.locate(tmp_path, "COCO") == base / "data_clip_RN101_att.h5"
    assert IMAGE.locate(tmp_path, "COCO", "data_clip_RN101_att").suffix == ".h5"


def test_store_pickles_without_handles_and_reopens_per_process(tmp_path):
    values = feats(3)
    store = IMAGE.open(write_packed(tmp_path / "f.h5", IDS, values))
    store.get(IDS[0])
    assert store._h5 is not None
    clone = pickle.loads(pickle.dumps(store))
    assert clone._h5 is None and len(clone) == 3
    np.testing.assert_array_equal(clone.get(IDS[2]), values[2].astype(np.float32))
    stale = clone._h5
    clone._pid = -1  # as if inherited through fork: the next access opens a fresh handle
    clone.get(IDS[0])
    assert clone._h5 is not stale and clone._pid == os.getpid()
    store.close()
    clone.close()


def test_store_in_dataloader_workers(tmp_path):
    torch = pytest.importorskip("torch")
    values = feats(3)
    store = IMAGE.open(write_packed(tmp_path / "f.h5", IDS, values))
    store.get(IDS[0])  # the parent has an open handle; workers must not reuse it

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return store.get(IDS[i])

    loader = torch.utils.data.DataLoader(DS(), batch_size=1, num_workers=2,
                                         multiprocessing_context="fork")
    got = np.concatenate([b.numpy() for b in loader])
    np.testing.assert_array_equal(got, values.astype(np.float32))


def test_packed_resume_drops_torn_rows(tmp_path):
    path = write_packed(tmp_path / "f.h5", IDS[:2], feats(2))
    with h5py.File(path, "r+") as f:  # a writer killed after flushing features, before writing their ids
        f["features"].resize(5, axis=0)
        f["ids"].resize(3, axis=0)  # ... or after resizing ids, before their values reached the file
    store = IMAGE.open(path)
    assert store.ids() == IDS[:2] and len(store) == 2
    writer = PackedImageWriter(path, (T, D), "float16", ATTRS)
    assert writer.existing() == set(IDS[:2])
    writer.add(IDS[2:], feats(1, seed=5))
    writer.close()
    with h5py.File(path, "r") as f:
        assert f["features"].shape[0] == f["ids"].shape[0] == 3
    store = IMAGE.open(path)
    assert store.ids() == IDS
    np.testing.assert_array_equal(store.get(IDS[2]), feats(1, seed=5)[0].astype(np.float32))


def test_writer_refuses_other_settings(tmp_path):
    path = write_packed(tmp_path / "f.h5", IDS, feats(3))
    with pytest.raises(DataError, match="layer=-1"):
        PackedImageWriter(path, (T, D), "float16", dict(ATTRS, layer=3))
    with pytest.raises(DataError, match="shape"):
        PackedImageWriter(path, (T, D + 1), "float16", ATTRS)
    ref = write_reference_dir(tmp_path / "ref", IDS, feats(3))
    with pytest.raises(DataError, match="dtype"):
        PerImageWriter(ref, (T, D), "float32", ATTRS)
    with pytest.raises(DataError, match="is a directory"):
        PackedImageWriter(ref, (T, D))
    with pytest.raises(DataError, match="dtype"):
        PackedImageWriter(tmp_path / "g.h5", (T, D), "bfloat16")


def test_open_features_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        IMAGE.open(tmp_path / "nothing.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.create_dataset("x", data=[1])
    with pytest.raises(DataError, match="not a vlpet packed feature file"):
        IMAGE.open(tmp_path / "other.h5")
    (tmp_path / "junk.h5").write_bytes(b"junk")
    with pytest.raises(DataError, match="cannot read HDF5"):
        IMAGE.open(tmp_path / "junk.h5")


def test_missing_ids_and_check_compatible(tmp_path):
    store = IMAGE.open(write_packed(tmp_path / "f.h5", IDS, feats(3)))
    assert missing_ids(store, ["a", IDS[0], "b", "a"]) == ["a", "b"]
    check_compatible(store, D)
    with pytest.raises(DataError) as err:
        check_compatible(store, 2048)
    assert f"model.feat_dim={D}" in str(err.value) and "f.h5" in str(err.value)


def test_annotation_images_reference_formats(tmp_path):
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps({"images": [
        {"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "split": "test", "sentences": []},
        {"filepath": "train2014", "filename": "COCO_train2014_000000000009.jpg", "split": "train"},
    ]}))
    assert annotation_images(karpathy) == {
        "COCO_val2014_000000391895": "val2014/COCO_val2014_000000391895.jpg",
        "COCO_train2014_000000000009": "train2014/COCO_train2014_000000000009.jpg",
    }
    vqa = tmp_path / "karpathy_test.json"
    vqa.write_text(json.dumps([{"img_id": "COCO_val2014_000000000042", "question_id": 1, "sent": "q?"},
                               {"img_id": "COCO_val2014_000000000042", "question_id": 2, "sent": "q2?"},
                               {"img_id": "2375429", "question_id": "07333408", "sent": "q3?"}]))
    assert list(annotation_images(vqa)) == ["COCO_val2014_000000000042", "2375429"]
    nlvr = tmp_path / "test.jsonl"
    nlvr.write_text(json.dumps({"identifier": "t-1-0", "img0": "t-1-0-img0", "img1": "t-1-0-img1"}) + "\n")
    assert list(annotation_images(nlvr)) == ["t-1-0-img0", "t-1-0-img1"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"img_id": "a"}, {"sent": "no image"}]))
    with pytest.raises(DataError, match=r"bad.json: record 1: names no image or video \(no 'img_id'"):
        annotation_images(bad)
    bad.write_text("{not json")
    with pytest.raises(DataError, match=r"bad.json: not valid JSON \(line 1"):
        annotation_images(bad)
    bad.write_text(json.dumps({"records": []}))
    with pytest.raises(DataError, match="unrecognised annotation format"):
        annotation_images(bad)


def test_inspect_reports_missing_ids(tmp_path):
    path = write_packed(tmp_path / "f.h5", IDS[:2], feats(2))
    ann = tmp_path / "valid.json"
    ann.write_text(json.dumps([{"identifier": "x", "img0": IDS[0], "img1": "dev-1-img1", "label": 0}]))
    info = inspect_features(path, annotation_images(ann), ann)
    assert info["count"] == 2 and info["shape"] == [2, T, D] and info["dtype"] == "float16"
    assert info["layout"] == "packed" and info["attributes"]["model"] == "m"
    assert info["annotation_ids"] == 2 and info["missing_count"] == 1 and info["missing_ids"] == ["dev-1-img1"]
    text = describe_features(info)
    assert "missing: dev-1-img1" in text and "1 without features" in text
    json.dumps(info)  # JSON-serialisable for `--json`
    ref = write_reference_dir(tmp_path / "ref", IDS, feats(3))
    info = inspect_features(ref)
    assert info["layout"] == "per-image" and info["count"] == 3 and info["attributes"] == {}
    (tmp_path / "empty").mkdir()
    assert inspect_features(tmp_path / "empty")["count"] == 0


def test_image_stores_reject_unknown_layout(tmp_path):
    with pytest.raises(DataError, match="unknown image feature layout 'npz'"):
        IMAGE.writer(tmp_path / "x", "npz", (T, D))


def test_features_made_in_memory_read_like_a_store():
    """`vlpet predict` hands TaskDataset the features it just computed: the image kind's memory store reads them as
    float32 and names an id it lacks."""
    values = feats(2, seed=3)
    store = IMAGE.memory(dict(zip(IDS[:2], values)))
    got = store.visual([IDS[1], IDS[0]])
    assert set(got) == {"vis_feats"} and got["vis_feats"].dtype == np.float32 and got["vis_feats"].shape == (2, T, D)
    np.testing.assert_array_equal(got["vis_feats"][0], values[1].astype(np.float32))
    assert IDS[0] in store and IDS[2] not in store and len(store) == 2
    with pytest.raises(DataError, match=f"no features for image id '{IDS[2]}'"):
        store.visual([IDS[2]])
