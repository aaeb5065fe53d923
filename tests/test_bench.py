"""The benchmark scripts' pure helpers (throughput, peak RSS, interleaving, report), their command lines, and that
every ftcli name the bench imports still exists (a rename in ftcli breaks a test here, not the next benchmark run)."""

from __future__ import annotations

import ast
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import measure, report

REPO = Path(__file__).resolve().parents[1]


def _steps(times, tokens, start_step=1):
    return [{"step": start_step + i, "time": t, "loss": 1.0, "num_tokens": n}
            for i, (t, n) in enumerate(zip(times, tokens))]


def test_steady_throughput_skips_warmup_and_ignores_other_records():
    records = _steps([10.0, 20.0, 22.0, 24.0, 26.0], [100, 200, 300, 400, 500])
    records.insert(3, {"step": 3, "time": 23.0, "eval_loss": 2.0})                  # an eval line: no loss
    records.append({"step": 5, "time": 27.0, "train_runtime": 17.0, "train_loss": 1.0})  # the summary line
    records.append(dict(records[-2]))                                                   # a duplicated step
    result = measure.steady_throughput(records, skip=2)
    # from the log of step 2 (t=20, 200 tokens) to step 5 (t=26, 500 tokens): 300 tokens in 6 s
    assert result["tokens_per_s"] == pytest.approx(50.0) and result["steps_per_s"] == pytest.approx(0.5)
    assert (result["steps"], result["first_step"], result["last_step"]) == (3, 3, 5)
    with_warmup = measure.steady_throughput(records, skip=1)
    assert with_warmup["tokens_per_s"] == pytest.approx(400 / 16)


def test_steady_throughput_too_few_steps():
    records = _steps([0.0, 5.0, 7.0, 9.0], [256, 512, 768, 1024])
    assert measure.steady_throughput(records[:3], skip=2) is None   # one step after the warm-up is not a rate
    assert measure.steady_throughput([], skip=1) is None
    # ... unless asked for: an arm capped by a time budget has long steps; still never the warm-up step itself
    one = measure.steady_throughput(records[:3], skip=2, min_steps=1)
    assert one["tokens_per_s"] == pytest.approx(256 / 2.0) and (one["first_step"], one["last_step"]) == (3, 3)
    assert measure.steady_throughput(records[:2], skip=2, min_steps=1) is None


def test_ratio_median_goal():
    assert measure.ratio(3.0, 2.0) == 1.5
    assert measure.ratio(None, 2.0) is None and measure.ratio(1.0, 0) is None
    assert measure.median([3.0, None, 1.0, 2.0]) == 2.0
    assert measure.median([None]) is None
    assert measure.goal(0.09, at_most=0.1) is True
    assert measure.goal(0.11, at_most=0.1) is False
    assert measure.goal(1.2, at_least=0.85, at_most=1.15) is False
    assert measure.goal(None, at_least=1.0) is None


def test_interleaved_rotates_arms_every_repeat():
    assert measure.interleaved(["a", "b"], 2) == [(0, "a"), (0, "b"), (1, "b"), (1, "a")]
    order = measure.interleaved(["a", "b", "c"], 3)
    assert [arm for _, arm in order] == list("abcbcacab")


_RUN_TWO_CHILDREN = """
import json, sys
from pathlib import Path
from bench import measure
out = Path(sys.argv[1])
big = measure.run_child([sys.executable, "-c", "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096])"],
                        log_dir=out / "big")
small = measure.run_child([sys.executable, "-c", "import sys; print('hi'); sys.exit(3)"], log_dir=out / "small")
print(json.dumps({"big": [big.ok, big.peak_rss_bytes],
                  "small": [small.returncode, small.ok, small.stdout.strip(), small.peak_rss_bytes]}))
"""


def test_run_child_reports_peak_rss_and_exit_code(tmp_path):
    # From a small parent, as bench/run.py is: Linux counts the parent's memory at exec time into a child's peak RSS,
    # so measured from this test process (large once other tests loaded models) both children would look as big.
    result = _run(["-c", _RUN_TWO_CHILDREN, str(tmp_path)])
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout)
    big_ok, big_peak = figures["big"]
    small_code, small_ok, small_stdout, small_peak = figures["small"]
    assert big_ok and big_peak >= 300 * 2**20
    assert small_code == 3 and not small_ok and small_stdout == "hi"
    assert small_peak < big_peak - 200 * 2**20


def test_parse_meminfo_and_machine_info():
    parsed = measure.parse_meminfo("MemTotal:       24576000 kB\nMemAvailable:   1000 kB\nHugePages_Total:       0\n")
    assert parsed == {"MemTotal": 24576000 * 1024, "MemAvailable": 1024000, "HugePages_Total": 0}
    info = measure.machine_info()
    assert info["nproc"] >= 1 and info["memory_total_bytes"] > 0


def test_varied_chat_records_are_deterministic_and_varied():
    records = measure.varied_chat_records(300, seed=0)
    assert records == measure.varied_chat_records(300, seed=0)
    lengths = sorted(len(r["messages"][1]["content"]) for r in records)
    assert [m["role"] for m in records[0]["messages"]] == ["user", "assistant"]
    assert lengths[len(lengths) // 2] < 150 < lengths[-1]   # skewed short with a long tail
    assert lengths[-1] > 4 * lengths[len(lengths) // 2]


def test_synthetic_chat_records_are_deterministic_prefixes_of_steady_size(tmp_path):
    records = list(measure.synthetic_chat_records(400, seed=0))
    assert records == list(measure.synthetic_chat_records(400, seed=0))
    assert list(measure.synthetic_chat_records(150, seed=0)) == records[:150]   # every size a prefix of the larger
    assert records != list(measure.synthetic_chat_records(400, seed=1))
    assert [m["role"] for m in records[0]["messages"]] == ["user", "assistant"]
    assert records[7]["messages"][0]["content"].startswith("Q7: ")
    sizes = [len(json.dumps(r)) + 1 for r in records]
    assert 440 < sum(sizes) / len(sizes) < 520 and 250 < min(sizes) and max(sizes) < 700   # ~480 bytes each
    # written one record at a time, from a generator, with no partial file left behind
    path = measure.write_jsonl(tmp_path / "d" / "chat.jsonl", measure.synthetic_chat_records(400, seed=0))
    assert path.stat().st_size == sum(sizes) and not list(path.parent.glob("*.partial"))
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == records


def test_folder_bytes_counts_files_not_links(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "one").write_bytes(b"x" * 100)
    (tmp_path / "a" / "b" / "two").write_bytes(b"y" * 20)
    other = tmp_path / "other"
    other.mkdir()
    (other / "big").write_bytes(b"z" * 5000)
    (tmp_path / "a" / "linked").symlink_to(other, target_is_directory=True)   # as converted/ in a cold cache
    (tmp_path / "a" / "file-link").symlink_to(other / "big")
    assert measure.folder_bytes(tmp_path / "a") == 120
    assert measure.folder_bytes(tmp_path / "missing") == 0


def _data_run(wall, rss, rows=1000, ok=True, **extra):
    return {"ok": ok, "wall_s": wall if ok else None, "peak_rss_bytes": rss if ok else None, "rows": rows,
            "others_cpu_share": 0.0, "error": None if ok else "Traceback\nRuntimeError: boom", **extra}


def test_data_row_medians_ratios_and_cached_runs():
    from bench.run import data_row

    mib = 2**20
    runs = {"ftcli": [_data_run(10.0, 500 * mib, repeat=1, cached=_data_run(1.0, 300 * mib)),
                      _data_run(14.0, 700 * mib, repeat=2, cached=_data_run(2.0, 300 * mib))],
            "trl": [_data_run(20.0, 1000 * mib, prep_s=12.0, repeat=1), _data_run(24.0, 1000 * mib, prep_s=14.0,
                                                                                 repeat=2)]}
    row = data_row(1000, 480_000, 2, runs)
    assert (row["ftcli"]["wall_s"], row["trl"]["wall_s"], row["trl"]["prep_s"]) == (12.0, 22.0, 13.0)
    assert row["wall_ratio"] == round(12 / 22, 3) and row["rss_ratio"] == 0.6
    assert row["cached"]["wall_s"] == 1.5 and row["same_rows"] is True
    runs["trl"][1]["rows"] = 999
    assert data_row(1000, 480_000, 2, runs)["same_rows"] is False
    # a failed run counts for nothing, neither its time nor its memory
    failed = data_row(1000, 1, 1, {"ftcli": [_data_run(1, 1, ok=False)], "trl": [_data_run(5.0, 9)]})
    assert failed["wall_ratio"] is None and failed["rss_ratio"] is None and "cached" not in failed


def test_data_goals():
    from bench.run import CACHED_WALL_LIMIT_S, data_goals

    mib = 2**20

    def row(ftcli_rss, rss_ratio, wall_ratio, cached_s=None):
        item = {"ftcli": {"peak_rss_bytes": ftcli_rss}, "rss_ratio": rss_ratio, "wall_ratio": wall_ratio}
        return {**item, "cached": {"wall_s": cached_s}} if cached_s is not None else item

    section = {"cached_size": 200_000, "sizes": {"20000": row(600 * mib, 0.9, 1.2),
                                                 "200000": row(700 * mib, 1.05, 0.8, cached_s=3.0),
                                                 "2000000": row(1000 * mib, 1.2, 0.7)}}
    goals = {g["key"]: g for g in data_goals(section)}
    assert set(goals) == {"data/20000/memory", "data/20000/wall", "data/200000/memory", "data/200000/wall",
                          "data/2000000/memory", "data/2000000/wall", "data/rss-flat", "data/cached"}
    assert [goals[f"data/{n}/memory"]["met"] for n in (20000, 200000, 2000000)] == [True, True, False]
    assert [goals[f"data/{n}/wall"]["met"] for n in (20000, 200000, 2000000)] == [False, True, True]
    assert goals["data/rss-flat"]["value"] == round(1000 / 600, 3) and goals["data/rss-flat"]["met"] is False
    assert "2,000,000 examples / at 20,000" in goals["data/rss-flat"]["what"]
    assert goals["data/cached"]["value"] == 3.0 and goals["data/cached"]["met"] is True
    assert "200,000" in goals["data/cached"]["what"] and CACHED_WALL_LIMIT_S == 5.0
    # one size (the quick run): flatness is not measured; no cached run: not measured either, never "met"
    one = {g["key"]: g for g in data_goals({"cached_size": 20_000, "sizes": {"20000": row(600 * mib, 1.0, 1.0)}})}
    assert one["data/rss-flat"]["met"] is None and one["data/rss-flat"]["value"] is None
    assert one["data/cached"]["met"] is None and one["data/20000/memory"]["met"] is True


def test_dry_run_figures_and_last_json_line():
    from bench.run import dry_run_figures, find_key, last_json_line

    report = {"recipe": "data-prep", "data": {"train": {"examples": 12, "rows": 11}, "num_proc": 2}}
    result = measure.ChildResult(command=["ftcli"], returncode=0, wall_s=1.0, peak_rss_bytes=1,
                                 stdout=json.dumps(report, indent=2))
    assert dry_run_figures(result) == {"rows": 11, "num_proc": 2}
    failed = measure.ChildResult(command=["ftcli"], returncode=1, wall_s=1.0, peak_rss_bytes=1, stdout="")
    assert dry_run_figures(failed) == {}
    report["data"] = {"train": {"examples": 12, "rows": 12, "processes": 2}}   # as ftcli reports it now
    processes = measure.ChildResult(command=["ftcli"], returncode=0, wall_s=1.0, peak_rss_bytes=1,
                                    stdout=json.dumps(report))
    assert dry_run_figures(processes) == {"rows": 12, "num_proc": 2}
    assert find_key({"a": [{"b": {"num_proc": "auto"}}]}, "num_proc") == "auto" and find_key([], "x") is None
    assert last_json_line('progress\n{"prep_s": 1.5, "rows": 3}\n') == {"prep_s": 1.5, "rows": 3}
    assert last_json_line("Traceback ...") == {} and last_json_line("") == {}


def test_data_plans():
    from bench import run as bench_run

    full, quick = bench_run.FULL, bench_run.QUICK
    assert full.data_sizes == (20_000, 200_000, 2_000_000) and full.data_repeats == (2, 1, 1)
    assert full.data_cached_size == 200_000
    assert quick.data_sizes == (20_000,) and quick.data_repeats == (1,) and quick.data_cached_size == 20_000
    for plan in (full, quick):
        assert len(plan.data_sizes) == len(plan.data_repeats) and plan.data_cached_size in plan.data_sizes
        assert plan.data_max_length == 256
    assert "data" in bench_run.SECTIONS
    recipe = bench_run.data_recipe(Path("/d/chat.jsonl"), 256)
    assert recipe["model"] == {"path": "builtin:smollm2-135m-instruct"} and recipe["method"] == {"kind": "lora"}
    assert recipe["data"] == {"train": "/d/chat.jsonl", "max_length": 256}   # num_proc and format at their defaults
    assert recipe["training"] == {"max_steps": 10}


def test_data_section_runs_both_sides_on_cold_caches_interleaved(tmp_path, monkeypatch):
    """The data section's plumbing with fake children: the commands, a fresh cache per run with the warm converted
    folder linked in (the cached run reusing its run's), a fresh HF_DATASETS_CACHE, the order, the results."""
    import dataclasses

    from bench import run as bench_run

    warm = tmp_path / "warm"
    (warm / "converted" / "SmolLM2").mkdir(parents=True)
    monkeypatch.setenv("FTCLI_CACHE_DIR", str(warm))
    plan = dataclasses.replace(bench_run.QUICK, data_sizes=(30, 60), data_repeats=(2, 1), data_cached_size=60)
    bench = bench_run.Bench(plan, tmp_path / "work")
    monkeypatch.setattr(bench, "local_dir", lambda: warm / "converted" / "SmolLM2")
    calls = []

    def fake_child(label, command, *, env=None, timed=True, timeout_s=None):
        env = env or {}
        cache = Path(env["FTCLI_CACHE_DIR"] if "--dry-run" in command else env["HF_DATASETS_CACHE"])
        calls.append({"label": label, "command": command, "cache": cache, "timeout_s": timeout_s,
                      "linked": (cache / "converted").resolve() if (cache / "converted").exists() else None})
        if "--dry-run" in command:
            recipe = json.loads(Path(command[command.index("train") + 1]).read_text(encoding="utf-8"))
            examples = sum(1 for _ in open(recipe["data"]["train"], encoding="utf-8"))
            data_dir = cache / "data"
            stdout = json.dumps({"data": {"train": {"examples": examples, "rows": examples}}})
            data_dir.mkdir(exist_ok=True)
            (data_dir / "entry").write_text("x", encoding="utf-8")
        else:
            examples = sum(1 for _ in open(command[command.index("bench.trl_data_prep") + 1], encoding="utf-8"))
            stdout = json.dumps({"prep_s": 2.0, "rows": examples})
        rss = (300 if "--dry-run" in command else 400) * 2**20
        return measure.ChildResult(command=command, returncode=0, wall_s=3.0, peak_rss_bytes=rss, stdout=stdout)

    monkeypatch.setattr(bench, "child", fake_child)
    bench.data()
    labels = [c["label"] for c in calls]
    assert labels == ["data-30-ftcli-1", "data-30-trl-1", "data-30-trl-2", "data-30-ftcli-2",
                      "data-60-ftcli-1", "data-60-ftcli-1-cached", "data-60-trl-1"]
    by_label = {c["label"]: c for c in calls}
    ftcli_caches = [c["cache"] for c in calls if "-ftcli-" in c["label"] and not c["label"].endswith("cached")]
    assert len(set(ftcli_caches)) == 3 and all(not cache.exists() for cache in ftcli_caches)   # fresh, then removed
    assert all(c["linked"] == warm / "converted" for c in calls if "-ftcli-" in c["label"])
    assert by_label["data-60-ftcli-1-cached"]["cache"] == by_label["data-60-ftcli-1"]["cache"]
    trl = by_label["data-30-trl-1"]
    assert trl["command"][1:3] == ["-m", "bench.trl_data_prep"] and trl["linked"] is None
    assert trl["command"][trl["command"].index("--max-length") + 1] == "256"
    assert trl["command"][trl["command"].index("--model") + 1] == str(warm / "converted" / "SmolLM2")
    assert trl["cache"] != by_label["data-30-trl-2"]["cache"] and not trl["cache"].exists()
    assert all(c["timeout_s"] == plan.data_timeout_s for c in calls)
    section = bench.results["sections"]["data"]
    assert list(section["sizes"]) == ["30", "60"]
    row = section["sizes"]["60"]
    assert row["rss_ratio"] == 0.75 and row["wall_ratio"] == 1.0 and row["same_rows"] is True
    assert row["ftcli"]["rows"] == [60] and row["cached"]["wall_s"] == 3.0 and "cached" not in section["sizes"]["30"]
    assert section["cpu_count"] >= 1 and "recipe_default" in section["num_proc"]
    goals = {g["id"]: g for g in bench.results["goals"]}
    assert goals["data/60/memory"]["met"] is True and goals["data/rss-flat"]["value"] == 1.0
    assert not (tmp_path / "work" / "data").exists()   # the generated files are removed
    text = report.render_markdown({**bench.results, "plan": dataclasses.asdict(plan), "quick": True})
    assert "## 8. Data preparation" in text
    assert "| 60 | 0 | 1 | 3.0 | 300 | 3.0 | 2.0 | 400 | 1.000 | 0.750 | 60 / 60 |" in text
    assert "again on the data cache its cold run filled: 3.00 s" in text
    assert row["ftcli"]["cache_bytes"] == 1 and row["trl"]["cache_bytes"] == 0   # what each left on disk
    assert "on disk, ftcli's data cache 0 MiB, the datasets cache of the TRL script 0 MiB" in text
    # a failed and a disturbed run are said so, once per size
    row["trl"]["runs"][0].update(ok=False, error="Traceback\nMemoryError")
    row["ftcli"]["runs"][0]["others_cpu_share"] = 0.25
    text = report.render_markdown({**bench.results, "plan": dataclasses.asdict(plan), "quick": True})
    assert "- @60: trl repeat 1 failed: `['MemoryError']`" in text
    assert "- @60: runs disturbed by other processes (their share of the CPU): ftcli 1 (25%)" in text
    assert "data preparation at 30, 60 examples only" in text


def _results(quick: bool) -> dict:
    run = {"ok": True, "tokens_per_s": 100.0, "peak_rss_bytes": 3 * 2**30, "wall_s": 50.0, "repeat": 1,
           "eval_loss": 1.5}
    arm = {"runs": [run], "tokens_per_s": 100.0, "peak_rss_bytes": 3 * 2**30, "wall_s": 50.0, "eval_loss": 1.5}
    failed = {"runs": [{**run, "ok": False, "tokens_per_s": None, "error": "Traceback\nValueError: boom"}],
              "tokens_per_s": None, "peak_rss_bytes": None, "wall_s": 10.0}
    return {
        "quick": quick, "date": "2026-01-01", "elapsed_s": 12.0, "plan": {"skip": 2},
        "machine": {"nproc": 2, "memory_total_bytes": 24 * 2**30, "cpu_model": "AMD EPYC", "load_average": [0.1]},
        "versions": {"torch": "2.13.0"},
        "goals": [{"id": "a", "what": "startup ratio", "value": 0.2, "target": "<= 0.10", "met": False},
                  {"id": "b", "what": "speed ratio", "value": 1.1, "target": ">= 1.00", "met": True}],
        "sections": {
            "startup": {"runs_s": {"ftcli --help": [0.1], "import torch": [1.0]},
                        "median_s": {"ftcli --help": 0.1, "import torch": 1.0},
                        "ratio_to_import_torch": {"ftcli --help": 0.1}},
            "training": {"lora": {"ftcli": arm, "trl_matched": arm, "trl_defaults": failed},
                         "qlora": {"ftcli": arm, "trl_matched": arm},
                         "head": {"lora": {"labelled_share": 0.11,
                                           "step_s_median": {"trl": 2.3, "labelled_only": 1.3, "ftcli": 1.0},
                                           "trl_over_labelled_only": {"median": 1.77, "range": [1.7, 1.8]},
                                           "trl_over_ftcli": {"median": 2.3, "range": [2.2, 2.4]},
                                           "largest_loss_difference": 0.0},
                                  "qlora": {"error": "Traceback"}}},
            "memory": {"steps": 1, "cases": {"lora@256": {"estimate_bytes": 2**30, "peak_rss_bytes": 2**30,
                                                          "estimate_over_measured": 1.0, "from": "own run"}},
                       "estimates_recomputed": "Recomputed for the same peaks."},
            "rl": {"steps": 10, "arms": {"ftcli": arm, "trl_matched": arm},
                   "ratios": {"steps_per_s": 1.02, "tokens_per_s": 0.9, "peak_rss": 0.97}},
            "preference": {"steps": 12, "arms": {"ftcli": arm, "trl_matched": arm},
                           "ratios": {"tokens_per_s": 1.0, "peak_rss": 1.0},
                           "estimate": {"estimate_bytes": 3 * 2**30, "measured_bytes": 3 * 2**30,
                                        "estimate_over_measured": 1.0, "estimate_parts": {"weights": 2**30}}},
        },
    }


def _with_precision(results: dict, *, detected, forced=None, ftcli="bf16", defaults_steps=(4, 4)) -> dict:
    """_results with what a run records about precision: the CPU facts and each LoRA arm's own settings."""
    effective = {None: detected, "off": False, "on": True}[forced]
    results["cpu_bf16"] = {"detected": detected, "FTCLI_CPU_BF16": forced, "forced": forced, "effective": effective,
                           "auto_precision": "bf16" if effective else "fp32"}
    lora = results["sections"]["training"]["lora"]
    lora["ftcli"] = {**lora["ftcli"], "precision": ftcli, "gradient_checkpointing": False}
    lora["trl_matched"] = {**lora["trl_matched"], "precision": ftcli, "gradient_checkpointing": False,
                           "optim": "adamw_torch"}
    ran, planned = defaults_steps
    lora["trl_defaults"] = {**lora["trl_defaults"], "precision": "bf16", "gradient_checkpointing": True,
                            "optim": "adamw_torch_fused", "steps_run": [ran], "steps_planned": planned,
                            "capped": ran < planned}
    results["plan"]["defaults_budget_s"] = 30.0
    return results


def _line(text: str, start: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(start))


def test_report_words_precision_from_what_the_run_recorded():
    # A CPU without native bf16: ftcli trained in fp32; nothing may claim AVX512-BF16 or bf16 for ftcli
    fp32 = report.render_markdown(_with_precision(_results(quick=True), detected=False, ftcli="fp32"))
    assert "has AVX512-BF16" not in fp32 and "as it has" not in fp32
    assert "this CPU has no native bf16" in fp32 and "computes bf16 natively" not in fp32
    ftcli_line = _line(fp32, "- `ftcli`:")
    assert "fp32" in ftcli_line and "bf16" not in ftcli_line and "no gradient checkpointing" in ftcli_line
    assert "fp32" in _line(fp32, "- `trl_matched`:")
    defaults_line = _line(fp32, "- `trl_defaults`:")
    assert "bf16 autocast, emulated as this CPU has no native bf16" in defaults_line
    assert "; gradient checkpointing;" in defaults_line and "adamw_torch_fused" in defaults_line
    assert "was capped" not in fp32 and "not capped" in fp32
    # A CPU with it: ftcli's bf16 is native, and said so
    bf16 = report.render_markdown(_with_precision(_results(quick=False), detected=True, ftcli="bf16"))
    assert "this CPU computes bf16 natively" in bf16 and "FTCLI_CPU_BF16 not set" in bf16
    assert "bf16 autocast, native on this CPU" in _line(bf16, "- `ftcli`:")
    assert "emulated" not in bf16
    # FTCLI_CPU_BF16=off on a CPU with native bf16: ftcli in fp32, TRL's default bf16 still native
    forced = report.render_markdown(_with_precision(_results(quick=True), detected=True, forced="off", ftcli="fp32"))
    assert "FTCLI_CPU_BF16=off made ftcli resolve as on a CPU without native bf16" in forced
    assert "resolved to fp32" in forced and "bf16" not in _line(forced, "- `ftcli`:")
    assert "bf16 autocast, native on this CPU" in _line(forced, "- `trl_defaults`:")
    # A matched arm that did not match is flagged
    mismatched = _with_precision(_results(quick=True), detected=True, ftcli="bf16")
    mismatched["sections"]["training"]["lora"]["trl_matched"]["precision"] = "fp32"
    assert "trl_matched did not train with ftcli's precision" in report.render_markdown(mismatched)
    # Older results without these records: no claim either way
    old = report.render_markdown(_results(quick=False))
    assert "precision not recorded" in _line(old, "- `ftcli`:") and "bf16 on this CPU: not recorded" in old


def test_report_says_what_was_capped():
    capped = _with_precision(_results(quick=True), detected=False, ftcli="fp32", defaults_steps=(2, 4))
    capped["sections"]["training"]["eval_loss_not_compared"] = "trl_defaults ran 2 of 4 steps (time budget)"
    text = report.render_markdown(capped)
    assert "**`trl_defaults` was capped: it ran 2 of 4 steps**" in text
    assert "after 30 s of training" in text and "eval loss is not compared" in text


def test_quick_plan_caps_the_trl_defaults_arm_only(tmp_path, monkeypatch):
    from bench import run as bench_run
    from bench.sides import arm_summary

    assert bench_run.QUICK.defaults_budget_s is not None and bench_run.QUICK.defaults_budget_s <= 60
    assert bench_run.FULL.defaults_budget_s is None   # the full run trains every arm its steps
    bench = bench_run.Bench(bench_run.QUICK, tmp_path)
    monkeypatch.setattr(bench, "local_dir", lambda: tmp_path / "model")
    monkeypatch.setattr(bench, "cpu_bf16", lambda: {"detected": False, "auto_precision": "fp32"})
    commands = {}

    def fake_child(label, command, *, env=None, timed=True):
        """The script as a slow CPU runs it: stopped by its budget after 2 of 4 steps; one settings line first."""
        commands[label] = command
        log = Path(command[command.index("--log") + 1])
        capped = "--max-seconds" in command
        settings = {"precision": "bf16" if "--trl-defaults" in command else command[command.index("--precision") + 1],
                    "gradient_checkpointing": "--trl-defaults" in command, "optim": "adamw_torch_fused"}
        lines = [{"event": "train_begin", "time": 1000.0, "settings": settings}]
        lines += [{"step": i, "time": 1000.0 + 100 * i, "loss": 1.0, "num_tokens": 400.0 * i}
                  for i in range(1, (2 if capped else 4) + 1)]
        log.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
        return measure.ChildResult(command=command, returncode=0, wall_s=250.0, peak_rss_bytes=2**30)

    monkeypatch.setattr(bench, "child", fake_child)
    arms = bench.lora_arms()
    assert set(arms) == {"ftcli", "trl_matched", "trl_defaults"}
    defaults = arms["trl_defaults"]("lora-trl_defaults-1")
    matched = arms["trl_matched"]("lora-trl_matched-1")
    command = commands["lora-trl_defaults-1"]
    budget = command[command.index("--max-seconds") + 1]
    assert float(budget) == bench_run.QUICK.defaults_budget_s
    assert command[command.index("--min-steps") + 1] == str(bench_run.QUICK.skip + 1)   # a step after the warm-up
    assert "--max-seconds" not in commands["lora-trl_matched-1"]
    assert commands["lora-trl_matched-1"][commands["lora-trl_matched-1"].index("--precision") + 1] == "fp32"
    # the quick plan's recipe overrides (smaller batches) reach the script too, through the recipe it reads
    assert "training.batch_size=2" in bench_run.QUICK.overrides
    for label in ("lora-trl_defaults-1", "lora-trl_matched-1"):
        assert commands[label][commands[label].index("--batch") + 1] == "2"
    assert commands[label][1:3] == ["-m", "bench.trl_baseline"]
    # tokens/s over the one step after the warm-up that the capped arm ran; the settings from its own log
    assert defaults["tokens_per_s"] == pytest.approx(4.0) and defaults["steps_run"] == 2
    assert (defaults["precision"], defaults["gradient_checkpointing"]) == ("bf16", True)
    summary = arm_summary([defaults])
    assert summary["capped"] and summary["steps_run"] == [2] and summary["steps_planned"] == bench_run.QUICK.lora_steps
    assert summary["precision"] == "bf16" and summary["optim"] == "adamw_torch_fused"
    assert not arm_summary([matched])["capped"] and arm_summary([matched])["precision"] == "fp32"


@pytest.mark.slow
def test_baseline_script_stops_at_its_time_budget(tmp_path, tiny_model_dir, chat_data):
    log = tmp_path / "steps.jsonl"
    result = _run(["-m", "bench.trl_baseline", str(tiny_model_dir), str(chat_data), "--out", str(tmp_path / "out"),
                   "--log", str(log), "--steps", "5", "--batch", "2", "--max-length", "64", "--trl-defaults",
                   "--max-seconds", "0", "--min-steps", "2"], timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    records = measure.read_jsonl(log)
    assert records[0]["event"] == "train_begin"
    assert records[0]["settings"]["precision"] == "bf16" and records[0]["settings"]["gradient_checkpointing"] is True
    assert [r["step"] for r in measure.train_records(records)] == [1, 2]   # stopped after --min-steps, not 5
    assert (tmp_path / "out" / "adapter_config.json").is_file()            # and saved as usual


@pytest.mark.slow   # starts the script as a process
def test_dpo_baseline_script_trains_and_logs_real_tokens(tmp_path, tiny_model_dir):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Say {w}", "chosen": w, "rejected": f"not {w}"}) + "\n"
                             for w in ("red", "blue", "green", "cat")), encoding="utf-8")
    log = tmp_path / "steps.jsonl"
    result = _run(["-m", "bench.trl_dpo_baseline", str(tiny_model_dir), str(pairs), "--out", str(tmp_path / "out"),
                   "--log", str(log), "--steps", "2", "--batch", "2", "--max-length", "64"], timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    records = measure.read_jsonl(log)
    assert records[0]["settings"] == {"precision": "fp32", "gradient_checkpointing": False, "optim": "adamw_torch",
                                      "max_steps": 2, "max_seconds": None}
    steps = measure.train_records(records)
    assert [r["step"] for r in steps] == [1, 2] and 0 < steps[0]["num_tokens"] < steps[1]["num_tokens"]
    assert "rewards/margins" in steps[0]
    assert (tmp_path / "out" / "adapter_config.json").is_file()


@pytest.mark.slow   # starts the script as a process
def test_grpo_baseline_script_trains_with_its_python_rewards(tmp_path, tiny_model_dir, chat_data):
    log = tmp_path / "steps.jsonl"
    result = _run(["-m", "bench.trl_grpo_baseline", str(tiny_model_dir), str(chat_data), "--out", str(tmp_path / "out"),
                   "--log", str(log), "--steps", "2", "--batch", "4", "--num-generations", "2",
                   "--max-completion-length", "8", "--max-length", "64"], timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    steps = measure.train_records(measure.read_jsonl(log))
    assert [r["step"] for r in steps] == [1, 2]
    assert {"rewards/exact_match_norm/mean", "rewards/f1/mean", "rewards/one_line/mean"} <= set(steps[0])


def test_report_lists_goals_sections_and_failures():
    text = report.render_markdown(_results(quick=True))
    assert text.startswith("# ftcli benchmark results (QUICK")
    assert "| startup ratio | 0.200 | <= 0.10 | **no** |" in text
    assert "| speed ratio | 1.100 | >= 1.00 | yes |" in text
    assert "trl_defaults repeat 1 failed" in text and "ValueError: boom" in text
    assert "| lora@256 | 1,024 | 1,024 | 1.000 |" in text
    assert "| lora | 11% | 2.300 | 1.300 | 1.000 | 1.770 (1.700, 1.800) | 2.300 (2.200, 2.400) | 0.000000 |" in text
    assert "| qlora | failed |" in text
    assert "**Recomputed for the same peaks.**" in text
    assert "## 6. Preference tuning (DPO)" in text and "12 steps of its batch of pairs" in text
    assert "3,072 MiB against ftcli's measured peak 3,072 MiB: 1.000 (weights 1,024)" in text
    assert "## 7. RL with declared rewards (GRPO)" in text
    assert "- ftcli / trl_matched: steps/s 1.020, tokens/s 0.900, peak RSS 0.970" in text
    assert "QUICK" not in report.render_markdown(_results(quick=False))


def _run(args, timeout=60, **kwargs):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=timeout,
                          check=False, **kwargs)


def test_run_help_is_fast_and_imports_nothing_heavy():
    result = _run(["-m", "bench.run", "--help"])
    assert result.returncode == 0, result.stderr
    assert "--quick" in result.stdout and "packing" in result.stdout
    probe = _run(["-c", "import json, sys; import bench.run, bench.report; "
                        "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'trl') if m in sys.modules)))"])
    assert probe.returncode == 0, probe.stderr
    assert json.loads(probe.stdout) == []


def test_baseline_and_probe_help():
    baseline = _run(["-m", "bench.trl_baseline", "--help"])
    assert baseline.returncode == 0 and "--trl-defaults" in baseline.stdout
    probes = _run(["-m", "bench.probes", "--help"])
    assert probes.returncode == 0 and "estimate" in probes.stdout
    prep = _run(["-m", "bench.trl_data_prep", "--help"])
    assert prep.returncode == 0 and "--max-length" in prep.stdout
    dpo = _run(["-m", "bench.trl_dpo_baseline", "--help"])
    assert dpo.returncode == 0 and "--beta" in dpo.stdout
    grpo = _run(["-m", "bench.trl_grpo_baseline", "--help"])
    assert grpo.returncode == 0 and "--num-generations" in grpo.stdout


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine would run the real check")
def test_gpu_check_exits_cleanly_without_gpu():
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0
    assert "no NVIDIA GPU" in result.stdout and "nothing measured" in result.stdout


def test_cpu_noise_helpers():
    stat = "cpu  1000 50 250 9000 10 5 5 0 0 0\ncpu0 500 25 125 4500 5 2 3 0 0 0\n"
    ticks = os.sysconf("SC_CLK_TCK")
    assert measure.machine_busy_seconds(stat) == pytest.approx((1000 + 50 + 250 + 5 + 5 + 0) / ticks)
    # 2 cores for 10 s = 20 CPU-s of capacity; the machine was busy 14 s of which the child used 9: others 5/20
    assert measure.others_cpu_share(14.0, 9.0, 10.0, 2) == 0.25
    assert measure.others_cpu_share(8.0, 9.0, 10.0, 2) == 0.0   # accounting jitter never goes negative


def test_per_token_fit_separates_token_cost_from_the_rest():
    from bench.run import per_token_fit

    mib = 2**20
    cases = {  # measured: 1000 MiB fixed + 2 MiB per token; estimated: 1200 MiB + 1 MiB per token (batch 8)
        "lora@128": {"peak_rss_bytes": (1000 + 2 * 1024) * mib, "estimate_bytes": (1200 + 1024) * mib},
        "lora@256": {"peak_rss_bytes": (1000 + 2 * 2048) * mib, "estimate_bytes": (1200 + 2048) * mib},
        "lora@256 packed": {"peak_rss_bytes": 1, "estimate_bytes": 1},
        "qlora@256": {"peak_rss_bytes": 5 * mib, "estimate_bytes": 4 * mib},   # one length only: no fit
    }
    fit = per_token_fit(cases, batch=8)
    assert set(fit) == {"lora"}
    assert fit["lora"]["measured_bytes_per_token"] == 2 * mib
    assert fit["lora"]["estimated_bytes_per_token"] == 1 * mib
    assert fit["lora"]["measured_fixed_bytes"] == 1000 * mib and fit["lora"]["estimated_fixed_bytes"] == 1200 * mib


def test_cpu_seconds_between_interpolates_samples():
    samples = [(100.0, 1.0), (101.0, 2.0), (103.0, 2.5)]
    assert measure.cpu_seconds_between(samples, 100.5, 102.0) == pytest.approx((2.0 + 0.25) - 1.5)
    assert measure.cpu_seconds_between(samples, 99.0, 102.0) is None    # before the first sample
    assert measure.cpu_seconds_between(samples[:1], 100.0, 100.0) is None


def test_run_child_samples_its_cpu_time(tmp_path):
    busy = "import time\nend = time.time() + 0.8\nwhile time.time() < end: pass\n"
    result = measure.run_child([sys.executable, "-c", busy], log_dir=tmp_path)
    assert result.ok and len(result.cpu_samples) >= 3
    times = [t for t, _ in result.cpu_samples]
    cpu = [c for _, c in result.cpu_samples]
    assert times == sorted(times) and cpu == sorted(cpu) and cpu[-1] > 0.05   # a busy loop: CPU grows
    assert result.cpu_s >= cpu[-1] - 0.05


def test_run_child_times_short_commands_precisely_and_kills_on_timeout(tmp_path):
    quick = measure.run_child([sys.executable, "-c", "import time; time.sleep(0.12)"], log_dir=tmp_path / "q",
                              timeout_s=30)
    assert quick.ok and 0.12 <= quick.wall_s < 0.12 + 0.5
    slow = measure.run_child([sys.executable, "-c", "import time; time.sleep(30)"], log_dir=tmp_path / "s",
                             timeout_s=0.5)
    assert not slow.ok and slow.wall_s < 10


def test_arm_speed_ignores_disturbed_runs_but_memory_uses_all():
    from bench.sides import arm_summary as _arm_summary

    def run(speed, rss, others):
        return {"ok": True, "tokens_per_s": speed, "tokens_per_cpu_s": speed / 2, "peak_rss_bytes": rss,
                "wall_s": 10.0, "others_cpu_share": others}

    arm = _arm_summary([run(200.0, 100, 0.01), run(30.0, 300, 0.45), run(210.0, 200, 0.02)])
    assert arm["tokens_per_s"] == 205.0 and arm["speed_from"] == "undisturbed runs"
    assert arm["peak_rss_bytes"] == 200
    all_disturbed = _arm_summary([run(30.0, 100, 0.5), run(50.0, 100, 0.3)])
    assert all_disturbed["tokens_per_s"] == 40.0 and all_disturbed["speed_from"].startswith("all runs")


def test_paired_step_ratio_compares_the_same_steps_and_refuses_different_batches():
    def records(seconds_per_step, tokens_per_step):
        rows, time, tokens = [], 100.0, 0.0
        for step, (seconds, count) in enumerate(zip(seconds_per_step, tokens_per_step), start=1):
            time, tokens = time + seconds, tokens + count
            rows.append({"step": step, "loss": 1.0, "num_tokens": tokens, "time": time})
        return rows

    tokens = [400, 420, 380, 410, 390]
    # The side is 10% faster at every step but one, which another process slowed 3x.
    side = {"step_times": measure.step_times(records([9, 1.0, 1.0, 3.0, 1.0], tokens), skip=1)}
    other = {"step_times": measure.step_times(records([9, 1.1, 1.1, 1.1, 1.1], tokens), skip=1)}
    assert [s for s, _, _ in side["step_times"]] == [2, 3, 4, 5]  # the warm-up step is left out
    paired = measure.paired_step_ratio([side], [other])
    assert paired == {"ratio": 1.1, "pairs": 4, "run_pairs_range": [1.1, 1.1]}
    assert measure.paired_step_ratio([other], [side])["ratio"] == round(1 / 1.1, 3)
    shuffled = {"step_times": measure.step_times(records([9, 1.1, 1.1, 1.1, 1.1], tokens[::-1]), skip=1)}
    assert measure.paired_step_ratio([side], [shuffled]) is None


@pytest.mark.slow
def test_trl_data_prep_prepares_completion_only_rows(tmp_path, tokenizer_dir, chat_data):
    result = _run(["-m", "bench.trl_data_prep", str(chat_data), "--max-length", "64", "--model", str(tokenizer_dir)],
                  timeout=300, env={**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf")})
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    examples = len(chat_data.read_text(encoding="utf-8").splitlines())
    assert figures["examples"] == examples and 0 < figures["rows"] <= examples
    assert {"input_ids", "labels"} <= set(figures["columns"]) and figures["prep_s"] > 0
    assert figures["prep_s"] == pytest.approx(figures["load_s"] + figures["tokenize_s"], abs=0.01)


@pytest.mark.slow
def test_head_probe_times_both_choices_over_the_same_batches(tiny_recipe):
    result = _run(["-m", "bench.probes", "head", str(tiny_recipe), "--batches", "2", "--repeats", "2"])
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert 0 < figures["labelled_share"] < 0.5    # the tiny chat data is mostly prompt
    assert set(figures["step_s_median"]) == {"trl", "labelled_only", "ftcli"}
    assert all(seconds > 0 for seconds in figures["step_s_median"].values())
    for key in ("trl_over_ftcli", "trl_over_labelled_only"):
        assert figures[key]["median"] > 0 and len(figures[key]["range"]) == 2
    assert figures["largest_loss_difference"] < 1e-4   # the same batches, the same loss every way


# ------------------------------------------------------------------------------------------ imports of ftcli internals

BENCH_MODULES = sorted(p.stem for p in (REPO / "bench").glob("*.py") if p.stem != "__init__")


def _code_strings(tree: ast.AST):
    """Python source kept in string constants that a child runs (`python -c`, e.g. bench/sides.py CPU_FACTS)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "ftcli" in node.value \
                and ("import " in node.value):
            try:
                yield ast.parse(node.value)
            except SyntaxError:
                continue


def _scopes(tree: ast.AST):
    """The module and every function: the imports each makes itself, with the body they bind names in."""
    yield tree
    yield from (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))


def _own_nodes(scope: ast.AST):
    """The nodes of a scope, not those of the functions nested in it (they are scopes of their own)."""
    stack = list(ast.iter_child_nodes(scope))
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            stack.extend(ast.iter_child_nodes(node))


def ftcli_references(source: str) -> list[tuple[str, str | None, int]]:
    """(module, name, line) for every ftcli import of the source, at module level or inside functions (name None:
    the module itself), and (module, attribute, line) for every `alias.attribute` where the alias is an ftcli module
    that a scope imported (`from ftcli.models import load as models` ... `models.resolve_model`)."""
    found = []
    tree = ast.parse(source)
    for module_tree in (tree, *_code_strings(tree)):
        for scope in _scopes(module_tree):
            aliases: dict[str, str] = {}   # name bound in this scope -> the ftcli module or object path it names
            for node in _own_nodes(scope):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                        and node.module.split(".")[0] == "ftcli":
                    for alias in node.names:
                        found.append((node.module, alias.name, node.lineno))
                        aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        if alias.name.split(".")[0] == "ftcli":
                            found.append((alias.name, None, node.lineno))
                            if alias.asname:
                                aliases[alias.asname] = alias.name
            # a name the scope also assigns is not (only) the import: leave its attributes alone
            assigned = {n.id for n in _own_nodes(scope) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            for node in ast.walk(scope):
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                        and node.value.id in aliases and node.value.id not in assigned:
                    path = aliases[node.value.id]
                    found.append((path, node.attr, node.lineno))
    return found


def _resolve(path: str):
    """The object a dotted ftcli path names: a module, or an attribute of one (a submodule is imported)."""
    try:
        return importlib.import_module(path)
    except ModuleNotFoundError as error:
        if not (error.name and path.startswith(error.name)):
            raise   # the module exists but imports something missing: a real failure, shown as is
        parent, _, name = path.rpartition(".")
        return getattr(_resolve(parent), name)


def _exists(module: str, name: str | None) -> bool:
    try:
        target = _resolve(module)
    except (ModuleNotFoundError, AttributeError):
        return False
    if name is None or hasattr(target, name):
        return True
    try:   # `from package import submodule`
        importlib.import_module(f"{module}.{name}")
        return True
    except ModuleNotFoundError:
        return False


def test_ftcli_references_finds_imports_in_functions_strings_and_module_aliases():
    source = (
        "from ftcli.recipe.loader import load_recipe\n"
        "CODE = 'from ftcli.models.load import cpu_has_native_bf16\\nprint(1)'\n"
        "def f():\n"
        "    from ftcli.models import load as models\n"
        "    import ftcli.runs.rundir as rundir\n"
        "    models.resolve_model(1)\n"
        "    return rundir.RunDir\n"
        "def g(models):\n"
        "    return models.not_an_ftcli_name\n"
    )
    refs = {(module, name) for module, name, _ in ftcli_references(source)}
    assert refs == {("ftcli.recipe.loader", "load_recipe"), ("ftcli.models.load", "cpu_has_native_bf16"),
                    ("ftcli.models", "load"), ("ftcli.runs.rundir", None), ("ftcli.models.load", "resolve_model"),
                    ("ftcli.runs.rundir", "RunDir")}
    assert _exists("ftcli.models.load", "resolve_model") and _exists("ftcli.models", "load")
    assert not _exists("ftcli.models.load", "no_such_name") and not _exists("ftcli.no_such_module", None)


@pytest.mark.parametrize("name", BENCH_MODULES)
def test_bench_module_imports_and_its_ftcli_names_exist(name):
    """Import each bench module (as `python -m bench.NAME` would) and check every ftcli name it imports, at module
    level, inside functions or in code it hands a child, and every attribute it takes from an ftcli module alias.
    A plain script (trl_baseline: no `__main__` guard, it parses its arguments on import) runs with --help instead."""
    source = (REPO / "bench" / f"{name}.py").read_text(encoding="utf-8")
    if "__name__ == \"__main__\"" in source:
        importlib.import_module(f"bench.{name}")
    else:
        result = _run(["-m", f"bench.{name}", "--help"], timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
    missing = [f"bench/{name}.py:{line}: {module}{'' if attr is None else '.' + attr}"
               for module, attr, line in ftcli_references(source) if not _exists(module, attr)]
    assert not missing, "ftcli names the bench uses no longer exist:\n" + "\n".join(missing)


def test_bench_modules_that_drive_ftcli_internals_are_scanned():
    """The scan sees the probes' imports (not vacuously empty), and no bench file edits sys.path any more."""
    counts = {name: len(ftcli_references((REPO / "bench" / f"{name}.py").read_text(encoding="utf-8")))
              for name in BENCH_MODULES}
    assert counts["probes"] >= 15 and counts["parity"] >= 5 and counts["sides"] >= 5 and counts["gpu_check"] >= 3
    for path in [*(REPO / "bench").glob("*.py"), REPO / "bench" / "gpu_check.sh"]:
        text = path.read_text(encoding="utf-8")
        assert "sys.path.insert" not in text, path
        assert "python bench/" not in text and "bench/run.py --" not in text, path   # python -m bench.NAME


def _smollm2_135m_with_lora():
    """SmolLM2-135M's architecture (its config's sizes) on the meta device, LoRA r=16 on the attention projections as
    recipes/quickstart.yaml puts it: shapes without weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                 "o_proj"]))


def test_flop_count_of_smollm2_matches_a_hand_count():
    from bench.flops import BatchTokens, model_shapes, training_flops

    shapes = model_shapes(_smollm2_135m_with_lora())
    # Per layer: q and o 576x576, k and v 576x192 (3 of 9 heads' keys and values), the MLP's three 576x1536.
    per_layer = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536
    assert shapes.frozen_matmul_params == 30 * per_layer == 106_168_320
    # LoRA r=16: A is 16 x in, B is out x 16, for q, k, v (in 576) and o (in 576, out 576).
    assert shapes.trainable_matmul_params == 30 * 16 * ((576 + 576) * 2 + (576 + 192) * 2) == 1_843_200
    assert (shapes.attention_layers, shapes.attention_width) == (30, 576)
    assert shapes.head_params == 576 * 49152 and not shapes.head_trainable
    # A 100-token sequence with its last 10 positions labelled:
    tokens = BatchTokens(real=100, labelled=10, attended_pairs=100 * 101 // 2)
    hand = 100 * (4 * 106_168_320 + 6 * 1_843_200) + 12 * 30 * 576 * 5050 + 10 * 4 * 576 * 49152
    assert training_flops(shapes, tokens) == hand
    assert 0.44e9 < hand / 100 < 0.47e9   # about 0.45 GFLOP per real token, most of it the frozen decoder


def test_batch_tokens_counts_real_labelled_and_attended_positions():
    import torch

    from bench.flops import BatchTokens, batch_tokens

    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    labels = torch.tensor([[-100, -100, 5, -100], [-100, 7, 8, 9]])
    # labels shift by one inside the loss: a label at position 0 never counts
    assert batch_tokens(mask, labels) == BatchTokens(real=7, labelled=4, attended_pairs=6 + 10)
    assert batch_tokens(mask, labels) + BatchTokens(1, 1, 1) == BatchTokens(8, 5, 17)


def test_step_profile_puts_every_event_in_one_part():
    from bench.step_profile import PARTS, OpEvent, breakdown, part_of

    def part(name, shapes=(), ancestors=()):
        return part_of(OpEvent(name, shapes, ancestors, 1.0), rank=16, vocab_size=49152)

    assert part("aten::mm", ([430, 576], [576, 1536])) == "base model matmuls"
    assert part("aten::mm", ([430, 576], [576, 16])) == "LoRA matmuls"
    assert part("aten::mm", ([266, 576], [576, 49152])) == "LM head and loss"
    assert part("aten::mul", (), ("aten::cross_entropy",)) == "LM head and loss"
    assert part("aten::_scaled_dot_product_flash_attention_for_cpu_backward") == "attention"
    assert part("aten::bmm", ([72, 60, 64], [72, 64, 60])) == "attention"
    assert part("aten::mm", ([16, 16], [16, 16]), ("Optimizer.step#AdamW.step",)) == "optimizer"
    assert part("aten::cat", (), ("enumerate(DataLoader)#_SingleProcessDataLoaderIter.__next__",)) == \
        "data loading and collation"
    assert part("aten::add", (), ("ftcli::logging",)) == "logging and callbacks"
    assert part("aten::bernoulli_") == "normalisation, activations, other elementwise"
    assert part("aten::silu_backward") == "normalisation, activations, other elementwise"
    assert part("aten::_to_copy") == "copies and dtype casts"
    assert part("aten::embedding", ([49152, 576], [8, 60])) == "other operators"
    assert part("bitsandbytes::dequantize_4bit") == "4-bit dequantization"
    events = [OpEvent("aten::mm", ([4, 8], [8, 8]), (), 300.0), OpEvent("aten::add", (), (), 100.0)]
    parts = breakdown(events, 1000.0, rank=16, vocab_size=49152)
    assert list(parts) == list(PARTS) and sum(parts.values()) == 1000.0
    assert parts["base model matmuls"] == 300.0 and parts["Python between operators"] == 600.0


@pytest.mark.slow   # a training session in this process: ~25 s
def test_utilization_probe_times_counts_and_profiles_ftcli_steps(tiny_recipe):
    from bench.probes import utilization

    result = utilization(str(tiny_recipe), warmup=1, steps=2, profile_steps=1, overrides=[])
    assert result["method"] == "lora" and result["steps"] == 2
    assert result["matmul"]["peak_gflops"] > 0 and result["tokens"]["real"] > result["tokens"]["labelled"] > 0
    assert result["achieved_gflops"] == pytest.approx(
        result["flops_per_real_token"] * result["real_tokens_per_s"] / 1e9, rel=0.01, abs=0.05)   # rounded to 0.1
    assert 0 < result["mfu"] < 1.5
    assert result["tokens"]["positions"] >= result["tokens"]["real"]
    parts = result["profile"]["parts_s"]
    assert sum(parts.values()) == pytest.approx(result["profile"]["wall_s"], rel=0.01)
    for part in ("base model matmuls", "LoRA matmuls", "attention", "LM head and loss", "optimizer"):
        assert parts[part] > 0, (part, parts)


def test_utilization_summary_report_and_picture(tmp_path):
    from bench.run import utilization_summary
    from bench.step_profile import PARTS, plot_parts

    def probe(mfu, others=0.0):
        parts = dict.fromkeys(PARTS, 0.1)
        return {"ok": True, "others_cpu_share": others, "mfu": mfu, "achieved_gflops": mfu * 200,
                "matmul": {"peak_gflops": 200.0}, "real_tokens_per_s": mfu * 400, "step_s": 1.0 / mfu,
                "precision": "fp32", "threads": 2, "dropout": "16-bit random masks", "attention": "sdpa",
                "flops_per_real_token": 4.6e8, "tokens": {"real": 90, "positions": 100},
                "profile": {"wall_s": 1.2, "parts_s": {**parts, "base model matmuls": mfu}}}

    # the disturbed run is left out of the speed; the profile is the median run's
    arm = utilization_summary([probe(0.5), probe(0.9, others=0.5), probe(0.4), probe(0.6)])
    assert arm["speed_from"] == "undisturbed runs" and arm["mfu"] == 0.5
    assert arm["profile"]["parts_s"]["base model matmuls"] == 0.5
    assert utilization_summary([{"ok": False, "error": "boom"}]) == {
        "runs": [{"ok": False, "error": "boom"}], "speed_from": "all runs (every one disturbed)"}
    section = {"lora": arm, "lora_torch_dropout": utilization_summary([probe(0.45)]), "lora_dropout_ratio": 1.11,
               "lora_attention_ratio": 1.2}
    text = "\n".join(report.utilization_section(section))
    assert "| lora | fp32 | 2 | 16-bit random masks | sdpa |" in text
    assert "50%" in text and "10%" in text   # MFU, padding
    assert "torch's dropout: 1.110" in text and "under autocast: 1.200" in text and "step_profile.png" in text
    plot_parts({name: section[name]["profile"]["parts_s"] for name in ("lora", "lora_torch_dropout")},
               tmp_path / "profile.png")
    assert (tmp_path / "profile.png").stat().st_size > 1000
