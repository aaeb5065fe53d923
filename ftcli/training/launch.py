"""`ftcli train --nproc N`: relaunch the same training in N processes per node through torch.distributed.run."""

from __future__ import annotations

import os
import subprocess
import sys

# Options consumed by the launcher; the workers get every other argument unchanged.
LAUNCHER_OPTIONS = {"--nproc": True, "--nnodes": True, "--node-rank": True, "--master-addr": True,
                    "--master-port": True}


def worker_arguments(argv: list[str]) -> list[str]:
    """The ftcli arguments each worker runs: the user's command line without the launcher options."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in LAUNCHER_OPTIONS:
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


def launch_command(argv: list[str], *, nproc: int, nnodes: int, node_rank: int, master_addr: str,
                   master_port: int) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={nproc}", f"--nnodes={nnodes}", f"--node_rank={node_rank}",
        f"--master_addr={master_addr}", f"--master_port={master_port}",
        "-m", "ftcli", *worker_arguments(argv),
    ]


def launch_distributed(argv: list[str], *, nproc: int, nnodes: int, node_rank: int, master_addr: str,
                       master_port: int) -> int:
    """Run the workers and return their exit code (torchrun forwards SIGINT/SIGTERM to them)."""
    command = launch_command(argv[1:], nproc=nproc, nnodes=nnodes, node_rank=node_rank,
                             master_addr=master_addr, master_port=master_port)
    from ftcli.training.threads import worker_thread_environment

    env = {**os.environ, **worker_thread_environment(nproc)}
    try:
        return subprocess.call(command, env=env)
    except KeyboardInterrupt:
        return 130
