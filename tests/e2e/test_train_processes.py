"""`ftcli train` as a real process: kill -9 then resume, SIGINT (once and twice), a second process on the same run,
and the completion line the program prints."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import losses, run_cli, write_jsonl


def _start(recipe: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ftcli", "train", str(recipe), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training ended before {path} appeared: {proc.communicate()}")
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_kill_9_then_resume_reaches_the_same_losses(tiny_recipe, runs_dir):
    settings = ["--set", "training.max_steps=16", "--set", "training.save_steps=4",
                "--set", "training.scheduler=linear"]
    reference = run_cli("train", tiny_recipe, "--name", "straight", *settings)
    assert reference.exit_code == 0, reference

    proc = _start(tiny_recipe, "--name", "killed", *settings)
    _wait_for(runs_dir / "killed" / "checkpoints" / "checkpoint-4" / "COMPLETE", proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    info = json.loads((runs_dir / "killed" / "run.json").read_text())
    assert info["status"] == "running"  # what kill -9 leaves; resume takes it from here

    resumed = run_cli("train", tiny_recipe, "--name", "killed", "--resume", *settings)
    assert resumed.exit_code == 0, resumed
    assert "resuming from checkpoint-" in resumed.stderr
    straight, killed = losses(runs_dir / "straight"), losses(runs_dir / "killed")
    assert killed[16] == pytest.approx(straight[16], rel=1e-4, abs=1e-5)
    for step in range(9, 17):
        assert killed[step] == pytest.approx(straight[step], rel=1e-4, abs=1e-5), step


@pytest.mark.parametrize("objective", ["sft", "dpo", "grpo"])
def test_sigint_saves_a_checkpoint_and_exits_130(tiny_recipe, runs_dir, tiny_model_dir, tmp_path, objective):
    extra = []
    if objective == "dpo":   # the same graceful stop through TRL's DPOTrainer
        pairs = [{"prompt": f"Say {w}", "chosen": w, "rejected": f"{w} {w} no"} for w in ("red", "blue", "sun")] * 4
        data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
        extra = ["--set", "objective=dpo", "--set", "data.format=preference", "--set", f"data.train={data}"]
    if objective == "grpo":   # and through GRPOTrainer, between its sampling and its updates
        prompts = [{"prompt": f"Say {w}", "reference": w} for w in ("red", "blue", "sun")] * 4
        data = write_jsonl(tmp_path / "prompts.jsonl", prompts)
        extra = ["--set", "objective={kind: grpo, num_generations: 2, max_completion_length: 8, rewards: "
                 "[{kind: exact_match}]}", "--set", "data.format=prompt", "--set", f"data.train={data}"]
    proc = _start(tiny_recipe, "--set", "training.max_steps=200", "--set", "training.save_steps=2", *extra)
    _wait_for(runs_dir / "tiny" / "checkpoints" / "checkpoint-2" / "COMPLETE", proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr
    info = json.loads((runs_dir / "tiny" / "run.json").read_text())
    assert info["status"] == "interrupted"
    from ftcli.runs.checkpoints import scan_checkpoints

    scan = scan_checkpoints(runs_dir / "tiny" / "checkpoints")
    assert scan.newest_complete is not None and scan.skipped == []
    step = int(scan.newest_complete.name.split("-")[1])
    assert step == info["step"] and step < 200

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), scan.newest_complete)
    resumed = run_cli("train", tiny_recipe, "--resume", "--set", "training.max_steps=200", "--set",
                      "training.save_steps=2", "--set", f"training.max_steps={step + 2}", *extra)
    assert resumed.exit_code == 0, resumed


def test_second_process_on_the_same_run_exits_5_naming_the_pid(tiny_recipe, runs_dir):
    proc = _start(tiny_recipe, "--set", "training.max_steps=400", "--set", "training.save_steps=1000")
    try:
        _wait_for(runs_dir / "tiny" / "metrics.jsonl", proc)
        second = run_cli("train", tiny_recipe, "--resume", "--set", "training.max_steps=400",
                         "--set", "training.save_steps=1000")
        assert second.exit_code == 5, second
        assert f"pid {proc.pid}" in second.stderr
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()


def test_second_sigint_exits_at_once_leaving_nothing_half_written(tiny_recipe, runs_dir):
    # Long steps (50 micro-batches each): the first SIGINT stops only at the end of the step, so the second lands
    # while it still runs, whatever the CPU's speed (a tiny step could finish the whole graceful stop in between).
    proc = _start(tiny_recipe, "--set", "training.max_steps=400", "--set", "training.save_steps=3",
                  "--set", "training.grad_accum=50")
    _wait_for(runs_dir / "tiny" / "checkpoints" / "checkpoint-3" / "COMPLETE", proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    info = json.loads((runs_dir / "tiny" / "run.json").read_text())
    assert info["status"] == "interrupted" and "twice" in info["error"]
    from ftcli.runs.checkpoints import scan_checkpoints

    scan = scan_checkpoints(runs_dir / "tiny" / "checkpoints")
    assert scan.newest_complete is not None and scan.skipped == []
    assert not list((runs_dir / "tiny").rglob(".tmp-*"))


def test_completion_line_prints_the_path_verbatim(tiny_recipe, tmp_path):
    # rich would turn :ok: in the runs path into an emoji; the line scripts read must carry the real path.
    runs = tmp_path / "a:ok:b"
    result = run_cli("train", tiny_recipe, "--runs-dir", runs, "--set", "training.max_steps=1")
    assert result.exit_code == 0, result
    assert result.stdout == f"run tiny completed: {runs / 'tiny'}\n"
