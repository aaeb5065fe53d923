"""Shared fixtures only (helpers live in helpers.py): the isolated cache, tiny Llama models with the embedded
SmolLM2 tokenizer, data and recipes, CLI runners, the runs shared by a whole session, and the hook that marks every
test under tests/e2e slow."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import (
    TINY_RECIPE,
    build_tiny_llama,
    make_run,
    memorisable_chat,
    memorised_run,
    run_cli,
    run_inproc,
    smollm_gguf_path,
    write_jsonl,
    write_recipe,
)

E2E = Path(__file__).resolve().parent / "e2e"


def pytest_collection_modifyitems(config, items):
    """tests/e2e runs the real program and the embedded model: all of it is `slow` (`make test-fast` leaves it out)."""
    for item in items:
        if E2E in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Every test session gets its own ftcli cache; nothing leaks between sessions or into ~/.cache."""
    cache = tmp_path_factory.mktemp("ftcli-cache")
    os.environ["FTCLI_CACHE_DIR"] = str(cache)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ.pop("FTCLI_RUNS_DIR", None)
    yield cache


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The real SmolLM2 tokenizer (49,152 tokens, ChatML template, <|im_end|> EOS) as a plain folder."""
    from transformers import AutoTokenizer

    gguf = smollm_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    out = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer_dir, tied=True)


@pytest.fixture(scope="session")
def tiny_untied_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-untied"), tokenizer_dir, tied=False, kv_heads=4)


@pytest.fixture
def chat_data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "data" / "train.jsonl", memorisable_chat())


@pytest.fixture
def tiny_recipe(tmp_path, tiny_model_dir, chat_data) -> Path:
    """A LoRA recipe on the tiny model and the memorisable chat data; override with --set as needed."""
    return write_recipe(tmp_path / "tiny.yaml", TINY_RECIPE.format(model=tiny_model_dir, data=chat_data))


@pytest.fixture
def runs_dir(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "runs"
    monkeypatch.setenv("FTCLI_RUNS_DIR", str(root))
    return root


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def cli_inproc():
    """Run the CLI in this process (fast: heavy imports are paid once per test session)."""
    return run_inproc


@pytest.fixture(scope="session")
def merged_lora_run(tmp_path_factory, tiny_model_dir):
    """A LoRA run ("tied") on the tied, grouped-query tiny Llama, merged once for the whole session; the GGUF and
    export tests share it."""
    from ftcli.export.merge import merge_run

    run = make_run(tmp_path_factory.mktemp("merged-lora") / "runs", "tied", tiny_model_dir)
    merge_run(run)
    return run


@pytest.fixture(scope="session")
def memorised(tmp_path_factory, tiny_untied_model_dir) -> tuple[Path, str]:
    """The LoRA run that memorises memorisable_chat() (helpers.MEMORISED_RECIPE): (runs root, run name)."""
    return memorised_run(tmp_path_factory, tiny_untied_model_dir)
