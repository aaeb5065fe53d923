"""The pieces of `ftcli eval --tasks` that need no model: task lists, lm_eval's results as ftcli metrics, gates in
lm_eval's directions, the recipe's eval.tasks and eval.fail_under, and the benchmark tasks shipped in recipes/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftcli.errors import UsageError
from ftcli.inference.benchmarks import _flatten, benchmark_metric, split_tasks
from ftcli.inference.evaluate import check_gates, gate_failure, parse_gates, render_eval

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "recipes" / "benchmarks").glob("*.yaml"))

# The shape of lm_eval's simple_evaluate() result, as 0.4.x returns it (a group, a filtered task, a lower-is-better
# metric, a standard error it did not compute).
RESULTS = {
    "results": {
        "suite": {"alias": "suite", "acc,none": 0.5, "acc_stderr,none": 0.1},
        "gsm8k": {"alias": " - gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.05,
                  "exact_match,flexible-extract": 0.375, "exact_match_stderr,flexible-extract": "N/A"},
        "wikitext": {"word_perplexity,none": 21.5, "word_perplexity_stderr,none": "N/A", "sample_len": 62},
    },
    "higher_is_better": {"suite": {"acc": True}, "gsm8k": {"exact_match": True},
                         "wikitext": {"word_perplexity": False}},
}


def test_task_lists_split_on_commas_and_repeat():
    assert split_tasks(None) is None and split_tasks([]) is None
    assert split_tasks(["arc_easy,hellaswag", " my/task.yaml "]) == ("arc_easy", "hellaswag", "my/task.yaml")
    with pytest.raises(UsageError, match="empty task"):
        split_tasks(["arc_easy,"])


def test_lm_eval_results_become_task_slash_metric():
    metrics, stderr, higher = _flatten(RESULTS)
    assert metrics == {"suite/acc": 0.5, "gsm8k/exact_match,strict-match": 0.25,
                       "gsm8k/exact_match,flexible-extract": 0.375, "wikitext/word_perplexity": 21.5}
    assert stderr == {"suite/acc": 0.1, "gsm8k/exact_match,strict-match": 0.05}    # "N/A" is left out
    assert higher == {name: name != "wikitext/word_perplexity" for name in metrics}
    assert benchmark_metric("arc_easy", "acc", "none") == "arc_easy/acc"


def benchmark_result(metrics: dict, higher: dict) -> dict:
    return {"run": "r", "data": None, "metrics": metrics, "base_metrics": None, "delta": None, "samples": [],
            "benchmarks": {"tasks": ["wikitext"], "higher_is_better": higher,
                           "run": {"stderr": {"wikitext/word_perplexity": 0.5}}},
            "path": "eval/x.json"}


def test_gates_follow_each_benchmark_metrics_direction():
    assert parse_gates(["wikitext/word_perplexity=20", "gsm8k/exact_match,strict-match=0.3"]) == {
        "wikitext/word_perplexity": 20.0, "gsm8k/exact_match,strict-match": 0.3}
    with pytest.raises(UsageError, match="TASK/METRIC"):
        parse_gates(["accuracy=0.5"])
    result = benchmark_result({"wikitext/word_perplexity": 21.5}, {"wikitext/word_perplexity": False})
    gates = check_gates(result, {"wikitext/word_perplexity": 20.0}, recipe=None)
    assert gates["checks"] == [{"metric": "wikitext/word_perplexity", "value": 21.5, "bar": 20.0, "direction": "max",
                                "passed": False}]
    failure = gate_failure({**result, "gates": gates}, type("Run", (), {"name": "r", "eval_dir": "eval"}))
    assert failure.exit_code == 6 and "21.5 > 20 (lower is better)" in failure.message
    assert check_gates(result, {"wikitext/word_perplexity": 22.0}, recipe=None)["passed"] is True


def test_the_table_shows_benchmarks_with_their_direction_and_standard_error():
    from rich.console import Console

    console = Console(record=True, width=120)
    render_eval(benchmark_result({"wikitext/word_perplexity": 21.5}, {"wikitext/word_perplexity": False}), console)
    text = console.export_text()
    assert "on benchmarks wikitext" in text and "wikitext/word_perplexity ↓" in text and "21.5000 ± 0.5000" in text


def test_recipe_eval_tasks_and_benchmark_gates(tmp_path):
    from ftcli.recipe.loader import load_recipe
    from ftcli.recipe.schema import EvalConfig

    config = EvalConfig(tasks=["arc_easy"], fail_under={"arc_easy/acc": 0.5, "loss": 2.0,
                                                        "gsm8k/exact_match,strict-match": 0.2})
    assert config.fail_under["arc_easy/acc"] == 0.5
    for bad in ({"accuracy": 0.5}, {"arc_easy/": 0.5}, {"/acc": 0.5}):
        with pytest.raises(ValueError, match="TASK/METRIC"):
            EvalConfig(fail_under=bad)
    with pytest.raises(ValueError, match="one task per list item"):
        EvalConfig(tasks=["arc_easy,hellaswag"])
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "mine.yaml").write_text("task: mine\n")
    (tmp_path / "train.jsonl").write_text("{}\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: {path: org/model}\nmethod: {kind: lora}\ndata: {train: train.jsonl}\n"
                      "eval:\n  tasks: [bench/mine.yaml, arc_easy]\n")
    # A task file is read relative to the recipe that names it; a registry name stays a name.
    assert load_recipe(recipe).recipe.eval.tasks == [str(tmp_path / "bench" / "mine.yaml"), "arc_easy"]


@pytest.mark.parametrize("task_file", SHIPPED, ids=lambda p: p.name)
def test_shipped_benchmark_tasks_load_and_their_answers_are_right(task_file, monkeypatch):
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    first = task_file.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# ftcli eval quickstart --tasks ") and str(task_file.relative_to(REPO)) in first
    monkeypatch.chdir(task_file.parent)
    task = next(iter(TaskManager(include_defaults=False).load([str(task_file)])["tasks"].values()))
    docs = list(task.test_docs())
    assert 10 <= len(docs) <= 40
    for doc in docs:
        assert doc["choices"][doc["label"]] == doc["answer"] and len(set(doc["choices"])) == 4
    records = [json.loads(line) for line in (task_file.parent / "quickstart.jsonl").read_text().splitlines()]
    training = {json.loads(line)["messages"][0]["content"]
                for name in ("train.jsonl", "val.jsonl") for line in (REPO / "data" / "quickstart" / name).open()}
    assert not training & {r["question"] for r in records}     # none of it seen in training or held out


def test_task_files_that_load_python_need_allow_code(tmp_path):
    from ftcli.inference.benchmark_tasks import load_task, task_file_code

    (tmp_path / "base.yaml").write_text("output_type: generate_until\n"
                                        "process_results: !function utils.score   # Python beside the file\n")
    task = tmp_path / "task.yaml"
    task.write_text("task: mine\ninclude: base.yaml\n# !function in a comment loads nothing\n")
    assert task_file_code(task).endswith("base.yaml:2: process_results: !function utils.score   # Python beside "
                                         "the file")
    (tmp_path / "plain.yaml").write_text("task: plain  # !function only in a comment\n")
    assert task_file_code(tmp_path / "plain.yaml") is None
    with pytest.raises(UsageError, match="runs Python from beside it") as refused:
        load_task(None, str(task))   # refused before lm_eval reads anything
    assert "--allow-code" in refused.value.hint
