"""objective: dpo through the CLI on the tiny model: training, continuing a run's adapter with that run as the
reference, resume, and every bad preference record named with its file and line."""

from __future__ import annotations

import json

import pytest
from helpers import write_jsonl

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]


def preference_pairs(n: int = 16) -> list[dict]:
    """Prompts whose chosen answer repeats the two words asked for and whose rejected answer swaps them."""
    pairs = []
    for i in range(n):
        a, b = WORDS[i % len(WORDS)], WORDS[(i * 3 + 1) % len(WORDS)]
        pairs.append({"prompt": f"Say {a} {b}", "chosen": f"{a} {b}", "rejected": f"{b} {a} {a}"})
    return pairs


@pytest.fixture
def preference_data(tmp_path):
    return write_jsonl(tmp_path / "data" / "pairs.jsonl", preference_pairs())


def dpo_options(data, *more: str) -> list[str]:
    return ["--set", "objective=dpo", "--set", f"data.train={data}", "--set", "data.format=preference",
            "--set", "training.batch_size=2", *more]


def test_dpo_trains_logs_rewards_and_saves_one_adapter(cli_inproc, tiny_recipe, runs_dir, preference_data):
    result = cli_inproc("train", tiny_recipe, "--name", "dpo", *dpo_options(preference_data))
    assert result.exit_code == 0, result
    run = runs_dir / "dpo"
    state = json.loads((run / "run.json").read_text())
    assert state["status"] == "completed" and state["objective"] == "dpo" and state["parent"] is None
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*logged)
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= keys, keys
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert not (run / "adapter" / "ref").exists()   # DPO's frozen reference copy is not part of the result


@pytest.mark.slow
def test_dpo_resumes_from_its_checkpoint(cli_inproc, tiny_recipe, runs_dir, preference_data):
    first = cli_inproc("train", tiny_recipe, "--name", "dpo-resume", *dpo_options(preference_data))
    assert first.exit_code == 0, first
    resumed = cli_inproc("train", tiny_recipe, "--name", "dpo-resume", "--resume",
                         *dpo_options(preference_data, "--set", "training.max_steps=6"))
    assert resumed.exit_code == 0, resumed
    assert "resuming from checkpoint-4" in resumed.stderr
    assert json.loads((runs_dir / "dpo-resume" / "run.json").read_text())["step"] == 6


@pytest.mark.slow
def test_a_continued_dpo_run_uses_its_parent_as_reference(cli_inproc, tiny_recipe, runs_dir, preference_data,
                                                          tiny_model_dir):
    """The reference pass of a run that starts from run:sft gives the SFT run's log-probabilities, not the base's."""
    import torch

    sft = cli_inproc("train", tiny_recipe, "--name", "sft")
    assert sft.exit_code == 0, sft

    from ftcli.recipe.loader import load_recipe
    from ftcli.runs.rundir import RunDir
    from ftcli.training.session import TrainingSession
    from ftcli.training.trainer import RealTokenCount

    recipe = load_recipe(tiny_recipe, ["objective=dpo", f"data.train={preference_data}", "data.format=preference",
                                       "model.adapter=run:sft"]).recipe
    session = TrainingSession(recipe, RunDir(runs_dir, "child"), trust_remote_code=False, console=None)
    session.prepare()
    trainer = session.make_trainer(RealTokenCount(), [])
    model = trainer.model
    assert set(model.peft_config) == {"default", "ref"}
    batch = trainer.data_collator([session.prepared.train[i] for i in range(2)])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    parent = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                       str(runs_dir / "sft" / "adapter"))
    with torch.no_grad():
        model.set_adapter("ref")
        reference = model(**inputs).logits
        model.set_adapter("default")
        parent_logits = parent(**inputs).logits
        with parent.disable_adapter():
            base_logits = parent(**inputs).logits
    assert torch.allclose(reference, parent_logits, atol=1e-4)
    assert (reference - base_logits).abs().max() > 1e-2   # the parent really moved away from the base

    child = cli_inproc("train", tiny_recipe, "--name", "child", *dpo_options(preference_data),
                       "--set", "model.adapter=run:sft")
    assert child.exit_code == 0, child
    state = json.loads((runs_dir / "child" / "run.json").read_text())
    assert state["parent"]["run"] == "sft" and state["parent"]["adapter"] == "run:sft"
    shown = cli_inproc("runs", "show", "child")
    assert "run:sft" in shown.stdout

    # eval ranks the pairs by the implicit reward against the reference: the parent run, and the parent's own
    # ranking (against the base) beside it; a gate on the accuracy fails with exit 6.
    scored = cli_inproc("eval", "child", "--compare-base", "--json", "--data", preference_data)
    assert scored.exit_code == 0, scored
    result = json.loads(scored.stdout)
    assert 0 <= result["metrics"]["preference_accuracy"] <= 1 and "reward_margin" in result["metrics"]
    assert "exact_match" in result["metrics"] and "preference_accuracy" in result["base_metrics"]
    assert result["compared_with"] == "parent"
    gated = cli_inproc("eval", "child", "--json", "--data", preference_data, "--fail-under",
                       "preference_accuracy=1.01")
    assert gated.exit_code == 6, gated


def test_a_starting_adapter_must_match_the_method(cli_inproc, tiny_recipe, runs_dir, preference_data):
    sft = cli_inproc("train", tiny_recipe, "--name", "sft-r8")
    assert sft.exit_code == 0, sft
    result = cli_inproc("train", tiny_recipe, "--name", "child", *dpo_options(preference_data),
                        "--set", "model.adapter=run:sft-r8", "--set", "method.r=4")
    assert result.exit_code == 2, result
    assert "r 8 (the recipe's method: 4)" in result.stderr
    missing = cli_inproc("train", tiny_recipe, "--name", "child", *dpo_options(preference_data),
                         "--set", "model.adapter=run:nope")
    assert missing.exit_code == 5, missing


@pytest.mark.parametrize("record, message", [
    ({"prompt": "Say red", "rejected": "blue"}, "missing column 'chosen'"),
    ({"prompt": "Say red", "chosen": "", "rejected": "blue"}, "chosen is empty"),
    ({"prompt": "Say red", "chosen": "red", "rejected": "red"}, "chosen and rejected are identical"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "rejected": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},
     "share no first turn"),
    ({"prompt": "Say red", "chosen": [{"role": "user", "content": "x"}], "rejected": "blue"},
     "chosen must start with an assistant turn"),
])
def test_bad_preference_records_name_file_and_line(cli_inproc, tiny_recipe, tmp_path, record, message):
    path = write_jsonl(tmp_path / "pairs.jsonl", [*preference_pairs(3), record])
    result = cli_inproc("train", tiny_recipe, "--dry-run", *dpo_options(path))
    assert result.exit_code == 3, result
    assert "pairs.jsonl:4: " in result.stderr and message in result.stderr


@pytest.mark.parametrize("overrides, message", [
    (["--set", "objective=dpo"], "objective dpo trains on format: preference"),
    (["--set", "data.format=preference"], "objective sft trains on a non-preference format"),
    (["--set", "objective=dpo", "--set", "data.format=preference", "--set", "method={kind: prefix}"],
     "needs method lora, qlora or dora"),
])
def test_objective_data_and_method_must_fit(cli_inproc, tiny_recipe, overrides, message):
    result = cli_inproc("train", tiny_recipe, "--dry-run", *overrides)
    assert result.exit_code == 2, result
    assert message in result.stderr


def test_preference_scores_follow_the_implicit_reward():
    from ftcli.inference.preference import preference_scores

    # policy and reference (chosen, rejected) log-probabilities: the first pair moved towards chosen, the second
    # towards rejected; beta scales the margin.
    scores = preference_scores([(-1.0, -5.0), (-4.0, -1.0)], [(-2.0, -4.0), (-2.0, -2.0)], beta=0.5)
    assert scores["preference_accuracy"] == 0.5
    assert scores["reward_margin"] == pytest.approx(0.5 * ((1 - -1) + (-2 - 1)) / 2)
