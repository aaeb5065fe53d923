"""Packing: best-fit rows, boundary labels, and isolation of packed examples checked through the model's logits."""

from __future__ import annotations

import pytest
from helpers import memorisable_chat, write_jsonl

from ftcli.data import pipeline as data
from ftcli.data.packing import pack_examples, packed_position_ids
from ftcli.data.pipeline import IGNORE_INDEX
from ftcli.recipe.schema import Recipe


def test_best_fit_decreasing_fills_rows_and_masks_boundaries():
    sizes = [7, 5, 4, 3, 3, 2, 1]
    examples = [(list(range(100 * n, 100 * n + n)), list(range(100 * n, 100 * n + n))) for n in sizes]
    rows = pack_examples(examples, max_length=10)
    assert sorted(sum(r.seq_lengths) for r in rows) == [5, 10, 10]
    assert sorted(length for r in rows for length in r.seq_lengths) == sorted(sizes)
    for row in rows:
        assert len(row.input_ids) == len(row.labels) == sum(row.seq_lengths) <= 10
        start = 0
        for length in row.seq_lengths:   # each example's first token is never a target
            assert row.labels[start] == IGNORE_INDEX
            assert row.labels[start + 1:start + length] == row.input_ids[start + 1:start + length]
            start += length
    assert packed_position_ids([3, 2], 7) == [0, 1, 2, 0, 1, 0, 1]


def test_prepare_data_packs_and_reports_efficiency(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    path = write_jsonl(tmp_path / "d.jsonl", memorisable_chat(12))
    recipe = Recipe.model_validate({"model": {"path": "x"}, "method": {"kind": "lora"},
                                    "data": {"train": str(path), "max_length": 128, "packing": True}})
    prepared = data.prepare_data(recipe, tokenizer)
    report = prepared.train_report
    assert report.rows < report.examples == 12
    assert sum(len(ids) for ids in prepared.train["input_ids"]) == report.total_tokens
    assert report.packing_efficiency == pytest.approx(report.total_tokens / (report.rows * 128), abs=1e-4)
    assert all(sum(lengths) == len(ids) for lengths, ids in zip(prepared.train["seq_lengths"],
                                                                prepared.train["input_ids"]))
    batch = data.make_collator(recipe, tokenizer)([prepared.train[i] for i in range(2)])
    from ftcli.data.packing import REAL_TOKENS_KEY

    assert set(batch) == {"input_ids", "labels", "position_ids", REAL_TOKENS_KEY}
    assert int(batch[REAL_TOKENS_KEY]) == sum(len(prepared.train[i]["input_ids"]) for i in range(2))
    unpacked = recipe.model_copy(update={"data": recipe.data.model_copy(update={"packing": False})})
    assert set(data.make_collator(unpacked, tokenizer)([prepared.train[0]])) == {
        "input_ids", "labels", "attention_mask"}


def test_flash_attention_gets_one_flattened_row():
    from ftcli.data.packing import PackedCollator

    rows = [{"input_ids": [5, 6, 7, 8], "labels": [-100, 6, -100, 8], "seq_lengths": [2, 2]},
            {"input_ids": [9, 10, 11], "labels": [-100, 10, 11], "seq_lengths": [3]}]
    batch = PackedCollator(pad_token_id=2, flatten=True)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11]]
    assert batch["labels"].tolist() == [[-100, 6, -100, 8, -100, 10, 11]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 0, 1, 2]]
    assert int(batch["ftcli_real_tokens"]) == 7
    recipe = Recipe.model_validate({"model": {"path": "x", "attn_implementation": "flash_attention_2"},
                                    "method": {"kind": "lora"}, "data": {"train": "x.jsonl", "packing": True}})

    class Tokenizer:
        pad_token_id = eos_token_id = 2

    assert data.make_collator(recipe, Tokenizer()).flatten is True


def test_packing_refused_for_virtual_token_methods(tmp_path):
    from ftcli.errors import UsageError

    recipe = Recipe.model_validate({"model": {"path": "x"}, "method": {"kind": "prefix"},
                                    "data": {"train": "x.jsonl", "packing": True}})
    with pytest.raises(UsageError, match="data.packing is not supported with method prefix"):
        data.prepare_data(recipe, tokenizer=None)


def test_packed_examples_do_not_attend_to_each_other(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from ftcli.data.packing import PackedCollator

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    first, second = list(range(100, 113)), list(range(500, 509))
    packed_row = {"input_ids": first + second, "labels": first + second, "seq_lengths": [13, 9]}
    alone_row = {"input_ids": second, "labels": second, "seq_lengths": [9]}
    collate = PackedCollator(pad_token_id=2)
    with torch.no_grad():
        packed = collate([packed_row, alone_row])   # the second row is padded: padding must not leak either
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        alone = model(input_ids=torch.tensor([second]), use_cache=False).logits[0]
        first_alone = model(input_ids=torch.tensor([first]), use_cache=False).logits[0]
        # The counter-check: the same row with plain positions lets the second example see the first.
        leaky = model(input_ids=packed["input_ids"][:1], use_cache=False).logits[0]
    torch.testing.assert_close(logits[0, 13:], alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits[0, :13], first_alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits[1, :9], alone, atol=1e-5, rtol=1e-4)
    assert (leaky[13:] - alone).abs().max() > 1e-3


def test_packed_batch_trains_through_sft_trainer(tmp_path, tiny_model_dir):
    """One step of TRL's SFTTrainer on packed rows, as train.py runs it (our collator, prepared dataset)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from ftcli.data.packing import REAL_TOKENS_KEY
    from ftcli.training.trainer import FtcliSFTTrainer, RealTokenCount

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    path = write_jsonl(tmp_path / "d.jsonl", memorisable_chat(8))
    recipe = Recipe.model_validate({"model": {"path": str(tiny_model_dir)}, "method": {"kind": "lora"},
                                    "data": {"train": str(path), "max_length": 96, "packing": True}})
    prepared = data.prepare_data(recipe, tokenizer)
    seen = []
    collator = data.make_collator(recipe, tokenizer)

    def spy(features):
        batch = collator(features)
        seen.append(batch)
        return batch

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2, report_to=[],
                     bf16=False, gradient_checkpointing=False, use_cpu=True, packing=False, max_length=96,
                     dataset_kwargs={"skip_prepare_dataset": True}, save_strategy="no", logging_steps=1)
    real_tokens = RealTokenCount()
    trainer = FtcliSFTTrainer(model=model, args=args, train_dataset=prepared.train, processing_class=tokenizer,
                              data_collator=spy, real_tokens=real_tokens, group_by_length=False)
    output = trainer.train()
    assert output.training_loss > 0
    # Real tokens, not TRL's one row width per packed batch: the rows' own lengths.
    assert real_tokens.total == int(seen[0][REAL_TOKENS_KEY]) == sum(
        len(row) for row in prepared.train[:2]["input_ids"]) > seen[0]["input_ids"].shape[1]
    assert "position_ids" in seen[0] and "attention_mask" not in seen[0]
    assert (seen[0]["position_ids"][:, 1:] == 0).any()   # rows really hold several examples
