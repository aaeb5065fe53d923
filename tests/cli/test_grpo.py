"""objective: grpo through the CLI on the tiny model (sampling, declared rewards, metrics, resume), the rewards on
hand-made completions, and Python rewards refused without --allow-code."""

from __future__ import annotations

import json
import textwrap

import pytest
from helpers import write_jsonl

from ftcli.recipe.schema import GrpoObjective

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]


def prompts(n: int = 8) -> list[dict]:
    return [{"prompt": f"Say {WORDS[i % len(WORDS)]}", "reference": WORDS[i % len(WORDS)]} for i in range(n)]


@pytest.fixture
def prompt_data(tmp_path):
    return write_jsonl(tmp_path / "data" / "prompts.jsonl", prompts())


GRPO = ["--set", "objective={kind: grpo, num_generations: 2, max_completion_length: 8, "
        "rewards: [{kind: exact_match_norm}, {kind: format, pattern: '[a-z ]+', weight: 0.5}, "
        "{kind: length, max_tokens: 4}]}", "--set", "data.format=prompt", "--set", "training.batch_size=2",
        "--set", "training.logging_steps=1"]


def grpo_options(data, *more: str) -> list[str]:
    return [*GRPO, "--set", f"data.train={data}", *more]


def test_grpo_trains_and_logs_each_reward(cli_inproc, tiny_recipe, runs_dir, prompt_data):
    result = cli_inproc("train", tiny_recipe, "--name", "grpo", *grpo_options(prompt_data))
    assert result.exit_code == 0, result
    run = runs_dir / "grpo"
    state = json.loads((run / "run.json").read_text())
    assert state["status"] == "completed" and state["objective"] == "grpo" and state["step"] == 4
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [entry for entry in logged if "loss" in entry]
    assert len(steps) == 4
    for entry in steps:
        for name in ("exact_match_norm", "format", "length"):
            assert f"rewards/{name}/mean" in entry and f"rewards/{name}/std" in entry, entry.keys()
        assert -1 <= entry["rewards/length/mean"] <= 0 and 0 <= entry["rewards/exact_match_norm/mean"] <= 1
        assert "reward" in entry
    seen = [entry["num_tokens"] for entry in steps]
    assert seen[0] > 0 and seen == sorted(seen)
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    height = int.from_bytes((run / "loss.png").read_bytes()[20:24], "big")
    assert height > 550   # the loss and the reward panels


@pytest.mark.slow
def test_grpo_resumes_from_its_checkpoint(cli_inproc, tiny_recipe, runs_dir, prompt_data):
    first = cli_inproc("train", tiny_recipe, "--name", "grpo-resume", *grpo_options(prompt_data))
    assert first.exit_code == 0, first
    resumed = cli_inproc("train", tiny_recipe, "--name", "grpo-resume", "--resume",
                         *grpo_options(prompt_data, "--set", "training.max_steps=6"))
    assert resumed.exit_code == 0, resumed
    assert "resuming from checkpoint-4" in resumed.stderr
    assert json.loads((runs_dir / "grpo-resume" / "run.json").read_text())["step"] == 6


def python_reward_recipe(tiny_recipe, prompt_data):
    """The tiny recipe with a Python reward from a module beside it (the word count of the completion)."""
    (tiny_recipe.parent / "my_rewards.py").write_text(textwrap.dedent("""\
        def words(prompts, completions, **kwargs):
            return [len(c.split()) for c in completions]
    """), encoding="utf-8")
    recipe = tiny_recipe.parent / "grpo-code.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        extends: {tiny_recipe.name}
        name: grpo-code
        objective:
          kind: grpo
          num_generations: 2
          max_completion_length: 8
          rewards:
            - kind: exact_match
            - kind: python
              function: my_rewards:words
        data:
          train: {prompt_data}
          format: prompt
        training:
          batch_size: 2
          max_steps: 2
          logging_steps: 1
    """), encoding="utf-8")
    return recipe


def test_python_rewards_run_only_with_allow_code(cli_inproc, tiny_recipe, runs_dir, prompt_data):
    recipe = python_reward_recipe(tiny_recipe, prompt_data)
    for command in (["train", recipe], ["train", recipe, "--dry-run"]):
        refused = cli_inproc(*command)
        assert refused.exit_code == 2, refused
        assert "grpo-code.yaml:10:7" in refused.stderr and "--allow-code" in refused.stderr
    assert not (runs_dir / "grpo-code").exists()
    allowed = cli_inproc("train", recipe, "--allow-code")
    assert allowed.exit_code == 0, allowed
    logged = [json.loads(line) for line in (runs_dir / "grpo-code" / "metrics.jsonl").read_text().splitlines()]
    assert all("rewards/python/mean" in entry for entry in logged if "loss" in entry)


@pytest.mark.parametrize("overrides, message", [
    (["--set", "training.batch_size=3"], "must be whole groups of num_generations 2"),
    (["--set", "data.format=text"], "objective grpo samples answers to prompts"),
    (["--set", "data.max_length=8"], "leaves no room for the prompt"),
    (["--set", "method={kind: prefix}"], "needs method lora, qlora or dora"),
])
def test_grpo_settings_must_fit(cli_inproc, tiny_recipe, prompt_data, overrides, message):
    result = cli_inproc("train", tiny_recipe, "--dry-run", *grpo_options(prompt_data), *overrides)
    assert result.exit_code == 2, result
    assert message in result.stderr


def test_vllm_generation_applies_to_grpo_only(cli_inproc, tiny_recipe):
    result = cli_inproc("train", tiny_recipe, "--dry-run", "--set", "training.generation=vllm")
    assert result.exit_code == 2 and "objective sft generates nothing" in result.stderr


@pytest.mark.parametrize("record, message", [
    ({"prompt": "Say red"}, "missing column 'reference'"),
    ({"prompt": "Say red", "reference": ""}, "reference is empty"),
    ({"reference": "red"}, "missing the prompt column"),
    ({"prompt": "Say red", "reference": ["red"]}, "reference must be a string"),
])
def test_bad_prompt_records_name_file_and_line(cli_inproc, tiny_recipe, tmp_path, record, message):
    path = write_jsonl(tmp_path / "prompts.jsonl", [*prompts(3), record])
    result = cli_inproc("train", tiny_recipe, "--dry-run", *grpo_options(path))
    assert result.exit_code == 3, result
    assert "prompts.jsonl:4" in result.stderr and message in result.stderr


def rewards_of(*declared: dict) -> list:
    return GrpoObjective(kind="grpo", rewards=list(declared)).rewards


@pytest.mark.parametrize("reward, completion, reference, tokens, expected", [
    ({"kind": "exact_match"}, " red blue\n", "red blue", 3, 1.0),
    ({"kind": "exact_match"}, "Red blue", "red blue", 2, 0.0),
    ({"kind": "exact_match_norm"}, "Red, BLUE!", "red blue", 4, 1.0),
    ({"kind": "exact_match_norm"}, "red blue green", "red blue", 3, 0.0),
    ({"kind": "contains"}, "The answer is: Paris.", "paris", 6, 1.0),
    ({"kind": "contains"}, "100 apples", "10", 2, 0.0),
    ({"kind": "f1"}, "red green", "red blue", 2, 0.5),
    ({"kind": "f1"}, "dog", "cat", 1, 0.0),
    ({"kind": "number"}, "so the sum is 1,234.", "1234", 6, 1.0),
    ({"kind": "number"}, "3 then 4", "3", 3, 0.0),               # the last number counts
    ({"kind": "number"}, "no number here", "3", 3, 0.0),
    ({"kind": "number", "tolerance": 0.01}, "x = 2.005", "2", 4, 1.0),
    ({"kind": "number", "tolerance": 0.001}, "x = 2.005", "2", 4, 0.0),
    ({"kind": "number"}, "-7", "The answer is -7", 1, 1.0),
    ({"kind": "regex", "pattern": r"<answer>"}, "<answer>7</answer>", "7", 5, 1.0),
    ({"kind": "regex", "pattern": r"<answer>"}, "7", "7", 1, 0.0),
    ({"kind": "regex", "pattern": r"<answer>(.*?)</answer>", "group": 1}, "<answer> 7 </answer>", "7", 5, 1.0),
    ({"kind": "regex", "pattern": r"<answer>(.*?)</answer>", "group": 1}, "<answer>8</answer>", "7", 5, 0.0),
    ({"kind": "regex", "pattern": r"=(?P<v>\d+)", "group": "v"}, "x=7", "7", 3, 1.0),
    ({"kind": "format", "pattern": r"<answer>.*</answer>"}, " <answer>a\nb</answer>\n", "", 5, 1.0),
    ({"kind": "format", "pattern": r"<answer>.*</answer>"}, "so: <answer>a</answer>", "", 5, 0.0),
    ({"kind": "length", "max_tokens": 4}, "", "", 4, 0.0),
    ({"kind": "length", "max_tokens": 4}, "", "", 6, -0.5),
    ({"kind": "length", "max_tokens": 4}, "", "", 40, -1.0),
])
def test_declared_rewards_score_hand_made_completions(reward, completion, reference, tokens, expected):
    from ftcli.training.rewards import reward_functions

    [function] = reward_functions(rewards_of(reward), allow_code=False, recipe_dir=None)
    scores = function(prompts=["p"], completions=[completion], completion_ids=[[0] * tokens], reference=[reference])
    assert scores == [pytest.approx(expected)]
    assert function.__name__ == reward["kind"]


def test_reward_names_number_repeated_kinds_and_refuse_duplicates():
    from ftcli.recipe.schema import reward_names

    declared = rewards_of({"kind": "regex", "pattern": "a"}, {"kind": "regex", "pattern": "b"},
                          {"kind": "f1", "name": "overlap"})
    assert reward_names(declared) == ["regex", "regex2", "overlap"]
    with pytest.raises(ValueError, match="two rewards are named f1"):
        rewards_of({"kind": "f1"}, {"kind": "exact_match", "name": "f1"})


def test_python_reward_refused_in_the_trainer_without_allow_code():
    from ftcli.errors import UsageError
    from ftcli.training.rewards import reward_functions

    with pytest.raises(UsageError, match="--allow-code"):
        reward_functions(rewards_of({"kind": "python", "function": "os:getcwd"}), allow_code=False, recipe_dir=None)


@pytest.mark.slow
def test_a_continued_grpo_run_is_compared_with_the_run_it_started_from(cli_inproc, tiny_recipe, runs_dir,
                                                                       prompt_data):
    sft = cli_inproc("train", tiny_recipe, "--name", "sft")
    assert sft.exit_code == 0, sft
    child = cli_inproc("train", tiny_recipe, "--name", "grpo-child", *grpo_options(prompt_data),
                       "--set", "model.adapter=run:sft")
    assert child.exit_code == 0, child
    assert json.loads((runs_dir / "grpo-child" / "run.json").read_text())["parent"]["run"] == "sft"
    scored = cli_inproc("eval", "grpo-child", "--compare-base", "--json", "--data", prompt_data)
    assert scored.exit_code == 0, scored
    result = json.loads(scored.stdout)
    assert result["compared_with"] == "parent" and result["data"]["examples"] == len(prompts())
    assert {"exact_match", "exact_match_norm"} <= set(result["metrics"]) <= set(result["base_metrics"])


def test_grpo_dry_run_shows_prompts_and_their_references(cli_inproc, tiny_recipe, prompt_data):
    result = cli_inproc("train", tiny_recipe, "--dry-run", "--json", *grpo_options(prompt_data))
    assert result.exit_code == 0, result
    report = json.loads(result.stdout)
    first = report["samples"][0]
    assert first["reference"] == "red" and first["trained_tokens"] == 0
    assert first["segments"][0]["text"].rstrip().endswith("assistant") and "Say red" in first["segments"][0]["text"]
    assert report["data"]["train"]["examples"] == len(prompts())
    shown = cli_inproc("train", tiny_recipe, "--dry-run", *grpo_options(prompt_data))
    assert "reference: red" in shown.stdout
