"""Data at scale: mixing sources by weight, samples and fraction; shards; hub options; the remembered file hashes."""

from __future__ import annotations

import json

import pytest
from helpers import memorisable_chat, write_jsonl

from ftcli.data import pipeline as data
from ftcli.errors import DataError, NotAvailableError
from ftcli.recipe.schema import Recipe


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def make_recipe(train, seed: int = 7, **data_fields) -> Recipe:
    return Recipe.model_validate({"model": {"path": "unused"}, "method": {"kind": "lora"},
                                  "training": {"seed": seed}, "data": {"train": train, **data_fields}})


def chat_records(tag: str, n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"{tag} question {i}"},
                          {"role": "assistant", "content": f"{tag} answer {i}"}]} for i in range(n)]


def instruction_records(n: int) -> list[dict]:
    return [{"instruction": f"instr {i}", "output": f"out {i}"} for i in range(n)]


def tags_of(prepared, tokenizer) -> list[str]:
    """Which source each training row came from, read back from its text."""
    texts = tokenizer.batch_decode(prepared.train[:]["input_ids"])
    return [next(tag for tag in ("chatA", "instr", "plain") if tag in text) for text in texts]


def test_mixing_weights_samples_and_fractions_realise_their_proportions(tmp_path, tokenizer):
    chat = write_jsonl(tmp_path / "chat.jsonl", chat_records("chatA", 300))
    instructions = write_jsonl(tmp_path / "instr.jsonl", instruction_records(200))
    texts = write_jsonl(tmp_path / "text.jsonl", [{"body": f"plain text {i}"} for i in range(100)])
    sources = [{"path": str(chat), "weight": 0.5},
               {"path": str(instructions), "format": "instruction", "weight": 2.5},
               {"path": str(texts), "format": "text", "columns": {"text": "body"}, "fraction": 0.3}]
    prepared = data.prepare_data(make_recipe(sources), tokenizer)
    tags = tags_of(prepared, tokenizer)
    # weight 0.5 of 300 = 150; weight 2.5 of 200 = every example twice and a random half again = 500; 30% of 100.
    assert (tags.count("chatA"), tags.count("instr"), tags.count("plain")) == (150, 500, 30)
    shares = {s["source"]: s for s in prepared.train_report.sources}
    assert shares[str(instructions)]["used"] == 500 and shares[str(instructions)]["examples"] == 200
    assert shares[str(chat)]["share_examples"] == pytest.approx(150 / 680, abs=1e-4)
    assert sum(s["share_tokens"] for s in shares.values()) == pytest.approx(1, abs=1e-3)
    assert prepared.train_report.examples == 600 and prepared.train_report.rows == 680
    # Upsampling repeats rows; each instruction example is used 2 or 3 times, none skipped.
    counts = {}
    for text in tokenizer.batch_decode(prepared.train[:]["input_ids"]):
        if "instr" in text:
            key = text.split("instr ")[1].split()[0]
            counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 200 and set(counts.values()) == {2, 3}

    same = data.prepare_data(make_recipe(sources), tokenizer)
    assert same.train["input_ids"] == prepared.train["input_ids"]   # reproducible (a cache hit here)
    other_seed = data.prepare_data(make_recipe(sources, seed=8), tokenizer)
    assert tags_of(other_seed, tokenizer).count("chatA") == 150
    assert other_seed.train["input_ids"] != prepared.train["input_ids"]   # another subset


def test_mixing_is_reproducible_when_prepared_again_from_scratch(tmp_path, tokenizer, monkeypatch):
    chat = write_jsonl(tmp_path / "chat.jsonl", chat_records("chatA", 120))
    sources = [{"path": str(chat), "samples": 50}]
    rows = []
    for attempt in range(2):
        monkeypatch.setenv("FTCLI_CACHE_DIR", str(tmp_path / f"cache-{attempt}"))
        rows.append(data.prepare_data(make_recipe(sources, seed=3), tokenizer).train["input_ids"])
    assert rows[0] == rows[1] and len(rows[0]) == 50


def test_a_sampled_mix_is_within_sampling_error_of_its_weights(tmp_path, tokenizer):
    """Each source's share over many seeds: the mean equals the weights' proportion, the spread is the sampling's."""
    first = write_jsonl(tmp_path / "a.jsonl", chat_records("chatA", 40))
    second = write_jsonl(tmp_path / "b.jsonl", instruction_records(40))
    sources = [{"path": str(first), "weight": 1.5}, {"path": str(second), "format": "instruction", "weight": 0.5}]
    firsts = set()
    for seed in range(4):
        prepared = data.prepare_data(make_recipe(sources, seed=seed), tokenizer)
        tags = tags_of(prepared, tokenizer)
        assert (tags.count("chatA"), tags.count("instr")) == (60, 20)   # 3:1, as the weights say
        firsts.add(tuple(map(tuple, prepared.train[:]["input_ids"])))
    assert len(firsts) > 1   # the seed picks which examples


def test_one_amount_per_source_and_streaming_refuses_mixing():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="one of weight, samples or fraction"):
        make_recipe([{"path": "a.jsonl", "weight": 2.0, "fraction": 0.5}])
    with pytest.raises(ValidationError, match="not with data.streaming"):
        Recipe.model_validate({"model": {"path": "x"}, "method": {"kind": "lora"}, "training": {"max_steps": 3},
                               "data": {"train": [{"path": "a.jsonl", "weight": 2.0}], "streaming": True}})
    with pytest.raises(ValidationError, match="training.max_steps"):
        make_recipe("a.jsonl", streaming=True)


def test_a_glob_and_a_folder_of_shards_are_one_source(tmp_path, tokenizer):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "part-0.jsonl", chat_records("chatA", 5))
    write_jsonl(shards / "part-1.jsonl", chat_records("chatA", 7))
    from datasets import Dataset

    Dataset.from_list(chat_records("chatA", 3)).to_parquet(str(shards / "part-2.parquet"))
    by_glob = data.prepare_data(make_recipe(str(shards / "part-*.jsonl")), tokenizer)
    assert by_glob.train_report.examples == 12
    assert set(by_glob.train_report.fingerprints) == {str(shards / "part-0.jsonl"), str(shards / "part-1.jsonl")}
    by_folder = data.prepare_data(make_recipe(str(shards)), tokenizer)
    assert by_folder.train_report.examples == 15 and len(by_folder.train_report.sources) == 1

    (shards / "part-1.jsonl").write_text('{"messages": [}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"part-1.jsonl:1: not valid JSON"):
        data.prepare_data(make_recipe(str(shards / "*.jsonl")), tokenizer)
    with pytest.raises(NotAvailableError, match="no data file matches"):
        data.prepare_data(make_recipe(str(tmp_path / "nothing-*.jsonl")), tokenizer)


def test_hub_sources_pass_config_split_and_revision(monkeypatch):
    import datasets

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    calls = {}

    def fake_split_names(dataset_id, **options):
        calls["split_names"] = (dataset_id, options)
        return ["train", "test"]

    def fake_load(dataset_id, **options):
        calls["load"] = (dataset_id, options)
        return datasets.Dataset.from_list(chat_records("chatA", 2))

    monkeypatch.setattr(datasets, "get_dataset_split_names", fake_split_names)
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    config = make_recipe({"path": "org/data", "config": "en", "revision": "abc123"}).data
    conversations = data.load_conversations(config)
    assert len(conversations) == 2 and conversations[1].origin == "org/data[train] row 1"
    assert calls["load"] == ("org/data", {"split": "train", "streaming": False, "name": "en", "revision": "abc123"})
    data.load_conversations(make_recipe({"path": "org/data", "split": "test"}).data)
    assert calls["load"][1]["split"] == "test"


def test_a_cache_hit_reads_no_data_file(tmp_path, tokenizer, monkeypatch):
    """The file's hash is remembered by size, mtime and inode: a hit neither hashes nor parses the data again."""
    from ftcli.data import cache, sources

    path = write_jsonl(tmp_path / "d.jsonl", memorisable_chat(30))
    recipe = make_recipe(str(path))
    first = data.prepare_data(recipe, tokenizer)
    opened = []
    monkeypatch.setattr(cache, "sha256_file", lambda p: opened.append(p) or pytest.fail("hashed again"))
    monkeypatch.setattr(sources, "read_piece", lambda piece: pytest.fail("read again"))
    again = data.prepare_data(recipe, tokenizer)
    assert again.train["input_ids"] == first.train["input_ids"] and opened == []
    memo = json.loads((cache.data_cache_root() / cache.FILE_HASHES).read_text())
    assert memo[str(path.resolve())]["sha256"] == first.train_report.fingerprints[str(path)]


def test_prepared_data_is_memory_mapped_from_the_cache(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", memorisable_chat(40))
    prepared = data.prepare_data(make_recipe(str(path), val_split=0.25), tokenizer)
    from ftcli.data.cache import data_cache_root

    files = [f["filename"] for f in prepared.train.cache_files]
    assert files and all(str(data_cache_root()) in name for name in files)
    assert (len(prepared.train), len(prepared.eval)) == (30, 10)
    assert prepared.train_report.examples == 30 and prepared.eval_report.examples == 10
