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
def test_quickstart_chain(path, runs_dir):
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
