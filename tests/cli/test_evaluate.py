"""`ftcli eval` end to end on runs trained through `ftcli train`: metrics, base comparison, gates, refusals."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import memorisable_chat


def clone_run(memorised, tmp_path: Path, name: str) -> Path:
    """A copy of the memorised run under a fresh runs root, to damage or edit without touching the original."""
    runs, source = memorised
    root = tmp_path / "runs"
    shutil.copytree(runs / source, root / name)
    return root


def evaluate(cli_inproc, runs: Path, name: str, *args: str):
    result = cli_inproc("eval", name, "--runs-dir", runs, *args)
    return result


def eval_json(cli_inproc, runs: Path, name: str, *args: str) -> dict:
    result = evaluate(cli_inproc, runs, name, "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_eval_is_finite_reproducible_and_matches_the_training_loss(cli_inproc, memorised):
    runs, name = memorised
    first = eval_json(cli_inproc, runs, name)
    second = eval_json(cli_inproc, runs, name)
    metrics = first["metrics"]
    assert set(metrics) == {"loss", "perplexity", "exact_match", "exact_match_norm", "contains", "f1"}
    assert all(math.isfinite(v) for v in metrics.values())
    assert second["metrics"] == metrics and second["samples"] == first["samples"]
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    assert first["data"]["examples"] == len(memorisable_chat())
    # Same masking as training: the trainer's own eval loss (one batch of all 16 examples) is reproduced.
    info = json.loads((runs / name / "run.json").read_text())
    assert metrics["loss"] == pytest.approx(info["metrics"]["eval_loss"], rel=1e-4)
    # Files: one timestamped result per call, latest.json = the newest, run.json records the latest metrics.
    eval_dir = runs / name / "eval"
    assert json.loads((eval_dir / "latest.json").read_text()) == second
    assert Path(first["path"]).exists() and Path(second["path"]).exists() and first["path"] != second["path"]
    assert info["eval"]["metrics"] == second["metrics"]
    samples = second["samples"]
    assert samples and {"prompt", "reference", "prediction"} <= set(samples[0])
    assert samples[0]["reference"] == memorisable_chat()[0]["messages"][1]["content"]
    assert "<|im_start|>user" in samples[0]["prompt"]   # rendered through the run's ChatML template


def test_the_trained_run_beats_its_base(cli_inproc, memorised):
    runs, name = memorised
    result = eval_json(cli_inproc, runs, name, "--compare-base")
    run, base, delta = result["metrics"], result["base_metrics"], result["delta"]
    assert run["loss"] < base["loss"] - 5          # the base is a random model: about ln(49152) = 10.8
    assert run["f1"] > base["f1"]
    assert run["contains"] >= base["contains"] and run["exact_match_norm"] >= base["exact_match_norm"]
    assert delta == {k: pytest.approx(run[k] - base[k]) for k in run}
    assert all("base_prediction" in s for s in result["samples"])
    assert any(s["prediction"] != s["base_prediction"] for s in result["samples"])
    info = json.loads((runs / name / "run.json").read_text())
    assert info["eval"]["base_metrics"] == base


def test_the_terminal_table_shows_run_base_and_difference(cli_inproc, memorised):
    runs, name = memorised
    result = evaluate(cli_inproc, runs, name, "--compare-base", "--max-samples", "2")
    assert result.exit_code == 0, result.output
    for text in ("exact_match_norm", "base", "Δ (run - base)", "red blue", "saved:"):
        assert text in result.stdout, text
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.stdout)


def test_fail_under_exits_6_below_the_bar_and_0_above(cli_inproc, memorised):
    runs, name = memorised
    measured = eval_json(cli_inproc, runs, name, "--max-samples", "4")["metrics"]
    f1, loss = measured["f1"], measured["loss"]
    failing = evaluate(cli_inproc, runs, name, "--max-samples", "4", "--fail-under", f"f1={f1 + 0.01}")
    assert failing.exit_code == 6, failing.output
    assert "f1" in failing.stderr and "higher is better" in failing.stderr
    # loss and perplexity: lower is better, so a bar under the measured loss fails.
    too_lossy = evaluate(cli_inproc, runs, name, "--max-samples", "4", "--fail-under", f"loss={loss / 2}")
    assert too_lossy.exit_code == 6 and "lower is better" in too_lossy.stderr
    passing = evaluate(cli_inproc, runs, name, "--max-samples", "4", "--json", "--fail-under", f"f1={f1 - 0.01}",
                       "--fail-under", f"loss={loss + 0.5}", "--fail-under", f"perplexity={math.exp(loss) * 2}")
    assert passing.exit_code == 0, passing.output
    assert json.loads(passing.stdout)["metrics"]["f1"] == f1


def test_unknown_gate_metric_exits_2_before_loading_anything(cli_inproc, memorised):
    runs, name = memorised
    result = evaluate(cli_inproc, runs, name, "--fail-under", "bleu=0.5")
    assert result.exit_code == 2
    assert "unknown metric 'bleu'" in result.stderr and "exact_match_norm" in result.stderr


def test_recipe_fail_under_applies_unless_overridden(cli_inproc, memorised, tmp_path):
    runs = clone_run(memorised, tmp_path, "gated")
    recipe_path = runs / "gated" / "recipe.yaml"
    recipe = yaml.safe_load(recipe_path.read_text())
    recipe["eval"]["fail_under"] = {"loss": 0.001}
    recipe_path.write_text(yaml.safe_dump(recipe))
    gated = evaluate(cli_inproc, runs, "gated", "--max-samples", "2")
    assert gated.exit_code == 6 and "loss" in gated.stderr
    gated_json = evaluate(cli_inproc, runs, "gated", "--max-samples", "2", "--json")
    assert gated_json.exit_code == 6
    assert json.loads(gated_json.stdout)["gates"]["source"] == "recipe eval.fail_under"
    overridden = evaluate(cli_inproc, runs, "gated", "--max-samples", "2", "--fail-under", "loss=100")
    assert overridden.exit_code == 0, overridden.output


def test_data_option_reads_any_supported_file_and_max_samples_cuts(cli_inproc, memorised, tmp_path):
    runs, name = memorised
    records = memorisable_chat()[:3]
    as_json = tmp_path / "held_out.json"           # a JSON array, where the run trained on JSON lines
    as_json.write_text(json.dumps(records))
    result = eval_json(cli_inproc, runs, name, "--data", str(as_json))
    assert result["data"]["examples"] == 3 and result["data"]["source"] == str(as_json)
    assert [s["reference"] for s in result["samples"]] == [r["messages"][1]["content"] for r in records]
    assert eval_json(cli_inproc, runs, name, "--max-samples", "2")["data"]["examples"] == 2
    missing = evaluate(cli_inproc, runs, name, "--data", str(tmp_path / "absent.jsonl"))
    assert missing.exit_code == 4 and "absent.jsonl" in missing.stderr
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text('{"conversation": []}\n')
    broken = evaluate(cli_inproc, runs, name, "--data", str(malformed))
    assert broken.exit_code == 3 and "malformed.jsonl:1" in broken.stderr and "messages" in broken.stderr


def test_batch_size_changes_nothing_but_speed(cli_inproc, memorised):
    runs, name = memorised
    one = eval_json(cli_inproc, runs, name, "--max-samples", "5", "--batch-size", "1")["metrics"]
    five = eval_json(cli_inproc, runs, name, "--max-samples", "5", "--batch-size", "5")["metrics"]
    assert one["loss"] == pytest.approx(five["loss"], rel=1e-5)
    assert one["exact_match_norm"] == five["exact_match_norm"]


def test_a_run_without_eval_data_asks_for_data(cli_inproc, memorised, tmp_path):
    runs = clone_run(memorised, tmp_path, "no-eval")
    recipe_path = runs / "no-eval" / "recipe.yaml"
    recipe = yaml.safe_load(recipe_path.read_text())
    recipe["data"]["eval"] = None
    recipe_path.write_text(yaml.safe_dump(recipe))
    result = evaluate(cli_inproc, runs, "no-eval")
    assert result.exit_code == 2
    assert "has no eval data" in result.stderr and "--data FILE" in result.stderr
    with_data = evaluate(cli_inproc, runs, "no-eval", "--data", recipe["data"]["train"], "--max-samples", "2")
    assert with_data.exit_code == 0, with_data.output


def test_missing_unfinished_and_adapterless_runs_exit_5(cli_inproc, memorised, tmp_path):
    runs = clone_run(memorised, tmp_path, "busy")
    missing = evaluate(cli_inproc, runs, "nope")
    assert missing.exit_code == 5 and "run 'nope' not found" in missing.stderr
    info_path = runs / "busy" / "run.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "status": "running"}))
    running = evaluate(cli_inproc, runs, "busy")
    assert running.exit_code == 5 and "status is running" in running.stderr
    info_path.write_text(json.dumps({**info, "status": "failed", "error": "out of memory"}))
    failed = evaluate(cli_inproc, runs, "busy")
    assert failed.exit_code == 5 and "out of memory" in failed.stderr
    info_path.write_text(json.dumps(info))
    shutil.rmtree(runs / "busy" / "adapter")
    adapterless = evaluate(cli_inproc, runs, "busy")
    assert adapterless.exit_code == 5 and "has no adapter" in adapterless.stderr


def test_an_adapter_is_refused_on_a_different_base(cli_inproc, memorised, tmp_path):
    runs = clone_run(memorised, tmp_path, "moved")
    info_path = runs / "moved" / "run.json"
    info = json.loads(info_path.read_text())
    info["base_model"]["fingerprint"] = "0123456789abcdef"
    info_path.write_text(json.dumps(info))
    result = evaluate(cli_inproc, runs, "moved")
    assert result.exit_code == 5
    assert "is not the model its adapter was trained on" in result.stderr


def test_render_eval_without_base(memorised):
    from rich.console import Console

    from ftcli.inference.evaluate import render_eval

    runs, name = memorised
    result = json.loads((runs / name / "eval" / "latest.json").read_text())
    result = {**result, "base_metrics": None, "delta": None,
              "samples": [{"prompt": "p", "reference": "[red] blue", "prediction": "[red] blue"}]}
    console = Console(record=True, width=120)
    render_eval(result, console)
    text = console.export_text()
    assert "perplexity" in text and "[red] blue" in text and "Δ" not in text


def test_a_plain_text_run_has_loss_but_no_generation_metrics_or_template(cli_inproc, tmp_path_factory,
                                                                         tiny_model_dir):
    from helpers import text_run

    runs, name = text_run(tmp_path_factory, tiny_model_dir)
    result = eval_json(cli_inproc, runs, name)
    assert set(result["metrics"]) == {"loss", "perplexity"} and result["samples"] == []
    assert result["data"]["examples"] == 2          # val_split 0.25 of 8
    gated = evaluate(cli_inproc, runs, name, "--fail-under", "f1=0.1")
    assert gated.exit_code == 2 and "did not measure" in gated.stderr
    # Generation renders the prompt as is (the tokenizer's ChatML template saved in adapter/ is not the run's).
    generated = cli_inproc("generate", name, "--runs-dir", runs, "--prompt", "the quick", "--max-new-tokens", "3",
                           "--json")
    assert json.loads(generated.stdout)["outputs"][0]["rendered"] == "the quick"
    chat = cli_inproc("chat", name, "--runs-dir", runs)
    assert chat.exit_code == 2 and "no chat template" in chat.stderr
