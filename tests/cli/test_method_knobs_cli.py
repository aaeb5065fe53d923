"""LoRA+, LoftQ, NEFTune, lr_multipliers and weight decay through `ftcli train` on the tiny model: what run.json and
--dry-run say, the optimizer groups a resumed run keeps, the adapter saved, and the refusals."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import TINY_RECIPE, memorisable_chat, run_inproc, write_jsonl, write_recipe

LR = 5e-3   # TINY_RECIPE's training.lr
KNOBS = ["--set", "method.loraplus_lr_ratio=16", "--set", "method.modules_to_save=[lm_head]",
         "--set", "training.lr_multipliers={lm_head: 0.1}", "--set", "training.weight_decay=0.01",
         "--set", "training.neftune_noise_alpha=5"]


@pytest.fixture(scope="module")
def knob_recipe(tmp_path_factory, tiny_untied_model_dir) -> Path:
    folder = tmp_path_factory.mktemp("knobs")
    data = write_jsonl(folder / "train.jsonl", memorisable_chat())
    return write_recipe(folder / "tiny.yaml", TINY_RECIPE.format(model=tiny_untied_model_dir, data=data))


@pytest.fixture(scope="module")
def knob_run(knob_recipe) -> Path:
    """Every knob but LoftQ at once: 2 steps with a checkpoint, then resumed to 3 (all within a 10-step warmup, so
    that the rate saved in each checkpoint is not 0)."""
    runs = knob_recipe.parent / "runs"
    common = [knob_recipe, "--runs-dir", runs, *KNOBS, "--set", "training.save_steps=2",
              "--set", "training.warmup_steps=10"]
    first = run_inproc("train", *common, "--set", "training.max_steps=2")
    assert first.exit_code == 0, first
    resumed = run_inproc("train", *common, "--set", "training.max_steps=3", "--resume")
    assert resumed.exit_code == 0, resumed
    assert "resuming from checkpoint-2" in resumed.stderr
    return runs / "tiny"


def test_run_json_records_each_knob_and_the_optimizer_groups(knob_run):
    info = json.loads((knob_run / "run.json").read_text())
    assert info["status"] == "completed" and info["step"] == 3
    knobs = info["knobs"]
    assert (knobs["loraplus_lr_ratio"], knobs["lr_multipliers"], knobs["weight_decay"],
            knobs["neftune_noise_alpha"], knobs["init"]) == (16, {"lm_head": 0.1}, 0.01, 5, "default")
    groups = {group["name"]: group for group in knobs["param_groups"]}
    lora_b, lora_a, head = groups["B"], groups["A_and_others"], groups["A_and_others lm_head x0.1"]
    assert lora_b["lr"] == pytest.approx(LR * 16) and lora_a["lr"] == pytest.approx(LR)
    assert head["lr"] == pytest.approx(LR * 0.1)
    # 4 target modules x 2 layers, r 8, hidden 64 (k and v project to 64 too: 4 kv heads of 16)
    assert lora_a["parameters"] == lora_b["parameters"] == 8 * 8 * 64
    assert head["parameters"] == 64 * 49152 and head["weight_decay"] == 0.01
    assert info["parameters"]["trainable"] == sum(group["parameters"] for group in groups.values())


def test_the_resumed_run_keeps_its_optimizer_groups(knob_run):
    import torch

    saved = {}
    for step in (2, 3):
        state = torch.load(knob_run / "checkpoints" / f"checkpoint-{step}" / "optimizer.pt", weights_only=True)
        saved[step] = {group["name"]: group for group in state["param_groups"]}
    assert list(saved[2]) == list(saved[3])   # the same groups, in the same order
    for step, groups in saved.items():
        assert groups["B"]["initial_lr"] == pytest.approx(LR * 16), step
        assert groups["A_and_others"]["initial_lr"] == pytest.approx(LR), step
        assert groups["A_and_others lm_head x0.1"]["initial_lr"] == pytest.approx(LR * 0.1), step
        # the schedule scales every group alike: still 16 to 1 at the step saved
        assert groups["B"]["lr"] == pytest.approx(16 * groups["A_and_others"]["lr"]), step
        assert groups["B"]["lr"] > 0
    assert saved[3]["B"]["lr"] == pytest.approx(saved[2]["B"]["lr"] * 3 / 2)   # the warmup went on after the resume


def test_changing_a_knob_on_resume_is_refused(knob_run, knob_recipe):
    changed = [*KNOBS, "--set", "method.loraplus_lr_ratio=8", "--set", "training.save_steps=2",
               "--set", "training.warmup_steps=10"]
    result = run_inproc("train", knob_recipe, "--runs-dir", knob_run.parent, *changed,
                        "--set", "training.max_steps=4", "--resume")
    assert result.exit_code == 5, result
    assert "method.loraplus_lr_ratio: 16.0 -> 8.0" in result.stderr


def test_a_neftune_run_saves_a_normal_adapter(knob_run, tiny_untied_model_dir):
    from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    adapter = knob_run / "adapter"
    config = PeftConfig.from_pretrained(adapter)
    assert "neftune" not in (adapter / "adapter_config.json").read_text()
    saved = load_file(adapter / "adapter_model.safetensors")
    fresh = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_untied_model_dir),
                           LoraConfig(**{k: v for k, v in config.to_dict().items()
                                         if k in ("r", "lora_alpha", "target_modules", "modules_to_save")}))
    expected = {name: tuple(t.shape) for name, t in get_peft_model_state_dict(fresh).items()}
    assert {name: tuple(t.shape) for name, t in saved.items()} == expected
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_untied_model_dir), adapter)
    assert not loaded.get_input_embeddings()._forward_hooks   # no NEFTune hook comes with it


def test_loftq_run_records_the_fit(knob_recipe):
    runs = knob_recipe.parent / "runs"
    result = run_inproc("train", knob_recipe, "--runs-dir", runs, "--name", "loftq", "--set", "method.kind=qlora",
                        "--set", "method={r: 8, alpha: 16, dropout: 0.0, target_modules: all-linear, init: loftq}",
                        "--set", "training.max_steps=1", "--set", "training.save_steps=100")
    assert result.exit_code == 0, result
    assert "method.init loftq: 14 layers fitted" in result.stderr
    knobs = json.loads((runs / "loftq" / "run.json").read_text())["knobs"]
    assert knobs["init"] == "loftq" and knobs["loftq_iter"] == 1
    fit = knobs["loftq"]
    assert fit["layers"] == len(fit["errors"]) == 14
    assert all(layer["after"] < 0.95 * layer["before"] for layer in fit["errors"].values()), fit["errors"]
    assert fit["mean_error_after"] < fit["mean_error_before"]


def test_dry_run_and_explain_show_each_knob(knob_recipe, tmp_path):
    runs = tmp_path / "runs"
    report = run_inproc("train", knob_recipe, "--runs-dir", runs, "--dry-run", "--json", *KNOBS)
    assert report.exit_code == 0, report
    knobs = report.json()["knobs"]
    assert knobs["lora_b_lr"] == pytest.approx(LR * 16) and knobs["module_lr"] == {"lm_head": pytest.approx(LR / 10)}
    assert (knobs["loraplus_lr_ratio"], knobs["weight_decay"], knobs["neftune_noise_alpha"]) == (16, 0.01, 5)
    shown = run_inproc("train", knob_recipe, "--runs-dir", runs, "--dry-run", *KNOBS).output
    for line in ("B matrices at 0.08 (16 x lr)", "lm_head at 0.0005 (0.1 x lr)", "weight decay", "0.01",
                 "noise alpha 5", "method.init"):
        assert line in shown, line
    assert not runs.exists()

    explained = run_inproc("recipe", "show", knob_recipe, "--explain", "--json", *KNOBS).json()["sources"]
    for key in ("method.loraplus_lr_ratio", "method.loraplus_lr_embedding", "method.init", "method.loftq_iter",
                "training.lr_multipliers.lm_head", "training.weight_decay", "training.neftune_noise_alpha"):
        assert key in explained, key
    assert explained["method.loraplus_lr_ratio"].startswith("--set")


def test_refusals_name_the_reason_and_create_no_run(knob_recipe, tmp_path):
    runs = tmp_path / "runs"
    prefix = run_inproc("train", knob_recipe, "--runs-dir", runs, "--set",
                        "method={kind: prefix, num_virtual_tokens: 4, loraplus_lr_ratio: 16}")
    assert prefix.exit_code == 2, prefix
    assert "method.loraplus_lr_ratio: unknown key: LoRA+ sets the learning rate of LoRA's B matrices, and method " \
           "prefix trains none" in prefix.stderr
    no_base = run_inproc("train", knob_recipe, "--runs-dir", runs, "--set", "method.init=loftq")
    assert no_base.exit_code == 2 and "needs method.kind qlora" in no_base.stderr
    assert re.search(r"tiny\.yaml:\d+:\d+: |--set method\.init=loftq: method\.init", no_base.stderr)

    for command in (["train"], ["train", "--dry-run"]):
        unknown = run_inproc(*command, knob_recipe, "--runs-dir", runs, "--set", "training.lr_multipliers={lm_haed: 2}")
        assert unknown.exit_code == 2, unknown
        assert "'lm_haed' matches no module of the model" in unknown.stderr and "embed_tokens" in unknown.stderr
        assert "lm_head" in unknown.stderr
    idle = run_inproc("train", knob_recipe, "--runs-dir", runs, "--set", "training.lr_multipliers={lm_head: 0.1}")
    assert idle.exit_code == 2 and "lm_head holds no parameter that method lora trains" in idle.stderr
    assert not runs.exists() or not any(runs.iterdir())
