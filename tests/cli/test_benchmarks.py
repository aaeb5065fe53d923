"""`ftcli eval --tasks`: lm-evaluation-harness tasks on a run, scored exactly as lm_eval scores the same model itself,
stored and gated like the held-out metrics, and refused clearly (offline hub data, missing files, bad gates)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

# lm-evaluation-harness scoring models (the pieces without a model: tests/unit/test_benchmarks_unit.py)
pytestmark = pytest.mark.slow

pytest.importorskip("lm_eval", reason="the benchmarks extra: pip install -e '.[benchmarks]'")

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "benchmarks"
CHOICE = FIXTURES / "say_choice.yaml"   # multiple choice: acc, acc_norm
EXACT = FIXTURES / "say_exact.yaml"     # generation: exact_match
BOTH = f"{CHOICE},{EXACT}"


def evaluate(cli_inproc, runs: Path, name: str, *args):
    return cli_inproc("eval", name, "--runs-dir", runs, *args)


def eval_json(cli_inproc, runs: Path, name: str, *args) -> dict:
    result = evaluate(cli_inproc, runs, name, "--json", *args)
    assert result.exit_code == 0, result
    return json.loads(result.stdout)


def clone_run(memorised, tmp_path: Path, name: str) -> Path:
    runs, source = memorised
    root = tmp_path / "runs"
    shutil.copytree(runs / source, root / name)
    return root


def lm_eval_scores(tasks: list[Path], *, pretrained, tokenizer, peft=None, chat: bool = True,
                   num_fewshot: int | None = None, limit: int | None = None, batch_size: int = 16,
                   like: dict) -> dict:
    """lm-evaluation-harness's own scores of a model folder (with an adapter), as its users run it: its Python API
    on its `hf` model, started from the task files' folder (lm_eval reads their data paths from the working folder).
    Named TASK/METRIC independently of ftcli's code; on the device and in the dtype ftcli's result (`like`) says it
    scored on."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    scored_on = like["benchmarks"]["run"]
    model_args = {"pretrained": str(pretrained), "tokenizer": str(tokenizer), "dtype": scored_on["dtype"],
                  "device": scored_on["device"]}
    if peft is not None:
        model_args["peft"] = str(peft)
    results = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=[str(t) for t in tasks],
                                      num_fewshot=num_fewshot, limit=limit, batch_size=batch_size,
                                      apply_chat_template=chat, fewshot_as_multiturn=chat,
                                      task_manager=TaskManager(include_defaults=False))   # files: no registry
    return {f"{task}/{key.split(',')[0]}": float(value)
            for task, values in results["results"].items() for key, value in values.items()
            if key.endswith(",none") and "_stderr" not in key}


def test_scores_equal_lm_evals_own_for_the_run_and_its_base(cli_inproc, memorised, monkeypatch):
    runs, name = memorised
    result = eval_json(cli_inproc, runs, name, "--tasks", BOTH, "--num-fewshot", "1", "--compare-base")
    metrics, base = result["metrics"], result["base_metrics"]
    assert set(metrics) == set(base) == {"say_choice/acc", "say_choice/acc_norm", "say_exact/exact_match"}
    assert result["data"] is None and result["samples"] == []     # --tasks alone: no held-out data
    # Not a trivial comparison: the adapter changes the scores, and some lie strictly between 0 and 1.
    assert metrics != base and any(0 < value < 1 for value in metrics.values())
    assert result["delta"] == {k: pytest.approx(metrics[k] - base[k]) for k in metrics}

    info = json.loads((runs / name / "run.json").read_text())
    base_dir, adapter = info["base_model"]["local_dir"], runs / name / "adapter"
    monkeypatch.chdir(FIXTURES)
    assert metrics == lm_eval_scores([CHOICE, EXACT], pretrained=base_dir, peft=adapter, tokenizer=adapter,
                                     num_fewshot=1, like=result)
    assert base == lm_eval_scores([CHOICE, EXACT], pretrained=base_dir, tokenizer=adapter, num_fewshot=1,
                                  like=result)

    benchmarks = result["benchmarks"]
    assert benchmarks["tasks"] == [str(CHOICE), str(EXACT)]
    assert benchmarks["settings"]["num_fewshot"] == 1 and benchmarks["settings"]["chat_template"] is True
    assert benchmarks["run"]["samples_scored"] == {"say_choice": 8, "say_exact": 8}
    assert benchmarks["higher_is_better"] == dict.fromkeys(metrics, True)
    assert set(benchmarks["run"]["stderr"]) == set(metrics)
    answers = benchmarks["run"]["samples"]["say_exact"]
    assert len(answers) == 8 and "<|im_start|>user" in answers[0]["prompt"]   # through the run's chat template
    assert [a["scores"]["exact_match"] for a in answers].count(1.0) == metrics["say_exact/exact_match"] * 8
    # Stored where eval results go: eval/<timestamp>.json, eval/latest.json, run.json.
    assert json.loads((runs / name / "eval" / "latest.json").read_text()) == result
    recorded = json.loads((runs / name / "run.json").read_text())["eval"]
    assert recorded["metrics"] == metrics and recorded["base_metrics"] == base
    assert recorded["tasks"] == [str(CHOICE), str(EXACT)] and recorded["data"] is None


def test_fail_under_gates_a_benchmark_metric_both_ways(cli_inproc, memorised):
    runs, name = memorised
    task = ("--tasks", str(EXACT), "--limit", "4")
    measured = eval_json(cli_inproc, runs, name, *task)["metrics"]["say_exact/exact_match"]
    bar = f"say_exact/exact_match={measured + 0.01}"
    failing = evaluate(cli_inproc, runs, name, *task, "--json", "--fail-under", bar)
    assert failing.exit_code == 6, failing
    gates = json.loads(failing.stdout)["gates"]      # stdout is one document, gates and all
    assert gates == {"passed": False, "source": "--fail-under", "checks": [
        {"metric": "say_exact/exact_match", "value": measured, "bar": measured + 0.01, "direction": "min",
         "passed": False}]}
    assert "say_exact/exact_match" in failing.stderr and "higher is better" in failing.stderr

    passing = evaluate(cli_inproc, runs, name, *task, "--fail-under", f"say_exact/exact_match={measured}")
    assert passing.exit_code == 0, passing
    for text in ("say_exact/exact_match ↑", "±", f"{measured:.4f}", "saved:"):   # the eval table
        assert text in passing.stdout, text
    for noise in ("Running generate_until", "bootstrapping", "Passed an already-initialized model"):
        assert noise not in passing.stdout                                        # lm_eval's output: stderr only

    unmeasured = evaluate(cli_inproc, runs, name, *task, "--fail-under", "say_exact/acc=0.5")
    assert unmeasured.exit_code == 2 and "say_exact measured: say_exact/exact_match" in unmeasured.stderr


def test_recipe_tasks_run_beside_the_held_out_data_and_gate_it(cli_inproc, memorised, tmp_path):
    runs = clone_run(memorised, tmp_path, "gated")
    recipe_path = runs / "gated" / "recipe.yaml"
    recipe = yaml.safe_load(recipe_path.read_text())
    recipe["eval"]["tasks"] = [str(EXACT)]
    recipe["eval"]["fail_under"] = {"say_exact/exact_match": 1.01, "loss": 100.0}
    recipe_path.write_text(yaml.safe_dump(recipe))

    both = evaluate(cli_inproc, runs, "gated", "--max-samples", "2", "--limit", "2", "--json")
    assert both.exit_code == 6, both
    document = json.loads(both.stdout)
    assert document["data"]["examples"] == 2
    assert {"loss", "f1", "say_exact/exact_match"} <= set(document["metrics"])
    gates = document["gates"]
    assert gates["source"] == "recipe eval.fail_under" and "skipped" not in gates
    assert sorted((c["metric"], c["passed"]) for c in gates["checks"]) == [("loss", True),
                                                                           ("say_exact/exact_match", False)]

    # --tasks replaces the recipe's tasks and the held-out data: the recipe's gates on those are left out.
    other = evaluate(cli_inproc, runs, "gated", "--tasks", str(CHOICE), "--limit", "2", "--json")
    assert other.exit_code == 0, other
    document = json.loads(other.stdout)
    assert document["data"] is None and set(document["metrics"]) == {"say_choice/acc", "say_choice/acc_norm"}
    gates = document["gates"]
    assert gates["passed"] is True and gates["checks"] == [] and gates["source"] == "recipe eval.fail_under"
    assert sorted(gates["skipped"]) == ["loss", "say_exact/exact_match"]


def test_the_merged_model_without_the_chat_template_matches_lm_eval(cli_inproc, memorised, tmp_path, monkeypatch):
    runs = clone_run(memorised, tmp_path, "merged")
    assert cli_inproc("merge", "merged", "--runs-dir", runs).exit_code == 0
    result = eval_json(cli_inproc, runs, "merged", "--tasks", BOTH, "--merged", "--no-chat-template")
    assert result["settings"]["merged"] is True and result["benchmarks"]["settings"]["chat_template"] is False
    prompt = result["benchmarks"]["run"]["samples"]["say_exact"][0]["prompt"]
    assert prompt == "Say red blue"       # the task's own text, no template around it
    merged_dir = runs / "merged" / "merged"
    tokenizer = merged_dir if (merged_dir / "tokenizer_config.json").exists() else runs / "merged" / "adapter"
    monkeypatch.chdir(FIXTURES)
    assert result["metrics"] == lm_eval_scores([CHOICE, EXACT], pretrained=merged_dir, tokenizer=tokenizer,
                                               chat=False, like=result)


def test_refusals_come_before_any_model_loads(cli_inproc, memorised, tmp_path, monkeypatch):
    runs, name = memorised

    def refused(*args, code: int, says: str):
        result = evaluate(cli_inproc, runs, name, *args)
        assert result.exit_code == code and says in result.stderr, result

    refused("--fail-under", "say_exact/exact_match=0.5", code=2, says="no benchmark runs")
    refused("--fail-under", "accuracy=0.5", code=2, says="TASK/METRIC")
    refused("--tasks", str(tmp_path / "absent.yaml"), code=4, says="absent.yaml: no such file")
    refused("--tasks", str(EXACT), "--fail-under", "say_choice/acc=0.5", code=2, says="not among the benchmarks")
    refused("--tasks", str(EXACT), "--fail-under", "loss=1", code=2, says="--tasks alone scores benchmarks only")
    refused("--tasks", str(EXACT), "--merged", "--compare-base", code=2, says="drop --merged")
    refused("--tasks", f"{EXACT},", code=2, says="empty task")
    broken = tmp_path / "broken.yaml"
    broken.write_text("task: broken\noutput_type: nonsense\ndataset_path: json\n")
    refused("--tasks", str(broken), code=2, says="invalid output_type")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "answer": "b"}\n{not json\n')
    bad_data = tmp_path / "bad_data.yaml"
    bad_data.write_text(EXACT.read_text().replace("say.jsonl", "bad.jsonl").replace("say_exact", "bad_data"))
    refused("--tasks", str(bad_data), code=3, says="its data can't be read")
    monkeypatch.setitem(sys.modules, "lm_eval", None)          # as if the extra were not installed
    refused("--tasks", str(EXACT), code=4, says="pip install 'ftcli[benchmarks]'")


def test_a_prefix_tuning_run_is_refused(cli_inproc, tmp_path, tiny_model_dir):
    from helpers import make_run

    make_run(tmp_path / "runs", "prefixed", tiny_model_dir, kind="prefix")
    result = evaluate(cli_inproc, tmp_path / "runs", "prefixed", "--tasks", str(EXACT))
    assert result.exit_code == 2 and "prefix tuning run" in result.stderr, result


def test_a_hub_task_offline_exits_4_naming_its_dataset(cli_inproc, memorised):
    """The test session is offline (HF_DATASETS_OFFLINE=1, conftest.py) and arc_easy's data is not cached."""
    runs, name = memorised
    offline = evaluate(cli_inproc, runs, name, "--tasks", "arc_easy", "--json")
    assert offline.exit_code == 4, offline
    assert "allenai/ai2_arc" in offline.stderr and "HF_DATASETS_OFFLINE=1" in offline.stderr
    assert json.loads(offline.stdout)["exit_code"] == 4                     # still one document on stdout
    typo = evaluate(cli_inproc, runs, name, "--tasks", "arc_eazy")
    assert typo.exit_code == 2 and "did you mean arc_easy" in typo.stderr, typo
