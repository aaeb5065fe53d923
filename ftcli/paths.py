"""Where ftcli keeps things on disk (the runs root and the cache), and whether a reference names a local path."""

from __future__ import annotations

import os
import re
from pathlib import Path

RUNS_DIR_ENV = "FTCLI_RUNS_DIR"
DEFAULT_RUNS_DIR = "runs"
CACHE_DIR_ENV = "FTCLI_CACHE_DIR"  # default ~/.cache/ftcli
BUILTIN_PREFIX = "builtin:"  # builtin:NAME, a model shipped as a package (ftcli.models.sources.BUILTINS)
HUB_PREFIX = "hf:"  # forces a hub id even where a folder of that name exists
# Names that mark a reference as a file: data files, GGUF models, chat templates, saved Arrow tables.
LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".gguf", ".jinja", ".txt", ".arrow")
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")  # NAME or ORG/NAME


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


def is_local_path(reference: str, base: str | Path | None = None) -> bool:
    """True when a model or data reference names a file or folder on this machine, False for a hub id (NAME,
    ORG/NAME, ORG/NAME:SPLIT for data) or a builtin:/hf: name.

    Local: spelled as a path (/, ./, ../, ~), named like a file (LOCAL_SUFFIXES), existing (relative to `base`,
    else to the working folder), or shaped like no hub id (a/b/c, .hidden, a name with spaces).
    """
    if reference.startswith((BUILTIN_PREFIX, HUB_PREFIX)):
        return False
    if reference.startswith(("/", "./", "../", "~")) or reference.lower().endswith(LOCAL_SUFFIXES):
        return True
    if (Path(base or ".") / reference).exists():
        return True
    return not HUB_ID.match(reference.partition(":")[0])
