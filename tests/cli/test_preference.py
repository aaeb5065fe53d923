"""The preference objectives (dpo, kto, orpo, simpo) through the CLI on the tiny model: training, continuing a run's
adapter with that run as the reference, resume, and every bad preference record named with its file and line."""

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


def unpaired_answers(n: int = 16) -> list[dict]:
    """The pairs' answers one by one, labelled: the chosen desirable, the rejected not."""
    return [{"prompt": pair["prompt"], "completion": pair[side], "label": side == "chosen"}
            for pair in preference_pairs(n // 2) for side in ("chosen", "rejected")]


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
    (["--set", "objective=dpo"], "objective dpo trains on format preference (prompt, chosen, rejected)"),
    (["--set", "objective=orpo", "--set", "data.format=unpaired_preference"],
     "objective orpo trains on format preference"),
    (["--set", "data.format=preference"], "format preference holds judged answers for a preference objective"),
    (["--set", "objective=kto", "--set", "data.format=unpaired_preference", "--set", "training.batch_size=1"],
     "set training.batch_size to 2 or more"),
    (["--set", "objective={kind: simpo, beta: 2, label_smoothing: 0.1}", "--set", "data.format=preference"],
     "label_smoothing"),
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
    scores = preference_scores([(-1.0, -5.0), (-4.0, -1.0)], [(-2.0, -4.0), (-2.0, -2.0)], [None, None], beta=0.5)
    assert scores["preference_accuracy"] == 0.5
    assert scores["reward_margin"] == pytest.approx(0.5 * ((1 - -1) + (-2 - 1)) / 2)
    # unpaired answers: right when the reward's sign agrees with the label; the margin is the mean desirable reward
    # minus the mean undesirable one
    unpaired = preference_scores([[-1.0], [-3.0], [-1.0]], [[-2.0], [-2.0], [-2.0]], [True, False, False], beta=1)
    assert unpaired["preference_accuracy"] == pytest.approx(2 / 3)
    assert unpaired["reward_margin"] == pytest.approx(1.0 - (-1.0 + 1.0) / 2)
    # both in one eval set (a KTO mix of pair and unpaired sources)
    mixed = preference_scores([[-1.0, -5.0], [-1.0]], [[-2.0, -4.0], [-2.0]], [None, False], beta=1)
    assert mixed == {"preference_accuracy": 0.5, "reward_margin": pytest.approx(1.0 - (-1.0 + 1.0) / 2)}


@pytest.mark.parametrize("objective, data_format", [
    ("kto", "unpaired_preference"), ("kto", "preference"), ("orpo", "preference"), ("simpo", "preference")])
def test_preference_objectives_train_through_trl(cli_inproc, tiny_recipe, runs_dir, tmp_path, objective,
                                                 data_format):
    records = unpaired_answers() if data_format == "unpaired_preference" else preference_pairs()
    data = write_jsonl(tmp_path / "data" / f"{data_format}.jsonl", records)
    name = f"{objective}-{data_format}"
    result = cli_inproc("train", tiny_recipe, "--name", name, "--set", f"objective={objective}",
                        "--set", f"data.train={data}", "--set", f"data.format={data_format}",
                        "--set", "training.batch_size=2", "--set", "training.max_steps=3",
                        "--set", "training.logging_steps=1")
    assert result.exit_code == 0, result
    run = runs_dir / name
    state = json.loads((run / "run.json").read_text())
    assert state["status"] == "completed" and state["objective"] == objective and state["step"] == 3
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_logs = [entry for entry in logged if "loss" in entry]
    assert len(train_logs) == 3 and all(entry["loss"] == entry["loss"] for entry in train_logs)   # not NaN
    assert all("rewards/margins" in entry for entry in train_logs), train_logs[0]
    seen = [entry["num_tokens"] for entry in train_logs]   # ftcli's count of real (non-padding) tokens
    assert seen[0] > 0 and seen == sorted(seen) and len(set(seen)) == 3
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    height = int.from_bytes((run / "loss.png").read_bytes()[20:24], "big")   # the PNG header's height
    assert height > 550   # the loss panel and the reward margin panel below it

    if data_format == "unpaired_preference":   # eval judges labelled answers by the sign of their reward
        scored = cli_inproc("eval", name, "--json", "--data", data)
        assert scored.exit_code == 0, scored
        metrics = json.loads(scored.stdout)["metrics"]
        assert 0 <= metrics["preference_accuracy"] <= 1 and "reward_margin" in metrics
        assert json.loads(scored.stdout)["data"]["examples"] == len(records)


@pytest.mark.parametrize("record, message", [
    ({"prompt": "Say red", "completion": "red"}, "missing column 'label'"),
    ({"prompt": "Say red", "completion": "red", "label": "yes"}, "label must be true (desirable) or false"),
    ({"prompt": "Say red", "completion": "red", "label": 1}, "label must be true (desirable) or false"),
    ({"prompt": "Say red", "completion": "", "label": True}, "completion is empty"),
    ({"completion": "red", "label": True}, "an unpaired answer needs its prompt"),
])
def test_bad_unpaired_records_name_file_and_line(cli_inproc, tiny_recipe, tmp_path, record, message):
    path = write_jsonl(tmp_path / "answers.jsonl", [*unpaired_answers(4), record])
    result = cli_inproc("train", tiny_recipe, "--dry-run", "--set", "objective=kto", "--set", f"data.train={path}",
                        "--set", "data.format=unpaired_preference", "--set", "training.batch_size=2")
    assert result.exit_code == 3, result
    assert "answers.jsonl:5: " in result.stderr and message in result.stderr


def test_kto_batches_pair_each_answer_with_another_prompts_answer():
    """The KL answer of each answer in a batch comes from another prompt, for unpaired rows and split pairs."""
    from types import SimpleNamespace

    from ftcli.training.trainer import UnpairedAnswers

    collate = UnpairedAnswers(SimpleNamespace(pad_token_id=0, eos_token_id=0), kl=True)
    pairs = [{"prompt_ids": [p], "chosen_ids": [10 + p], "rejected_ids": [20 + p]} for p in (1, 2)]
    batch = collate(pairs)
    assert batch["label"].tolist() == [True, True, False, False]
    prompts = batch["input_ids"][:, 0].tolist()
    kl_prompts = batch["KL_input_ids"][:, 0].tolist()
    kl_answers = batch["KL_input_ids"][:, 1].tolist()
    answers = batch["input_ids"][:, 1].tolist()
    assert prompts == kl_prompts   # the KL sequence keeps the example's prompt ...
    assert all(answer % 10 != prompt for prompt, answer in zip(prompts, kl_answers))   # ... with another's answer
    assert sorted(kl_answers) == sorted(answers)   # drawn from the same batch


def test_kto_warns_when_desirable_and_undesirable_answers_are_unbalanced(tiny_recipe, tmp_path):
    import datasets

    from ftcli.recipe.loader import load_recipe
    from ftcli.training.preflight import kto_balance_warning

    data = write_jsonl(tmp_path / "answers.jsonl", unpaired_answers(4))
    recipe = load_recipe(tiny_recipe, ["objective=kto", f"data.train={data}", "data.format=unpaired_preference",
                                       "training.batch_size=2"]).recipe
    unbalanced = datasets.Dataset.from_dict({"label": [True, True, True, False]})
    warning = kto_balance_warning(recipe, unbalanced)
    assert "3 desirable and 1 undesirable answers weigh 3.00 to 1" in warning
    assert "set desirable_weight between 0.33 and 0.44" in warning
    assert kto_balance_warning(recipe, datasets.Dataset.from_dict({"label": [True, False]})) is None
    weighted = recipe.model_copy(update={"objective": recipe.objective.model_copy(update={"desirable_weight": 0.4})})
    assert kto_balance_warning(weighted, unbalanced) is None
    assert "no undesirable answer" in kto_balance_warning(recipe, datasets.Dataset.from_dict({"label": [True]}))


def test_orpo_supervised_term_covers_the_chosen_answer_only(tiny_recipe, runs_dir, preference_data):
    """With data.train_on: completion, ORPO's NLL is SFT's loss on the chosen answers (TRL's covers the prompt)."""
    import torch
    import torch.nn.functional as F

    from ftcli.recipe.loader import load_recipe
    from ftcli.runs.rundir import RunDir
    from ftcli.training.session import TrainingSession
    from ftcli.training.trainer import RealTokenCount

    def nll_of(train_on: str):
        recipe = load_recipe(tiny_recipe, ["objective=orpo", f"data.train={preference_data}",
                                           "data.format=preference", f"data.train_on={train_on}"]).recipe
        session = TrainingSession(recipe, RunDir(runs_dir, f"orpo-{train_on}"), trust_remote_code=False,
                                  console=None)
        session.prepare()
        trainer = session.make_trainer(RealTokenCount(), [])
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
        trainer.model.eval()
        with torch.no_grad():
            return trainer.concatenated_forward(trainer.model, batch)[4], trainer, session

    answers_only, trainer, session = nll_of("completion")
    rows = [session.prepared.train[i] for i in range(2)]
    losses, counted = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["prompt_ids"] + row["chosen_ids"]])
            logits = trainer.model(input_ids=ids).logits[0, :-1]
            targets = ids[0, 1:].clone()
            targets[: len(row["prompt_ids"]) - 1] = -100
            losses += F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum")
            counted += len(row["chosen_ids"])
    assert answers_only == pytest.approx(float(losses / counted), rel=1e-4)
    whole, _, _ = nll_of("all")
    assert abs(float(whole) - float(answers_only)) > 1e-3   # TRL's term, over the prompt too, differs
