"""Benchmark scores of a run through EleutherAI's lm-evaluation-harness (`ftcli eval --tasks`), on its registry tasks
or on local task YAMLs, flattened into eval metrics named TASK/METRIC."""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ftcli.console import note
from ftcli.errors import UsageError
from ftcli.inference.benchmark_tasks import import_lm_eval, is_task_file, load_task, task_manager, top_level

# Standard errors: lm_eval's closed form for mean metrics (acc, exact_match ...), whatever this is; a bootstrap of
# this many resamples, in this process, for the others (bleu, f1 ...), where lm_eval's own default (100,000 spread
# over a process per core) would cost minutes. The scores themselves do not depend on it.
BOOTSTRAP_ITERS = 100
SAMPLES_KEPT = 20          # generated answers kept per generation task in the result file
# Methods whose adapter lives in the attention cache or the inputs (virtual tokens): transformers' generate() and
# lm_eval's plain forward calls would drop it.
PROMPT_LEARNING_METHODS = ("prefix", "prompt")


@dataclass(frozen=True)
class BenchmarkOptions:
    """What `ftcli eval` was asked to score with lm-evaluation-harness."""

    tasks: tuple[str, ...] | None = None   # --tasks; None: the recipe's eval.tasks
    limit: int | None = None               # documents per task
    num_fewshot: int | None = None         # None: each task's own setting (0 where it has none)
    chat_template: bool | None = None      # None: through the run's chat template when it has one
    allow_code: bool = False               # task files may load Python (lm_eval's !function)


def split_tasks(values: list[str] | None) -> tuple[str, ...] | None:
    """--tasks values ("a,b", repeatable) as one tuple of task names or files; None when none were given."""
    if not values:
        return None
    tasks = tuple(part.strip() for value in values for part in value.split(","))
    if not all(tasks):
        raise UsageError(f"--tasks {','.join(values)!r} names an empty task", hint="e.g. --tasks arc_easy,hellaswag")
    return tasks


def benchmark_metric(task: str, metric: str, filter_name: str) -> str:
    """The eval metric name of lm_eval's `metric,filter` result of `task`: TASK/METRIC, TASK/METRIC,FILTER when the
    task filters its answers (gsm8k/exact_match,strict-match)."""
    return f"{task}/{metric}" if filter_name == "none" else f"{task}/{metric},{filter_name}"


def is_benchmark_metric(name: str) -> bool:
    return "/" in name


def prepare_benchmarks(recipe, options: BenchmarkOptions | None, gates: dict[str, float] | None, batch_size: int,
                       console=None) -> Benchmarks | None:
    """The benchmarks `ftcli eval` scores (--tasks, else the recipe's eval.tasks), their tasks and datasets loaded,
    or None when there are none. Refuses, before any model loads: a --fail-under TASK/METRIC without its task, and
    runs whose adapter lm-evaluation-harness can't carry."""
    options = options or BenchmarkOptions()
    specs = options.tasks if options.tasks is not None else tuple(recipe.eval.tasks)
    task_gates = {gate: bar for gate, bar in (gates or {}).items() if is_benchmark_metric(gate)}
    if not specs:
        if task_gates:
            raise UsageError(f"--fail-under {next(iter(task_gates))}: a benchmark's metric, but no benchmark runs",
                             hint="name its task with --tasks (or in the recipe's eval.tasks)")
        return None
    if recipe.method.kind in PROMPT_LEARNING_METHODS:
        raise UsageError(f"benchmarks can't score a {recipe.method.kind} tuning run: lm-evaluation-harness calls the "
                         "model without the adapter's virtual tokens, so it would score the base model",
                         hint="evaluate it on held-out data (without --tasks), or train a LoRA run")
    note(console, f"loading benchmark tasks: {', '.join(specs)}")
    benchmarks = Benchmarks(specs, options, batch_size=batch_size, console=console)
    benchmarks.check_gates(task_gates)
    return benchmarks


class Benchmarks:
    """The tasks, loaded (datasets and all) before any model so that a missing task or dataset fails fast; then
    measure() scores a loaded run model on them, as often as asked (the run, then its base)."""

    def __init__(self, specs: tuple[str, ...], options: BenchmarkOptions, *, batch_size: int, console=None):
        self.specs, self.options, self.batch_size, self.console = specs, options, batch_size, console
        self.lm_eval = import_lm_eval()
        from ftcli.models.quiet import quiet_libraries

        quiet_libraries()   # datasets' progress bars while the tasks load their data
        with _stdout_to_stderr():
            self.manager = task_manager(registry=not all(is_task_file(s) for s in specs))
            self.loaded = [load_task(self.manager, spec, allow_code=options.allow_code) for spec in specs]
        self.names = sorted({name for item in self.loaded for name in (*item["tasks"], *item["groups"])})
        unsafe = sorted(name for item in self.loaded for name, task in item["tasks"].items()
                        if getattr(task, "UNSAFE_CODE", False))
        if unsafe:   # lm_eval would refuse them only after the model loaded
            raise UsageError(f"benchmark tasks {', '.join(unsafe)} run the code the model writes, which ftcli eval "
                             "does not do", hint="run them with lm_eval itself, in a sandbox")
        self.directions: dict[str, bool] = {}     # TASK/METRIC -> higher is better, as lm_eval says
        self.chat: bool | None = None              # whether prompts went through the run's chat template
        self.per_model: dict[str, dict] = {}       # "run" / "base" -> standard errors, counts, answers

    def check_gates(self, gates: dict[str, float]) -> None:
        """UsageError (exit 2, before any model loads) for a TASK/METRIC gate on a task these benchmarks don't run."""
        for gate in gates:
            task = gate.partition("/")[0]
            if is_benchmark_metric(gate) and task not in self.names:
                close = difflib.get_close_matches(task, self.names, n=1)
                raise UsageError(f"--fail-under {gate}: task {task!r} is not among the benchmarks "
                                 f"({', '.join(self.names)})" + (f"; did you mean {close[0]!r}?" if close else ""))

    def measure(self, loaded, label: str) -> dict[str, float]:
        """Score `loaded` (a RunModel, as its adapters are set now) on every task; {TASK/METRIC: value}. The details
        (standard errors, sample counts, task versions, generated answers) go to self.per_model[label]."""
        chat = self._chat_template(loaded)
        lm = self._wrap(loaded)
        through = " through the run's chat template" if chat else ""
        note(self.console, f"scoring benchmarks {', '.join(self.specs)} with lm-evaluation-harness{through}")
        items = [item for loaded_spec in self.loaded for item in top_level(loaded_spec)]   # tasks and groups
        with _stdout_to_stderr(), _sequential_bootstrap():
            results = self.lm_eval.simple_evaluate(
                model=lm, tasks=items, task_manager=self.manager, limit=self.options.limit,
                num_fewshot=self.options.num_fewshot, batch_size=self.batch_size, apply_chat_template=chat,
                fewshot_as_multiturn=chat, bootstrap_iters=BOOTSTRAP_ITERS, log_samples=True)
        metrics, stderr, directions = _flatten(results)
        self.directions.update(directions)
        self.per_model[label] = {
            "dtype": str(getattr(loaded.model, "dtype", "")).removeprefix("torch."), "device": str(loaded.device),
            "stderr": stderr,
            "samples_scored": {task: counts.get("effective") for task, counts in results.get("n-samples", {}).items()},
            "num_fewshot": dict(results.get("n-shot", {})),
            "task_versions": {task: str(v) for task, v in results.get("versions", {}).items()},
            "samples": _generated_samples(results),
        }
        return metrics

    def document(self) -> dict[str, Any]:
        """What result["benchmarks"] records: the tasks, settings, lm_eval's version and the per-model details."""
        from importlib import metadata

        return {"tasks": list(self.specs), "lm_eval": metadata.version("lm_eval"),
                "settings": {"limit": self.options.limit, "num_fewshot": self.options.num_fewshot,
                             "batch_size": self.batch_size, "chat_template": self.chat,
                             "bootstrap_iters": BOOTSTRAP_ITERS},
                "higher_is_better": self.directions, **self.per_model}

    def _chat_template(self, loaded) -> bool:
        wanted = self.options.chat_template
        if wanted and loaded.chat_template is None:
            raise UsageError("--chat-template: this run has no chat template (it trained on plain text)",
                             hint="drop --chat-template")
        self.chat = loaded.chat_template is not None if wanted is None else wanted
        return self.chat

    def _wrap(self, loaded):
        """lm_eval's HFLM over the run's own model and tokenizer (the run's chat template set on it)."""
        from lm_eval.models.huggingface import HFLM

        logger = logging.getLogger("lm_eval")
        level = logger.level
        logger.setLevel(logging.ERROR)   # its warnings that a loaded model ignores the loading options
        try:
            with _stdout_to_stderr():
                return HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=self.batch_size)
        finally:
            logger.setLevel(level)


# ---------------------------------------------------------------------------------------------- results


def _flatten(results: dict) -> tuple[dict[str, float], dict[str, float], dict[str, bool]]:
    """lm_eval's {task: {"metric,filter": value, "metric_stderr,filter": ...}} as {TASK/METRIC: value}, the standard
    errors under the same names, and which way each metric is better."""
    metrics: dict[str, float] = {}
    stderr: dict[str, float] = {}
    directions: dict[str, bool] = {}
    higher = results.get("higher_is_better", {})
    for task, values in results.get("results", {}).items():
        for key, value in values.items():
            metric, sep, filter_name = key.partition(",")
            number = _number(value)
            if not sep or number is None:
                continue
            if metric.endswith("_stderr"):
                stderr[benchmark_metric(task, metric.removesuffix("_stderr"), filter_name)] = number
                continue
            name = benchmark_metric(task, metric, filter_name)
            metrics[name] = number
            directions[name] = bool((higher.get(task) or {}).get(metric, True))
    return metrics, stderr, directions


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not hasattr(value, "__float__"):
        return None    # "N/A" (no standard error)
    return float(value)


def _generated_samples(results: dict) -> dict[str, list[dict]]:
    """The first answers each generation task produced (prompt, target, prediction, scores): what to read when a
    generation score looks wrong. Multiple-choice tasks keep none (their answers are log-likelihoods)."""
    kept: dict[str, list[dict]] = {}
    for task, samples in (results.get("samples") or {}).items():
        rows = []
        for sample in samples[:SAMPLES_KEPT]:
            arguments = sample.get("arguments") or []
            prediction = (sample.get("filtered_resps") or [None])[0]
            if not arguments or not isinstance(prediction, str):
                break      # not a generation task
            rows.append({"prompt": str(arguments[0][0]), "reference": str(sample.get("target")),
                         "prediction": prediction,
                         "scores": {m: _number(sample.get(m)) for m in sample.get("metrics", [])}})
        if rows:
            kept[task] = rows
    return kept


# ---------------------------------------------------------------------------------------------- process state


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """lm_eval prints (bootstrap notes, its tables) and logs: keep stdout for ftcli's own output, one document."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


@contextlib.contextmanager
def _sequential_bootstrap() -> Iterator[None]:
    """lm_eval bootstraps standard errors in a pool of a process per core unless DISABLE_MULTIPROC is set."""
    previous = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = previous
