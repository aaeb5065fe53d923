"""Content hashes of files and folders, read in blocks so that no file has to fit in memory."""

from __future__ import annotations

import hashlib
from pathlib import Path

BLOCK_BYTES = 1 << 20


def update_with_file(digest, path: Path) -> None:
    """Feed the bytes of the file at `path` into `digest` (a hashlib object), a block at a time."""
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(BLOCK_BYTES), b""):
            digest.update(block)


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    update_with_file(digest, path)
    return digest.hexdigest()


def sha256_folder(path: Path) -> str:
    """sha256 of every file under `path`, in sorted order, each as its relative name, a NUL byte and its bytes."""
    path = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + b"\0")
        update_with_file(digest, file)
    return digest.hexdigest()
