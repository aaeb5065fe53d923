"""Faults during training: a full disk, and data or recipe errors that must never create a run."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli, write_jsonl
from ftcli.runs.checkpoints import scan_checkpoints


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(folder: Path) -> Path:
    """Write a file until the filesystem is full; return it so the test can free the space again."""
    filler = folder / "filler"
    with open(filler, "wb") as handle:
        with contextlib.suppress(OSError):
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
    with contextlib.suppress(OSError):
        with open(filler, "ab") as handle:  # the last few bytes too
            while True:
                handle.write(b"\0" * 512)
                handle.flush()
    return filler


def test_disk_full_during_training_keeps_the_last_checkpoint(tiny_recipe, tmp_path):
    root = tmp_path / "small-disk"
    with small_tmpfs(root, "48m") as mounted:
        if not mounted:
            pytest.skip("mounting a tmpfs needs root; the injected failure test below covers this path")
        runs = root / "runs"
        proc = subprocess.Popen(
            [sys.executable, "-m", "ftcli", "train", str(tiny_recipe), "--runs-dir", str(runs),
             "--set", "training.max_steps=300", "--set", "training.save_steps=2", "--set", "training.save_total_limit=1"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        marker = runs / "tiny" / "checkpoints" / "checkpoint-2" / "COMPLETE"
        deadline = time.time() + 300
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline
            time.sleep(0.02)
        filler = fill(root)
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 4, stderr
        assert "no space left on device" in stderr and str(runs / "tiny") in stderr
        assert "Traceback" not in stderr
        scan = scan_checkpoints(runs / "tiny" / "checkpoints")
        assert scan.newest_complete is not None
        newest = scan.newest_complete.name
        assert not list((runs / "tiny").rglob(".tmp-*"))

        filler.unlink()
        step = int(newest.split("-")[1])
        resumed = run_cli("train", tiny_recipe, "--runs-dir", runs, "--resume", "--set", "training.save_steps=2",
                          "--set", "training.save_total_limit=1", "--set", f"training.max_steps={step + 2}")
        assert resumed.exit_code == 0, resumed
        assert f"resuming from {newest}" in resumed.stderr
        assert json.loads((runs / "tiny" / "run.json").read_text())["status"] == "completed"


def test_injected_write_failure_names_the_path_and_exits_4(tiny_recipe, runs_dir, monkeypatch, cli_inproc):
    import errno

    from ftcli.runs import rundir as runs_module

    calls = {"n": 0}
    original = runs_module.RunDir.append_metrics

    def failing_append(self, record):
        calls["n"] += 1
        if calls["n"] >= 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.metrics_path))
        return original(self, record)

    monkeypatch.setattr(runs_module.RunDir, "append_metrics", failing_append)
    result = cli_inproc("train", tiny_recipe, "--set", "training.max_steps=6", "--set", "training.save_steps=2")
    assert result.exit_code == 4, result.output
    assert "no space left on device" in result.output and "metrics.jsonl" in result.output
    info = json.loads((runs_dir / "tiny" / "run.json").read_text())
    assert info["status"] == "failed" and "No space left" in info["error"]
    assert scan_checkpoints(runs_dir / "tiny" / "checkpoints").newest_complete is not None


@pytest.mark.parametrize("case", ["broken_line", "missing_column", "bad_recipe_value"])
def test_data_and_recipe_errors_never_create_a_run(case, tiny_recipe, runs_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    extra: list[str] = []
    if case == "broken_line":
        bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                       '{"messages": [\n')
        extra = ["--set", f"data.train={bad}"]
        expected = 3
    elif case == "missing_column":
        write_jsonl(bad, [{"text": "hello"}])
        extra = ["--set", f"data.train={bad}"]
        expected = 3
    else:
        extra = ["--set", "training.batch_size=0"]
        expected = 2
    result = run_cli("train", tiny_recipe, *extra)
    assert result.exit_code == expected, result
    if case == "broken_line":
        assert f"{bad}:2" in result.stderr or ("line 2" in result.stderr and str(bad) in result.stderr)
    assert not (runs_dir / "tiny").exists()


class _Payload:
    """Unpickling this creates a file: the proof that a pickle ran code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_only_adapter_is_refused_and_never_unpickled(tiny_recipe, runs_dir, tmp_path):
    import pickle

    assert run_cli("train", tiny_recipe, "--set", "training.max_steps=1").exit_code == 0
    adapter = runs_dir / "tiny" / "adapter"
    (adapter / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pwned"
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps({"weights": _Payload(str(marker))}))
    for command in (["eval"], ["merge"], ["export", "--format", "adapter"], ["generate", "--prompt", "hi"]):
        result = run_cli(command[0], "tiny", *command[1:])
        assert result.exit_code == 4, (command, result)
        assert "pickle" in result.stderr and "adapter_model.bin" in result.stderr
        assert not marker.exists()
