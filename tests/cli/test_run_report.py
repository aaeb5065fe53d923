"""`ftcli runs list/show/compare` through the CLI on runs trained with `ftcli train`, and the recipe diff logic."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import quick_lora_run


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_model_dir) -> Path:
    """Runs root holding 'quick-a' (r 8, lr 5e-3, evaluated) and 'quick-b' (r 4, lr 1e-2), copied to a root of
    their own so other tests' runs do not show up in the listing."""
    root = tmp_path_factory.mktemp("report") / "runs"
    for name, r, lr in (("quick-a", 8, 5e-3), ("quick-b", 4, 1e-2)):
        runs, _ = quick_lora_run(tmp_path_factory, tiny_model_dir, name, r=r, lr=lr)
        shutil.copytree(runs / name, root / name)
    from typer.testing import CliRunner

    from ftcli.cli.app import app

    evaluated = CliRunner().invoke(app, ["eval", "quick-a", "--runs-dir", str(root), "--max-samples", "2"])
    assert evaluated.exit_code == 0, evaluated.output
    return root


def runs_json(cli_inproc, *args) -> dict:
    result = cli_inproc("runs", *map(str, args), "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_runs_list(cli_inproc, two_runs, tiny_model_dir):
    rows = runs_json(cli_inproc, "list", "--runs-dir", two_runs)["runs"]
    assert [r["name"] for r in rows] == ["quick-a", "quick-b"]          # oldest first
    for row in rows:
        info = json.loads((two_runs / row["name"] / "run.json").read_text())
        assert row["status"] == "completed" and row["method"] == "lora" and row["steps"] == 2
        assert row["base_model"] == str(tiny_model_dir)
        assert row["train_loss"] == info["metrics"]["train_loss"] and row["eval_loss"] == info["metrics"]["eval_loss"]
        assert row["created_at"] == info["created_at"]
    table = cli_inproc("runs", "list", "--runs-dir", two_runs)
    assert table.exit_code == 0 and "quick-a" in table.stdout and "completed" in table.stdout


def test_runs_list_shows_failed_and_unreadable_runs(cli_inproc, two_runs, tmp_path):
    from ftcli.runs.rundir import RunDir

    root = tmp_path / "runs"
    shutil.copytree(two_runs / "quick-a", root / "quick-a")
    failed = RunDir(root, "broken")
    failed.path.mkdir(parents=True)
    failed.initialise("model: {path: x}\n", tmp_path / "recipe.yaml", overwrite=False)
    failed.set_status("failed", error="out of memory")
    (root / "corrupt").mkdir()
    (root / "corrupt" / "run.json").write_text("{not json")
    rows = {r["name"]: r for r in runs_json(cli_inproc, "list", "--runs-dir", root)["runs"]}
    assert rows["broken"]["status"] == "failed" and rows["broken"]["train_loss"] is None
    assert rows["corrupt"]["status"] == "unreadable" and "corrupt" in rows["corrupt"]["error"]
    assert rows["quick-a"]["status"] == "completed"
    shown = runs_json(cli_inproc, "show", "broken", "--runs-dir", root)
    assert shown["run"]["error"] == "out of memory" and shown["artifacts"]["adapter"] is None
    assert shown["recipe"] is None and shown["recipe_error"]


def test_runs_list_on_an_empty_root(cli_inproc, tmp_path):
    assert runs_json(cli_inproc, "list", "--runs-dir", tmp_path / "none") == {"runs": []}
    result = cli_inproc("runs", "list", "--runs-dir", tmp_path / "none")
    assert result.exit_code == 0 and "no runs yet" in result.stdout


def test_runs_show(cli_inproc, two_runs):
    details = runs_json(cli_inproc, "show", "quick-a", "--runs-dir", two_runs)
    run_path = two_runs / "quick-a"
    assert details["name"] == "quick-a" and details["path"] == str(run_path)
    assert details["run"] == json.loads((run_path / "run.json").read_text())
    assert details["recipe"]["method"]["r"] == 8 and details["recipe"]["training"]["max_steps"] == 2
    artifacts = details["artifacts"]
    assert artifacts["adapter"] == str(run_path / "adapter")
    assert artifacts["merged"] is None and artifacts["exports"] == {}
    assert artifacts["eval_latest"] == str(run_path / "eval" / "latest.json")
    latest = json.loads((run_path / "eval" / "latest.json").read_text())
    assert details["eval"]["metrics"] == latest["metrics"]
    (run_path / "export" / "gguf").mkdir(parents=True)
    assert runs_json(cli_inproc, "show", "quick-a", "--runs-dir", two_runs)["artifacts"]["exports"] == {
        "gguf": str(run_path / "export" / "gguf")}
    unevaluated = runs_json(cli_inproc, "show", "quick-b", "--runs-dir", two_runs)
    assert unevaluated["eval"] is None and unevaluated["artifacts"]["eval_latest"] is None
    table = cli_inproc("runs", "show", "quick-a", "--runs-dir", two_runs)
    assert table.exit_code == 0 and "eval exact_match" in table.stdout and "artifact adapter" in table.stdout


def test_runs_compare(cli_inproc, two_runs):
    comparison = runs_json(cli_inproc, "compare", "quick-a", "quick-b", "--runs-dir", two_runs)
    assert comparison["runs"] == ["quick-a", "quick-b"]
    assert comparison["recipe_differences"] == {
        "method.r": {"quick-a": 8, "quick-b": 4},
        "training.lr": {"quick-a": 5e-3, "quick-b": 1e-2},
    }
    metrics = comparison["metrics"]
    for name in ("quick-a", "quick-b"):
        info = json.loads((two_runs / name / "run.json").read_text())
        assert metrics[name]["final.train_loss"] == info["metrics"]["train_loss"]
        assert metrics[name]["final.eval_loss"] == info["metrics"]["eval_loss"]
    latest = json.loads((two_runs / "quick-a" / "eval" / "latest.json").read_text())
    assert metrics["quick-a"]["eval.f1"] == latest["metrics"]["f1"]
    assert not any(key.startswith("eval.") for key in metrics["quick-b"])
    table = cli_inproc("runs", "compare", "quick-a", "quick-b", "--runs-dir", two_runs)
    assert table.exit_code == 0 and "method.r" in table.stdout and "final.train_loss" in table.stdout


def test_runs_compare_refusals(cli_inproc, two_runs):
    alone = cli_inproc("runs", "compare", "quick-a", "--runs-dir", two_runs)
    assert alone.exit_code == 2 and "at least two runs" in alone.stderr
    missing = cli_inproc("runs", "compare", "quick-a", "nope", "--runs-dir", two_runs)
    assert missing.exit_code == 5 and "'nope' not found" in missing.stderr
    assert cli_inproc("runs", "show", "nope", "--runs-dir", two_runs).exit_code == 5


def test_flatten_and_method_specific_keys():
    from ftcli.recipe.schema import flatten_keys as flatten

    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None, "f": {}}) == {"a.b": 1, "a.c.d": [1, 2],
                                                                              "e": None, "f": {}}
