"""Bad training data through the real CLI (`ftcli train RECIPE --dry-run`): message with file and line, exit code."""

from __future__ import annotations

import json

import pytest
from helpers import memorisable_chat, write_jsonl

GOOD = memorisable_chat(2)


def write_bytes(path, content: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def lines(*records) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records)


CASES = {
    "broken_json_line": (lines(GOOD[0], b'{"messages": [', GOOD[1]), 3, r"train.jsonl:2: not valid JSON"),
    "invalid_utf8": (lines(GOOD[0], GOOD[1], b'{"messages": "caf\xe9"}'), 3, r"train.jsonl:3: invalid UTF-8"),
    "empty_file": (b"", 3, r"train.jsonl: the data file is empty"),
    "missing_column": (lines({"prompt": "a", "answer": "b"}), 3,
                       r"train.jsonl:1: missing column 'messages'; columns present: answer, prompt"),
    "wrong_role": (lines(GOOD[0], {"messages": [{"role": "human", "content": "a"},
                                                {"role": "assistant", "content": "b"}]}), 3,
                   r"train.jsonl:2: messages\[0\] has role 'human'; allowed: system, user, assistant"),
    "null_field": (lines({"messages": [{"role": "user", "content": None},
                                       {"role": "assistant", "content": "b"}]}), 3,
                   r"train.jsonl:1: messages\[0\].content is null"),
    "no_assistant_turn": (lines(GOOD[0], GOOD[1], {"messages": [{"role": "user", "content": "a"}]}), 3,
                          r"train.jsonl:3: messages has no assistant turn \(nothing to train on\)"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_data_file(cli_inproc, tiny_recipe, tmp_path, runs_dir, case):
    content, exit_code, message = CASES[case]
    data_file = write_bytes(tmp_path / "bad" / "train.jsonl", content)
    result = cli_inproc("train", tiny_recipe, "--dry-run", "--set", f"data.train={data_file}")
    assert result.exit_code == exit_code, result
    assert re_search(message, result.stderr), result
    assert "Traceback" not in result.stderr
    assert not runs_dir.exists()


def re_search(pattern: str, text: str) -> bool:
    import re

    return re.search(pattern, text) is not None


def test_missing_file_is_not_available(cli_inproc, tiny_recipe, tmp_path):
    result = cli_inproc("train", tiny_recipe, "--dry-run", "--set", f"data.train={tmp_path / 'nope.jsonl'}")
    assert result.exit_code == 4, result
    assert "data file not found" in result.stderr and "nope.jsonl" in result.stderr


def test_directory_instead_of_file(cli_inproc, tiny_recipe, tmp_path):
    (tmp_path / "folder").mkdir()
    result = cli_inproc("train", tiny_recipe, "--dry-run", "--set", f"data.train={tmp_path / 'folder'}")
    assert result.exit_code == 3, result
    assert "is a folder with no data files" in result.stderr


def test_hub_dataset_offline(cli_inproc, tiny_recipe):
    result = cli_inproc("train", tiny_recipe, "--dry-run", "--set", "data.train=someone/some-dataset")
    assert result.exit_code == 4, result
    assert "hub dataset someone/some-dataset is not available offline" in result.stderr


def test_sharegpt_roles_checked(cli_inproc, tiny_recipe, tmp_path):
    data_file = write_jsonl(tmp_path / "sg.jsonl", [{"conversations": [
        {"from": "human", "value": "a"}, {"from": "assistant", "value": "b"}]}])
    result = cli_inproc("train", tiny_recipe, "--dry-run", "--set", f"data.train={data_file}",
                        "--set", "data.sharegpt=true")
    assert result.exit_code == 3, result
    assert "sg.jsonl:1: conversations[1] has role 'assistant'; allowed: human, gpt, system" in result.stderr


def test_every_example_truncated_to_nothing(cli_inproc, tiny_recipe, tmp_path):
    data_file = write_jsonl(tmp_path / "long.jsonl", [
        {"messages": [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "ok"}]}])
    result = cli_inproc("train", tiny_recipe, "--dry-run", "--set", f"data.train={data_file}")
    assert result.exit_code == 3, result
    assert "no train example has a trainable token left after truncation to data.max_length 64" in result.stderr
    assert "long.jsonl:1" in result.stderr


def test_model_without_chat_template(cli_inproc, tiny_recipe, tmp_path, tiny_model_dir):
    import shutil

    model_dir = tmp_path / "base-model"
    shutil.copytree(tiny_model_dir, model_dir)
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    result = cli_inproc("train", tiny_recipe, "--dry-run", "--set", f"model.path={model_dir}")
    assert result.exit_code == 2, result
    assert "has no chat template" in result.stderr and "data.default_chat_template: chatml" in result.stderr
    fixed = cli_inproc("train", tiny_recipe, "--dry-run", "--json", "--set", f"model.path={model_dir}",
                "--set", "data.default_chat_template=chatml")
    assert fixed.exit_code == 0, fixed
    assert fixed.json()["chat_template"].startswith("{% for message in messages %}")
