"""Faults during training, in-process: an injected write failure, data or recipe errors that must never create a
run, pickled adapters. A real full disk under a real process is in e2e/test_program.py."""

from __future__ import annotations

import json

import pytest
from helpers import run_inproc, write_jsonl

from ftcli.runs.checkpoints import scan_checkpoints


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
    result = run_inproc("train", tiny_recipe, *extra)
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

    assert run_inproc("train", tiny_recipe, "--set", "training.max_steps=1").exit_code == 0
    adapter = runs_dir / "tiny" / "adapter"
    (adapter / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pwned"
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps({"weights": _Payload(str(marker))}))
    for command in (["eval"], ["merge"], ["export", "--format", "adapter"], ["generate", "--prompt", "hi"]):
        result = run_inproc(command[0], "tiny", *command[1:])
        assert result.exit_code == 4, (command, result)
        assert "pickle" in result.stderr and "adapter_model.bin" in result.stderr
        assert not marker.exists()
