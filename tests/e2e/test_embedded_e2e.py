"""The shipped quickstart recipe on the real embedded model, end to end through the CLI (shortened), on both CPU
precision paths: what `precision: auto` picks here, and the fp32 path of a CPU without native bf16."""

from __future__ import annotations

import json

import pytest
from helpers import REPO, run_cli

pytestmark = pytest.mark.slow

SHORT = ["--set", "training.max_steps=3", "--set", "training.batch_size=4", "--set", "training.save_steps=3",
         "--set", "data.max_length=96"]


@pytest.mark.parametrize("path", ["automatic", "fp32"])
def test_quickstart_chain(path, runs_dir, tmp_path):
    """train, eval, merge, export gguf (f16) and ollama (its GGUF at q8_0), as `make quickstart` does: with what
    `precision: auto` picks on this CPU, and on the fp32 path of a CPU without native bf16."""
    import os

    from ftcli.models.load import CPU_BF16_ENV, cpu_has_native_bf16
    from ftcli.models.parity import BOUNDS

    native = cpu_has_native_bf16()   # as this session presents the CPU: FTCLI_CPU_BF16=off makes it one without
    if path == "fp32" and not native:
        pytest.skip("no native bf16 here: the automatic arm already runs the fp32 path")
    env = {CPU_BF16_ENV: "off"} if path == "fp32" else {}

    def ftcli(*args):
        result = run_cli(*args, "--json", env=env)
        assert result.exit_code == 0, result
        return result.json()

    ftcli("train", REPO / "recipes" / "quickstart.yaml", *SHORT)
    info = json.loads((runs_dir / "quickstart" / "run.json").read_text())
    assert info["status"] == "completed" and info["base_model"]["kind"] == "builtin"
    assert info["precision"] == ("bf16" if native and path == "automatic" else "fp32")
    assert info["cpu_bf16"]["used"] == (info["precision"] == "bf16")
    assert info["cpu_bf16"]["override"] == env.get(CPU_BF16_ENV, os.environ.get(CPU_BF16_ENV))
    assert 100_000_000 < info["parameters"]["total"] < 200_000_000  # SmolLM2-135M
    assert info["metrics"]["eval_loss"] is not None

    metrics = ftcli("eval", "quickstart", "--max-samples", "4", "--max-new-tokens", "8")["metrics"]
    assert metrics["loss"] > 0 and metrics["perplexity"] > 1

    if path == "automatic":   # once: the benchmarks don't depend on how the run trained
        benchmarks_match_lm_eval(runs_dir, env, tmp_path)

    ftcli("merge", "quickstart")
    merge = json.loads((runs_dir / "quickstart" / "run.json").read_text())["merge"]
    assert merge["agreement"] == 1.0 and merge["kl_max"] < 1e-4 and merge["positions"] > 300

    for fmt, quant in (("gguf", "f16"), ("ollama", "q8_0")):
        document = ftcli("export", "quickstart", "--format", fmt, "--quant", quant)
        check = document["check"]
        assert check["tokenizer_identical"] and check["chat_template_identical"], document
        bounds = BOUNDS[f"gguf_{quant}"]
        assert check["parity"]["agreement"] >= bounds.min_agreement, document
        assert check["parity"]["kl_mean"] <= bounds.max_kl_mean and check["bounds"] == bounds.describe(), document
        assert document["bytes"] > 100 * 2**20
    exports = json.loads((runs_dir / "quickstart" / "run.json").read_text())["exports"]
    assert exports["gguf"]["quant"] == "f16" and exports["ollama"]["quant"] == "q8_0"
    assert (runs_dir / "quickstart" / "export" / "ollama" / "Modelfile").is_file()


BENCHMARKS = [REPO / "recipes" / "benchmarks" / name for name in ("quickstart_choice.yaml", "quickstart_exact.yaml")]


def benchmarks_match_lm_eval(runs_dir, env, tmp_path):
    """`ftcli eval --tasks` with the shipped quickstart benchmarks (README's Benchmarks command, cut to 6 questions)
    scores exactly what lm-evaluation-harness's own CLI scores for the same base + adapter and chat template."""
    import subprocess
    import sys

    command = ("eval", "quickstart", "--tasks", ",".join(map(str, BENCHMARKS)), "--limit", "6", "--json")
    result = run_cli(*command, env=env)
    assert result.exit_code == 0, result
    document = result.json()            # stdout held ftcli's one document, nothing of lm_eval's
    metrics = document["metrics"]
    assert set(metrics) == {"quickstart_choice/acc", "quickstart_exact/exact_match"}
    info = json.loads((runs_dir / "quickstart" / "run.json").read_text())
    adapter = runs_dir / "quickstart" / "adapter"
    scored_on = document["benchmarks"]["run"]        # the dtype and device ftcli scored in
    model_args = f"pretrained={info['base_model']['local_dir']},peft={adapter},tokenizer={adapter}," \
                 f"dtype={scored_on['dtype']}"
    own = subprocess.run(
        [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args", model_args,
         "--device", scored_on["device"],
         "--tasks", *map(str, BENCHMARKS), "--limit", "6", "--batch_size", str(document["settings"]["batch_size"]),
         "--apply_chat_template", "--fewshot_as_multiturn", "--output_path", str(tmp_path / "lm_eval")],
        cwd=BENCHMARKS[0].parent, capture_output=True, text=True, timeout=600)   # it reads data_files from here
    assert own.returncode == 0, own.stderr[-3000:]
    (saved,) = (tmp_path / "lm_eval").rglob("results_*.json")
    scores = json.loads(saved.read_text())["results"]
    assert metrics == {"quickstart_choice/acc": scores["quickstart_choice"]["acc,none"],
                       "quickstart_exact/exact_match": scores["quickstart_exact"]["exact_match,none"]}
    answers = document["benchmarks"]["run"]["samples"]["quickstart_exact"]
    assert len(answers) == 6 and all(a["prompt"].endswith("<|im_start|>assistant\n") for a in answers)
