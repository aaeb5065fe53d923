"""Data pipeline: sources, record formats, templates, loss masks (checked token by token), splits and the cache."""

from __future__ import annotations

import csv
import json

import pytest
from helpers import memorisable_chat, write_jsonl

from ftcli.data import pipeline as data
from ftcli.data.pipeline import IGNORE_INDEX, Conversation
from ftcli.errors import DataError, NotAvailableError, UsageError
from ftcli.recipe.schema import DataConfig, Recipe

HI_HELLO = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def make_recipe(train, **data_fields) -> Recipe:
    training = data_fields.pop("training", {})
    return Recipe.model_validate({
        "model": {"path": "unused"}, "method": {"kind": "lora"}, "training": training,
        "data": {"train": train if isinstance(train, list) else str(train), **data_fields},
    })


def trained_pieces(tokenizer, input_ids, labels) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    pieces, current = [], []
    for token, label in zip(input_ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            pieces.append(tokenizer.decode(current))
            current = []
    if current:
        pieces.append(tokenizer.decode(current))
    return pieces


# ---------------------------------------------------------------------------------------------- masking


def test_completion_mask_is_exactly_the_answer_and_its_end_of_turn(tmp_path, tokenizer):
    recipe = make_recipe(write_jsonl(tmp_path / "d.jsonl", [HI_HELLO]))
    prepared = data.prepare_data(recipe, tokenizer)
    row = prepared.train[0]
    # Hand-checked with the SmolLM2 tokenizer: 21 tokens of default system turn, 6 of user turn, 4 of generation
    # prompt (<|im_start|>assistant\n), then "Hello" (19556) and <|im_end|> (2, also the pad id), then "\n" (198).
    assert row["input_ids"] == [
        1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182, 2,
        198, 1, 4093, 198, 26843, 2, 198, 1, 520, 9531, 198, 19556, 2, 198]
    assert row["labels"] == [IGNORE_INDEX] * 31 + [19556, 2] + [IGNORE_INDEX]
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 2
    report = prepared.train_report
    assert (report.examples, report.trained_tokens, report.total_tokens, report.dropped) == (1, 2, 34, 0)


def test_every_assistant_turn_trains_with_its_end_token(tmp_path, tokenizer):
    record = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "One?"}, {"role": "assistant", "content": "Uno"},
        {"role": "user", "content": "Two?"}, {"role": "assistant", "content": "Dos"},
    ]}
    prepared = data.prepare_data(make_recipe(write_jsonl(tmp_path / "d.jsonl", [record])), tokenizer)
    row = prepared.train[0]
    assert trained_pieces(tokenizer, row["input_ids"], row["labels"]) == ["Uno<|im_end|>", "Dos<|im_end|>"]
    assert "You are a helpful" not in tokenizer.decode(row["input_ids"])   # our system prompt replaced the default


def test_train_on_all_trains_every_token(tmp_path, tokenizer):
    prepared = data.prepare_data(make_recipe(write_jsonl(tmp_path / "d.jsonl", [HI_HELLO]), train_on="all"),
                                 tokenizer)
    row = prepared.train[0]
    assert row["labels"] == row["input_ids"]


def test_text_format_trains_all_tokens_and_appends_eos(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "The cat sat."}])
    prepared = data.prepare_data(make_recipe(path, format="text"), tokenizer)
    row = prepared.train[0]
    assert row["input_ids"] == tokenizer("The cat sat.")["input_ids"] + [tokenizer.eos_token_id]
    assert row["labels"] == row["input_ids"]
    assert prepared.chat_template is None


def test_truncation_counted_and_all_masked_examples_dropped_and_reported(tmp_path, tokenizer):
    long_prompt = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    records = [HI_HELLO] * 9 + [long_prompt]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    prepared = data.prepare_data(make_recipe(path, max_length=40, max_dropped_fraction=0.2), tokenizer)
    report = prepared.train_report
    assert (report.examples, report.truncated, report.dropped, report.rows) == (10, 1, 1, 9)
    assert len(prepared.train) == 9
    assert all(len(ids) <= 40 for ids in prepared.train["input_ids"])
    assert report.length_stats["max"] > 200

    with pytest.raises(DataError, match=r"1 of 10 train examples .*max_dropped_fraction 0.05.*d.jsonl:10"):
        data.prepare_data(make_recipe(path, max_length=40), tokenizer)
    with pytest.raises(DataError, match="no train example has a trainable token left"):
        data.prepare_data(make_recipe(write_jsonl(tmp_path / "long.jsonl", [long_prompt]), max_length=40), tokenizer)


def test_truncation_keeps_a_partially_cut_answer(tmp_path, tokenizer):
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a b c d e f g h"}]}
    prepared = data.prepare_data(make_recipe(write_jsonl(tmp_path / "d.jsonl", [record]), max_length=36), tokenizer)
    row = prepared.train[0]
    assert len(row["input_ids"]) == 36
    # 31 prompt tokens (see above) leave 5 of the answer: no end-of-turn token, the cut answer still trains.
    assert trained_pieces(tokenizer, row["input_ids"], row["labels"]) == ["a b c d e"]
    assert prepared.train_report.truncated == 1


# ---------------------------------------------------------------------------------------------- formats


def conversations_of(path, **data_fields) -> list[Conversation]:
    train = path if isinstance(path, list) else str(path)
    return data.load_conversations(DataConfig.model_validate({"train": train, **data_fields}))


def test_instruction_format_with_and_without_input_and_system_prompt(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "Translate", "input": "chat", "output": "cat"},
        {"instruction": "Say hi", "input": "", "output": "hi"},
        {"instruction": "Say yo", "output": "yo"},
    ])
    first, second, third = conversations_of(path, format="instruction", system_prompt="Be kind.")
    assert first.messages == [{"role": "system", "content": "Be kind."},
                              {"role": "user", "content": "Translate\n\nchat"},
                              {"role": "assistant", "content": "cat"}]
    assert second.messages[1] == {"role": "user", "content": "Say hi"}
    assert third.messages[2] == {"role": "assistant", "content": "yo"}
    assert first.origin == f"{path}:1"


def test_prompt_completion_format_and_column_mapping(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": "2+2?", "a": "4"}])
    [conversation] = conversations_of(path, format="prompt_completion", columns={"prompt": "q", "completion": "a"})
    assert conversation.messages == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]


def test_sharegpt_conversations(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"conversations": [
        {"from": "system", "value": "S"}, {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}])
    [conversation] = conversations_of(path, format="chat", sharegpt=True, columns={"messages": "conversations"})
    assert [m["role"] for m in conversation.messages] == ["system", "user", "assistant"]
    assert conversation.messages[2]["content"] == "A"


@pytest.mark.parametrize("bad, message", [
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "bot", "content": "A"}]},
     r"d.jsonl:2: messages\[1\] has role 'bot'; allowed: system, user, assistant"),
    ({"messages": [{"role": "user", "content": "Q"}]}, r"d.jsonl:2: messages has no assistant turn"),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": None}]},
     r"d.jsonl:2: messages\[1\].content is null"),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "  "}]},
     r"d.jsonl:2: messages\[1\].content is empty"),
    ({"text": "hello"}, r"d.jsonl:2: missing column 'messages'; columns present: text"),
    ({"messages": "hi"}, r"d.jsonl:2: messages must be a list of messages"),
])
def test_bad_chat_records_name_file_and_line(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "d.jsonl", [HI_HELLO, bad])
    with pytest.raises(DataError, match=message):
        conversations_of(path)


# ---------------------------------------------------------------------------------------------- sources


def test_json_csv_parquet_saved_folder_and_several_files(tmp_path):
    records = memorisable_chat(4)
    (tmp_path / "d.json").write_text(json.dumps(records), encoding="utf-8")
    with open(tmp_path / "d.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["prompt", "completion"])
        writer.writeheader()
        writer.writerows({"prompt": r["messages"][0]["content"], "completion": r["messages"][1]["content"]}
                         for r in records)
    from datasets import Dataset, DatasetDict

    Dataset.from_list(records).to_parquet(str(tmp_path / "d.parquet"))
    DatasetDict({"train": Dataset.from_list(records), "test": Dataset.from_list(records[:1])}).save_to_disk(
        str(tmp_path / "saved"))
    expected = [r["messages"] for r in records]

    assert [c.messages for c in conversations_of(tmp_path / "d.json")] == expected
    assert [c.messages for c in conversations_of(tmp_path / "d.csv", format="prompt_completion")] == expected
    assert [c.messages for c in conversations_of(tmp_path / "d.parquet")] == expected
    assert [c.messages for c in conversations_of(tmp_path / "saved")] == expected
    evaluation = data.load_conversations(DataConfig(train=str(tmp_path / "saved"), eval=str(tmp_path / "saved")),
                                         "eval")
    assert [c.messages for c in evaluation] == expected[:1]
    both = conversations_of([str(tmp_path / "d.json"), str(tmp_path / "d.parquet")])
    assert len(both) == 8 and both[4].origin == f"{tmp_path / 'd.parquet'} row 0"


def test_bom_and_json_lines_named_json(tmp_path):
    content = "".join(json.dumps(r) + "\n" for r in memorisable_chat(3)).encode()
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + content)
    (tmp_path / "lines.json").write_bytes(content)
    assert len(conversations_of(tmp_path / "bom.jsonl")) == 3
    assert [c.origin for c in conversations_of(tmp_path / "lines.json")][-1] == f"{tmp_path / 'lines.json'}:3"
    (tmp_path / "broken.json").write_text('[{"messages": []},\n  {"messages": [}]', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken.json:2: not valid JSON"):
        conversations_of(tmp_path / "broken.json")


def test_val_split_is_seeded_deterministic_and_disjoint(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", memorisable_chat(20))
    config = DataConfig(train=str(path), val_split=0.25)
    train = data.load_conversations(config, "train", seed=1)
    held_out = data.load_conversations(config, "eval", seed=1)
    assert (len(train), len(held_out)) == (15, 5)
    assert {c.origin for c in train}.isdisjoint({c.origin for c in held_out})
    assert [c.origin for c in data.load_conversations(config, "eval", seed=1)] == [c.origin for c in held_out]
    assert [c.origin for c in data.load_conversations(config, "eval", seed=2)] != [c.origin for c in held_out]


def test_eval_file_and_eval_override(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", memorisable_chat(4))
    other = write_jsonl(tmp_path / "other.jsonl", [HI_HELLO])
    config = DataConfig(train=str(train), val_split=0.5)
    [conversation] = data.load_conversations(data.with_eval_source(config, str(other)), "eval")
    assert conversation.messages == HI_HELLO["messages"]
    with pytest.raises(DataError, match="no eval data"):
        data.load_conversations(DataConfig(train=str(train)), "eval")
    train.unlink()   # eval of a finished run must not need the training files
    assert len(data.load_conversations(DataConfig(train=str(train), eval=str(other)), "eval")) == 1


def test_hub_dataset_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(NotAvailableError, match="hub dataset someone/some-data is not available offline") as info:
        data.load_conversations(DataConfig(train="someone/some-data"))
    assert info.value.exit_code == 4


# ---------------------------------------------------------------------------------------------- templates


def test_template_choice_inline_file_default_and_missing(tmp_path, tokenizer):
    config = DataConfig(train="x.jsonl")
    assert data.resolve_chat_template(config, tokenizer) == tokenizer.chat_template
    inline = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    assert data.resolve_chat_template(DataConfig(train="x.jsonl", chat_template=inline), tokenizer) == inline
    template_file = tmp_path / "t.jinja"
    template_file.write_text(inline, encoding="utf-8")
    assert data.resolve_chat_template(
        DataConfig(train="x.jsonl", chat_template_file=str(template_file)), tokenizer) == inline
    assert data.resolve_chat_template(DataConfig(train="x.jsonl", format="text"), tokenizer) is None

    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    base.chat_template = None
    with pytest.raises(UsageError, match="has no chat template") as info:
        data.resolve_chat_template(config, base)
    assert "data.default_chat_template: chatml" in str(info.value)
    assert data.resolve_chat_template(DataConfig(train="x.jsonl", default_chat_template="chatml"), base) \
        == data.CHATML_TEMPLATE
    with pytest.raises(NotAvailableError, match="chat template file not found"):
        data.resolve_chat_template(DataConfig(train="x.jsonl", chat_template_file=str(tmp_path / "no.jinja")),
                                   tokenizer)
    with pytest.raises(UsageError, match="data.chat_template cannot render"):
        data.resolve_chat_template(DataConfig(train="x.jsonl", chat_template="{% for %}"), tokenizer)


def test_chatml_default_masks_without_system_prompt(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    base.chat_template = None
    path = write_jsonl(tmp_path / "d.jsonl", [HI_HELLO])
    prepared = data.prepare_data(make_recipe(path, default_chat_template="chatml"), base)
    row = prepared.train[0]
    assert tokenizer.decode(row["input_ids"]).startswith("<|im_start|>user\nHi")
    assert trained_pieces(tokenizer, row["input_ids"], row["labels"]) == ["Hello<|im_end|>"]


def test_template_whose_tokens_merge_across_the_boundary_falls_back_to_offsets(tmp_path, tokenizer):
    # The generation prompt ends in "A:" and the answer follows without a space: "A:" + "Hello" may tokenize
    # differently from "A:Hello"; the answer must still be found exactly.
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}Q:{{ m['content'] }}\n"
                "{% else %}A:{{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}A:{% endif %}")
    record = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "::yes"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    prepared = data.prepare_data(make_recipe(path, chat_template=template), tokenizer)
    row = prepared.train[0]
    pieces = trained_pieces(tokenizer, row["input_ids"], row["labels"])
    assert len(pieces) == 1 and pieces[0].endswith("yes<|im_end|>")
    assert prepared.train_report.prefix_mismatches >= 1


def test_split_for_generation(tokenizer):
    conversation = Conversation(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}])
    prompt, answer = data.split_for_generation(conversation, tokenizer, tokenizer.chat_template)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert answer == "Yo"


# ---------------------------------------------------------------------------------------------- collator, cache


def test_padding_collator_keeps_eos_label_although_pad_is_eos(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [HI_HELLO, {"messages": [
        {"role": "user", "content": "Hi there, how are you today?"}, {"role": "assistant", "content": "Fine"}]}])
    recipe = make_recipe(path)
    prepared = data.prepare_data(recipe, tokenizer)
    batch = data.make_collator(recipe, tokenizer)([prepared.train[0], prepared.train[1]])
    short = 0 if len(prepared.train[0]["input_ids"]) < len(prepared.train[1]["input_ids"]) else 1
    length = len(prepared.train[short]["input_ids"])
    assert batch["attention_mask"][short].tolist() == [1] * length + [0] * (batch["input_ids"].shape[1] - length)
    assert (batch["labels"][short, length:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][short, length:] == tokenizer.pad_token_id).all()
    assert batch["labels"][short].tolist()[:length] == prepared.train[short]["labels"]
    assert tokenizer.eos_token_id in batch["labels"][short].tolist()


def test_cache_hit_and_one_byte_change_retokenizes(tmp_path, tokenizer, monkeypatch):
    from ftcli.data import build

    path = write_jsonl(tmp_path / "d.jsonl", [HI_HELLO])
    recipe = make_recipe(path)
    first = data.prepare_data(recipe, tokenizer)
    calls = []
    original = build.tokenize_chunk
    monkeypatch.setattr(build, "tokenize_chunk", lambda *a, **k: calls.append(1) or original(*a, **k))
    again = data.prepare_data(recipe, tokenizer)
    assert calls == [] and again.train["labels"] == first.train["labels"]
    assert again.chat_template == first.chat_template and again.train_report == first.train_report

    path.write_text(path.read_text().replace("Hello", "Hellp"), encoding="utf-8")   # one byte
    changed = data.prepare_data(recipe, tokenizer)
    assert calls == [1]
    assert tokenizer.decode(changed.train[0]["input_ids"]).count("Hellp") == 1
    data.prepare_data(make_recipe(path, max_length=33), tokenizer)
    assert calls == [1, 1]   # a data setting is part of the key too


def test_num_proc_prepares_in_processes_with_the_same_result(tmp_path, tokenizer, monkeypatch):
    """A file cut into pieces prepared by two processes: the same rows in the same order, counts summed, and an
    error in a later piece still named with its true line."""
    import os

    from ftcli.data import build, sources

    pid_log = tmp_path / "pids"
    build_piece = build.build_piece

    def spy(*args, **kwargs):   # runs in the forked workers too: they append to a file
        with open(pid_log, "a", encoding="ascii") as log:
            log.write(f"{os.getpid()}\n")
        return build_piece(*args, **kwargs)

    monkeypatch.setattr(build, "build_piece", spy)
    monkeypatch.setattr(sources, "MIN_PIECE_BYTES", 4096)   # several pieces from a small file
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")  # restored after the test

    template = ("{% for m in messages %}{% if m['content'] == 'boom' %}{{ raise_exception('no boom') }}{% endif %}"
                "{% if m['role'] == 'user' %}Q:{{ m['content'] }}\n"
                "{% else %}A:{{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}A:{% endif %}")
    records = memorisable_chat(1200)
    records[7]["messages"][1]["content"] = "::yes"   # tokens merge across the answer boundary: counted
    path = write_jsonl(tmp_path / "d.jsonl", records)
    results = {}
    for workers in (1, 2):
        monkeypatch.setenv("FTCLI_CACHE_DIR", str(tmp_path / f"cache-{workers}"))   # num_proc is not in the key
        results[workers] = data.prepare_data(make_recipe(path, chat_template=template, num_proc=workers,
                                                         val_split=0.1), tokenizer)
    worker_pids = set(pid_log.read_text().split())
    assert str(os.getpid()) in worker_pids and len(worker_pids) >= 3   # the pieces really ran in other processes
    single, forked = results[1], results[2]
    assert forked.train_report.processes == 2 and single.train_report.processes == 1
    assert single.train["input_ids"] == forked.train["input_ids"] and single.train["labels"] == forked.train["labels"]
    assert single.eval["input_ids"] == forked.eval["input_ids"]
    assert single.train_report.to_dict() | {"processes": 2} == forked.train_report.to_dict()
    assert forked.train_report.prefix_mismatches >= 1
    assert forked.train_report.examples + forked.eval_report.examples == 1200

    records[1100]["messages"][0]["content"] = "boom"   # in a late piece, a worker's
    write_jsonl(path, records)
    with pytest.raises(DataError, match="d.jsonl:1101") as failure:
        data.prepare_data(make_recipe(path, chat_template=template, num_proc=2), tokenizer)
    assert "no boom" in str(failure.value)
