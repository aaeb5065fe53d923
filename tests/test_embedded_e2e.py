"""The shipped quickstart recipe on the real embedded model, end to end through the CLI (shortened)."""

from __future__ import annotations

import json

from conftest import REPO, run_cli


def test_quickstart_recipe_trains_evaluates_merges_and_exports(runs_dir):
    short = ["--set", "training.max_steps=3", "--set", "training.batch_size=4", "--set", "training.save_steps=3",
             "--set", "data.max_length=96"]
    trained = run_cli("train", REPO / "recipes" / "quickstart.yaml", *short, "--json")
    assert trained.exit_code == 0, trained
    info = json.loads((runs_dir / "quickstart" / "run.json").read_text())
    assert info["status"] == "completed"
    assert info["base_model"]["kind"] == "builtin"
    assert 100_000_000 < info["parameters"]["total"] < 200_000_000  # SmolLM2-135M
    assert info["metrics"]["eval_loss"] is not None

    evaluated = run_cli("eval", "quickstart", "--max-samples", "4", "--max-new-tokens", "8", "--json")
    assert evaluated.exit_code == 0, evaluated
    metrics = evaluated.json()["metrics"]
    assert metrics["loss"] > 0 and metrics["perplexity"] > 1

    merged = run_cli("merge", "quickstart", "--json")
    assert merged.exit_code == 0, merged
    parity = json.loads((runs_dir / "quickstart" / "run.json").read_text())["merge"]
    assert parity["next_token_agreement"] == 1.0

    exported = run_cli("export", "quickstart", "--format", "gguf", "--quant", "f16", "--json")
    assert exported.exit_code == 0, exported
    gguf_files = list((runs_dir / "quickstart" / "export" / "gguf").glob("*.gguf"))
    assert len(gguf_files) == 1 and gguf_files[0].stat().st_size > 100 * 2**20
