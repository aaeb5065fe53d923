"""How many CPU threads each training process computes with: the physical cores this process may use (CPU affinity,
container CPU quota), shared among the processes of this machine."""

from __future__ import annotations

import math
import os
from pathlib import Path

THREADS_ENV = "OMP_NUM_THREADS"   # set by the user: taken as it is
CHOSEN_BY_LAUNCHER_ENV = "FTCLI_THREADS_CHOSEN"   # the launcher set OMP_NUM_THREADS from threads_per_process
CPU_SYSFS = Path("/sys/devices/system/cpu")
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def physical_cores(cpus: set[int], sysfs: Path = CPU_SYSFS) -> int:
    """Distinct physical cores among the logical CPUs `cpus` (SMT siblings count once); len(cpus) where the topology
    can't be read."""
    cores = set()
    for cpu in cpus:
        topology = sysfs / f"cpu{cpu}" / "topology"
        try:
            cores.add((topology.joinpath("physical_package_id").read_text().strip(),
                       topology.joinpath("core_id").read_text().strip()))
        except OSError:
            return len(cpus)
    return len(cores) or len(cpus)


def cpu_quota(cpu_max: Path = CGROUP_CPU_MAX) -> int | None:
    """CPUs a container's CFS quota allows (cgroup v2 `cpu.max`, rounded up), or None without a quota."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, math.ceil(int(quota) / int(period)))


def usable_cores() -> int:
    """Physical cores this process may run on: its affinity mask, capped by a container's CPU quota."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = physical_cores(cpus)
    quota = cpu_quota()
    return min(cores, quota) if quota else cores


def threads_per_process(local_processes: int, cores: int | None = None) -> int:
    """Compute threads for each of `local_processes` processes on this machine: one per physical core, no more
    (hyper-threads and oversubscribed cores slow matmuls down while OpenMP threads wait for each other)."""
    cores = usable_cores() if cores is None else cores
    return max(1, cores // max(1, local_processes))


def set_training_threads(local_processes: int) -> dict:
    """Give torch the threads of threads_per_process unless the environment chose (OMP_NUM_THREADS); what run.json
    records: the count and where it came from."""
    import torch

    chosen = f"physical cores / processes on this machine ({local_processes})"
    if os.environ.get(THREADS_ENV):
        return {"threads": torch.get_num_threads(),
                "source": chosen if os.environ.get(CHOSEN_BY_LAUNCHER_ENV) else THREADS_ENV}
    threads = threads_per_process(local_processes)
    torch.set_num_threads(threads)
    return {"threads": threads, "source": chosen}


def worker_thread_environment(local_processes: int) -> dict[str, str]:
    """The thread settings the launcher gives its workers (torchrun would give each one thread otherwise)."""
    if os.environ.get(THREADS_ENV):
        return {}
    return {THREADS_ENV: str(threads_per_process(local_processes)), CHOSEN_BY_LAUNCHER_ENV: "1"}
