"""`ftcli generate` and `ftcli chat` on trained runs of every adapter kind, and the decoding loop underneath."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ASK, base_greedy, lively_model_dir, virtual_token_run

DISTINCTIVE_TEMPLATE = (
    "{% for m in messages %}### {{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}### ASSISTANT:{% endif %}"
)


@pytest.fixture(scope="module")
def lively(tmp_path_factory, tokenizer_dir) -> Path:
    return lively_model_dir(tmp_path_factory, tokenizer_dir)


def generate_json(cli_inproc, runs: Path, name: str, *args: str) -> list[dict]:
    result = cli_inproc("generate", name, "--runs-dir", runs, "--json", *args)
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["run"] == name
    return document["outputs"]


def test_greedy_generation_is_deterministic_and_renders_through_the_saved_template(cli_inproc, memorised, tmp_path,
                                                                                     tiny_untied_model_dir):
    runs, name = memorised
    first = generate_json(cli_inproc, runs, name, "--prompt", ASK, "--max-new-tokens", "8")
    second = generate_json(cli_inproc, runs, name, "--prompt", ASK, "--max-new-tokens", "8")
    assert first == second
    (out,) = first
    assert out["prompt"] == ASK and out["output"]
    assert out["rendered"].endswith(f"<|im_start|>user\n{ASK}<|im_end|>\n<|im_start|>assistant\n")
    # The LoRA run answers where its base (plain transformers, same rendering) only emits newlines.
    assert out["output"] != base_greedy(tiny_untied_model_dir, out["rendered"], 8)
    # Eval's generation metrics go through the same path: its prediction for the same prompt is this output.
    evaluated = cli_inproc("eval", name, "--runs-dir", runs, "--json", "--max-samples", "1", "--batch-size", "1")
    assert json.loads(evaluated.stdout)["samples"][0]["prediction"] == out["output"]

    # The template comes from the run (adapter/chat_template.jinja), not from the tokenizer or the base model.
    shutil.copytree(runs / name, tmp_path / "runs" / "templated")
    (tmp_path / "runs" / "templated" / "adapter" / "chat_template.jinja").write_text(DISTINCTIVE_TEMPLATE)
    (changed,) = generate_json(cli_inproc, tmp_path / "runs", "templated", "--prompt", ASK, "--max-new-tokens", "8")
    assert changed["rendered"] == f"### USER: {ASK}\n### ASSISTANT:"


def test_prompts_from_a_file_and_seeded_sampling(cli_inproc, memorised, tmp_path):
    runs, name = memorised
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{ASK}\n\nSay cat dog\n")
    outputs = generate_json(cli_inproc, runs, name, "--file", str(prompts), "--max-new-tokens", "6")
    assert [o["prompt"] for o in outputs] == [ASK, "Say cat dog"]
    sampled = ["--prompt", ASK, "--temperature", "1.5", "--top-p", "0.95", "--seed", "3", "--max-new-tokens", "6"]
    assert generate_json(cli_inproc, runs, name, *sampled) == generate_json(cli_inproc, runs, name, *sampled)


def test_plain_output_when_not_a_terminal(cli_inproc, memorised):
    runs, name = memorised
    (expected,) = generate_json(cli_inproc, runs, name, "--prompt", ASK, "--max-new-tokens", "8")
    result = cli_inproc("generate", name, "--runs-dir", runs, "--prompt", ASK, "--max-new-tokens", "8")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == expected["output"]


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_virtual_token_runs_generate_with_their_adapter(kind, cli_inproc, tmp_path_factory, lively):
    # transformers' generate() silently drops a prefix-tuning adapter; ftcli must not.
    runs, name = virtual_token_run(tmp_path_factory, lively, kind)
    (out,) = generate_json(cli_inproc, runs, name, "--prompt", ASK, "--max-new-tokens", "6")
    assert out["output"] != base_greedy(lively, out["rendered"], 6)
    evaluated = cli_inproc("eval", name, "--runs-dir", runs, "--json", "--batch-size", "1", "--compare-base")
    assert evaluated.exit_code == 0, evaluated.output
    result = json.loads(evaluated.stdout)
    # Eval generates through the same path, and scores with the adapter: the trainer's own eval loss (virtual
    # tokens prepended by PEFT) is reproduced, and predictions differ from the base model's.
    assert result["samples"][0]["prediction"] == out["output"]
    assert all(s["prediction"] != s["base_prediction"] for s in result["samples"])
    info = json.loads((runs / name / "run.json").read_text())
    assert result["metrics"]["loss"] == pytest.approx(info["metrics"]["eval_loss"], rel=1e-4)
    assert abs(result["metrics"]["loss"] - result["base_metrics"]["loss"]) > 1e-3


@pytest.mark.slow
def test_chat_reads_a_pipe_keeps_history_and_resets(memorised):
    runs, name = memorised
    lines = f"{ASK}\nSay cat dog\n/reset\n\n{ASK}\n/exit\nnever read\n"
    proc = subprocess.run([sys.executable, "-m", "ftcli", "chat", name, "--runs-dir", str(runs),
                           "--max-new-tokens", "8"], input=lines, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    replies = proc.stdout.splitlines()
    assert len(replies) == 4 and replies[2] == "(conversation cleared)", replies
    # After /reset the same question in a fresh conversation gets the same greedy answer as the first time.
    assert replies[3] == replies[0]
    assert "never read" not in proc.stdout


def test_merged_model_is_used_when_asked(cli_inproc, memorised, tmp_path):
    runs, name = memorised
    root = tmp_path / "runs"
    shutil.copytree(runs / name, root / "to-merge")
    missing = cli_inproc("generate", "to-merge", "--runs-dir", root, "--merged", "--prompt", ASK)
    assert missing.exit_code == 5 and "ftcli merge to-merge" in missing.stderr
    chat_missing = cli_inproc("chat", "to-merge", "--runs-dir", root, "--merged")
    assert chat_missing.exit_code == 5
    merged_now = cli_inproc("merge", "to-merge", "--runs-dir", root)
    assert merged_now.exit_code == 0, merged_now.output
    (adapter,) = generate_json(cli_inproc, root, "to-merge", "--prompt", ASK, "--max-new-tokens", "8")
    (merged,) = generate_json(cli_inproc, root, "to-merge", "--merged", "--prompt", ASK, "--max-new-tokens", "8")
    assert merged["output"] == adapter["output"] and merged["rendered"] == adapter["rendered"]


def test_missing_and_unfinished_runs_exit_5(cli_inproc, memorised, tmp_path):
    runs, name = memorised
    root = tmp_path / "runs"
    shutil.copytree(runs / name, root / "busy")
    assert cli_inproc("generate", "nope", "--runs-dir", root, "--prompt", "x").exit_code == 5
    info_path = root / "busy" / "run.json"
    info_path.write_text(json.dumps({**json.loads(info_path.read_text()), "status": "running"}))
    for command in (["generate", "busy", "--prompt", "x"], ["chat", "busy"]):
        result = cli_inproc(*command, "--runs-dir", root)
        assert result.exit_code == 5 and "status is running" in result.stderr, command


# ---------------------------------------------------------------------------------------------- decoding loop


def _loaded(model, tokenizer):
    from ftcli.models.run_model import RunModel

    return RunModel(model=model, tokenizer=tokenizer, recipe=None, chat_template=tokenizer.chat_template,
                    merged=False, base_model={})


def test_uncached_loop_is_exact_greedy_decoding_and_batch_invariant(lively):
    """The loop used for virtual-token methods gives the same tokens as transformers' generate() where that one
    is trustworthy (LoRA), whether prompts of different lengths are decoded alone or padded together."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftcli.inference.decoding import (
        DecodingSettings,
        _generate_cached,
        _generate_uncached,
        render_user_prompt,
        stop_token_ids,
    )

    tokenizer = AutoTokenizer.from_pretrained(lively)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(lively),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    loaded = _loaded(model, tokenizer)
    prompts = [render_user_prompt(tokenizer, tokenizer.chat_template, [{"role": "user", "content": text}])
               for text in ("hi", "Say red blue please, and then some more words", "What is two plus two?")]
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    settings = DecodingSettings(max_new_tokens=7)
    stops = stop_token_ids(tokenizer, model)
    with torch.inference_mode():
        together = _generate_uncached(loaded, encoded, settings, stops, None)
        alone = [_generate_uncached(loaded, [ids], settings, stops, None)[0] for ids in encoded]
        reference = [_generate_cached(loaded, [ids], settings, stops, None)[0] for ids in encoded]
    assert together == alone == reference
    assert all(len(tokens) == 7 for tokens in together)   # the lively model does not stop early


def test_decoding_stops_at_a_stop_token_and_drops_it(lively):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftcli.inference.decoding import DecodingSettings, _generate_uncached, stop_token_ids

    tokenizer = AutoTokenizer.from_pretrained(lively)
    model = AutoModelForCausalLM.from_pretrained(lively).eval()
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tokenizer, model)
    loaded, settings, prompt = _loaded(model, tokenizer), DecodingSettings(max_new_tokens=5), [[42, 43, 44]]
    free = _generate_uncached(loaded, prompt, settings, [], None)[0]
    assert len(free) == 5
    stopped = _generate_uncached(loaded, prompt, settings, [free[2]], None)[0]
    assert stopped == free[:free.index(free[2])]
