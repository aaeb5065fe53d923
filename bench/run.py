"""ftcli against the hand-written TRL script, side by side in one run; writes bench/RESULTS.md and bench/results.json.

    python -m bench.run            # full: about 47 minutes on 2 quiet CPU cores, plus about an hour for the data
                                   # section (its 2M-example files; --sections picks others)  (make bench)
    python -m bench.run --quick    # about 7 minutes: batches of 2, 3 steps, one repeat, no eval-loss scoring, the
                                   # utilization of LoRA and QLoRA without its comparisons, no scaling, labelled
                                   # quick, plus about a minute of data preparation at 20k examples (make bench-quick)
Run from the repository root: every child (bench.probes, bench.trl_baseline, bench.trl_dpo_baseline,
bench.trl_grpo_baseline, bench.trl_data_prep) runs as
`python -m bench.…` there.

Sections (all by default; --sections picks some):
  startup   `ftcli --help` and `ftcli validate` against `python -c "import torch"` (median of several runs each)
  training  real tokens/s and peak RSS of `ftcli train` against bench/trl_baseline.py on the embedded model:
            LoRA and QLoRA with identical settings; LoRA also against the script with TRL's own defaults, with
            the final eval loss of every adapter scored alike (bench/probes.py score); and where the speed comes
            from: ftcli's steps with TRL's LM head and with ftcli's, in one process (bench/probes.py head)
  utilization  model FLOP utilization of ftcli's LoRA and QLoRA steps on the embedded model (bench/flops.py's count
            over the measured step time, against the same process's matmul peak in the training dtype; LoRA in fp32
            too where auto is bf16), with LoRA's dropout as ftcli's CPU masks and as torch's, in bf16 attention in
            fp32 and torch's, and where each step's time goes (torch.profiler, grouped by bench/step_profile.py):
            bench/probes.py utilization
  scaling   `ftcli train --nproc 2` (DDP over gloo, the cores shared out) against one process, same global batch
  packing   data.packing=true against plain padded batches (ftcli's default) on chat data of varied length
  memory    ftcli's memory estimate (`ftcli train --dry-run`) against the measured peak RSS, lora/qlora x 128/256
  load      load time of the builtin model after its first conversion (and, full mode, that conversion)
  preference  DPO (recipes/dpo.yaml on a fresh adapter): `ftcli train` against bench/trl_dpo_baseline.py, a
            hand-written TRL DPOTrainer script, same settings; and ftcli's memory estimate against its peak RSS
  rl        GRPO (recipes/grpo.yaml on a fresh adapter): steps/s and peak RSS of `ftcli train` against
            bench/trl_grpo_baseline.py, a hand-written TRL GRPOTrainer script with the same rewards in Python
  data      data preparation: `ftcli train --dry-run` against datasets.load_dataset + TRL's SFTTrainer preparation
            (bench/trl_data_prep.py) on synthetic chat files of 20k, 200k and 2M examples (quick: 20k), cold caches;
            wall time and peak RSS of each, and ftcli's dry run again on its warm data cache
Runs are interleaved (A B, B A, ...) so the noise of a shared machine hits every side alike; figures are medians.
Every child's peak RSS comes from wait4 (the whole process, whatever allocated it).
"""

from __future__ import annotations

import argparse
import compileall
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from bench.measure import (
    MATCHED_MALLOC_ENV,
    folder_bytes,
    goal,
    interleaved,
    machine_info,
    median,
    paired_step_ratio,
    ratio,
    synthetic_chat_records,
    varied_chat_records,
    write_jsonl,
)
from bench.sides import (
    BENCH,
    NOISE_LIMIT,
    RECIPE_OVERRIDES,
    RECIPES,
    REPO,
    Session,
    ftcli_command,
    gib,
    side_ratios,
    speed_runs,
)

SECTIONS = ("startup", "training", "utilization", "scaling", "packing", "memory", "load", "preference", "rl", "data")
MFU_GOAL = 0.60   # LoRA in fp32: model FLOPs per second / the same process's fp32 matmul peak
DATA_MODEL = "builtin:smollm2-135m-instruct"   # the data section's model: its tokenizer and chat template
CACHED_WALL_LIMIT_S = 5.0                      # the data section's goal for a dry run on a warm data cache


@dataclass(frozen=True)
class Plan:
    """How much to run: the full benchmark or the quick one."""

    quick: bool
    startup_repeats: int      # runs of each start-up command
    repeats: int              # interleaved repeats of every training comparison
    lora_steps: int
    qlora_steps: int
    packing_steps: int
    skip: int                 # warm-up steps left out of tokens/s
    memory_steps: int
    memory_cases: tuple[tuple[str, int], ...]   # (method, max_length) measured for the memory estimate
    varied_examples: int
    load_repeats: int
    first_conversion: bool
    timeout_s: int
    head_batches: int = 6               # batches of the LM-head probe (bench/probes.py head)
    head_repeats: int = 3
    head_cases: tuple[str, ...] = ("lora", "qlora", "lora-varied")   # recipes probed; -varied: the varied data
    score_examples: int | None = None   # eval examples scored per adapter (None: all)
    context_arms: bool = False          # also ftcli grouped by length and packing against grouped batches
    # Extra training seeds for the eval-loss comparison with TRL's defaults: 20 steps end 8% apart from one seed to
    # the next, far more than the 1% the goal allows, so one seed can't tell.
    loss_seeds: tuple[int, ...] = ()
    # Seconds of training after which the script with TRL's defaults stops (at the end of a step, once skip + 1 steps
    # ran); None: all its steps. On a CPU without native bf16 TRL's default bf16 is emulated, ~100 s a step (4
    # tokens/s), which alone took half of a 16-minute quick run; where bf16 is native its steps take ~3 s and the cap
    # never fires. Its tokens/s then comes from the steps it ran; its eval loss is not compared (fewer steps).
    defaults_budget_s: float | None = None
    # Recipe overrides for every training of this plan, on both sides (ftcli's --set, the script's settings come from
    # the same recipe): the quick run trains smaller batches so that it fits in 5 minutes on a CPU without native bf16.
    overrides: tuple[str, ...] = ()
    score: bool = True                  # score every LoRA adapter's eval loss (the quick run skips it: ~2 minutes)
    packing_length: int = 256           # max_length of the packing comparison (and of the packed memory case)
    # The packing comparison's batch size where the plan's overrides change it: packing removes the padding of a
    # batch, which batches of 2 hardly have (at batch 2 a quick run measured packing 0.95x, at 8 the full run 1.43x).
    packing_batch: int | None = None
    # The data section: examples per generated chat file, interleaved repeats of each size (per size: the largest
    # files take minutes a run), the size whose dry run is repeated on its warm data cache, max_length of both sides,
    # and the time a data child may take (TRL single-process on 2M examples: ~20 minutes on 2 cores).
    data_sizes: tuple[int, ...] = (20_000, 200_000, 2_000_000)
    data_repeats: tuple[int, ...] = (2, 1, 1)
    data_cached_size: int = 200_000
    data_max_length: int = 256
    data_timeout_s: int = 2 * 3600
    # The preference section: DPO steps per run (recipes/dpo.yaml's batch of 4 pairs) and interleaved repeats.
    dpo_steps: int = 12
    dpo_repeats: int = 3
    # The rl section: GRPO steps per run (recipes/grpo.yaml: 2 prompts x 4 sampled answers a step) and repeats.
    grpo_steps: int = 10
    grpo_repeats: int = 3
    # The utilization section: warm-up, timed and profiled steps per probe, interleaved repeats of every arm.
    utilization_warmup: int = 2
    utilization_steps: int = 8
    utilization_repeats: int = 3
    # The utilization section's comparisons (torch's dropout and attention, grouped batches) besides LoRA and QLoRA
    utilization_comparisons: bool = True
    # The scaling section: steps per run (the first `skip` not timed) and interleaved repeats (0: not run).
    scaling_steps: int = 10
    scaling_repeats: int = 2


FULL = Plan(quick=False, startup_repeats=7, repeats=3, lora_steps=20, qlora_steps=14, packing_steps=6, skip=2,
            memory_steps=1, memory_cases=(("lora", 256), ("qlora", 256), ("lora", 128), ("qlora", 128)),
            varied_examples=512, load_repeats=7, first_conversion=True, timeout_s=900, context_arms=True,
            loss_seeds=(43, 44, 45))
# Quick: about 4 minutes on 2 CPU cores without native bf16 (FTCLI_CPU_BF16=off: ftcli in fp32), where a batch of 8
# takes ~30 s a step. Batches of 2 on both sides, 3 steps (1 warm-up, 2 timed: a single timed step proved far too
# noisy on a shared machine, and a batch of 2 costs ~4 s a step while each child's start costs ~20 s), one repeat; no
# eval-loss scoring (its goal is the full run's), no LM-head probe, packing at max_length 128, no memory run of its
# own (the packed runs fill every batch to max_length, so their peak is the one to estimate). Packing keeps the
# recipe's batch of 8 (see packing_batch). Every figure is labelled quick in RESULTS.md.
QUICK = Plan(quick=True, startup_repeats=3, repeats=1, lora_steps=3, qlora_steps=3, packing_steps=3, skip=1,
             memory_steps=1, memory_cases=(), varied_examples=128, load_repeats=3,
             first_conversion=False, timeout_s=300, head_batches=2, head_repeats=1, head_cases=(),
             defaults_budget_s=30.0, overrides=("training.batch_size=2",), score=False, packing_length=128,
             packing_batch=8, data_sizes=(20_000,), data_repeats=(1,), data_cached_size=20_000, data_timeout_s=600,
             dpo_steps=4, dpo_repeats=1, grpo_steps=4, grpo_repeats=1, utilization_warmup=1, utilization_steps=3,
             utilization_repeats=1, utilization_comparisons=False, scaling_steps=4, scaling_repeats=0)


class Bench(Session):
    """One benchmark session: the six sections, each a set of interleaved comparisons and its goals."""

    # ------------------------------------------------------------------------------------------ sections

    def startup(self) -> None:
        # As a wheel install leaves them; this checkout may have none (PYTHONDONTWRITEBYTECODE=1, editable install).
        compileall.compile_dir(str(REPO / "ftcli"), quiet=1)
        commands = {
            "ftcli --help": [*ftcli_command(), "--help"],
            "ftcli validate": [*ftcli_command(), "validate", str(RECIPES["lora"])],
            "import torch": [sys.executable, "-c", "import torch"],
            # References, no goal: the interpreter alone, and the libraries every ftcli command loads (the floor).
            "python -c pass": [sys.executable, "-c", "pass"],
            "import typer, rich, pydantic, yaml": [sys.executable, "-c", "import typer, rich.console, pydantic, yaml"],
        }
        for label, command in commands.items():  # warm the page cache; not counted
            self.child(f"warm-{label.replace(' ', '_')}", command, timed=False)
        times: dict[str, list[float]] = {label: [] for label in commands}
        cpu: dict[str, list[float]] = {label: [] for label in commands}
        for _, label in interleaved(list(commands), self.plan.startup_repeats):
            result = self.child(label.replace(" ", "_"), commands[label])
            times[label].append(result.wall_s if result.ok else None)
            cpu[label].append(result.cpu_s if result.ok else None)
        medians = {label: median(values) for label, values in times.items()}
        cpu_medians = {label: median(values) for label, values in cpu.items()}
        torch_s, torch_cpu_s = medians["import torch"], cpu_medians["import torch"]
        section = {"runs_s": times, "median_s": medians, "cpu_s": cpu, "cpu_median_s": cpu_medians,
                   "ratio_to_import_torch": {k: ratio(v, torch_s) for k, v in medians.items() if k != "import torch"},
                   # CPU time is what the process itself spent: steadier than wall time on a shared machine
                   "cpu_ratio_to_import_torch": {k: ratio(v, torch_cpu_s) for k, v in cpu_medians.items()
                                                 if k != "import torch"}}
        self.results["sections"]["startup"] = section
        for label in ("ftcli --help", "ftcli validate"):
            value = section["ratio_to_import_torch"][label]
            self.add_goal(f"startup/{label}", f"`{label}` time / `python -c \"import torch\"` time", value,
                          "<= 0.10", goal(value, at_most=0.10))
        self.log(f"startup: {medians}")

    def lora_arms(self) -> dict:
        """The LoRA comparison's arms: ftcli, the script with ftcli's settings, the script with TRL's defaults
        (stopped after the plan's time budget, if any), and in full runs ftcli grouped by length."""
        p = self.plan
        arms = {
            "ftcli": lambda label: self.ftcli_train(label, "lora", p.lora_steps, ["data.eval=null"]),
            "trl_matched": lambda label: self.baseline_train(label, "lora", p.lora_steps, trl_defaults=False),
            "trl_defaults": lambda label: self.baseline_train(label, "lora", p.lora_steps, trl_defaults=True,
                                                              max_seconds=p.defaults_budget_s),
        }
        if p.context_arms:  # the speed and the eval loss of grouping by length, which ftcli leaves off by default
            arms["ftcli_grouped"] = lambda label: self.ftcli_train(
                label, "lora", p.lora_steps, ["data.eval=null", "training.group_by_length=true"])
        return arms

    def training(self) -> None:
        from bench.report import describe_settings

        p = self.plan
        lora = self.compare("lora", self.lora_arms(), p.repeats)
        seeds = {}
        if p.loss_seeds:   # ftcli's defaults and TRL's, once per extra seed, interleaved
            seed_arms = {}
            for seed in p.loss_seeds:
                seed_arms[f"ftcli_seed{seed}"] = lambda label, seed=seed: self.ftcli_train(
                    label, "lora", p.lora_steps, ["data.eval=null", f"training.seed={seed}"])
                seed_arms[f"trl_defaults_seed{seed}"] = lambda label, seed=seed: self.baseline_train(
                    label, "lora", p.lora_steps, trl_defaults=True, seed=seed)
            seeds = self.compare("seeds", seed_arms, 1)
        if p.score:
            self._score_eval_loss({**lora, **seeds})
        qlora = self.compare("qlora", {
            "ftcli": lambda label: self.ftcli_train(label, "qlora", p.qlora_steps, ["data.eval=null"]),
            "trl_matched": lambda label: self.baseline_train(label, "qlora", p.qlora_steps, trl_defaults=False),
        }, p.repeats)
        head = {}
        for case in p.head_cases:
            method, _, varied = case.partition("-")
            # Long answers (most positions labelled): what the scoring costs, beyond skipping the prompt.
            head[f"{method}, varied data @256" if varied else method] = self._head_probe(
                case, method, self.varied_overrides(256) if varied else [])
        section = {"lora": lora, "qlora": qlora, "head": head}
        for method, arms in (("lora", lora), ("qlora", qlora)):
            ratios = side_ratios(arms["ftcli"], arms["trl_matched"])
            ratios["paired_steps"] = paired_step_ratio(arms["ftcli"]["runs"], arms["trl_matched"]["runs"])
            section[f"{method}_matched_ratios"] = ratios
            self.add_goal(f"training/{method}/speed", f"{method}: ftcli tokens/s / hand-written TRL script (same "
                          "settings)", ratios["tokens_per_s"], ">= 1.00", goal(ratios["tokens_per_s"], at_least=1.0))
            self.add_goal(f"training/{method}/memory", f"{method}: ftcli peak RSS / hand-written TRL script (same "
                          "settings)", ratios["peak_rss"], "<= 1.05", goal(ratios["peak_rss"], at_most=1.05))
        defaults = side_ratios(lora["ftcli"], lora["trl_defaults"])
        # An eval-loss comparison needs the same steps on both sides; a tokens/s one does not.
        capped = [f"{name} ran {', '.join(map(str, arm.get('steps_run', [])))} of {arm.get('steps_planned')} steps"
                  for name, arm in {**lora, **seeds}.items() if arm.get("capped")]
        if capped:
            defaults["eval_loss"] = None
            section["eval_loss_not_compared"] = "; ".join(capped) + " (time budget)"
        if not p.score:
            defaults["eval_loss"] = None
            section["eval_loss_not_scored"] = "quick run: the adapters' eval loss is not scored (the full run does)"
        section["lora_defaults_ratios"] = defaults
        if "ftcli_grouped" in lora:
            section["lora_grouped_ratios"] = side_ratios(lora["ftcli_grouped"], lora["trl_defaults"])
        loss_ratio = defaults["eval_loss"]
        if seeds:
            section["seeds"] = seeds
        if seeds and not capped:
            mean_loss = {side: mean_of([lora[side]["eval_loss"]] + [seeds[f"{side}_seed{seed}"]["eval_loss"]
                                                                    for seed in p.loss_seeds])
                         for side in ("ftcli", "trl_defaults")}
            section["eval_loss_over_seeds"] = {"seeds": [self.recipe("lora").training.seed, *p.loss_seeds],
                                               **mean_loss}
            loss_ratio = ratio(mean_loss["ftcli"], mean_loss["trl_defaults"])
        native = self.cpu_bf16().get("detected")
        ftcli_ran = describe_settings(lora["ftcli"], native)
        trl_ran = describe_settings(lora["trl_defaults"], native)
        self.add_goal("training/lora/defaults-speed", f"lora: ftcli defaults ({ftcli_ran}) tokens/s / the script with "
                      f"TRL's defaults ({trl_ran})", defaults["tokens_per_s"], ">= 1.30",
                      goal(defaults["tokens_per_s"], at_least=1.3))
        if not p.score:
            self.add_goal("training/lora/defaults-eval-loss", "lora: ftcli final eval loss / the script's with TRL's "
                          f"defaults: not compared, {section['eval_loss_not_scored']}", None, "<= 1.01 (no loss)",
                          None)
        elif capped:
            self.add_goal("training/lora/defaults-eval-loss", "lora: ftcli final eval loss / the script's with TRL's "
                          f"defaults: not compared, {section['eval_loss_not_compared']}", None, "<= 1.01 (no loss)",
                          None)
        else:
            self.add_goal("training/lora/defaults-eval-loss", "lora: ftcli final eval loss / the script's with TRL's "
                          "defaults (same steps; one scorer for both; mean over the seeds)", loss_ratio,
                          "<= 1.01 (no loss)", goal(loss_ratio, at_most=1.01))
        self.results["sections"]["training"] = section

    def utilization(self) -> None:
        """Model FLOP utilization and the step profile of LoRA and QLoRA; LoRA's dropout both ways, interleaved."""
        p = self.plan
        auto = self.cpu_bf16().get("auto_precision")

        def probe(method: str, *options: str):
            def run(label: str) -> dict:
                sets = [arg for override in (*self.overrides_for(method), *options[1:]) for arg in ("--set", override)]
                flags = [f"--{options[0]}"] if options and options[0] else []
                result = self.child(label, [sys.executable, "-m", "bench.probes", "utilization", str(RECIPES[method]),
                                            "--warmup", str(p.utilization_warmup), "--steps", str(p.utilization_steps),
                                            "--profile-steps", "1", *flags, *sets])
                figures = json.loads(result.stdout.strip().splitlines()[-1]) if result.ok else {}
                return {"ok": result.ok, "others_cpu_share": result.others_cpu_share, **figures,
                        "error": None if result.ok else result.stderr_tail[-1500:]}
            return run

        compare = p.utilization_comparisons
        arms = {"lora": probe("lora", "")}
        if compare:
            arms["lora_torch_dropout"] = probe("lora", "torch-dropout")
        arms["qlora"] = probe("qlora", "")
        if compare and auto == "bf16":   # ftcli computes attention in fp32 under bf16 autocast on the CPU
            arms["lora_torch_attention"] = probe("lora", "torch-attention")
        fp32 = [] if auto == "fp32" else ["training.precision=fp32"]
        if fp32:   # the goal is LoRA in fp32: the path CPUs without native bf16 take
            arms["lora_fp32"] = probe("lora", "", *fp32)
            if compare:
                arms["lora_fp32_torch_dropout"] = probe("lora", "torch-dropout", *fp32)
        if compare:
            # Batches grouped by length (off by default: see README) carry almost no padding, which the FLOP count
            # leaves out: what the same steps reach on the positions they compute.
            arms["lora_fp32_grouped" if fp32 else "lora_grouped"] = probe("lora", "", *fp32,
                                                                          "training.group_by_length=true")
        runs = self.interleaved_runs("utilization", arms, p.utilization_repeats, describe=lambda r: (
            f"MFU {r.get('mfu')} ({r.get('achieved_gflops')} of {(r.get('matmul') or {}).get('peak_gflops')} "
            f"GFLOP/s, {r.get('precision')}), {r.get('real_tokens_per_s')} tokens/s, others used "
            f"{r.get('others_cpu_share')} of the CPU"))
        section = {name: utilization_summary(items) for name, items in runs.items()}
        self.results["sections"]["utilization"] = section
        fp32 = "lora_fp32" if "lora_fp32" in section else "lora"
        for arm, batches in ((fp32, "ftcli's default random batches"),
                             (f"{fp32}_grouped", "batches grouped by length, almost no padding")):
            if arm not in section:
                continue
            value = section[arm].get("mfu")
            self.add_goal(f"utilization/{arm.replace('_', '-')}", f"lora, fp32, {batches}: model FLOPs/s of a "
                          "training step / this process's fp32 matmul peak", value, f">= {MFU_GOAL:.2f}",
                          goal(value, at_least=MFU_GOAL))
        if not compare:
            return
        for arm in (fp32, "lora"):
            speed = ratio(section[arm].get("real_tokens_per_s"),
                          section[f"{arm}_torch_dropout"].get("real_tokens_per_s"))
            section[f"{arm}_dropout_ratio"] = speed
        value = section[f"{fp32}_dropout_ratio"]
        self.add_goal("utilization/cpu-dropout", "lora, fp32: tokens/s with ftcli's CPU dropout masks / with torch's "
                      "dropout", value, ">= 1.00", goal(value, at_least=1.0))
        if "lora_torch_attention" in section:
            value = section["lora_attention_ratio"] = ratio(section["lora"].get("real_tokens_per_s"),
                                                            section["lora_torch_attention"].get("real_tokens_per_s"))
            self.add_goal("utilization/cpu-attention", "lora, bf16: tokens/s with attention in fp32 / with torch's "
                          "SDPA under autocast (bf16)", value, ">= 1.00", goal(value, at_least=1.0))

    def scaling(self) -> None:
        """`--nproc 2` against one process with the same global batch: tokens/s and the threads each process got."""
        p = self.plan
        if not p.scaling_repeats:
            self.log("scaling: not in this plan (the full run measures it)")
            return
        batch = self.recipe("lora").training.batch_size
        for override in self.overrides_for("lora"):
            if override.startswith("training.batch_size="):
                batch = int(override.split("=", 1)[1])
        common = ["data.eval=null", "training.group_by_length=false"]
        arms = {"one_process": lambda label: self.ftcli_train(label, "lora", p.scaling_steps,
                                                              [*common, f"training.batch_size={batch}"]),
                "two_processes": lambda label: self.ftcli_train(label, "lora", p.scaling_steps,
                                                                [*common, f"training.batch_size={max(1, batch // 2)}"],
                                                                extra_args=["--nproc", "2"])}
        arms = self.compare("scaling", arms, p.scaling_repeats)
        efficiency = ratio(arms["two_processes"].get("tokens_per_s"), arms["one_process"].get("tokens_per_s"))
        self.results["sections"]["scaling"] = {"arms": arms, "global_batch": batch, "efficiency": efficiency}
        self.add_goal("scaling/nproc2", f"--nproc 2 / one process, tokens/s (global batch {batch}, the same cores)",
                      efficiency, ">= 0.90", goal(efficiency, at_least=0.9))

    def _head_probe(self, label: str, method: str, overrides: list[str] = ()) -> dict:
        """ftcli's steps with TRL's fused LM head as TRL and as ftcli run it on the CPU, in one process."""
        p = self.plan
        self.log(f"head: {label}, TRL's LM head / ftcli's, alternated in one process")
        sets = [arg for override in (*p.overrides, *overrides) for arg in ("--set", override)]
        result = self.child(f"head-{label}", [sys.executable, "-m", "bench.probes", "head", str(RECIPES[method]),
                                              "--batches", str(p.head_batches), "--repeats", str(p.head_repeats),
                                              *sets])
        return json.loads(result.stdout.strip().splitlines()[-1]) if result.ok else {"error": result.stderr_tail}

    def _score_eval_loss(self, arms: dict) -> None:
        """Score every LoRA adapter with one scorer (ftcli's completion masks on the quickstart eval data)."""
        adapters = [run["adapter"] for arm in arms.values() for run in arm["runs"] if run["ok"]]
        if not adapters:
            return
        self.log(f"scoring {len(adapters)} adapters on the eval data")
        limit = ["--max-examples", str(self.plan.score_examples)] if self.plan.score_examples else []
        result = self.child("score", [sys.executable, "-m", "bench.probes", "score", str(RECIPES["lora"]),
                                      *adapters, *limit], env={**self.env, **MATCHED_MALLOC_ENV}, timed=False)
        if not result.ok:
            return
        losses = json.loads(result.stdout.strip().splitlines()[-1])["eval_loss"]
        for arm in arms.values():
            for run in arm["runs"]:
                run["eval_loss"] = losses.get(run["adapter"])
            arm["eval_loss"] = median([run.get("eval_loss") for run in arm["runs"]])

    def varied_data(self) -> Path:
        path = self.work / "varied" / "train.jsonl"
        if not path.is_file():
            write_jsonl(path, varied_chat_records(self.plan.varied_examples, seed=0))
        return path

    def varied_overrides(self, max_length: int) -> list[str]:
        return [f"data.train={self.varied_data()}", "data.eval=null", f"data.max_length={max_length}",
                "data.max_dropped_fraction=0.5"]

    def packing_overrides(self) -> list[str]:
        """The packing comparison's overrides (after the plan's): varied-length data at its length, its batch."""
        p = self.plan
        batch = [f"training.batch_size={p.packing_batch}"] if p.packing_batch else []
        return [*self.varied_overrides(p.packing_length), *batch]

    def packing(self) -> None:
        p = self.plan
        common = self.packing_overrides()
        # The goal's baseline is plain batches (random order, padded to the longest): what TRL's packing was measured
        # against in the issue (and ftcli's default). Length-grouped batches are the other way to remove padding.
        packing_arms = {
            "unpacked": lambda label: self.ftcli_train(label, "lora", p.packing_steps,
                                                       [*common, "training.group_by_length=false"]),
            "packed": lambda label: self.ftcli_train(label, "lora", p.packing_steps, [*common, "data.packing=true"]),
        }
        if p.context_arms:
            packing_arms["unpacked_grouped"] = lambda label: self.ftcli_train(
                label, "lora", p.packing_steps, [*common, "training.group_by_length=true"])
        arms = self.compare("packing", packing_arms, p.repeats)
        ratios = side_ratios(arms["packed"], arms["unpacked"])
        section = {"arms": arms, "ratios": ratios, "max_length": p.packing_length, "examples": p.varied_examples,
                   "batch_size": p.packing_batch or self.recipe("lora").training.batch_size}
        if "unpacked_grouped" in arms:
            section["ratios_to_grouped"] = side_ratios(arms["packed"], arms["unpacked_grouped"])
        self.results["sections"]["packing"] = section
        speed = ratios["tokens_per_s"]
        self.add_goal("packing/speed", "packing: tokens/s with data.packing=true / without (plain batches, random "
                      "order), varied-length chat data", speed, ">= 1.30", goal(speed, at_least=1.3))

    def memory(self) -> None:
        p = self.plan
        packing = self.results["sections"].get("packing", {}).get("arms", {})
        measured: dict[str, dict] = {}
        for method, length in p.memory_cases:
            key = f"{method}@{length}"
            grouped = packing.get("unpacked_grouped", {}).get("peak_rss_bytes")
            if (method, length) == ("lora", p.packing_length) and grouped:
                measured[key] = {"peak_rss_bytes": packing["unpacked_grouped"]["peak_rss_bytes"],
                                 "from": "packing/unpacked_grouped"}
                continue
            self.log(f"memory: {key}")
            # Grouped by length, the longest batch comes first: the one step measured runs at max_length.
            run = self.ftcli_train(f"memory-{key}", method, p.memory_steps,
                                   [*self.varied_overrides(length), "training.group_by_length=true"])
            measured[key] = {"peak_rss_bytes": run["peak_rss_bytes"] if run["ok"] else None, "from": "own run",
                             "wall_s": run["wall_s"]}
        if packing.get("packed", {}).get("peak_rss_bytes"):
            measured[f"lora@{p.packing_length} packed"] = {"peak_rss_bytes": packing["packed"]["peak_rss_bytes"],
                                                           "from": "packing/packed"}
        if not measured:
            self.log("memory: no measured peak to estimate (the quick run takes the packed runs': run packing too)")
            self.results["sections"]["memory"] = {"cases": {}, "steps": p.memory_steps, "per_token_fit": {}}
            return
        spec = [{"key": key, "recipe": str(RECIPES[key.split("@")[0]]),
                 "overrides": [*p.overrides,
                               *(self.packing_overrides() + ["data.packing=true"] if key.endswith("packed")
                                 else self.varied_overrides(int(key.split("@")[1].split()[0])))]}
                for key in measured]
        spec_path = self.work / "estimate-spec.json"
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        self.log(f"memory: estimating {len(spec)} recipes (ftcli train --dry-run)")
        result = self.child("estimate", [sys.executable, "-m", "bench.probes", "estimate", str(spec_path)],
                            timed=False)
        estimates = json.loads(result.stdout.strip().splitlines()[-1]) if result.ok else {}
        rows = {}
        for key, item in measured.items():
            memory = (estimates.get(key) or {}).get("memory") or {}
            estimate = memory.get("total_bytes")
            value = ratio(estimate, item["peak_rss_bytes"])
            rows[key] = {**item, "estimate_bytes": estimate, "estimate_parts": memory.get("parts"),
                         "estimate_over_measured": value}
            self.add_goal(f"memory/{key}", f"memory estimate / measured peak RSS, {key} (varied-length data)",
                          value, "0.85 .. 1.15", goal(value, at_least=0.85, at_most=1.15))
        batch = self.recipe("lora").training.batch_size
        self.results["sections"]["memory"] = {"cases": rows, "steps": p.memory_steps,
                                              "per_token_fit": per_token_fit(rows, batch)}

    def preference(self) -> None:
        """DPO: ftcli against the hand-written TRL DPOTrainer script, and ftcli's memory estimate for it."""
        p = self.plan
        arms = self.compare("dpo", {
            "ftcli": lambda label: self.ftcli_train(label, "dpo", p.dpo_steps, []),
            "trl_matched": lambda label: self.dpo_baseline_train(label, p.dpo_steps),
        }, p.dpo_repeats)
        ratios = side_ratios(arms["ftcli"], arms["trl_matched"])
        ratios["paired_steps"] = paired_step_ratio(arms["ftcli"]["runs"], arms["trl_matched"]["runs"])
        section = {"arms": arms, "ratios": ratios, "steps": p.dpo_steps}
        self.add_goal("preference/dpo/speed", "dpo: ftcli tokens/s / hand-written TRL DPOTrainer script (same "
                      "settings)", ratios["tokens_per_s"], ">= 1.00", goal(ratios["tokens_per_s"], at_least=1.0))
        self.add_goal("preference/dpo/memory", "dpo: ftcli peak RSS / hand-written TRL DPOTrainer script (same "
                      "settings)", ratios["peak_rss"], "<= 1.05", goal(ratios["peak_rss"], at_most=1.05))
        spec_path = self.work / "estimate-dpo.json"
        spec_path.write_text(json.dumps([{"key": "dpo", "recipe": str(RECIPES["dpo"]),
                                          "overrides": list(RECIPE_OVERRIDES["dpo"])}]),
                             encoding="utf-8")
        result = self.child("estimate-dpo", [sys.executable, "-m", "bench.probes", "estimate", str(spec_path)],
                            timed=False)
        memory = ((json.loads(result.stdout.strip().splitlines()[-1]) if result.ok else {}).get("dpo") or {}).get(
            "memory") or {}
        estimate = memory.get("total_bytes")
        value = ratio(estimate, arms["ftcli"]["peak_rss_bytes"])
        section["estimate"] = {"estimate_bytes": estimate, "estimate_parts": memory.get("parts"),
                               "measured_bytes": arms["ftcli"]["peak_rss_bytes"], "estimate_over_measured": value}
        self.add_goal("preference/dpo/estimate", "dpo: memory estimate / measured peak RSS of ftcli's DPO run",
                      value, "0.85 .. 1.15", goal(value, at_least=0.85, at_most=1.15))
        self.results["sections"]["preference"] = section

    def rl(self) -> None:
        """GRPO: ftcli against the hand-written TRL GRPOTrainer script, in steps per second (the sampled answers,
        and so the tokens of a step, differ between the two)."""
        p = self.plan
        arms = self.compare("grpo", {
            "ftcli": lambda label: self.ftcli_train(label, "grpo", p.grpo_steps, []),
            "trl_matched": lambda label: self.grpo_baseline_train(label, p.grpo_steps),
        }, p.grpo_repeats)
        ratios = side_ratios(arms["ftcli"], arms["trl_matched"])
        self.results["sections"]["rl"] = {"arms": arms, "ratios": ratios, "steps": p.grpo_steps}
        self.add_goal("rl/grpo/speed", "grpo: ftcli steps/s / hand-written TRL GRPOTrainer script (same settings "
                      "and rewards)", ratios["steps_per_s"], ">= 1.00", goal(ratios["steps_per_s"], at_least=1.0))
        self.add_goal("rl/grpo/memory", "grpo: ftcli peak RSS / hand-written TRL GRPOTrainer script",
                      ratios["peak_rss"], "<= 1.05", goal(ratios["peak_rss"], at_most=1.05))

    def load(self) -> None:
        self.log("load: builtin model load time")
        result = self.child("load", [sys.executable, "-m", "bench.probes", "load", str(RECIPES["lora"]),
                                     "--repeats", str(self.plan.load_repeats)])
        section = json.loads(result.stdout.strip().splitlines()[-1]) if result.ok else {"error": result.stderr_tail}
        if self.plan.first_conversion:
            cache = Path(tempfile.mkdtemp(prefix="bench-cache-", dir=self.work))
            self.log("load: first conversion of the builtin model into an empty cache")
            converted = self.child("convert", [sys.executable, "-m", "bench.probes", "convert",
                                               str(RECIPES["lora"])], env={**self.env, "FTCLI_CACHE_DIR": str(cache)},
                                   timed=False)
            if converted.ok:
                section.update(json.loads(converted.stdout.strip().splitlines()[-1]))
                section["first_conversion_peak_rss_bytes"] = converted.peak_rss_bytes
            shutil.rmtree(cache, ignore_errors=True)
        value = ratio(section.get("ftcli_load_s_median"), section.get("plain_load_s_median"))
        section["ftcli_over_plain"] = value
        self.results["sections"]["load"] = section
        self.add_goal("load/builtin", "load of the converted builtin model: ftcli (resolve + load_model) / plain "
                      "from_pretrained of the same folder", value, "<= 1.10", goal(value, at_most=1.10))

    # ------------------------------------------------------------------------------------------ data preparation

    def data(self) -> None:
        """Data preparation at every size of the plan: ftcli's dry run and the TRL script, interleaved, each on cold
        caches; at data_cached_size ftcli's dry run again on the data cache its cold run just filled."""
        p = self.plan
        converted = self.warm_converted()
        sizes: dict[str, dict] = {}
        for size, repeats in zip(p.data_sizes, p.data_repeats, strict=True):
            path = self.work / "data" / f"chat-{size}.jsonl"
            if not path.is_file():
                self.log(f"data: writing {size:,} synthetic chat examples")
                write_jsonl(path, synthetic_chat_records(size, seed=0))
            recipe = self.work / "data" / f"recipe-{size}.yaml"
            recipe.write_text(json.dumps(data_recipe(path, p.data_max_length)) + "\n", encoding="utf-8")
            cached = size == p.data_cached_size
            arms = {"ftcli": lambda label, recipe=recipe, cached=cached: self.ftcli_prepare(label, recipe, converted,
                                                                                        cached=cached),
                    "trl": lambda label, path=path: self.trl_prepare(label, path)}
            runs = self.interleaved_runs(f"data-{size}", arms, repeats, describe=lambda run: (
                f"{_seconds(run['wall_s'])} s, peak RSS {gib(run['peak_rss_bytes'])} GiB"
                + (f"; again on its warm cache {_seconds(run['cached']['wall_s'])} s" if run.get("cached") else "")))
            sizes[str(size)] = data_row(size, path.stat().st_size, repeats, runs)
            path.unlink()   # up to 1 GB (2M examples); each size has its own file
        from ftcli.recipe.schema import DataConfig

        reported = {r.get("num_proc") for row in sizes.values() for r in row.get("ftcli", {}).get("runs", [])}
        section = {"sizes": sizes, "max_length": p.data_max_length, "cached_size": p.data_cached_size,
                   "model": DATA_MODEL,
                   # the recipe leaves data.num_proc at its default; what ftcli resolved it to, if its report says
                   "num_proc": {"recipe_default": getattr(DataConfig.model_fields.get("num_proc"), "default", None),
                                "reported": sorted(reported - {None}, key=str) or None},
                   "cpu_count": os.cpu_count(), "cpu_affinity": len(os.sched_getaffinity(0))}
        self.results["sections"]["data"] = section
        for item in data_goals(section):
            self.add_goal(**item)
        shutil.rmtree(self.work / "data", ignore_errors=True)

    def warm_converted(self) -> Path:
        """The converted-model folder of this machine's ftcli cache (converting the builtin model if it never was),
        linked into every cold cache so that only the data cache starts empty."""
        from ftcli.paths import cache_dir

        self.local_dir()   # resolves the recipes' builtin model, the data section's model, converting it if needed
        converted = cache_dir() / "converted"
        if not converted.is_dir():
            raise SystemExit(f"data: no converted models in {converted} after resolving the builtin model")
        return converted

    def ftcli_prepare(self, label: str, recipe: Path, converted: Path, *, cached: bool) -> dict:
        """`ftcli train RECIPE --dry-run --json` with a fresh FTCLI_CACHE_DIR (its converted/ linked to the warm
        one), and the size of the data cache it wrote; with `cached`, the same command again on that cache."""
        cache = Path(tempfile.mkdtemp(prefix=f"{label}-cache-", dir=self.work))
        (cache / "converted").symlink_to(converted, target_is_directory=True)
        env = {**self.env, "FTCLI_CACHE_DIR": str(cache)}
        command = [*ftcli_command(), "train", str(recipe), "--dry-run", "--json"]
        try:
            result = self.child(label, command, env=env, timeout_s=self.plan.data_timeout_s)
            run = prepare_summary(result, **dry_run_figures(result), cache_bytes=folder_bytes(cache / "data"))
            if cached and result.ok:
                again = self.child(f"{label}-cached", command, env=env, timeout_s=self.plan.data_timeout_s)
                run["cached"] = prepare_summary(again, **dry_run_figures(again))
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        return run

    def trl_prepare(self, label: str, path: Path) -> dict:
        """bench/trl_data_prep.py with a fresh, empty HF_DATASETS_CACHE, and the size of what it wrote there."""
        cache = Path(tempfile.mkdtemp(prefix=f"{label}-hf-", dir=self.work))
        command = [sys.executable, "-m", "bench.trl_data_prep", str(path), "--max-length",
                   str(self.plan.data_max_length), "--model", str(self.local_dir())]
        try:
            result = self.child(label, command, env={**self.env, "HF_DATASETS_CACHE": str(cache)},
                                timeout_s=self.plan.data_timeout_s)
            cache_bytes = folder_bytes(cache)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        figures = last_json_line(result.stdout) if result.ok else {}
        return prepare_summary(result, **{key: figures.get(key) for key in ("rows", "prep_s", "load_s",
                                                                           "tokenize_s")},
                               cache_bytes=cache_bytes)


def data_recipe(train: Path, max_length: int) -> dict:
    """The data section's recipe (written as JSON, which YAML reads): the builtin model, LoRA, chat data at
    max_length with every other data setting at its default (num_proc included), 10 steps."""
    return {"name": "data-prep", "model": {"path": DATA_MODEL}, "method": {"kind": "lora"},
            "data": {"train": str(train), "max_length": max_length}, "training": {"max_steps": 10}}


def last_json_line(stdout: str) -> dict:
    """The JSON object on the last line of a child's output; {} when there is none."""
    lines = stdout.strip().splitlines()
    try:
        value = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def dry_run_figures(result) -> dict:
    """What a dry run's JSON report says of the training data: rows handed to the trainer, and the processes it
    tokenized with if it says (`num_proc` anywhere under `data`, else the training data's `processes`)."""
    if not result.ok:
        return {}
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        report = last_json_line(result.stdout)
    data = report.get("data") or {}
    train = data.get("train") or {}
    num_proc = find_key(data, "num_proc")
    return {"rows": train.get("rows") or train.get("examples"),
            "num_proc": num_proc if num_proc is not None else train.get("processes")}


def find_key(value, key: str):
    """The first value of `key` in nested dicts and lists (depth first), None when absent."""
    if isinstance(value, dict):
        if key in value:
            return value[key]
        value = list(value.values())
    if isinstance(value, list):
        for item in value:
            found = find_key(item, key)
            if found is not None:
                return found
    return None


def prepare_summary(result, **figures) -> dict:
    """One data-preparation child: wall time and peak RSS of the whole process (None when it failed), its CPU time
    and the CPU other processes took meanwhile, the figures it reported (rows prepared ...), its error."""
    return {"ok": result.ok, "wall_s": result.wall_s if result.ok else None,
            "peak_rss_bytes": result.peak_rss_bytes if result.ok else None, "cpu_s": result.cpu_s,
            "others_cpu_share": result.others_cpu_share, **figures,
            "error": None if result.ok else result.stderr_tail[-1500:]}


def _seconds(value) -> str:
    return "?" if value is None else f"{value:.1f}"


def data_row(size: int, file_bytes: int, repeats: int, runs: dict[str, list[dict]]) -> dict:
    """One size of the data section: each side's medians (wall time, peak RSS, the bytes its cache took on disk),
    ftcli / TRL for wall time and peak RSS, the cached dry runs' medians, and whether both sides prepared the same
    number of rows."""
    row = {"examples": size, "file_bytes": file_bytes, "repeats": repeats}
    for side, items in runs.items():
        row[side] = {"runs": items, "wall_s": median([r["wall_s"] for r in items]),
                     "peak_rss_bytes": median([r["peak_rss_bytes"] for r in items]),
                     "rows": sorted({r.get("rows") for r in items if r.get("rows") is not None}) or None,
                     "cache_bytes": median([r.get("cache_bytes") if r.get("ok") else None for r in items])}
        if side == "trl":
            row[side]["prep_s"] = median([r.get("prep_s") for r in items])
    ftcli, trl = row.get("ftcli", {}), row.get("trl", {})
    row["wall_ratio"] = ratio(ftcli.get("wall_s"), trl.get("wall_s"))
    row["rss_ratio"] = ratio(ftcli.get("peak_rss_bytes"), trl.get("peak_rss_bytes"))
    cached = [r["cached"] for r in runs.get("ftcli", []) if r.get("cached")]
    if cached:
        row["cached"] = {"runs": cached, "wall_s": median([r["wall_s"] for r in cached]),
                         "peak_rss_bytes": median([r["peak_rss_bytes"] for r in cached])}
    row["same_rows"] = None if not (ftcli.get("rows") and trl.get("rows")) else ftcli["rows"] == trl["rows"]
    return row


def data_goals(section: dict) -> list[dict]:
    """The data section's goals (add_goal's keyword arguments): per size ftcli's peak RSS <= 1.1x TRL's and its wall
    time <= TRL's; ftcli's peak RSS at the largest size <= 1.5x at the smallest (not measured with one size); the
    dry run on a warm data cache at the cached size <= CACHED_WALL_LIMIT_S."""
    sizes = section.get("sizes") or {}
    goals = []
    for key, row in sizes.items():
        n = f"{int(key):,}"
        goals.append({"key": f"data/{key}/memory", "what": f"data @{n} examples: ftcli `train --dry-run` peak RSS / "
                      "the TRL script's (load_dataset + SFTTrainer preparation), cold caches",
                      "value": row.get("rss_ratio"), "target": "<= 1.10", "met": goal(row.get("rss_ratio"),
                                                                                       at_most=1.10)})
        goals.append({"key": f"data/{key}/wall", "what": f"data @{n} examples: ftcli `train --dry-run` wall time / "
                      "the TRL script's (whole processes), cold caches", "value": row.get("wall_ratio"),
                      "target": "<= 1.00", "met": goal(row.get("wall_ratio"), at_most=1.0)})
    if len(sizes) >= 2:
        smallest, largest = min(sizes, key=int), max(sizes, key=int)
        flat = ratio(sizes[largest].get("ftcli", {}).get("peak_rss_bytes"),
                     sizes[smallest].get("ftcli", {}).get("peak_rss_bytes"))
        what = f"data: ftcli peak RSS at {int(largest):,} examples / at {int(smallest):,} (flat with the data size)"
    else:
        flat, what = None, "data: ftcli peak RSS at the largest size / at the smallest: not measured, one size only"
    goals.append({"key": "data/rss-flat", "what": what, "value": flat, "target": "<= 1.50",
                  "met": goal(flat, at_most=1.5)})
    cached_size = section.get("cached_size")
    cached = (sizes.get(str(cached_size)) or {}).get("cached") or {}
    goals.append({"key": "data/cached", "what": f"data @{cached_size:,} examples: ftcli `train --dry-run` wall "
                  "seconds on a warm data cache", "value": cached.get("wall_s"),
                  "target": f"<= {CACHED_WALL_LIMIT_S:.0f} s", "met": goal(cached.get("wall_s"),
                                                                           at_most=CACHED_WALL_LIMIT_S)})
    return goals


def utilization_summary(runs: list[dict]) -> dict:
    """Medians of one utilization arm's probes (undisturbed ones when there are), and the profile of its median run
    by MFU."""
    timed, speed_from = speed_runs(runs)
    timed = [r for r in timed if r.get("ok")]   # a failed probe has no figures
    summary = {"runs": runs, "speed_from": speed_from}
    if not timed:
        return summary
    by_mfu = sorted(timed, key=lambda r: r["mfu"])
    middle = by_mfu[len(by_mfu) // 2]
    summary.update(mfu=median([r["mfu"] for r in timed]),
                   achieved_gflops=median([r["achieved_gflops"] for r in timed]),
                   peak_gflops=median([r["matmul"]["peak_gflops"] for r in timed]),
                   real_tokens_per_s=median([r["real_tokens_per_s"] for r in timed]),
                   step_s=median([r["step_s"] for r in timed]),
                   **{key: middle.get(key) for key in ("precision", "threads", "dropout", "attention",
                                                        "flops_per_real_token",
                                                        "tokens", "matmul", "profile", "gradient_checkpointing")})
    return summary


def mean_of(values: list) -> float | None:
    """The mean of the values, None when any is missing (a failed run must not pass for a good one)."""
    return None if not values or any(v is None for v in values) else sum(values) / len(values)


def per_token_fit(cases: dict[str, dict], batch: int) -> dict[str, dict]:
    """Per method measured at two lengths: the bytes each batch token adds (slope) and the rest (intercept: weights,
    libraries, allocator), measured and estimated, so an estimate that is off says which part is off."""
    fits = {}
    for method in sorted({key.split("@")[0] for key in cases}):
        lengths = sorted(int(key.split("@")[1]) for key in cases if key.startswith(f"{method}@")
                         and key.split("@")[1].isdigit())
        if len(lengths) < 2:
            continue
        short, long = cases[f"{method}@{lengths[0]}"], cases[f"{method}@{lengths[-1]}"]
        tokens = batch * (lengths[-1] - lengths[0])
        fit = {}
        for side, key in (("measured", "peak_rss_bytes"), ("estimated", "estimate_bytes")):
            if short.get(key) is None or long.get(key) is None:
                continue
            slope = (long[key] - short[key]) / tokens
            fit[f"{side}_bytes_per_token"] = round(slope)
            fit[f"{side}_fixed_bytes"] = round(long[key] - slope * batch * lengths[-1])
        fits[method] = fit
    return fits


def without_step_times(value):
    """The results without each run's per-step times (`step_times`): the paired step ratios are computed from them
    before this, and report.py reads only the ratios. The step logs themselves stay in the work folder (--work)."""
    if isinstance(value, dict):
        return {k: without_step_times(v) for k, v in value.items() if k != "step_times"}
    if isinstance(value, list):
        return [without_step_times(v) for v in value]
    return value


def versions() -> dict:
    from ftcli.runs.rundir import git_commit, package_versions

    return {**package_versions(), "git_commit": git_commit(REPO)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="batches of 2, fewer steps and repeats, no eval-loss scoring (under 5 minutes)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="what to run")
    parser.add_argument("--out", type=Path, default=BENCH, help="where RESULTS.md and results.json go")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    parser.add_argument("--data-sizes", type=lambda text: tuple(int(n) for n in text.split(",")), default=None,
                        help="the data section's sizes, e.g. 20000,200000 (one run each; the cached dry run at the "
                             "largest of them up to 200,000)")
    args = parser.parse_args(argv)

    from bench.report import render_markdown

    plan = QUICK if args.quick else FULL
    if args.data_sizes:
        plan = replace(plan, data_sizes=args.data_sizes, data_repeats=(1,) * len(args.data_sizes),
                       data_cached_size=max([n for n in args.data_sizes if n <= 200_000] or [min(args.data_sizes)]))
    work = args.work or Path(tempfile.mkdtemp(prefix="ftcli-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(plan, work)
    bench.results.update({
        "quick": plan.quick, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "sections_run": args.sections, "plan": asdict(plan), "machine": machine_info(), "versions": versions(),
        "environment": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "FTCLI_CPU_BF16",
                                                      *MATCHED_MALLOC_ENV)},
    })
    bench.log(f"{'quick' if plan.quick else 'full'} benchmark, work folder {work}")
    # What this machine computes in bf16 and what FTCLI_CPU_BF16 made of it: the report words precision from it
    bench.results["cpu_bf16"] = bench.cpu_bf16()
    bench.log(f"cpu bf16: {bench.results['cpu_bf16']}")
    try:
        for section in SECTIONS:
            if section in args.sections:
                getattr(bench, section)()
    finally:
        bench.results["elapsed_s"] = round(time.perf_counter() - bench.started, 1)
        shares = list(bench.results["noise"]["runs"].values())
        bench.results["noise"].update(max_others_cpu_share=max(shares, default=None),
                                      runs_over_limit=sum(share > NOISE_LIMIT for share in shares),
                                      limit=NOISE_LIMIT)
        bench.results["machine"]["load_average_end"] = list(os.getloadavg())
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(without_step_times(bench.results), indent=2) + "\n",
                                               encoding="utf-8")
        (args.out / "RESULTS.md").write_text(render_markdown(bench.results), encoding="utf-8")
        profiles = {name: arm["profile"]["parts_s"]
                    for name, arm in bench.results["sections"].get("utilization", {}).items()
                    if isinstance(arm, dict) and (arm.get("profile") or {}).get("parts_s")}
        if profiles:
            from bench.step_profile import plot_parts

            plot_parts(profiles, args.out / "step_profile.png")
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    bench.log(f"done: {args.out / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
