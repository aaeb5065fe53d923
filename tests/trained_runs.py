"""Runs trained once per test session through the real `ftcli train`, shared by the eval/generate/report tests."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import memorisable_chat, write_jsonl

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

    from conftest import build_tiny_llama

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
