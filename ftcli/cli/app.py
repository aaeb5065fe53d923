"""The ftcli command line: each command parses its options, calls one function and maps errors to exit codes."""

# No `from __future__ import annotations`: Typer would eval every command's string annotations at each start (~5 ms).

import functools
import gc
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ftcli.cli.output import print_json, report_failure, say
from ftcli.errors import UsageError

if TYPE_CHECKING:
    from rich.console import Console

app = typer.Typer(
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Declarative parameter-efficient fine-tuning: ftcli train RECIPE, then eval, merge and export the run.",
)
runs_app = typer.Typer(no_args_is_help=True, help="List, show and compare runs.")
recipe_app = typer.Typer(no_args_is_help=True, help="Inspect recipes.")
app.add_typer(runs_app, name="runs")
app.add_typer(recipe_app, name="recipe")


# The rich consoles are made on first use: importing rich costs ~13 ms that validate, schema and errors don't need.
@functools.cache
def out() -> "Console":
    """The console for results (stdout)."""
    from rich.console import Console

    return Console(soft_wrap=True)


@functools.cache
def err() -> "Console":
    """The console for progress and logs (stderr)."""
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)


RunsDirOpt = Annotated[
    Path | None, typer.Option("--runs-dir", help="Runs root (default: $FTCLI_RUNS_DIR, else ./runs).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout and nothing else there.")]
RunArg = Annotated[str, typer.Argument(help="Run name (a folder under the runs root).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override KEY=VALUE (YAML value); repeatable.")]


def open_run(run: str, runs_dir: Path | None):
    """The named run under --runs-dir / $FTCLI_RUNS_DIR / ./runs; RunStateError (exit 5) when it doesn't exist."""
    from ftcli.paths import runs_root
    from ftcli.runs.rundir import RunDir

    return RunDir.open(runs_root(runs_dir), run)


def handles_errors(func: Callable) -> Callable:
    """Map a failure to its documented exit code and message (ftcli.cli.output.report_failure)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except (Exception, KeyboardInterrupt) as exc:
            raise typer.Exit(report_failure(exc, json_output=bool(kwargs.get("json_output")))) from None

    return wrapper


# ---------------------------------------------------------------------------------------------- recipes


@app.command()
@handles_errors
def validate(
    recipes: Annotated[list[Path], typer.Argument(help="Recipe files to check.")],
    set_: SetOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Check recipes without loading any model; report every problem with its file, line and key."""
    # The plain form of this command never reaches Typer: ftcli.cli.entry runs it (ftcli.cli.validate).
    from ftcli.cli.validate import ValidateArgs, validate_recipes

    code = validate_recipes(ValidateArgs(recipes=list(recipes), overrides=list(set_ or []), json_output=json_output))
    if code:
        raise typer.Exit(code)


@app.command()
@handles_errors
def schema() -> None:
    """Print the recipe JSON Schema (for yaml-language-server and editors)."""
    from ftcli.recipe.schema import recipe_json_schema

    print_json(recipe_json_schema())


@recipe_app.command("show")
@handles_errors
def recipe_show(
    recipe: Annotated[Path, typer.Argument(help="Recipe file.")],
    set_: SetOpt = None,
    explain: Annotated[
        bool, typer.Option("--explain", help="Show which file, line or override set each value.")
    ] = False,
    json_output: JsonOpt = False,
) -> None:
    """Print the resolved recipe: extends merged, overrides applied, defaults filled in."""
    from ftcli.recipe.loader import load_recipe, recipe_to_yaml

    loaded = load_recipe(recipe, set_ or [])
    if json_output:
        document = loaded.recipe.model_dump(mode="json")
        if explain:
            document = {"recipe": document, "sources": {k: s for k, _, s in loaded.explain()}}
        print_json(document)
    elif explain:
        from rich.table import Table

        table = Table("key", "value", "set by")
        for column in table.columns:
            column.overflow = "fold"
        for key, value, source in loaded.explain():
            table.add_row(key, json.dumps(value), source)
        out().print(table)
    else:
        say(recipe_to_yaml(loaded.recipe), end="")


# ---------------------------------------------------------------------------------------------- train


@app.command(context_settings={"allow_extra_args": False})
@handles_errors
def train(
    recipe: Annotated[Path, typer.Argument(help="Recipe file.")],
    name: Annotated[str | None, typer.Option("--name", help="Run name (default: the recipe's name).")] = None,
    runs_dir: RunsDirOpt = None,
    set_: SetOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run from its newest complete checkpoint.")
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run of the same name.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Preflight: check data and model, train nothing.")] = False,
    json_output: JsonOpt = False,
    trust_remote_code: Annotated[
        bool, typer.Option("--trust-remote-code", help="Allow model code from the hub.")
    ] = False,
    allow_code: Annotated[
        bool, typer.Option("--allow-code", help="Allow the recipe's Python rewards (objective.rewards kind python).")
    ] = False,
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="Processes (GPUs) on this machine.")] = 1,
    nnodes: Annotated[int, typer.Option("--nnodes", min=1, help="Machines in a multi-node run.")] = 1,
    node_rank: Annotated[int, typer.Option("--node-rank", min=0, help="This machine's rank.")] = 0,
    master_addr: Annotated[str, typer.Option("--master-addr", help="Address of rank 0.")] = "127.0.0.1",
    master_port: Annotated[int, typer.Option("--master-port", help="Port of rank 0.")] = 29500,
) -> None:
    """Fine-tune the recipe's model into a named run directory."""
    from ftcli.recipe.loader import load_recipe

    loaded = load_recipe(recipe, set_ or [], name=name)
    if loaded.recipe.model.trust_remote_code and not trust_remote_code:
        raise UsageError(
            f"{recipe}: model.trust_remote_code is true, but remote code runs only with --trust-remote-code",
            hint="read the model's code, then pass --trust-remote-code",
        )
    if not allow_code:
        refuse_python_rewards(loaded)
    if dry_run:
        from ftcli.training.preflight import render_preflight, run_preflight

        report = run_preflight(loaded.recipe, trust_remote_code=trust_remote_code, console=err())
        print_json(report) if json_output else render_preflight(report, out())
        return
    if nproc > 1 or nnodes > 1:
        from ftcli.paths import runs_root
        from ftcli.runs.rundir import RunDir
        from ftcli.training.launch import launch_distributed

        # Refuse an existing or missing run once, here, rather than in every worker. Only node 0 does: the run
        # belongs to global rank 0, and on a shared filesystem node 0 may already have created it.
        if node_rank == 0:
            RunDir.prepare(runs_root(runs_dir), loaded.recipe.name, resume=resume, overwrite=overwrite)
        raise typer.Exit(launch_distributed(sys.argv, nproc=nproc, nnodes=nnodes, node_rank=node_rank,
                                            master_addr=master_addr, master_port=master_port))
    from ftcli.training.distributed import is_main_process
    from ftcli.training.session import start_training

    summary = start_training(loaded, runs_dir, resume=resume, overwrite=overwrite,
                             trust_remote_code=trust_remote_code, allow_code=allow_code, console=err())
    if not is_main_process():
        return  # only the main process reports
    if json_output:
        print_json(summary)
    else:
        say(f"run {summary['name']} {summary['status']}: {summary['path']}")


def refuse_python_rewards(loaded) -> None:
    """Exit 2, naming the recipe line, when the recipe declares a reward written in Python (it runs only with
    --allow-code: a shared recipe must not run code silently)."""
    for index, reward in enumerate(getattr(loaded.recipe.objective, "rewards", [])):
        if reward.kind == "python":
            where = loaded.locations.get(("objective", "rewards", index, "function")) or loaded.source
            raise UsageError(f"{where}: objective.rewards[{index}] runs Python code ({reward.function}), which "
                             "runs only with --allow-code",
                             hint="read the function, then pass --allow-code to ftcli train")


# ---------------------------------------------------------------------------------------------- eval, generate


@app.command("eval")
@handles_errors
def eval_(
    run: RunArg,
    runs_dir: RunsDirOpt = None,
    data: Annotated[
        Path | None, typer.Option("--data", help="Evaluate on this file instead of the run's eval data.")
    ] = None,
    max_samples: Annotated[
        int | None, typer.Option("--max-samples", min=1, help="Evaluate at most N examples.")
    ] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option("--max-new-tokens", min=1, help="Tokens generated per prompt.")
    ] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Examples per batch.")] = None,
    compare_base: Annotated[
        bool, typer.Option("--compare-base", help="Also evaluate the model the run started from (the base, or the "
                                                  "run a continued run started from), side by side.")
    ] = False,
    fail_under: Annotated[
        list[str] | None,
        typer.Option(
            "--fail-under",
            help="METRIC=VALUE, repeatable: exit 6 when the metric is worse than VALUE (exact_match, exact_match_norm, "
            "contains, f1: fractions 0-1, fail below; loss, perplexity: fail above; TASK/METRIC: a benchmark's, "
            "in lm-evaluation-harness's direction).",
        ),
    ] = None,
    tasks: Annotated[
        list[str] | None,
        typer.Option("--tasks", help="NAME[,NAME...], repeatable: score lm-evaluation-harness tasks (registry names "
                                     "or task YAML files) instead of the held-out data (add --data for both); "
                                     "default: the recipe's eval.tasks, beside the held-out data."),
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Benchmarks: at most N documents per task.")
    ] = None,
    num_fewshot: Annotated[
        int | None, typer.Option("--num-fewshot", min=0, help="Benchmarks: K examples in each prompt.")
    ] = None,
    chat_template: Annotated[
        bool | None,
        typer.Option("--chat-template/--no-chat-template",
                     help="Benchmarks: prompt through the run's chat template (default: when the run has one)."),
    ] = None,
    merged: Annotated[
        bool, typer.Option("--merged", help="Evaluate the run's merged model instead of base + adapter.")
    ] = False,
    allow_code: Annotated[
        bool, typer.Option("--allow-code", help="Benchmarks: allow task files that load Python (!function).")
    ] = False,
    json_output: JsonOpt = False,
) -> None:
    """Measure a run: loss, perplexity, generation metrics and benchmarks (--tasks); gate CI with --fail-under."""
    from ftcli.inference.benchmarks import BenchmarkOptions, split_tasks
    from ftcli.inference.evaluate import gate_failure, parse_gates, render_eval, run_eval

    gates = parse_gates(fail_under or [])
    benchmark = BenchmarkOptions(tasks=split_tasks(tasks), limit=limit, num_fewshot=num_fewshot,
                                 chat_template=chat_template, allow_code=allow_code)
    run_dir = open_run(run, runs_dir)
    result = run_eval(run_dir, data=data, max_samples=max_samples, max_new_tokens=max_new_tokens,
                      batch_size=batch_size, compare_base=compare_base, gates=gates or None, console=err(),
                      benchmark=benchmark, merged=merged)
    print_json(result) if json_output else render_eval(result, out())
    failure = gate_failure(result, run_dir)
    if failure:  # the document just printed carries the gates: report on stderr only, so stdout stays one document
        raise typer.Exit(report_failure(failure, json_output=False))


@app.command()
@handles_errors
def generate(
    run: RunArg,
    prompt: Annotated[list[str] | None, typer.Option("--prompt", help="Prompt text; repeatable.")] = None,
    file: Annotated[Path | None, typer.Option("--file", help="A file with one prompt per line.")] = None,
    runs_dir: RunsDirOpt = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 128,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)] = 1.0,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    merged: Annotated[
        bool, typer.Option("--merged", help="Use the run's merged model instead of base + adapter.")
    ] = False,
    json_output: JsonOpt = False,
) -> None:
    """Generate from a run through its saved chat template (greedy by default)."""
    from ftcli.inference.generate import run_generate

    prompts = list(prompt or [])
    if file is not None:
        try:
            prompts += [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except OSError as exc:
            from ftcli.errors import NotAvailableError

            raise NotAvailableError(f"can't read prompts from {file}: {exc.strerror}") from None
    if not prompts:
        raise UsageError("give --prompt TEXT or --file FILE")
    run_dir = open_run(run, runs_dir)
    results = run_generate(run_dir, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_p=top_p, seed=seed, merged=merged, stream=None if json_output else out())
    if json_output:
        print_json({"run": run, "outputs": results})


@app.command()
@handles_errors
def chat(
    run: RunArg,
    runs_dir: RunsDirOpt = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 256,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0)] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)] = 1.0,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    merged: Annotated[bool, typer.Option("--merged", help="Use the run's merged model.")] = False,
) -> None:
    """Chat with a run on the terminal (multi-turn; /reset clears, /exit or Ctrl-D quits)."""
    from ftcli.inference.generate import run_chat

    run_chat(open_run(run, runs_dir), max_new_tokens=max_new_tokens, temperature=temperature,
             top_p=top_p, seed=seed, merged=merged, console=out())


# ---------------------------------------------------------------------------------------------- merge, export


@app.command()
@handles_errors
def merge(
    run: RunArg,
    runs_dir: RunsDirOpt = None,
    dtype: Annotated[
        str | None,
        typer.Option("--dtype", help="float32 | float16 | bfloat16 (default: the recipe's export.merge_dtype)."),
    ] = None,
    qlora_base: Annotated[
        str | None, typer.Option("--qlora-base", help="QLoRA: dequantized (default) | original.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Merge again even when merged/ is up to date.")] = False,
    json_output: JsonOpt = False,
) -> None:
    """Merge the adapter into the full-precision base, write merged/ and check parity."""
    from ftcli.export.merge import merge_run

    result = merge_run(open_run(run, runs_dir), dtype=dtype, qlora_base=qlora_base,
                       force=force, console=err())
    print_json(result) if json_output else say(f"merged: {result['path']}")


@app.command()
@handles_errors
def export(
    run: RunArg,
    format: Annotated[str, typer.Option("--format", help="adapter | merged | gguf | gguf-lora | ollama")],
    runs_dir: RunsDirOpt = None,
    quant: Annotated[str | None, typer.Option("--quant", help="GGUF tensor type: f32 | f16 | bf16 | q8_0.")] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Write here instead of export/FORMAT in the run.")
    ] = None,
    json_output: JsonOpt = False,
) -> None:
    """Export a run as a PEFT adapter, merged model, GGUF, GGUF LoRA or Ollama model; each checked after writing."""
    from ftcli.export.exporters import export_run

    result = export_run(open_run(run, runs_dir), format, quant=quant, out=out_dir, console=err())
    print_json(result) if json_output else say(f"exported {format}: {result['path']}")


# ---------------------------------------------------------------------------------------------- runs


@runs_app.command("list")
@handles_errors
def runs_list(runs_dir: RunsDirOpt = None, json_output: JsonOpt = False) -> None:
    """List the runs under the runs root."""
    from ftcli.paths import runs_root
    from ftcli.runs.report import render_runs_list, runs_summary

    rows = runs_summary(runs_root(runs_dir))
    print_json({"runs": rows}) if json_output else render_runs_list(rows, out())


@runs_app.command("show")
@handles_errors
def runs_show(run: RunArg, runs_dir: RunsDirOpt = None, json_output: JsonOpt = False) -> None:
    """Show one run: status, recipe, metrics and artifacts."""
    from ftcli.runs.report import render_run, run_details

    details = run_details(open_run(run, runs_dir))
    print_json(details) if json_output else render_run(details, out())


@runs_app.command("compare")
@handles_errors
def runs_compare(
    runs: Annotated[list[str], typer.Argument(help="Two or more run names.")],
    runs_dir: RunsDirOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Show how runs' recipes differ and their final metrics side by side."""
    from ftcli.runs.report import compare_runs, render_comparison

    if len(runs) < 2:
        raise UsageError("give at least two runs to compare")
    comparison = compare_runs([open_run(name, runs_dir) for name in runs])
    print_json(comparison) if json_output else render_comparison(comparison, out())


def main() -> None:
    try:
        app()
    finally:
        # A light command (validate, schema, --help) is ending: spare the collector's final passes over every
        # object (~20 ms). Commands that loaded torch keep the normal shutdown, finalizers and all.
        if "torch" not in sys.modules:
            gc.freeze()


if __name__ == "__main__":
    main()
