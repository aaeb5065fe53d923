"""Compute threads per training process: physical cores within the affinity mask and a container's quota, shared
among the processes of a machine, and the user's OMP_NUM_THREADS taken as it is."""

from __future__ import annotations

import pytest

from ftcli.training import threads


def _fake_sysfs(root, topology: dict[int, tuple[int, int]]):
    for cpu, (package, core) in topology.items():
        folder = root / f"cpu{cpu}" / "topology"
        folder.mkdir(parents=True)
        (folder / "physical_package_id").write_text(f"{package}\n")
        (folder / "core_id").write_text(f"{core}\n")
    return root


def test_hyperthread_siblings_count_as_one_core(tmp_path):
    # 2 sockets x 2 cores x 2 threads; the same core_id on another socket is another core
    sysfs = _fake_sysfs(tmp_path, {0: (0, 0), 1: (0, 1), 2: (1, 0), 3: (1, 1),
                                   4: (0, 0), 5: (0, 1), 6: (1, 0), 7: (1, 1)})
    assert threads.physical_cores(set(range(8)), sysfs) == 4
    assert threads.physical_cores({0, 4}, sysfs) == 1          # a process pinned to one core's two threads
    assert threads.physical_cores({0, 1, 9}, sysfs) == 3       # unreadable topology: logical CPUs


def test_container_quota(tmp_path):
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")
    assert threads.cpu_quota(cpu_max) is None
    cpu_max.write_text("150000 100000\n")
    assert threads.cpu_quota(cpu_max) == 2                      # 1.5 CPUs: rounded up
    assert threads.cpu_quota(tmp_path / "missing") is None


def test_threads_are_shared_among_local_processes():
    assert threads.threads_per_process(1, cores=8) == 8
    assert threads.threads_per_process(2, cores=8) == 4
    assert threads.threads_per_process(3, cores=2) == 1         # never zero


def test_the_user_setting_wins_and_the_choice_is_recorded(monkeypatch):
    import torch

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.delenv(threads.CHOSEN_BY_LAUNCHER_ENV, raising=False)
        monkeypatch.setattr(threads, "usable_cores", lambda: 1)
        chosen = threads.set_training_threads(1)
        assert chosen == {"threads": 1, "source": "physical cores / processes on this machine (1)"}
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert threads.set_training_threads(1)["source"] == "OMP_NUM_THREADS"
        assert threads.worker_thread_environment(2) == {}       # the launcher passes the user's setting on
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert threads.worker_thread_environment(1) == {"OMP_NUM_THREADS": "1", threads.CHOSEN_BY_LAUNCHER_ENV: "1"}
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_getaffinity"), reason="no CPU affinity on this OS")
def test_usable_cores_on_this_machine():
    import os

    assert 1 <= threads.usable_cores() <= len(os.sched_getaffinity(0))
