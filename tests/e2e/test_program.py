"""The real `ftcli` program where a process matters: train, merge and export chained as a user runs them, the
stdout of `eval --json` as a script reads it, and a real full disk under a training process."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import run_cli

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


def test_train_merge_export_through_the_cli(cli, tiny_recipe, tiny_untied_model_dir, runs_dir, tmp_path):
    """End to end on the untied (tie_word_embeddings: false) tiny Llama: train, merge, then GGUF at the default
    quant (f16 from the recipe's export section) into --out."""
    trained = cli("train", tiny_recipe, "--set", f"model.path={tiny_untied_model_dir}", "--json")
    assert trained.exit_code == 0, trained
    merged = cli("merge", "tiny", "--json")
    assert merged.exit_code == 0, merged
    assert merged.json()["parity"]["merge"]["agreement"] == 1.0
    out = tmp_path / "gguf-out"
    exported = cli("export", "tiny", "--format", "gguf", "--out", out, "--json")
    assert exported.exit_code == 0, exported
    document = exported.json()
    assert document["quant"] == "f16" and document["check"]["parity"]["agreement"] == 1.0
    assert document["tied_embeddings"] is False and document["tensor_types"] == {"F16": 16, "F32": 5}
    assert (out / "tiny-f16.gguf").is_file() and os.stat(out / "tiny-f16.gguf").st_mode & 0o044 == 0o044
    recorded = json.loads((runs_dir / "tiny" / "run.json").read_text())
    assert recorded["merge"]["parity"]["saved"]["agreement"] == 1.0
    assert recorded["exports"]["gguf"]["path"] == str(out)
    assert not list(runs_dir.rglob(".tmp-*")) and not list(tmp_path.glob(".tmp-*"))
    shutil.rmtree(out)


def test_eval_json_is_exactly_one_document_whether_gates_pass_or_fail(cli, memorised):
    """Through the real program, as CI runs it: stdout parses whole as one JSON document in every outcome."""
    runs, name = memorised
    command = ("eval", name, "--runs-dir", runs, "--max-samples", "2", "--json")
    passing = cli(*command, "--fail-under", "loss=100")
    assert passing.exit_code == 0, passing
    document = json.loads(passing.stdout)  # raises unless stdout is exactly one document
    assert document["gates"] == {"passed": True, "source": "--fail-under", "checks": [
        {"metric": "loss", "value": document["metrics"]["loss"], "bar": 100.0, "direction": "max", "passed": True}]}
    failing = cli(*command, "--fail-under", "loss=0.0001", "--fail-under", "f1=0")
    assert failing.exit_code == 6, failing
    document = json.loads(failing.stdout)
    gates = document["gates"]
    assert gates["passed"] is False and gates["source"] == "--fail-under" and "error" not in document
    assert [(c["metric"], c["direction"], c["passed"]) for c in gates["checks"]] == [("loss", "max", False),
                                                                                      ("f1", "min", True)]
    error = [line for line in failing.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "failed its quality gates: loss" in error[0] and "f1" not in error[0]
    assert json.loads(Path(document["path"]).read_text())["gates"] == gates   # the saved result keeps them
    missing = cli("eval", "nope", "--runs-dir", runs, "--json")
    assert missing.exit_code == 5, missing
    assert json.loads(missing.stdout)["kind"] == "RunStateError"




def test_disk_full_during_training_keeps_the_last_checkpoint(tiny_recipe, tmp_path):
    root = tmp_path / "small-disk"
    with small_tmpfs(root, "48m") as mounted:
        if not mounted:
            pytest.skip("mounting a tmpfs needs root; the injected failure test below covers this path")
        runs = root / "runs"
        proc = subprocess.Popen(
            [sys.executable, "-m", "ftcli", "train", str(tiny_recipe), "--runs-dir", str(runs),
             "--set", "training.max_steps=300", "--set", "training.save_steps=2",
             "--set", "training.save_total_limit=1"],
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
