"""Atomic writes: all or nothing, no temp files left behind, a full disk reported clearly."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import leftovers

from ftcli import atomic
from ftcli.atomic import (
    DiskFullError,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_free_space,
    staged_dir,
)


def test_writes_land_whole_and_readable(tmp_path):
    atomic_write_text(tmp_path / "sub" / "a.txt", "héllo")
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    atomic_write_json(tmp_path / "c.json", {"x": [1, 2], "p": Path("/p")})
    assert (tmp_path / "sub" / "a.txt").read_text(encoding="utf-8") == "héllo"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": [1, 2], "p": "/p"}
    assert stat.S_IMODE((tmp_path / "b.bin").stat().st_mode) == 0o644  # mkstemp would leave 0600
    assert leftovers(tmp_path) == []


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "run.json"
    atomic_write_text(target, "old")

    def broken_replace(src, dst):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(atomic.os, "replace", broken_replace)
    with pytest.raises(OSError, match="I/O error"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert leftovers(tmp_path) == []


def test_disk_full_is_a_clear_error(tmp_path, monkeypatch):
    target = tmp_path / "big.bin"
    atomic_write_bytes(target, b"old")
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, fd, mode):
            self.handle = real_fdopen(fd, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fdopen", FullDisk)
    with pytest.raises(DiskFullError, match="no space left") as error:
        atomic_write_bytes(target, b"new" * 1000)
    assert error.value.exit_code == 4 and "previous output was left intact" in str(error.value)
    assert target.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_kill_during_write_leaves_old_content(tmp_path):
    target = tmp_path / "state.json"
    atomic_write_text(target, "old")
    # The child dies (SIGKILL, no cleanup) between writing the temp file and renaming it.
    code = (
        "import os, signal, sys\n"
        "from ftcli import atomic\n"
        "atomic.os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
        "atomic.atomic_write_text(sys.argv[1], 'new')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(target)])
    assert proc.returncode == -9
    assert target.read_text() == "old"  # a reader never sees a half-written file


def test_staged_dir_replaces_the_folder_in_one_step(tmp_path):
    target = tmp_path / "adapter"
    with staged_dir(target) as staging:
        (staging / "a.txt").write_text("v1")
        os.chmod(staging / "a.txt", 0o600)
        assert not target.exists()  # nothing visible until the block succeeds
    assert (target / "a.txt").read_text() == "v1"
    assert stat.S_IMODE((target / "a.txt").stat().st_mode) == 0o644
    with staged_dir(target) as staging:
        (staging / "b.txt").write_text("v2")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert leftovers(tmp_path) == []


def test_staged_dir_failure_keeps_the_old_folder(tmp_path):
    target = tmp_path / "merged"
    with staged_dir(target) as staging:
        (staging / "model.safetensors").write_text("good")
    with pytest.raises(RuntimeError):
        with staged_dir(target) as staging:
            (staging / "model.safetensors").write_text("half")
            raise RuntimeError("crash while saving")
    assert (target / "model.safetensors").read_text() == "good"
    assert leftovers(tmp_path) == []


def test_staged_dir_disk_full_from_any_library(tmp_path):
    class SafetensorError(Exception):  # safetensors' error is not an OSError
        pass

    with pytest.raises(DiskFullError):
        with staged_dir(tmp_path / "out"):
            raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_check_free_space(tmp_path):
    check_free_space(tmp_path / "not" / "yet" / "there", 0)
    with pytest.raises(DiskFullError, match="MiB needed"):
        check_free_space(tmp_path / "x", 2**62)


def test_staged_dir_keeps_an_entry_another_writer_finished_first(tmp_path):
    """Two ranks preparing the same cache entry: the second one's rename would meet a non-empty folder."""
    from ftcli.atomic import staged_dir

    target = tmp_path / "entry"
    with staged_dir(target, keep_existing=True) as staging:
        (staging / "data").write_text("mine")
        target.mkdir()                                  # the other process renamed its entry into place
        (target / "data").write_text("theirs")
    assert (target / "data").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]   # no staging folder left behind
    with staged_dir(tmp_path / "fresh", keep_existing=True) as staging:
        (staging / "data").write_text("mine")
    assert (tmp_path / "fresh" / "data").read_text() == "mine"
