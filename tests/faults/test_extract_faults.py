"""Faults of `vlpet extract-features` (issue 21, item 2): a disk that fills up during extraction and an output that
cannot be written.

A full disk ends the run with exit code 2 and one line naming the store, how many were written and about how much
more space the rest needs, with the store left valid and resumable: what was written before stays, and the same
command finishes the job once there is space. (Before, a packed file gave two tracebacks and a segmentation fault,
exit 139: HDF5 could not close a file it still held data for.) A read-only output is refused, with one line, before
the model loads.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vlpet_cli.errors import VlpetError
from vlpet_cli.extract import images_from
from vlpet_cli.features.extract.images import extract as extract_images
from vlpet_cli.features.hdf5 import DiskFull
from vlpet_cli.features.kinds import IMAGE, VIDEO

VLPET = Path(sys.executable).with_name("vlpet")


def make_images(folder: Path, n: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(folder / f"img{i:03d}.png")
    return folder


def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def values(path: Path) -> dict[str, np.ndarray]:
    with IMAGE.open(path) as store:
        return {i: store.get(i) for i in store.ids()}


# ---- a full disk, simulated in-process -----------------------------------------------------------------------
def test_disk_full_in_a_packed_file_keeps_what_was_written_and_resumes(tmp_path, monkeypatch):
    """HDF5 reports the full disk while a batch is written: one DiskFull line, the earlier batches stay readable,
    the file closes cleanly, and the same call finishes the job."""
    import h5py

    images = images_from(make_images(tmp_path / "imgs", 10))
    out = tmp_path / "f.h5"
    real = h5py.Dataset.__setitem__
    rows = []

    def filling(self, key, value):
        if self.name == "/features":
            rows.append(len(value))
            if sum(rows) > 4:
                raise enospc()
        real(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", filling)
    with pytest.raises(DiskFull) as err:
        extract_images(images, "tiny-clip", out, batch_size=2, workers=0, progress=False)
    monkeypatch.undo()
    message = str(err.value)
    assert "\n" not in message and str(out) in message and "disk is full after 4 new images" in message
    assert "the 4 images in the store are kept" in message and "the 6 left need about" in message
    assert "run the same command again to resume" in message
    assert sorted(IMAGE.open(out).ids()) == sorted(images)[:4]  # valid, the failed batch dropped
    again = extract_images(images, "tiny-clip", out, batch_size=2, progress=False)
    assert (again.skipped_existing, again.written) == (4, 6)
    clean = extract_images(images, "tiny-clip", tmp_path / "clean.h5", batch_size=2, progress=False)
    assert clean.written == 10
    a, b = values(out), values(tmp_path / "clean.h5")
    assert a.keys() == b.keys() == set(images)
    for img_id in a:
        np.testing.assert_array_equal(a[img_id], b[img_id])


def test_disk_full_in_a_folder_leaves_no_half_file(tmp_path, monkeypatch):
    """VALUE's npz folder: the video being written when the disk fills leaves no file and no temp file behind."""
    folder = tmp_path / "v"
    calls = []
    real = np.savez

    def filling(fh, **arrays):
        calls.append(1)
        if len(calls) > 2:
            fh.write(b"half a file")
            raise enospc()
        real(fh, **arrays)

    monkeypatch.setattr(np, "savez", filling)
    with VIDEO.writer(folder, "npz", (8,)) as writer:
        writer.add("a", np.zeros((3, 8), np.float16))
        writer.add("b", np.zeros((4, 8), np.float16))
        with pytest.raises(DiskFull, match="the 2 videos already in the store are kept"):
            writer.add("c", np.zeros((5, 8), np.float16))
    assert sorted(p.name for p in folder.iterdir()) == ["a.npz", "b.npz", "vlpet_attrs.json"]
    assert sorted(VIDEO.open(folder).ids()) == ["a", "b"]


def test_disk_full_when_the_writer_opens(tmp_path, monkeypatch):
    """No room even for the writer's reserve: one line before anything is written, the old store untouched."""
    from vlpet_cli.features import hdf5

    out = tmp_path / "f.h5"
    with IMAGE.writer(out, "packed", (4, 6)) as writer:
        writer.add(["x"], np.ones((1, 4, 6), np.float16))
    before = out.read_bytes()

    def no_room(*args, **kwargs):
        raise enospc()

    monkeypatch.setattr(hdf5.os, "posix_fallocate", no_room)
    with pytest.raises(DiskFull, match="the 1 images already in the store are kept"):
        IMAGE.writer(out, "packed", (4, 6))
    with pytest.raises(DiskFull, match="the 0 images already"):
        IMAGE.writer(tmp_path / "new.h5", "packed", (4, 6))
    assert out.read_bytes() == before and not (tmp_path / "new.h5").exists()


# ---- a full disk, for real: a small tmpfs ----------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 2.5 MiB tmpfs (needs root and a kernel that lets this process mount); skipped where that is not so."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2560k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def vlpet_cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([str(VLPET), *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["packed", "per-image"])
def test_installed_command_on_a_disk_that_fills(tmp_path, small_disk, layout):
    if not VLPET.exists():
        pytest.skip(f"no installed console script at {VLPET}")
    images = make_images(tmp_path / "imgs", 200)
    out = small_disk / ("f.h5" if layout == "packed" else "pi")
    args = ["extract-features", "--images", images, "--model", "tiny-clip", "--out", out, "--layout", layout,
            "--no-progress"]
    full = vlpet_cli(*args)
    assert full.returncode == 2, (full.returncode, full.stderr)  # was 139 (segmentation fault) for packed
    lines = full.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in full.stderr, full.stderr
    assert str(out) in lines[0] and "disk is full after" in lines[0] and "run the same command again" in lines[0]
    kept = IMAGE.open(out).ids()
    assert 0 < len(kept) < 200
    assert not [p for p in small_disk.rglob("*") if p.name.endswith(".tmp")]
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
    done = vlpet_cli(*args)
    assert done.returncode == 0, done.stderr
    assert sorted(IMAGE.open(out).ids()) == [f"img{i:03d}" for i in range(200)]
    assert f"{200 - len(kept)} written, {len(kept)} already there" in " ".join(done.stdout.split())


# ---- an output that cannot be written --------------------------------------------------------------------------
@pytest.fixture
def read_only(tmp_path):
    """A folder this process cannot write to: chmod for a normal user, a read-only tmpfs for root."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"root ignores permissions and cannot mount a read-only tmpfs here: {done.stderr.decode()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize("out", ["f.h5", "pi", "deeper/f.h5"])
def test_read_only_output_is_refused_before_the_model_loads(tmp_path, read_only, out):
    images = images_from(make_images(tmp_path / "imgs", 2))
    with pytest.raises(VlpetError) as err:  # a model that cannot load: the output is refused first
        extract_images(images, "someone/not-a-cached-clip", read_only / out, progress=False)
    message = str(err.value)
    assert "\n" not in message and f"{read_only / out}: cannot write the features there" in message
    assert "choose another --out" in message and str(read_only) in message
    assert not list(read_only.iterdir())


def test_read_only_output_through_the_command(tmp_path, read_only):
    from typer.testing import CliRunner

    from vlpet_cli.cli import app

    images = make_images(tmp_path / "imgs", 2)
    videos = tmp_path / "vids"
    videos.mkdir()
    (videos / "clip.mp4").write_bytes(b"not decoded: the output is refused first")
    for flag, folder, model in (("--images", images, "tiny-clip"), ("--videos", videos, "tiny-clip-proj")):
        result = CliRunner().invoke(app, ["extract-features", flag, str(folder), "--model", model,
                                          "--out", str(read_only / "out")])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "cannot write the features there" in lines[0], result.stderr
