"""`ftcli eval`: loss, perplexity and generation metrics of a run, optionally against its base model."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ftcli.console import note
from ftcli.errors import NotAvailableError, QualityGateError, UsageError
from ftcli.inference.benchmarks import is_benchmark_metric, prepare_benchmarks
from ftcli.inference.metrics import HIGHER_IS_BETTER
from ftcli.inference.preference import answer_log_probs, as_chosen_conversations, preference_scores, reference_model
from ftcli.paths import is_local_path
from ftcli.runs.rundir import now_iso, now_stamp

SAMPLES_KEPT = 20          # predictions stored next to their references in the result file
SAMPLES_SHOWN = 5          # of which the terminal table shows this many


# ---------------------------------------------------------------------------------------------- gates


def parse_gates(texts: list[str]) -> dict[str, float]:
    """METRIC=VALUE strings -> {metric: bar}; UsageError for unknown metrics or bad numbers. TASK/METRIC names a
    benchmark's metric (--tasks), checked once the tasks are loaded."""
    gates: dict[str, float] = {}
    known = ", ".join(HIGHER_IS_BETTER)
    for text in texts:
        metric, sep, raw = text.partition("=")
        metric = metric.strip()
        if not sep:
            raise UsageError(f"--fail-under {text!r} is not METRIC=VALUE", hint=f"e.g. --fail-under f1=0.5 ({known})")
        if metric not in HIGHER_IS_BETTER and not is_benchmark_metric(metric):
            raise UsageError(f"--fail-under: unknown metric {metric!r}",
                             hint=f"known metrics: {known}; TASK/METRIC for a benchmark's (--tasks)")
        try:
            bar = float(raw)
        except ValueError:
            bar = math.nan
        if not math.isfinite(bar):
            raise UsageError(f"--fail-under {text!r}: {raw!r} is not a finite number", hint="e.g. f1=0.5, loss=2.0")
        gates[metric] = bar
    return gates


def check_gates(result: dict, gates: dict[str, float] | None, recipe) -> dict | None:
    """The gates' outcome, for the result document: {"passed", "checks": [{metric, value, bar, direction, passed}],
    "source"}; None when there are no gates (gates default to the recipe's eval.fail_under).

    direction "min": the value must reach the bar (generation metrics); "max": it must not exceed it (loss,
    perplexity); a benchmark metric's as lm-evaluation-harness reports it. UsageError for a gate on a metric this eval
    did not measure; a recipe gate on a part of eval this call did not run (its held-out data, a task) is skipped."""
    from ftcli.inference.metrics import passes

    gates, source = _gates_and_source(gates, recipe)
    if not gates:
        return None
    metrics = result.get("metrics", {})
    checks, skipped = [], []
    for metric, bar in gates.items():
        value = metrics.get(metric)
        if value is None and source != "--fail-under" and not _part_ran(metric, result):
            skipped.append(metric)
            continue
        if value is None:
            raise _unmeasured(metric, result)
        higher = _higher_is_better(metric, result)
        checks.append({"metric": metric, "value": value, "bar": bar, "direction": "min" if higher else "max",
                       "passed": passes(metric, value, bar, higher)})
    return {"passed": all(c["passed"] for c in checks), "checks": checks, "source": source,
            **({"skipped": skipped} if skipped else {})}


def _higher_is_better(metric: str, result: dict) -> bool:
    """The direction of a metric: a benchmark's as lm-evaluation-harness reported it, else ftcli's own."""
    directions = (result.get("benchmarks") or {}).get("higher_is_better", {})
    return directions.get(metric, HIGHER_IS_BETTER.get(metric, True))


def _part_ran(metric: str, result: dict) -> bool:
    """Whether the part of eval that measures `metric` ran: its benchmark task, or the held-out data."""
    if is_benchmark_metric(metric):
        return any(name.partition("/")[0] == metric.partition("/")[0] for name in result.get("metrics", {}))
    return result.get("data") is not None


def gate_failure(result: dict, run) -> QualityGateError | None:
    """The QualityGateError (exit 6) naming each metric worse than its bar in result["gates"], or None."""
    failures = []
    for check in (result.get("gates") or {}).get("checks", []):
        if not check["passed"]:
            higher = check["direction"] == "min"
            failures.append(f"{check['metric']} {check['value']:.4g} {'<' if higher else '>'} {check['bar']:g} "
                            f"({'higher' if higher else 'lower'} is better)")
    if not failures:
        return None
    return QualityGateError(f"run {run.name!r} failed its quality gates: " + "; ".join(failures),
                            hint=f"results in {result.get('path', run.eval_dir)}")


def _gates_and_source(gates: dict[str, float] | None, recipe) -> tuple[dict[str, float], str]:
    if gates is None:
        return dict(recipe.eval.fail_under), "recipe eval.fail_under"
    return gates, "--fail-under"


def _unmeasured(metric: str, result: dict | None = None) -> UsageError:
    if is_benchmark_metric(metric):
        task = metric.partition("/")[0]
        measured = [name for name in (result or {}).get("metrics", {}) if name.partition("/")[0] == task]
        return UsageError(f"quality gate on {metric}, which this eval did not measure",
                          hint=f"{task} measured: {', '.join(measured)}" if measured else
                          f"name the task {task} with --tasks (or eval.tasks)")
    return UsageError(f"quality gate on {metric}, which this eval did not measure",
                      hint="generation metrics need chat, instruction or prompt_completion data "
                           "and eval.generation: true")


# ---------------------------------------------------------------------------------------------- eval


def run_eval(run, *, data=None, max_samples=None, max_new_tokens=None, batch_size=None,
             compare_base=False, gates=None, console=None, benchmark=None, merged=False) -> dict:
    """Evaluate the run (base + adapter from the run dir alone); write eval/<timestamp>.json and eval/latest.json.

    `gates` ({metric: bar}, None for the recipe's eval.fail_under) are checked into result["gates"]; raising
    for a failed gate is the caller's (gate_failure), after it has shown the result.
    `benchmark` (BenchmarkOptions): lm-evaluation-harness tasks (--tasks, else the recipe's eval.tasks) scored as
    TASK/METRIC metrics beside the held-out ones; --tasks skips the held-out data unless `data` names some.
    `merged`: evaluate the run's merged/ model instead of base + adapter."""
    from ftcli.inference.metrics import GENERATION_METRICS
    from ftcli.models.run_model import load_run_model

    run.require_adapter("evaluate")
    recipe = run.load_recipe()
    if not _generates(recipe):  # a gate on a metric that can't be measured fails before any model loads
        for metric in _gates_and_source(gates, recipe)[0]:
            if metric in GENERATION_METRICS:
                raise _unmeasured(metric)
    settings = {
        "max_new_tokens": max_new_tokens or recipe.eval.max_new_tokens,
        "batch_size": batch_size or recipe.eval.batch_size,
        "max_samples": max_samples or recipe.eval.max_samples,
        "decoding": "greedy",
        "merged": merged,
    }
    if merged and compare_base:
        raise UsageError("--compare-base measures the base through base + adapter, which --merged replaces",
                         hint="drop --merged: merge checked that both compute the same")
    benchmarks = prepare_benchmarks(recipe, benchmark, gates, settings["batch_size"], console)  # tasks load first
    held_out = data is not None or benchmarks is None or (   # held-out data: unless --tasks alone asks otherwise
        (benchmark is None or benchmark.tasks is None)
        and (recipe.data.eval is not None or recipe.data.val_split is not None))
    for metric in (gates or {}) if not held_out else ():
        if not is_benchmark_metric(metric):
            raise UsageError(f"--fail-under {metric}: a held-out data metric, but --tasks alone scores benchmarks only",
                             hint="add --data FILE to score held-out data too, or gate TASK/METRIC")
    conversations, source = (_eval_conversations(run, recipe, data, settings["max_samples"], console) if held_out
                             else ([], None))
    if held_out:
        note(console, f"evaluating run {run.name} on {len(conversations)} examples from {source}")
    loaded = load_run_model(run, action="evaluate", merged=merged)
    # Preference pairs are scored as the conversations that end with their chosen answers, and ranked.
    pairs = conversations if conversations and conversations[0].answers else None   # preference data
    scored = as_chosen_conversations(pairs) if pairs else conversations
    tokenized = _tokenize(scored, loaded, console) if held_out else None
    prompts, references = _generation_pairs(scored, loaded)
    # A continued run is measured against the run it started from (its reference in preference and RL tuning)
    parent = _parent_adapter(run, required=bool(pairs))

    note(console, f"measuring the run ({'merged' if merged else 'base + adapter'})")
    metrics, predictions = _measure(loaded, tokenized, prompts, references, settings, console, "run")
    if benchmarks:
        metrics.update(benchmarks.measure(loaded, "run"))
    ranking = _Ranking(loaded, pairs, recipe, settings["batch_size"], console) if pairs else None
    if ranking:
        metrics.update(ranking.scores(ranking.policy(), ranking.reference(parent)))
    base_metrics = base_predictions = None
    if compare_base:
        compared = f"the run it started from ({parent})" if parent else "the base model (adapter disabled)"
        note(console, f"measuring {compared}")
        with reference_model(loaded, parent) if parent else loaded.base_only():
            base_metrics, base_predictions = _measure(loaded, tokenized, prompts, references, settings, console,
                                                      "parent" if parent else "base")
            if benchmarks:
                base_metrics.update(benchmarks.measure(loaded, "base"))
        if ranking and parent:   # the parent ranked against its own reference, the base
            base_metrics.update(ranking.scores(ranking.reference(parent), ranking.reference(None)))

    result = {
        "run": run.name,
        "evaluated_at": now_iso(),
        "method": recipe.method.kind,
        "base_model": {k: loaded.base_model.get(k) for k in ("reference", "fingerprint")},
        "data": {"source": source, "examples": len(conversations), "scored_tokens": tokenized["tokens"],
                 "generation_examples": len(prompts)} if held_out else None,   # None: benchmarks only
        "settings": settings,
        "metrics": metrics,
        "base_metrics": base_metrics,
        # what base_metrics measured: the base, or for a continued run on preference pairs the run it started from
        "compared_with": None if base_metrics is None else ("parent" if parent else "base"),
        "delta": _delta(metrics, base_metrics) if base_metrics else None,
        "samples": _samples(prompts, references, predictions, base_predictions),
        "benchmarks": benchmarks.document() if benchmarks else None,
    }
    result["gates"] = check_gates(result, gates, recipe)
    _save(run, result)
    return result


def _eval_conversations(run, recipe, data: Path | None, max_samples: int | None, console=None):
    """The conversations to score and a description of where they came from (fails before any model loads)."""
    from ftcli.data.pipeline import load_conversations, with_eval_source

    data_config = recipe.data
    if data is not None:
        source = str(data)
        if is_local_path(source):   # else a hub dataset id, read as the data module reads data.eval
            path = Path(data).expanduser().resolve()
            if not path.exists():
                raise NotAvailableError(f"--data {data}: no such file or folder")
            source = str(path)
        data_config = with_eval_source(recipe.data, source)
    elif recipe.data.eval is not None:
        source = f"data.eval ({recipe.data.eval})"
    elif recipe.data.val_split is not None:
        source = f"data.val_split {recipe.data.val_split} of data.train (seed {recipe.training.seed})"
    else:
        raise UsageError(f"run {run.name!r} has no eval data: its recipe has neither data.eval nor data.val_split",
                         hint=f"pass the data to evaluate on: ftcli eval {run.name} --data FILE "
                              f"(format {recipe.data.format}, as in training)")
    conversations = load_conversations(data_config, "eval", seed=recipe.training.seed, console=console)
    return conversations[:max_samples] if max_samples else conversations, source


def _parent_adapter(run, *, required: bool) -> Path | None:
    """The adapter a continued run started from (its reference model), None for a run that started fresh, or whose
    parent is gone when not `required` (then --compare-base measures the base)."""
    parent = run.read().get("parent") or {}
    if not parent.get("path"):
        return None
    path = Path(parent["path"])
    if not path.is_dir() and not required:
        return None
    if not path.is_dir():
        raise NotAvailableError(f"run {run.name!r} started from {parent.get('adapter')}, whose adapter ({path}) is "
                                "gone: it is this run's reference model",
                                hint="restore it to score preference pairs, or evaluate on other data with --data")
    return path


class _Ranking:
    """Log-probabilities of each example's answers, under the run and under a reference, cached per reference."""

    def __init__(self, loaded, pairs, recipe, batch_size: int, console=None):
        from ftcli.data.tokenize import tokenize_preference_chunk

        self.loaded, self.batch_size, self.console = loaded, batch_size, console
        self.beta = getattr(recipe.objective, "beta", 0.1)
        self.examples, _ = tokenize_preference_chunk(pairs, recipe.data, loaded.tokenizer, loaded.chat_template)
        self.desirable = [None if len(p.answers) == 2 else p.chosen is not None for p in pairs]
        self._references: dict = {}

    def policy(self):
        return answer_log_probs(self.loaded, self.examples, self.batch_size, self.console, "run")

    def reference(self, parent):
        if parent not in self._references:
            with reference_model(self.loaded, parent):
                self._references[parent] = answer_log_probs(self.loaded, self.examples, self.batch_size, self.console,
                                                            "parent" if parent else "base")
        return self._references[parent]

    def scores(self, policy, reference) -> dict[str, float]:
        return preference_scores(policy, reference, self.desirable, self.beta)


def _tokenize(conversations, loaded, console=None) -> dict[str, Any]:
    """Eval examples with the training masks (labels -100 outside the completions), unpacked."""
    from ftcli.data.pipeline import tokenize_conversations

    dataset, report = tokenize_conversations(conversations, loaded.recipe, loaded.tokenizer, loaded.chat_template,
                                             packing=False, split="eval", console=console)
    return {"features": [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in dataset],
            "tokens": report.trained_tokens}


def _generation_pairs(conversations, loaded) -> tuple[list[str], list[str]]:
    """(prompts rendered up to the last assistant turn, reference answers); none for format text."""
    from ftcli.data.pipeline import split_for_generation

    if not _generates(loaded.recipe):
        return [], []
    pairs = [split_for_generation(c, loaded.tokenizer, loaded.chat_template) for c in conversations]
    return [p for p, _ in pairs], [r for _, r in pairs]


def _generates(recipe) -> bool:
    """Whether eval generates answers, and so measures the generation metrics (format text has no answers)."""
    return recipe.eval.generation and recipe.data.format != "text"


def _measure(loaded, tokenized, prompts, references, settings, console=None, label: str = "run"
             ) -> tuple[dict[str, float], list[str]]:
    from ftcli.inference.metrics import generation_scores, perplexity

    if tokenized is None:    # no held-out data: benchmarks only
        return {}, []
    loss = completion_loss(loaded, tokenized["features"], settings["batch_size"], console, label)
    metrics = {"loss": loss, "perplexity": perplexity(loss)}
    predictions = _generate(loaded, prompts, settings, console, label) if prompts else []
    metrics.update(generation_scores(predictions, references))
    return metrics, predictions


def _generate(loaded, prompts: list[str], settings, console, label: str) -> list[str]:
    """Greedy answers to the prompts, a batch at a time as generate_texts batches them, showing the progress."""
    from ftcli.inference.decoding import DecodingSettings, generate_texts
    from ftcli.progress import progress

    decoding, size = DecodingSettings(max_new_tokens=settings["max_new_tokens"]), settings["batch_size"]
    predictions: list[str] = []
    with progress(console, f"generating answers ({label})", total=len(prompts), unit="examples") as bar:
        for start in range(0, len(prompts), size):
            predictions += generate_texts(loaded, prompts[start:start + size], decoding, batch_size=size)
            bar.update(completed=len(predictions))
    return predictions


def completion_loss(loaded, features: list[dict], batch_size: int, console=None, label: str = "run") -> float:
    """Mean negative log-likelihood per scored token (labels != -100), over all examples: token-weighted. Scored as
    training scores its loss, by TRL's fused LM head over the labelled positions only (ftcli/models/fused_head.py)."""
    import torch

    from ftcli.data.pipeline import IGNORE_INDEX, make_collator
    from ftcli.models.fused_head import with_fused_head
    from ftcli.progress import progress

    model = with_fused_head(loaded.model)
    collate = make_collator(loaded.recipe.model_copy(update={"data": loaded.recipe.data.model_copy(
        update={"packing": False})}), loaded.tokenizer)
    total, count = 0.0, 0
    with torch.inference_mode(), progress(console, f"scoring the loss ({label})", total=len(features),
                                          unit="examples") as bar:
        for start in range(0, len(features), batch_size):
            batch = collate(features[start:start + batch_size])
            labels = batch["labels"].to(loaded.device)
            # Prompt tuning prepends never-labelled virtual tokens: the log-probabilities cover them with zeros.
            scored = model(input_ids=batch["input_ids"].to(loaded.device), labels=labels,
                           attention_mask=batch["attention_mask"].to(loaded.device), fused_lm_head=True)
            total -= float(scored.log_probs.double().sum())
            count += int((labels[:, 1:] != IGNORE_INDEX).sum())
            bar.advance(len(batch["input_ids"]))
    return total / count if count else math.nan


def _delta(metrics: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    return {name: metrics[name] - base[name] for name in metrics if name in base}


def _samples(prompts, references, predictions, base_predictions) -> list[dict[str, str]]:
    samples = []
    for i, (prompt, reference, prediction) in enumerate(zip(prompts, references, predictions)):
        if i >= SAMPLES_KEPT:
            break
        sample = {"prompt": prompt, "reference": reference, "prediction": prediction}
        if base_predictions is not None:
            sample["base_prediction"] = base_predictions[i]
        samples.append(sample)
    return samples


def _save(run, result: dict) -> None:
    """eval/<timestamp>.json and eval/latest.json (both atomic), and the metrics in run.json."""
    from ftcli.atomic import atomic_write_json

    path = run.eval_result_path(now_stamp())
    result["path"] = str(path)
    atomic_write_json(path, result)
    atomic_write_json(run.eval_latest_path, result)
    run.update(eval={"evaluated_at": result["evaluated_at"], "path": str(path),
                     "data": (result["data"] or {}).get("source"),
                     "tasks": (result.get("benchmarks") or {}).get("tasks"),
                     "metrics": result["metrics"], "base_metrics": result["base_metrics"]})


# ---------------------------------------------------------------------------------------------- rendering


def render_eval(result: dict, console) -> None:
    from rich.table import Table

    base = result.get("base_metrics")
    benchmarks = result.get("benchmarks") or {}
    parts = [f"{result['data']['examples']} examples ({result['data']['source']})"] if result.get("data") else []
    parts += [f"benchmarks {', '.join(benchmarks['tasks'])}"] if benchmarks else []
    table = Table(title=f"eval of run {result['run']} on {' and '.join(parts)}")
    table.add_column("metric")
    table.add_column("run", justify="right")
    if base:
        compared = result.get("compared_with") or "base"
        table.add_column(compared, justify="right")
        table.add_column(f"Δ (run - {compared})", justify="right")
    for name, value in result["metrics"].items():
        higher = _higher_is_better(name, result)
        errors = [benchmarks.get(model, {}).get("stderr", {}).get(name) for model in ("run", "base")]  # ± shown
        row = [f"{name} {'↑' if higher else '↓'}", _fmt(value, stderr=errors[0])]
        if base:
            row += [_fmt(base.get(name), stderr=errors[1]), _fmt(result["delta"].get(name), signed=True)]
        table.add_row(*row)
    console.print(table)
    samples = result.get("samples") or []
    if samples:
        shown = Table(title=f"first {min(len(samples), SAMPLES_SHOWN)} predictions", show_lines=True)
        for column in ("reference", "prediction", *(("base",) if base else ())):
            shown.add_column(column, overflow="fold")
        for sample in samples[:SAMPLES_SHOWN]:
            shown.add_row(*[_clip(sample.get(key, "")) for key in
                            ("reference", "prediction", *(("base_prediction",) if base else ()))])
        console.print(shown)
    note(console, f"saved: {result.get('path')}")


def _fmt(value: float | None, *, signed: bool = False, stderr: float | None = None) -> str:
    if value is None:
        return "-"
    return (f"{value:+.4f}" if signed else f"{value:.4f}") + (f" ± {stderr:.4f}" if stderr is not None else "")


def _clip(text: str, limit: int = 200) -> str:
    from rich.markup import escape

    return escape(text if len(text) <= limit else text[:limit] + "…")
