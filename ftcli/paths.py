"""Where ftcli keeps things on disk: the runs root and the cache, each from its flag or environment variable."""

from __future__ import annotations

import os
from pathlib import Path

RUNS_DIR_ENV = "FTCLI_RUNS_DIR"
DEFAULT_RUNS_DIR = "runs"
CACHE_DIR_ENV = "FTCLI_CACHE_DIR"  # default ~/.cache/ftcli


def runs_root(cli_value: str | Path | None = None) -> Path:
    """The runs root: --runs-dir, else $FTCLI_RUNS_DIR, else ./runs, as an absolute path.

    A root that is a symlink (say runs -> /scratch/runs) is followed on purpose: it is resolved once, here, and
    every run path is built from and checked against the resolved target. A run folder that is itself a symlink
    leading out of the root is refused (see ftcli.runs.rundir.RunDir).
    """
    raw = cli_value or os.environ.get(RUNS_DIR_ENV) or DEFAULT_RUNS_DIR
    return Path(raw).expanduser().resolve()


def cache_dir() -> Path:
    """$FTCLI_CACHE_DIR, else ~/.cache/ftcli (builtin conversions, tokenized data)."""
    value = os.environ.get(CACHE_DIR_ENV)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "ftcli"
