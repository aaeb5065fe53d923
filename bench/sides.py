"""The measured sides of every comparison: `ftcli train` and the hand-written TRL script, run as child processes
(peak RSS, CPU noise), their step logs turned into tokens/s, interleaved repeats and per-arm medians."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from bench.measure import (
    MATCHED_MALLOC_ENV,
    cpu_seconds_between,
    interleaved,
    median,
    ratio,
    read_jsonl,
    run_child,
    steady_throughput,
    step_times,
    train_records,
)

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RECIPES = {"lora": REPO / "recipes" / "quickstart.yaml", "qlora": REPO / "recipes" / "qlora.yaml",
           "dpo": REPO / "recipes" / "dpo.yaml", "grpo": REPO / "recipes" / "grpo.yaml"}
# Every side of the DPO and GRPO comparisons trains a fresh adapter (the recipes continue the quickstart run's).
RECIPE_OVERRIDES = {"dpo": ("model.adapter=null", "data.eval=null"),
                    "grpo": ("model.adapter=null", "data.eval=null")}
NO_CHECKPOINTS = "training.save_steps=1000000"  # a checkpoint inside the timed steps would time the disk
# What the CPU computes in bf16 natively and what FTCLI_CPU_BF16 makes of it, asked of ftcli in a child process (so
# this one stays small: a child's peak RSS counts the parent's memory at exec time).
CPU_FACTS = (
    "import json, os\n"
    "from ftcli.models.load import CPU_BF16_ENV, cpu_has_native_bf16, detected_cpu_bf16, resolve_precision\n"
    "print(json.dumps({'detected': detected_cpu_bf16(), 'FTCLI_CPU_BF16': os.environ.get(CPU_BF16_ENV),\n"
    "                  'effective': cpu_has_native_bf16(), 'auto_precision': resolve_precision('auto', 'cpu')}))\n"
)
# Other processes took more than this share of the CPU during a run: its speed is set aside. Small, because the two
# OpenMP threads of a training wait for each other, so a core busy elsewhere now and then costs more than its share.
NOISE_LIMIT = 0.03


def ftcli_command() -> list[str]:
    script = Path(sys.executable).parent / "ftcli"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "ftcli"]


class Session:
    """A work folder for runs and logs, the results document and its goals, and the two sides to run."""

    def __init__(self, plan, work: Path):
        self.plan = plan
        self.work = work
        self.runs_root = work / "runs"
        self.started = time.perf_counter()
        self.results: dict = {"sections": {}, "goals": [], "noise": {"runs": {}}}
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        self._children = 0
        self._recipes: dict = {}
        self._cpu_bf16: dict | None = None

    # ------------------------------------------------------------------------------------------ plumbing

    def log(self, text: str) -> None:
        sys.stderr.write(f"[{time.perf_counter() - self.started:7.1f}s] {text}\n")
        sys.stderr.flush()

    def child(self, label: str, command: list[str], *, env: dict | None = None, timed: bool = True,
              timeout_s: float | None = None):
        """Run one command (killed after timeout_s, by default the plan's); `timed` ones (whose speed is reported) of
        2 s or more count towards the noise warning (shorter ones are a few /proc/stat ticks: their share is mostly
        rounding)."""
        self._children += 1
        result = run_child(command, env=env or self.env, cwd=REPO, timeout_s=timeout_s or self.plan.timeout_s,
                           log_dir=self.work / "logs" / f"{self._children:03d}-{label}")
        if not result.ok:
            self.log(f"  {label} FAILED (exit {result.returncode}):\n{result.stderr_tail[-1500:]}")
        if timed and result.others_cpu_share is not None and result.wall_s >= 2:
            self.results["noise"]["runs"][label] = result.others_cpu_share
        return result

    def add_goal(self, key: str, what: str, value, target: str, met: bool | None) -> None:
        self.results["goals"].append({"id": key, "what": what, "value": value, "target": target, "met": met})

    def recipe(self, method: str):
        if method not in self._recipes:
            from ftcli.recipe.loader import load_recipe

            overrides = [*RECIPE_OVERRIDES.get(method, ()), *self.overrides_for(method)]
            self._recipes[method] = load_recipe(RECIPES[method], overrides).recipe
        return self._recipes[method]

    @property
    def overrides(self) -> tuple[str, ...]:
        """The plan's recipe overrides, applied to both sides alike (the script's settings come from the recipe)."""
        return tuple(getattr(self.plan, "overrides", ()))

    def overrides_for(self, key: str) -> tuple[str, ...]:
        """The plan's overrides for the SFT recipes; the DPO and GRPO recipes keep their own batches (a GRPO batch
        must hold whole groups of answers), which the quick plan's 4 steps keep short."""
        return self.overrides if key in ("lora", "qlora") else ()

    def cpu_bf16(self) -> dict:
        """Whether this CPU has native bf16 as torch detects it (`detected`), FTCLI_CPU_BF16 as set, what ftcli takes
        as true (`effective`, the detection unless FTCLI_CPU_BF16 forces it) and what `precision: auto` resolves to on
        the CPU (`auto_precision`). The children get the same environment, so ftcli resolves alike there."""
        if self._cpu_bf16 is None:
            result = self.child("cpu-bf16", [sys.executable, "-c", CPU_FACTS], timed=False)
            facts = json.loads(result.stdout.strip().splitlines()[-1]) if result.ok else {"error": result.stderr_tail}
            setting = (os.environ.get("FTCLI_CPU_BF16") or "auto").strip().lower()
            facts["forced"] = None if setting == "auto" else setting   # None: the detection decides
            self._cpu_bf16 = facts
        return self._cpu_bf16

    def local_dir(self) -> Path:
        """The converted folder of the recipes' builtin model: the baseline loads the very same weights."""
        from ftcli.models.load import resolve_model

        return resolve_model(self.recipe("lora").model).local_dir

    # ------------------------------------------------------------------------------------------ training runs

    def ftcli_train(self, label: str, method: str, steps: int, overrides: list[str],
                    extra_args: list[str] = ()) -> dict:
        from ftcli.runs.rundir import RunDir

        name = label.replace("@", "-")
        command = [*ftcli_command(), "train", str(RECIPES[method]), "--runs-dir", str(self.runs_root), "--name",
                   name, "--overwrite", "--json", "--set", f"training.max_steps={steps}", "--set", NO_CHECKPOINTS,
                   "--set", "training.logging_steps=1", *extra_args]
        for override in (*RECIPE_OVERRIDES.get(method, ()), *self.overrides_for(method), *overrides):
            command += ["--set", override]
        result = self.child(label, command)
        run = RunDir(self.runs_root, name)
        records = read_jsonl(run.metrics_path)
        summary = run_summary(result, records, self.plan.skip)
        run_json = run.read() if run.run_json_path.is_file() else {}
        summary["timings"] = run_json.get("timings")
        # What ftcli resolved on this machine, as its run record says (not what the bench expects it to resolve)
        summary["precision"] = run_json.get("precision")
        summary["gradient_checkpointing"] = run_json.get("gradient_checkpointing")
        summary["cpu_bf16"] = run_json.get("cpu_bf16")   # detected / FTCLI_CPU_BF16 / used, as ftcli saw them
        summary["cpu_threads"] = run_json.get("cpu_threads")   # threads per process, and why
        summary["distributed"] = run_json.get("distributed")
        summary["steps_planned"] = steps
        summary["adapter"] = str(run.adapter_dir)
        train_report = (run_json.get("data") or {}).get("train") or {}
        summary["packing_efficiency"] = train_report.get("packing_efficiency")
        return summary

    def baseline_train(self, label: str, method: str, steps: int, *, trl_defaults: bool,
                       seed: int | None = None, max_seconds: float | None = None) -> dict:
        """The hand-written script; `max_seconds` stops it at the end of the first step past that many seconds of
        training once skip + 1 steps ran (its tokens/s then comes from the steps after the warm-up it ran)."""
        recipe = self.recipe(method)
        t = recipe.training
        if (t.grad_accum, t.weight_decay, t.max_grad_norm) != (1, 0.0, 1.0):
            raise SystemExit("bench recipes must keep grad_accum 1, weight_decay 0 and max_grad_norm 1 (the script's)")
        out, log, command = self._script_command("bench.trl_baseline", label, recipe, steps,
                                                 seed=t.seed if seed is None else seed)
        command += ["--method", method]
        env = self.env
        if trl_defaults:
            command.append("--trl-defaults")
        else:
            command += ["--precision", self.matched_precision(t.precision)]   # what ftcli chooses on this CPU
            env = {**self.env, **MATCHED_MALLOC_ENV}
        if max_seconds is not None:
            command += ["--max-seconds", str(max_seconds), "--min-steps", str(self.plan.skip + 1)]
        result = self.child(label, command, env=env)
        records = read_jsonl(log)
        summary = run_summary(result, records, self.plan.skip, min_steps=1 if max_seconds is not None else 2)
        summary["adapter"] = str(out)
        summary.update(script_settings(records), steps_planned=steps, max_seconds=max_seconds)
        return summary

    def _script_command(self, module: str, label: str, recipe, steps: int, *, seed: int) -> tuple[Path, Path, list]:
        """(output folder, step log, command line) of a hand-written TRL script with the recipe's settings."""
        t, m = recipe.training, recipe.method
        out = self.work / "baseline" / label
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        log = out / "steps.jsonl"
        targets = m.target_modules if isinstance(m.target_modules, str) else ",".join(m.target_modules)
        command = [sys.executable, "-m", module, str(self.local_dir()), str(recipe.data.train),
                   "--out", str(out), "--log", str(log), "--steps", str(steps),
                   "--max-length", str(recipe.data.max_length), "--batch", str(t.batch_size), "--lr", str(t.lr),
                   "--warmup", str(t.warmup_steps or t.warmup_ratio), "--scheduler", t.scheduler,
                   "--r", str(m.r), "--alpha", str(m.alpha), "--dropout", str(m.dropout), "--targets", targets,
                   "--seed", str(seed)]
        return out, log, command

    def dpo_baseline_train(self, label: str, steps: int) -> dict:
        """The hand-written TRL DPOTrainer script (bench/trl_dpo_baseline.py) with recipes/dpo.yaml's settings."""
        objective = self.recipe("dpo").objective
        return self._objective_script("dpo", "bench.trl_dpo_baseline", label, steps, ["--beta", str(objective.beta)])

    def grpo_baseline_train(self, label: str, steps: int) -> dict:
        """The hand-written TRL GRPOTrainer script (bench/trl_grpo_baseline.py) with recipes/grpo.yaml's settings."""
        objective = self.recipe("grpo").objective
        return self._objective_script("grpo", "bench.trl_grpo_baseline", label, steps, [
            "--num-generations", str(objective.num_generations),
            "--max-completion-length", str(objective.max_completion_length),
            "--temperature", str(objective.temperature)])

    def _objective_script(self, key: str, module: str, label: str, steps: int, options: list[str]) -> dict:
        """A hand-written TRL script of recipe `key`'s objective, with the precision ftcli resolved."""
        recipe = self.recipe(key)
        _, log, command = self._script_command(module, label, recipe, steps, seed=recipe.training.seed)
        command += [*options, "--precision", self.matched_precision(recipe.training.precision)]
        result = self.child(label, command, env={**self.env, **MATCHED_MALLOC_ENV})
        records = read_jsonl(log)
        summary = run_summary(result, records, self.plan.skip)
        summary.update(script_settings(records), steps_planned=steps)
        return summary

    def matched_precision(self, requested: str) -> str:
        """The precision ftcli resolves `requested` to on the CPU, in this environment (FTCLI_CPU_BF16 included)."""
        if requested != "auto":
            return requested
        resolved = self.cpu_bf16().get("auto_precision")
        if resolved is None:   # the probe failed: resolve here
            from ftcli.models.load import resolve_precision

            resolved = resolve_precision(requested, "cpu")
        return resolved

    def compare(self, key: str, arms: dict, repeats: int) -> dict:
        """Run every arm `repeats` times, interleaved; arms maps a name to a function(label) -> run summary."""
        runs = self.interleaved_runs(key, arms, repeats, describe=lambda summary: (
            f"{summary['tokens_per_s']} tokens/s, peak RSS {gib(summary['peak_rss_bytes'])} GiB, "
            f"{summary['wall_s']:.0f} s, other processes used {summary['others_cpu_share']} of the CPU"))
        return {name: arm_summary(items) for name, items in runs.items()}

    def interleaved_runs(self, key: str, arms: dict, repeats: int, describe) -> dict[str, list[dict]]:
        """Every arm's runs, `repeats` each, interleaved (A B, B A, ...); `describe(run)` words one for the log."""
        runs: dict[str, list[dict]] = {name: [] for name in arms}
        for repeat, name in interleaved(list(arms), repeats):
            label = f"{key}-{name}-{repeat + 1}"
            self.log(f"{key}: {name} (repeat {repeat + 1}/{repeats})")
            summary = arms[name](label)
            summary["repeat"] = repeat + 1
            runs[name].append(summary)
            self.log(f"  {name}: {describe(summary)}")
        return runs


def script_settings(records: list[dict]) -> dict:
    """What a script trained with, from its trainer's own settings (the first line of its log)."""
    settings = next((r["settings"] for r in records if r.get("event") == "train_begin"), {})
    return {key: settings.get(key) for key in ("precision", "gradient_checkpointing", "optim")}


def run_summary(result, records: list[dict], skip: int, *, min_steps: int = 2) -> dict:
    """A training child's figures: steady real tokens/s, peak RSS, wall time, last train loss (or its error), the
    steps it ran."""
    steady = steady_throughput(records, skip=skip, min_steps=min_steps) if result.ok else None
    if steady:
        # Tokens per CPU-second of the process over the same steps: less hurt by other processes than wall time
        cpu = cpu_seconds_between(result.cpu_samples, *steady["window"])
        steady["tokens_per_cpu_s"] = round(steady["tokens"] / cpu, 2) if cpu else None
    steps = train_records(records)
    first_step_s = round(float(steps[0]["time"]) - result.started_at, 2) if steps else None
    return {"ok": result.ok, "tokens_per_s": steady["tokens_per_s"] if steady else None, "steady": steady,
            "steps_per_s": steady["steps_per_s"] if steady else None,
            "tokens_per_cpu_s": steady.get("tokens_per_cpu_s") if steady else None,
            "peak_rss_bytes": result.peak_rss_bytes, "wall_s": result.wall_s, "cpu_s": result.cpu_s,
            "first_step_s": first_step_s,   # process start to the end of step 1: imports, data, model, one step
            "others_cpu_share": result.others_cpu_share,
            "train_loss_last": steps[-1]["loss"] if steps else None,
            "steps_run": int(steps[-1]["step"]) if steps else 0,
            "step_times": step_times(records, skip=skip) if result.ok and skip >= 1 else [],
            "error": None if result.ok else result.stderr_tail[-1500:]}


def side_ratios(side: dict, other: dict) -> dict:
    """side / other for the medians of two arms: tokens/s, tokens per CPU-s, peak RSS, eval loss."""
    return {"tokens_per_s": ratio(side.get("tokens_per_s"), other.get("tokens_per_s")),
            "steps_per_s": ratio(side.get("steps_per_s"), other.get("steps_per_s")),
            "tokens_per_cpu_s": ratio(side.get("tokens_per_cpu_s"), other.get("tokens_per_cpu_s")),
            "peak_rss": ratio(side.get("peak_rss_bytes"), other.get("peak_rss_bytes")),
            "eval_loss": ratio(side.get("eval_loss"), other.get("eval_loss"), 4)}


def speed_runs(runs: list[dict]) -> tuple[list[dict], str]:
    """The runs an arm's speed comes from (the successful ones no other process disturbed, others' CPU share at most
    NOISE_LIMIT; all runs when every one was disturbed), and which those were."""
    clean = [r for r in runs if r["ok"] and (r.get("others_cpu_share") or 0) <= NOISE_LIMIT]
    return (clean, "undisturbed runs") if clean else (runs, "all runs (every one disturbed)")


def arm_summary(runs: list[dict]) -> dict:
    """Medians of an arm's runs. Speed comes from the runs no other process disturbed (others' CPU share at most
    NOISE_LIMIT) when there is one; memory and loss do not depend on the CPU, so from every run."""
    timed, speed_from = speed_runs(runs)
    return {"runs": runs, "speed_from": speed_from,
            "tokens_per_s": median([r["tokens_per_s"] for r in timed]),
            "steps_per_s": median([r.get("steps_per_s") for r in timed]),
            "tokens_per_cpu_s": median([r.get("tokens_per_cpu_s") for r in timed]),
            "peak_rss_bytes": median([r["peak_rss_bytes"] if r["ok"] else None for r in runs]),
            "wall_s": median([r["wall_s"] for r in runs]),
            "first_step_s": median([r.get("first_step_s") for r in runs]),
            **run_settings(runs)}


SETTINGS = ("precision", "gradient_checkpointing", "optim")


def run_settings(runs: list[dict]) -> dict:
    """What an arm's runs trained with (each run's own record; "mixed" when they differ, None when none says) and
    the steps they ran: `capped` when a run stopped before the steps planned (a time budget)."""
    settings = {}
    for key in SETTINGS:
        values = {r.get(key) for r in runs if r.get(key) is not None}
        if values:
            settings[key] = values.pop() if len(values) == 1 else "mixed: " + ", ".join(sorted(map(str, values)))
    ran = [r["steps_run"] for r in runs if r.get("ok") and r.get("steps_run") is not None]
    planned = {r["steps_planned"] for r in runs if r.get("steps_planned") is not None}
    if ran:
        settings["steps_run"] = sorted(set(ran))
    if planned:
        settings["steps_planned"] = max(planned)
        settings["capped"] = any(n < max(planned) for n in ran)
    return settings


def gib(value) -> str:
    return "?" if value is None else f"{value / 2**30:.2f}"
