"""`ftcli train` through the CLI app in this process on a tiny model: every method, resume, refusals. What needs a
real process (signals, kill -9, a second process on the run, the program's own stdout) is in
e2e/test_train_processes.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import METHOD_SETTINGS, losses, metrics, run_inproc


@pytest.mark.parametrize("method", list(METHOD_SETTINGS))
def test_each_method_trains_and_saves_a_loadable_adapter(method, tiny_recipe, runs_dir, tiny_model_dir):
    extra = METHOD_SETTINGS[method]
    if method in ("lora", "dora", "qlora"):
        extra = ["--set", f"method.kind={method}", "--set", "method={r: 8, alpha: 16, dropout: 0.0}"]
    # One batch holds the whole memorisable set, so the curve is smooth and falls if anything is learned.
    result = run_inproc("train", tiny_recipe, "--name", method, "--set", "training.max_steps=10",
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
    result = run_inproc("train", tiny_recipe, "--set", "method.target_modules=[q_proj, qkv_proj]")
    assert result.exit_code == 2, result
    assert "qkv_proj" in result.stderr and "q_proj" in result.stderr and "down_proj" in result.stderr
    assert not (runs_dir / "tiny").exists()


def test_existing_run_is_refused_and_resume_checks_the_recipe(tiny_recipe, runs_dir):
    assert run_inproc("train", tiny_recipe, "--set", "training.max_steps=2").exit_code == 0
    again = run_inproc("train", tiny_recipe)
    assert again.exit_code == 5 and "--resume" in again.stderr and "--overwrite" in again.stderr
    changed = run_inproc("train", tiny_recipe, "--resume", "--set", "training.lr=1e-2", "--set", "training.max_steps=4")
    assert changed.exit_code == 5, changed
    assert "training.lr" in changed.stderr
    extended = run_inproc("train", tiny_recipe, "--resume", "--set", "training.max_steps=4", "--json")
    assert extended.exit_code == 0, extended
    assert json.loads((runs_dir / "tiny" / "run.json").read_text())["step"] == 4


def test_resume_with_more_steps_trains_its_first_step_at_the_new_schedule_lr(tiny_recipe, runs_dir):
    # 4 steps of linear decay end at lr 0, and the checkpoint's optimizer state says so; the resumed run's schedule
    # runs to 6 steps, so step 5 must train at its lr (2/6 of the peak), not at the stale 0.
    from safetensors.torch import load_file

    linear = ["--set", "training.scheduler=linear", "--set", "training.warmup_steps=0",
              "--set", "training.save_steps=4"]
    assert run_inproc("train", tiny_recipe, *linear).exit_code == 0
    adapter_file = runs_dir / "tiny" / "adapter" / "adapter_model.safetensors"
    after_four = load_file(adapter_file)
    resumed = run_inproc("train", tiny_recipe, "--resume", *linear, "--set", "training.max_steps=5")
    assert resumed.exit_code == 0, resumed
    assert "resuming from checkpoint-4" in resumed.stderr
    after_five = load_file(adapter_file)
    moved = max(float((after_five[key] - after_four[key]).abs().max()) for key in after_four)
    assert moved > 1e-4, "the first resumed step did not change the adapter: it trained at the stale lr 0"


def test_incomplete_newest_checkpoint_is_skipped_on_resume(tiny_recipe, runs_dir):
    settings = ["--set", "training.max_steps=6", "--set", "training.save_steps=2",
                "--set", "training.save_total_limit=5"]
    assert run_inproc("train", tiny_recipe, *settings).exit_code == 0
    checkpoints = runs_dir / "tiny" / "checkpoints"
    # Truncate the optimizer of the newest checkpoint, as a disk-full or kill -9 mid-save would.
    newest = checkpoints / "checkpoint-6"
    (newest / "optimizer.pt").write_bytes((newest / "optimizer.pt").read_bytes()[:100])
    resumed = run_inproc("train", tiny_recipe, "--resume", *settings[2:], "--set", "training.max_steps=8")
    assert resumed.exit_code == 0, resumed
    assert "skipping checkpoint checkpoint-6" in resumed.stderr and "optimizer.pt" in resumed.stderr
    assert "resuming from checkpoint-4" in resumed.stderr


def test_recipe_trust_remote_code_needs_the_flag(tiny_recipe, runs_dir):
    result = run_inproc("train", tiny_recipe, "--set", "model.trust_remote_code=true")
    assert result.exit_code == 2 and "--trust-remote-code" in result.stderr
    assert not runs_dir.exists() or not any(runs_dir.iterdir())


def test_eval_during_training_with_early_stopping(tiny_recipe, runs_dir, chat_data):
    result = run_inproc("train", tiny_recipe, "--set", f"data.eval={chat_data}", "--set", "training.eval_steps=2",
                     "--set", "training.save_steps=2", "--set", "training.early_stopping_patience=2",
                     "--set", "training.max_steps=6", "--json")
    assert result.exit_code == 0, result
    rows = metrics(runs_dir / "tiny")
    eval_steps = sorted({m["step"] for m in rows if "eval_loss" in m})
    assert eval_steps[:3] == [2, 4, 6]
    info = json.loads((runs_dir / "tiny" / "run.json").read_text())
    assert info["metrics"]["eval_loss"] > 0 and info["data"]["eval"]["examples"] == 16


def test_early_stopping_needs_aligned_save_steps(tiny_recipe, runs_dir, chat_data):
    result = run_inproc("train", tiny_recipe, "--set", f"data.eval={chat_data}", "--set", "training.eval_steps=2",
                     "--set", "training.save_steps=3", "--set", "training.early_stopping_patience=2")
    assert result.exit_code == 2 and "multiple of" in result.stderr
    assert not (runs_dir / "tiny").exists()


@pytest.mark.parametrize("packing", [False, True])
def test_metrics_count_every_real_token_once(packing, tiny_recipe, runs_dir):
    """After one epoch, num_tokens is the data's token count: padding never counts, packed rows count in full."""
    result = run_inproc("train", tiny_recipe, "--name", f"count-{packing}", "--set", "training.max_steps=null",
                     "--set", "training.epochs=1", "--set", f"data.packing={str(packing).lower()}",
                     "--set", "data.max_length=256", "--json")
    assert result.exit_code == 0, result
    run_path = Path(result.json()["path"])
    info = json.loads((run_path / "run.json").read_text())
    train_report = info["data"]["train"]
    assert (train_report["rows"] < train_report["examples"]) == packing
    logged = [m for m in metrics(run_path) if "loss" in m]
    assert logged[-1]["num_tokens"] == train_report["total_tokens"]
    assert all(m["tokens_per_second"] > 0 for m in logged[1:])


@pytest.mark.parametrize(("attention", "expected"), [("auto", "sdpa in fp32"), ("sdpa", None)])
def test_cpu_choices_are_recorded_in_run_json(tiny_recipe, runs_dir, attention, expected):
    """On the CPU run.json says the threads chosen, ftcli's dropout masks (dropout above 0) and, in bf16, attention
    in fp32 unless the recipe chose an attention implementation itself."""
    name = f"cpu-{attention}"
    result = run_inproc("train", tiny_recipe, "--name", name, "--set", "training.max_steps=1", "--set",
                        "method.dropout=0.1", "--set", f"model.attn_implementation={attention}",
                        env={"FTCLI_CPU_BF16": "on"})
    assert result.exit_code == 0, result
    info = json.loads((runs_dir / name / "run.json").read_text())
    assert info["precision"] == "bf16" and info["cpu_attention"] == expected
    assert info["cpu_dropout"] == "16-bit random masks"
    assert info["cpu_threads"]["threads"] >= 1 and info["cpu_threads"]["source"]
