"""`ftcli train --dry-run`: the report's figures, its rendering, and that nothing is trained or created."""

from __future__ import annotations

import pytest

from ftcli.recipe.schema import Recipe


def _numel(shape) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def test_dry_run_json_reports_the_numbers_and_creates_no_run(cli_inproc, tiny_recipe, runs_dir, tiny_model_dir):
    result = cli_inproc("train", tiny_recipe, "--dry-run", "--json", "--runs-dir", runs_dir,
                 "--set", "data.val_split=0.25")
    assert result.exit_code == 0, result
    report = result.json()
    assert not runs_dir.exists()

    train = report["data"]["train"]
    assert (train["examples"], report["data"]["eval"]["examples"]) == (12, 4)
    assert train["truncated"] == 0 and train["dropped"] == 0
    assert set(train["length_stats"]) == {"min", "p50", "p90", "p99", "max", "mean"}
    assert 0 < report["data"]["trained_token_ratio"] < 0.5   # completions only; the prompt is longer
    assert report["data"]["trained_token_ratio"] == round(train["trained_tokens"] / train["total_tokens"], 4)
    assert report["data"]["packing_efficiency"] is None

    # LoRA r=8 on q,k,v,o of 2 layers, hidden 64, 2 KV heads of 16: 8*((64+64)*2 + (64+32)*2) per layer.
    assert report["parameters"]["trainable"] == 2 * 8 * ((64 + 64) * 2 + (64 + 32) * 2)
    from safetensors import safe_open

    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as weights:   # tied: the LM head is not stored
        base = sum(_numel(weights.get_slice(name).get_shape()) for name in weights.keys())
    assert report["parameters"]["total"] == base + report["parameters"]["trainable"]

    memory = report["memory"]
    # autocast_weight_copies where precision auto means bf16 autocast (CPUs with native bf16)
    assert set(memory["parts"]) - {"autocast_weight_copies"} == {
        "weights", "adapter_and_optimizer", "activations", "logits", "framework"}
    assert ("autocast_weight_copies" in memory["parts"]) == (memory["precision"] == "bf16")
    assert memory["total_bytes"] == sum(memory["parts"].values())
    # The fused LM head projects labelled positions only: at most those of the 4 rows with the most (completions of
    # a few tokens here, far fewer than batch 4 x max_length 64), over the whole vocabulary on the CPU, 1.5 fp32 copies.
    most = sorted((len(row) for row in _trained_token_rows(tiny_recipe)), reverse=True)[:4]
    assert 4 <= memory["labelled_tokens_per_batch"] <= sum(most) < 4 * 64 / 2
    assert memory["parts"]["logits"] == memory["labelled_tokens_per_batch"] * 49152 * 4 * 3 // 2
    assert memory["parts"]["adapter_and_optimizer"] == report["parameters"]["trainable"] * 16

    sample = report["samples"][0]
    trained = "".join(s["text"] for s in sample["segments"] if s["trained"])
    assert trained.endswith("<|im_end|>") and sample["trained_tokens"] > 0
    assert any("default system prompt" in w for w in report["warnings"])


def _trained_token_rows(recipe_path) -> list[list[int]]:
    """The trained tokens of every training example, tokenized as ftcli trains them."""
    from ftcli.data.pipeline import prepare_data
    from ftcli.models.load import load_tokenizer
    from ftcli.recipe.loader import load_recipe

    recipe = load_recipe(recipe_path, ["data.val_split=0.25"]).recipe
    prepared = prepare_data(recipe, load_tokenizer(recipe.model))
    return [[t for t in labels if t != -100] for labels in prepared.train["labels"]]


def test_labelled_tokens_per_batch_takes_the_rows_with_the_most():
    from ftcli.training.memory_estimate import labelled_tokens_per_batch

    rows = [[-100, 5, 6], [-100, -100, -100, 7], [1, 2, 3, 4], [-100, 9]]
    assert labelled_tokens_per_batch(rows, 2) == 4 + 2
    assert labelled_tokens_per_batch(rows, 10) == 2 + 1 + 4 + 1


def test_dry_run_renders_for_people(cli_inproc, tiny_recipe, runs_dir):
    result = cli_inproc("train", tiny_recipe, "--dry-run", "--runs-dir", runs_dir, "--set", "data.packing=true")
    assert result.exit_code == 0, result
    for text in ("nothing was trained", "trained-token ratio", "packing efficiency", "estimated peak memory",
                 "trainable parameters", "token length"):
        assert text in result.stdout
    assert not runs_dir.exists()


@pytest.fixture
def smollm_config():
    from transformers import LlamaConfig

    # SmolLM2-135M's shape.
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)


def recipe_of(**sections) -> Recipe:
    return Recipe.model_validate({"model": {"path": "x"}, "method": {"kind": "lora", "r": 16},
                                  "data": {"train": "x.jsonl", "max_length": 256}, **sections})


def test_memory_estimate_moves_the_right_way(smollm_config):
    from ftcli.training.preflight import estimate_peak_memory

    base = estimate_peak_memory(recipe_of(training={"batch_size": 8, "precision": "fp32"}), smollm_config, "cpu")
    assert base["precision"] == "fp32"
    assert base["parts"]["weights"] == pytest.approx(134.5e6 * 4, rel=0.01)   # 134.5 M parameters in fp32
    # The LM head on the CPU (ftcli/models/fused_head.py): chunks of 1024 positions x the 49152-word vocabulary, 1.5
    # fp32 copies at the peak, over every position unless the data says how many are labelled.
    assert base["parts"]["logits"] == 1024 * 49152 * 4 * 3 // 2
    answers_only = estimate_peak_memory(recipe_of(training={"batch_size": 8, "precision": "fp32"}), smollm_config,
                                        "cpu", labelled_tokens=100)
    assert answers_only["parts"]["logits"] == 100 * 49152 * 4 * 3 // 2
    assert answers_only["labelled_tokens_per_batch"] == 100
    assert base["total_bytes"] - answers_only["total_bytes"] == (1024 - 100) * 49152 * 4 * 3 // 2
    checkpointed = estimate_peak_memory(
        recipe_of(training={"batch_size": 8, "gradient_checkpointing": True, "precision": "fp32"}), smollm_config,
        "cpu")
    assert checkpointed["parts"]["activations"] < base["parts"]["activations"] / 4
    qlora = estimate_peak_memory(
        Recipe.model_validate({"model": {"path": "x"}, "method": {"kind": "qlora", "r": 16},
                               "data": {"train": "x.jsonl", "max_length": 256},
                               "training": {"batch_size": 8, "precision": "fp32"}}),
        smollm_config, "cpu")
    assert qlora["parts"]["weights"] < base["parts"]["weights"] / 2
    # On the CPU: the fp32 checkpoint's pages read while quantizing stay in RSS; bf16 compute keeps fewer bytes.
    assert qlora["parts"]["checkpoint_pages"] == pytest.approx(134.5e6 * 4, rel=0.01)
    assert qlora["parts"]["activations"] == pytest.approx(0.82 * base["parts"]["activations"], rel=1e-6)
    assert "checkpoint_pages" not in base["parts"]
    # bf16 autocast of the fp32 weights on the CPU: fewer activation bytes, plus bf16 copies of the linear weights.
    autocast = estimate_peak_memory(recipe_of(training={"batch_size": 8, "precision": "bf16"}), smollm_config, "cpu")
    assert autocast["parts"]["activations"] == pytest.approx(0.70 * base["parts"]["activations"], rel=1e-6)
    assert 0 < autocast["parts"]["autocast_weight_copies"] < base["parts"]["weights"] / 2
    doubled = estimate_peak_memory(recipe_of(training={"batch_size": 16, "precision": "fp32"}), smollm_config, "cpu")
    assert doubled["parts"]["activations"] == 2 * base["parts"]["activations"]
    # bench/RESULTS.md: LoRA r16 on q/k/v/o, batch 8, every row 256 tokens long peaked at 7,235 MiB (7.6e9 B) RSS on
    # the CPU; all-linear keeps a little more.
    assert 6.4e9 < base["total_bytes"] < 9.5e9


def test_memory_estimate_pads_batches_to_the_longest_example(smollm_config):
    from ftcli.training.memory_estimate import padded_length
    from ftcli.training.preflight import estimate_peak_memory

    training = {"batch_size": 8, "precision": "fp32"}
    full = estimate_peak_memory(recipe_of(training=training), smollm_config, "cpu")
    short = estimate_peak_memory(recipe_of(training=training), smollm_config, "cpu", longest_example=64)
    assert short["tokens_per_batch"] == 8 * 64 and full["tokens_per_batch"] == 8 * 256
    assert short["parts"]["activations"] < full["parts"]["activations"] / 3
    assert padded_length(recipe_of(), 1000) == 256                                     # truncated to max_length
    assert padded_length(recipe_of(data={"train": "x.jsonl", "max_length": 256, "packing": True}), 64) == 256
    assert padded_length(recipe_of(), None) == 256
    # DPO: two sequences a pair; GRPO: the prompt and the longest completion it may sample
    dpo = recipe_of(objective="dpo", data={"train": "x.jsonl", "max_length": 256, "format": "preference"},
                    training=training)
    assert estimate_peak_memory(dpo, smollm_config, "cpu", longest_example=64)["tokens_per_batch"] == 8 * 64 * 2
    grpo = recipe_of(objective={"kind": "grpo", "max_completion_length": 32, "rewards": [{"kind": "exact_match"}]},
                     data={"train": "x.jsonl", "max_length": 256, "format": "prompt"}, training=training)
    assert padded_length(grpo, 50) == 82 and padded_length(grpo, 250) == 256
