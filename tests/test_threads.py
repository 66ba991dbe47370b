"""The CPU thread count every command sets (vlpet_cli/threads.py): from the CPUs the process may use (affinity
mask, cgroup v2 or v1 quota), the model's size and the processes on the machine; train.threads and VLPET_THREADS
override it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlpet_cli import threads
from vlpet_cli.errors import VlpetError
from vlpet_cli.threads import TINY_PARAMETERS, cgroup_quota, choose_threads, configure_threads, usable_cpus

BIG = 140_000_000  # bart-base's size


@pytest.fixture(autouse=True)
def machine(monkeypatch, tmp_path):
    """An 8-CPU affinity mask, no cgroup quota, one process, no overrides; torch's count restored afterwards."""
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    for name in (threads.ENV, *threads.LOCAL_SIZE_VARS):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads, "CGROUP_ROOT", tmp_path / "nothing")
    monkeypatch.setattr(threads, "SELF_CGROUP", tmp_path / "no-proc")
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def cgroup(tmp_path: Path, files: dict[str, str], self_cgroup: str = "0::/\n") -> tuple[Path, Path]:
    """A fake /sys/fs/cgroup holding `files` and a fake /proc/self/cgroup."""
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(self_cgroup)
    return root, proc


def test_without_a_quota_the_affinity_mask_counts():
    assert usable_cpus() == (8, "8 CPUs usable")
    assert choose_threads(BIG).count == 8


def test_a_cgroup_v2_quota_caps_the_affinity_rounding_down(tmp_path):
    root, proc = cgroup(tmp_path, {"cpu.max": "250000 100000\n"})
    assert cgroup_quota(root, proc) == 2.5
    chosen = choose_threads(BIG, root=root, self_cgroup=proc)
    assert chosen.count == 2 and "cgroup CPU quota of 2.5" in str(chosen)


def test_the_tightest_quota_of_the_own_cgroup_and_its_ancestors_counts(tmp_path):
    root, proc = cgroup(tmp_path, {"cpu.max": "max 100000\n", "jobs/cpu.max": "300000 100000\n",
                                   "jobs/mine/cpu.max": "max 100000\n", "other/cpu.max": "100000 100000\n"},
                        self_cgroup="0::/jobs/mine\n")
    assert cgroup_quota(root, proc) == 3.0
    assert choose_threads(BIG, root=root, self_cgroup=proc).count == 3


def test_a_cgroup_v1_quota_counts_and_minus_one_means_none(tmp_path):
    root, proc = cgroup(tmp_path, {"cpu,cpuacct/cpu.cfs_quota_us": "150000\n",
                                   "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
                        self_cgroup="4:memory:/x\n2:cpu,cpuacct:/\n")
    assert cgroup_quota(root, proc) == 1.5
    assert choose_threads(BIG, root=root, self_cgroup=proc).count == 1
    (root / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_quota(root, proc) is None
    assert choose_threads(BIG, root=root, self_cgroup=proc).count == 8


def test_a_quota_above_the_affinity_mask_leaves_the_mask(tmp_path, monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    root, proc = cgroup(tmp_path, {"cpu.max": "400000 100000\n"})
    assert choose_threads(BIG, root=root, self_cgroup=proc).count == 2


def test_a_tiny_model_computes_on_one_thread():
    chosen = choose_threads(TINY_PARAMETERS - 1)
    assert chosen.count == 1 and "tiny model" in chosen.why
    assert choose_threads(TINY_PARAMETERS).count == 8
    assert choose_threads(None).count == 8  # size unknown: the CPUs decide


@pytest.mark.parametrize("local, expected", [("1", 8), ("2", 4), ("3", 2), ("16", 1)])
def test_processes_on_the_machine_share_the_cpus(monkeypatch, local, expected):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", local)  # as `accelerate launch` / torchrun set it in each process
    chosen = choose_threads(BIG)
    assert chosen.count == expected
    if local != "1":
        assert f"shared by {local} processes" in chosen.why


def test_mpi_local_size_counts_too(monkeypatch):
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "4")
    assert choose_threads(BIG).count == 2


def test_vlpet_threads_and_train_threads_override(monkeypatch):
    monkeypatch.setenv("VLPET_THREADS", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert str(choose_threads(TINY_PARAMETERS - 1)) == "3 CPU threads (VLPET_THREADS)"
    assert str(choose_threads(BIG, preset_threads=5)) == "5 CPU threads (train.threads)"


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_an_unusable_vlpet_threads_is_refused(monkeypatch, value):
    monkeypatch.setenv("VLPET_THREADS", value)
    with pytest.raises(VlpetError, match=f"VLPET_THREADS='{value}'.*at least 1"):
        choose_threads(BIG)


def test_omp_num_threads_does_not_decide(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # accelerate launch sets it in every process on its own
    assert choose_threads(BIG).count == 8


def test_configure_sets_torch_from_the_model_size():
    model = torch.nn.Linear(10, 10)
    chosen = configure_threads(model)
    assert chosen.count == 1 and torch.get_num_threads() == 1
    assert configure_threads(BIG).count == 8 and torch.get_num_threads() == 8


def test_extract_features_computes_on_the_chosen_count(tmp_path, monkeypatch):
    from vlpet_cli import extract

    seen = {}
    monkeypatch.setenv("VLPET_THREADS", "3")
    from vlpet_cli.features.extract import images

    monkeypatch.setattr(images, "extract", lambda *a, **k: seen.update(threads=torch.get_num_threads()))
    monkeypatch.setattr(extract, "images_from", lambda *a: {})
    extract.extract(tmp_path, "tiny-clip", tmp_path / "f.h5", workers=0)
    assert seen == {"threads": 3}
