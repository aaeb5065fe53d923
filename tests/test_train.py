"""`ftcli train` end to end through the real CLI on a tiny model: every method, resume, interrupts, refusals."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli

METHOD_SETTINGS = {
    "lora": [],
    "dora": [],
    "qlora": [],
    "prefix": ["--set", "method={kind: prefix, num_virtual_tokens: 4}", "--set", "training.lr=0.1"],
    "prompt": ["--set", "method={kind: prompt, num_virtual_tokens: 4, init_text: Answer}", "--set", "training.lr=0.1"],
    "ia3": ["--set", "method={kind: ia3}", "--set", "training.lr=5e-2"],
}


def metrics(run_path: Path) -> list[dict]:
    return [json.loads(line) for line in (run_path / "metrics.jsonl").read_text().splitlines()]


def losses(run_path: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_path) if "loss" in m}


@pytest.mark.parametrize("method", list(METHOD_SETTINGS))
def test_each_method_trains_and_saves_a_loadable_adapter(method, tiny_recipe, runs_dir, tiny_model_dir):
    extra = METHOD_SETTINGS[method]
    if method in ("lora", "dora", "qlora"):
        extra = ["--set", f"method.kind={method}", "--set", "method={r: 8, alpha: 16, dropout: 0.0}"]
    # One batch holds the whole memorisable set, so the curve is smooth and falls if anything is learned.
    result = run_cli("train", tiny_recipe, "--name", method, "--set", "training.max_steps=10",
                     "--set", "training.batch_size=16", "--set", "training.save_steps=100", *extra, "--json")
    assert result.exit_code == 0, result
    summary = result.json()
    assert summary["status"] == "completed"
    run_path = Path(summary["path"])
    info = json.loads((run_path / "run.json").read_text())
    assert info["status"] == "completed" and info["method"] == method
    assert info["parameters"]["trainable"] > 0 and info["parameters"]["total"] > info["parameters"]["trainable"]
    curve = losses(run_path)
    assert len(curve) == 10
    first, last = curve[1], curve[10]
    assert last < first - 0.03, f"{method}: loss did not fall ({first} -> {last})"
    assert (run_path / "loss.png").stat().st_size > 1000
    assert (run_path / "adapter" / "chat_template.jinja").read_text().startswith("{%") or \
        "im_start" in (run_path / "adapter" / "chat_template.jinja").read_text()

    from peft import PeftConfig, PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    if method in ("lora", "dora", "qlora"):  # README: qlora trains bf16 LoRA weights (TRL), the others fp32
        dtypes = {str(t.dtype) for k, t in load_file(run_path / "adapter" / "adapter_model.safetensors").items()
                  if "lora_A" in k or "lora_B" in k}
        assert dtypes == {"torch.bfloat16" if method == "qlora" else "torch.float32"}, dtypes
    config = PeftConfig.from_pretrained(run_path / "adapter")
    assert config.peft_type.value.lower().startswith({"lora": "lora", "dora": "lora", "qlora": "lora",
                                                      "prefix": "prefix", "prompt": "prompt", "ia3": "ia3"}[method])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, run_path / "adapter")
    assert sum(p.numel() for n, p in model.named_parameters() if "lora" in n or "prompt" in n or "ia3" in n) > 0


def test_wrong_target_module_stops_before_training(tiny_recipe, runs_dir):
    result = run_cli("train", tiny_recipe, "--set", "method.target_modules=[q_proj, qkv_proj]")
    assert result.exit_code == 2, result
    assert "qkv_proj" in result.stderr and "q_proj" in result.stderr and "down_proj" in result.stderr
    assert not (runs_dir / "tiny").exists()


def test_existing_run_is_refused_and_resume_checks_the_recipe(tiny_recipe, runs_dir):
    assert run_cli("train", tiny_recipe, "--set", "training.max_steps=2").exit_code == 0
    again = run_cli("train", tiny_recipe)
    assert again.exit_code == 5 and "--resume" in again.stderr and "--overwrite" in again.stderr
    changed = run_cli("train", tiny_recipe, "--resume", "--set", "training.lr=1e-2", "--set", "training.max_steps=4")
    assert changed.exit_code == 5, changed
    assert "training.lr" in changed.stderr
    extended = run_cli("train", tiny_recipe, "--resume", "--set", "training.max_steps=4", "--json")
    assert extended.exit_code == 0, extended
    assert json.loads((runs_dir / "tiny" / "run.json").read_text())["step"] == 4


def test_resume_with_more_steps_trains_its_first_step_at_the_new_schedule_lr(tiny_recipe, runs_dir):
    # 4 steps of linear decay end at lr 0, and the checkpoint's optimizer state says so; the resumed run's schedule
    # runs to 6 steps, so step 5 must train at its lr (2/6 of the peak), not at the stale 0.
    from safetensors.torch import load_file

    linear = ["--set", "training.scheduler=linear", "--set", "training.warmup_steps=0",
              "--set", "training.save_steps=4"]
    assert run_cli("train", tiny_recipe, *linear).exit_code == 0
    adapter_file = runs_dir / "tiny" / "adapter" / "adapter_model.safetensors"
    after_four = load_file(adapter_file)
    resumed = run_cli("train", tiny_recipe, "--resume", *linear, "--set", "training.max_steps=5")
    assert resumed.exit_code == 0, resumed
    assert "resuming from checkpoint-4" in resumed.stderr
    after_five = load_file(adapter_file)
    moved = max(float((after_five[key] - after_four[key]).abs().max()) for key in after_four)
    assert moved > 1e-4, "the first resumed step did not change the adapter: it trained at the stale lr 0"


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
    settings = ["--set", "training.max_steps=16", "--set", "training.save_steps=4", "--set", "training.scheduler=linear"]
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


def test_sigint_saves_a_checkpoint_and_exits_130(tiny_recipe, runs_dir, tiny_model_dir):
    proc = _start(tiny_recipe, "--set", "training.max_steps=200", "--set", "training.save_steps=2")
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
                      "training.save_steps=2", "--set", f"training.max_steps={step + 2}")
    assert resumed.exit_code == 0, resumed


def test_incomplete_newest_checkpoint_is_skipped_on_resume(tiny_recipe, runs_dir):
    settings = ["--set", "training.max_steps=6", "--set", "training.save_steps=2", "--set", "training.save_total_limit=5"]
    assert run_cli("train", tiny_recipe, *settings).exit_code == 0
    checkpoints = runs_dir / "tiny" / "checkpoints"
    # Truncate the optimizer of the newest checkpoint, as a disk-full or kill -9 mid-save would.
    newest = checkpoints / "checkpoint-6"
    (newest / "optimizer.pt").write_bytes((newest / "optimizer.pt").read_bytes()[:100])
    resumed = run_cli("train", tiny_recipe, "--resume", *settings[2:], "--set", "training.max_steps=8")
    assert resumed.exit_code == 0, resumed
    assert "skipping checkpoint checkpoint-6" in resumed.stderr and "optimizer.pt" in resumed.stderr
    assert "resuming from checkpoint-4" in resumed.stderr


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


def test_recipe_trust_remote_code_needs_the_flag(tiny_recipe, runs_dir):
    result = run_cli("train", tiny_recipe, "--set", "model.trust_remote_code=true")
    assert result.exit_code == 2 and "--trust-remote-code" in result.stderr
    assert not runs_dir.exists() or not any(runs_dir.iterdir())


def test_second_sigint_exits_at_once_leaving_nothing_half_written(tiny_recipe, runs_dir):
    proc = _start(tiny_recipe, "--set", "training.max_steps=400", "--set", "training.save_steps=3")
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


def test_eval_during_training_with_early_stopping(tiny_recipe, runs_dir, chat_data):
    result = run_cli("train", tiny_recipe, "--set", f"data.eval={chat_data}", "--set", "training.eval_steps=2",
                     "--set", "training.save_steps=2", "--set", "training.early_stopping_patience=2",
                     "--set", "training.max_steps=6", "--json")
    assert result.exit_code == 0, result
    rows = metrics(runs_dir / "tiny")
    eval_steps = sorted({m["step"] for m in rows if "eval_loss" in m})
    assert eval_steps[:3] == [2, 4, 6]
    info = json.loads((runs_dir / "tiny" / "run.json").read_text())
    assert info["metrics"]["eval_loss"] > 0 and info["data"]["eval"]["examples"] == 16


def test_early_stopping_needs_aligned_save_steps(tiny_recipe, runs_dir, chat_data):
    result = run_cli("train", tiny_recipe, "--set", f"data.eval={chat_data}", "--set", "training.eval_steps=2",
                     "--set", "training.save_steps=3", "--set", "training.early_stopping_patience=2")
    assert result.exit_code == 2 and "multiple of" in result.stderr
    assert not (runs_dir / "tiny").exists()


@pytest.mark.parametrize("packing", [False, True])
def test_metrics_count_every_real_token_once(packing, tiny_recipe, runs_dir):
    """After one epoch, num_tokens is the data's token count: padding never counts, packed rows count in full."""
    result = run_cli("train", tiny_recipe, "--name", f"count-{packing}", "--set", "training.max_steps=null",
                     "--set", "training.epochs=1", "--set", f"data.packing={str(packing).lower()}", "--set", "data.max_length=256", "--json")
    assert result.exit_code == 0, result
    run_path = Path(result.json()["path"])
    info = json.loads((run_path / "run.json").read_text())
    train_report = info["data"]["train"]
    assert (train_report["rows"] < train_report["examples"]) == packing
    logged = [m for m in metrics(run_path) if "loss" in m]
    assert logged[-1]["num_tokens"] == train_report["total_tokens"]
    assert all(m["tokens_per_second"] > 0 for m in logged[1:])


def test_completion_line_prints_the_path_verbatim(tiny_recipe, tmp_path):
    # rich would turn :ok: in the runs path into an emoji; the line scripts read must carry the real path.
    runs = tmp_path / "a:ok:b"
    result = run_cli("train", tiny_recipe, "--runs-dir", runs, "--set", "training.max_steps=1")
    assert result.exit_code == 0, result
    assert result.stdout == f"run tiny completed: {runs / 'tiny'}\n"
