"""Atomic writes of files and folders: stage beside the target, then rename into place."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ftcli.errors import NotAvailableError

STAGING_PREFIX = ".tmp-"


class DiskFullError(NotAvailableError):
    """The disk filled up while writing (exit 4); what was there before is left intact."""


def _readable(path: Path) -> None:
    # safetensors and mkstemp create 0600 files; outputs are meant to be shared.
    mode = 0o755 if path.is_dir() else 0o644
    os.chmod(path, mode)


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=STAGING_PREFIX + path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        _readable(Path(tmp))
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise_if_disk_full(exc, path)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def is_disk_full(exc: BaseException | None) -> bool:
    """True for any flavour of 'no space left' anywhere in the exception's chain (OSError, safetensors, torch)."""
    seen = 0
    while exc is not None and seen < 10:
        if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "No space left" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def raise_if_disk_full(exc: BaseException, path: Path) -> None:
    """Turn any flavour of 'no space left' (OSError or safetensors' own error) into one clear message."""
    if isinstance(exc, DiskFullError):
        raise exc
    if is_disk_full(exc):
        link, named = exc, None
        while link is not None and named is None:
            named = getattr(link, "filename", None)
            link = link.__cause__ or link.__context__
        where = f"{named} (in {path})" if named and str(named) != str(path) else str(path)
        raise DiskFullError(
            f"no space left on device while writing {where}",
            hint="free some space and run the command again; the previous output was left intact",
        ) from exc


@contextlib.contextmanager
def staged_dir(target: Path, *, keep_existing: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder beside `target`; on success it replaces `target` in one rename.

    On any failure the staging folder is removed and `target` keeps its previous content. With `keep_existing` (a
    cache entry named by its content), a `target` that another process wrote meanwhile is kept and the staging
    folder dropped: the first writer wins, and two writers never fail each other.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX + target.name + ".", dir=target.parent))
    try:
        yield staging
        for item in [staging, *staging.rglob("*")]:
            _readable(item)
        if keep_existing:
            try:
                if not target.exists():
                    os.replace(staging, target)
                    fsync_dir(target.parent)
            except OSError:
                if not target.exists():   # not another writer's entry: a real failure
                    raise
            shutil.rmtree(staging, ignore_errors=True)
            return
        old = None
        if target.exists():
            old = target.with_name(STAGING_PREFIX + target.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(staging, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        fsync_dir(target.parent)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise_if_disk_full(exc, target)
        raise


def remove_stale_staging(target: Path) -> None:
    """Clean up after a writer of `target` that was killed (kill -9 leaves its staging folder): put back a previous
    output caught mid-swap, remove half-written staging folders. Call only while holding the lock guarding target."""
    target = Path(target)
    old = target.with_name(STAGING_PREFIX + target.name + ".old")
    if old.exists() and not target.exists():
        os.replace(old, target)
    for leftover in target.parent.glob(STAGING_PREFIX + target.name + ".*"):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def check_free_space(path: Path, needed_bytes: int) -> None:
    path = Path(path)
    probe = path if path.exists() else path.parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise DiskFullError(
            f"not enough free space for {path}: {needed_bytes / 2**20:.0f} MiB needed, {free / 2**20:.0f} MiB free",
            hint="free some space or write elsewhere with --out",
        )
