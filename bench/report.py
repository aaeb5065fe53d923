"""bench/results.json -> bench/RESULTS.md: the goals first, then every figure of every section (pure, no I/O)."""

from __future__ import annotations

MIB = 2**20
DISTURBED = 0.03   # bench/sides.py NOISE_LIMIT: the CPU share of other processes above which a run is disturbed


def _num(value, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _mib(value) -> str:
    return "n/a" if value is None else f"{value / MIB:,.0f}"


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _met(met) -> str:
    return {True: "yes", False: "**no**", None: "not measured"}[met]


def _values(values) -> str:
    return "n/a" if not values else ", ".join(f"{v:,}" if isinstance(v, int) else str(v) for v in values)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def _ratio_line(what: str, ratios: dict | None) -> str:
    r = ratios or {}
    text = (f"- {what}: tokens/s {_num(r.get('tokens_per_s'), 3)} (per CPU-s {_num(r.get('tokens_per_cpu_s'), 3)}), "
            f"peak RSS {_num(r.get('peak_rss'), 3)}")
    text += f", eval loss {_num(r['eval_loss'], 4)}" if r.get("eval_loss") is not None else ""
    paired = r.get("paired_steps")
    if paired:
        text += (f"; from paired steps (the same batches on both sides, median of {paired['pairs']} step-time "
                 f"ratios): tokens/s {_num(paired['ratio'], 3)}, from one pair of runs to another "
                 f"{_num(paired['run_pairs_range'][0], 3)} to {_num(paired['run_pairs_range'][1], 3)}")
    return text


def describe_settings(arm: dict | None, native_bf16: bool | None) -> str:
    """What an arm trained with, from its runs' own records (ftcli's run.json, the script's trainer settings), in
    words; bf16 says whether this CPU computes it natively (`native_bf16`: as detected, not as FTCLI_CPU_BF16 says:
    the variable changes ftcli's choice, not the hardware)."""
    arm = arm or {}
    precision = arm.get("precision")
    if precision is None:
        parts = ["precision not recorded"]
    elif precision == "bf16":
        parts = ["bf16 autocast" + {True: ", native on this CPU", False: ", emulated as this CPU has no native bf16",
                                    None: ""}[native_bf16]]
    else:
        parts = [str(precision)]
    checkpointing = arm.get("gradient_checkpointing")
    parts.append({True: "gradient checkpointing", False: "no gradient checkpointing",
                  None: "gradient checkpointing not recorded"}.get(
                      checkpointing, f"gradient checkpointing {checkpointing}"))
    if arm.get("optim"):
        parts.append(str(arm["optim"]))
    return "; ".join(parts)


def cpu_bf16_line(results: dict) -> str:
    """Whether this CPU has native bf16 (as detected), whether FTCLI_CPU_BF16 overrode that for ftcli, and what ftcli's
    `precision: auto` resolved to here."""
    cpu = results.get("cpu_bf16") or {}
    detected = cpu.get("detected")
    if detected is None:
        return "bf16 on this CPU: not recorded"
    text = ("this CPU computes bf16 natively (AVX512-BF16 or AMX, as torch detects them)" if detected else
            "this CPU has no native bf16 (neither AVX512-BF16 nor AMX, as torch detects them): bf16 autocast runs "
            "emulated here")
    forced = cpu.get("forced")
    if forced:
        takes = "with" if cpu.get("effective") else "without"
        text += (f"; FTCLI_CPU_BF16={cpu.get('FTCLI_CPU_BF16')} made ftcli resolve as on a CPU {takes} native bf16"
                 + (" (as detected anyway)" if cpu.get("effective") == detected else " (not what this CPU has)")
                 + "; the variable changes what ftcli (and the script matched to it) chooses, not the hardware "
                 "any bf16 runs on")
    else:
        text += "; FTCLI_CPU_BF16 not set: ftcli followed the detection"
    if cpu.get("auto_precision"):
        text += f"; ftcli's `training.precision: auto` resolved to {cpu['auto_precision']} on the CPU"
    return "bf16: " + text


def _training_sides(results: dict, section: dict) -> list[str]:
    """What each side of the LoRA comparison ran, from the runs' own records."""
    native = (results.get("cpu_bf16") or {}).get("detected")
    lora = section.get("lora", {})
    ftcli, matched, defaults = lora.get("ftcli", {}), lora.get("trl_matched", {}), lora.get("trl_defaults", {})
    lines = [f"- {cpu_bf16_line(results)}.",
             f"- `ftcli`: `ftcli train` with its automatic defaults, as its run.json says they resolved on this "
             f"machine: {describe_settings(ftcli, native)}; random order; glibc malloc thresholds raised.",
             f"- `trl_matched`: bench/trl_baseline.py with ftcli's settings, as its trainer reported them: "
             f"{describe_settings(matched, native)}; random order; the same malloc thresholds as environment "
             "variables.",
             f"- `trl_defaults`: the same script with SFTConfig's defaults, as its trainer reported them: "
             f"{describe_settings(defaults, native)}; random order."]
    differ = [key for key in ("precision", "gradient_checkpointing")
              if ftcli.get(key) is not None and matched.get(key) is not None and ftcli[key] != matched[key]]
    if differ:
        lines.append(f"- **trl_matched did not train with ftcli's {' and '.join(differ)}: the matched comparison is "
                     "not like for like.**")
    budget = (results.get("plan") or {}).get("defaults_budget_s")
    if defaults.get("capped"):
        lines.append(f"- **`trl_defaults` was capped: it ran {', '.join(map(str, defaults.get('steps_run', [])))} of "
                     f"{defaults.get('steps_planned')} steps** (this run stops it at the end of the first step after "
                     f"{_num(budget, 0)} s of training). Its tokens/s comes from the steps after the warm-up that it "
                     "ran (a rate needs no equal step counts); its eval loss is not compared with ftcli's: "
                     f"{section.get('eval_loss_not_compared') or 'fewer steps'}.")
    elif budget is not None:
        lines.append(f"- `trl_defaults` had a time budget of {_num(budget, 0)} s of training in this run; it ran all "
                     "its steps within it (not capped).")
    return lines + [""]


def _runs_cell(runs: list[dict], key: str, fmt) -> str:
    return ", ".join(fmt(r.get(key)) for r in runs) or "n/a"


def _arms_table(arms: dict, *, with_eval: bool = False) -> list[str]:
    header = ["side", "tokens/s (median)", "per run", "tokens per CPU-s", "peak RSS MiB (median)", "per run",
              "wall s (median)", "start to step 1 s (median)", "others' CPU per run"]
    if with_eval:
        header += ["eval loss (median)", "per run"]
    rows = []
    for name, arm in arms.items():
        runs = arm["runs"]
        row = [name, _num(arm["tokens_per_s"], 1), _runs_cell(runs, "tokens_per_s", lambda v: _num(v, 1)),
               _num(arm.get("tokens_per_cpu_s"), 1), _mib(arm["peak_rss_bytes"]),
               _runs_cell(runs, "peak_rss_bytes", _mib), _num(arm["wall_s"], 0),
               _num(arm.get("first_step_s"), 1), _runs_cell(runs, "others_cpu_share", _pct)]
        if with_eval:
            row += [_num(arm.get("eval_loss"), 4), _runs_cell(runs, "eval_loss", lambda v: _num(v, 4))]
        rows.append(row)
    failures = [f"- {name} repeat {r['repeat']} failed: `{(r.get('error') or '').strip().splitlines()[-1:]}`"
                for name, arm in arms.items() for r in arm["runs"] if not r["ok"]]
    for name, arm in arms.items():
        disturbed = [r.get("repeat") for r in arm["runs"] if (r.get("others_cpu_share") or 0) > DISTURBED]
        if disturbed:
            failures.append(f"- {name}: repeat {', '.join(map(str, disturbed))} disturbed by other processes; "
                            f"tokens/s from {arm.get('speed_from', 'all runs')}")
    return _table(header, rows) + failures + ([""] if failures else [])


def render_markdown(results: dict) -> str:
    quick = results.get("quick")
    machine, versions, plan = results.get("machine", {}), results.get("versions", {}), results.get("plan", {})
    sections = results.get("sections", {})
    title = "# ftcli benchmark results" + (" (QUICK: few steps, one repeat; indicative only)" if quick else "")
    cuts = []
    if quick:
        if plan.get("overrides"):
            cuts.append(f"every training (both sides alike) with {', '.join(plan['overrides'])}")
        cuts.append(f"{plan.get('lora_steps')} LoRA / {plan.get('qlora_steps')} QLoRA / {plan.get('packing_steps')} "
                    f"packing steps, the first {plan.get('skip')} left out of tokens/s, one repeat")
        if plan.get("score") is False:
            cuts.append("no eval-loss scoring (the eval-loss goal is the full run's)")
        if not plan.get("head_cases"):
            cuts.append("no LM-head probe")
        own = ", ".join(f"{m}@{n}" for m, n in plan.get("memory_cases") or []) or "none (the packed runs' peak only)"
        packing_batch = f", batch {plan['packing_batch']}" if plan.get("packing_batch") else ""
        cuts.append(f"packing at max_length {plan.get('packing_length', 256)}{packing_batch}; memory runs of its own: "
                    f"{own}")
        if plan.get("data_sizes"):
            cuts.append(f"data preparation at {', '.join(f'{n:,}' for n in plan['data_sizes'])} examples only, "
                        f"{', '.join(map(str, plan.get('data_repeats') or []))} repeat(s)")
    lines = [title, "",
             f"Written by `{results.get('command', 'python -m bench.run')}` on {results.get('date')}, in "
             f"{_num(results.get('elapsed_s'), 0)} s. Regenerate with `make bench` (full) or `make bench-quick`.", "",
             "Every comparison ran side by side in this one run, interleaved (A B, B A, ...); figures are medians. "
             "Compare figures only within this file: on a shared machine the same training has run 107 and 143 "
             "tokens/s an hour apart.", "",
             ]
    if cuts:
        lines += ["**Quick run, cut to fit 5 minutes on a CPU without native bf16: " + "; ".join(cuts) + ". Its "
                  "ratios compare the two sides under these settings only; `make bench` gives the full figures.**", ""]
    noise = results.get("noise") or {}
    if noise.get("runs_over_limit"):
        lines += [f"**NOISY RUN: other processes used more than {noise['limit']:.0%} of the CPU during "
                  f"{noise['runs_over_limit']} of {len(noise.get('runs', {}))} timed runs (up to "
                  f"{noise['max_others_cpu_share']:.0%}; column `others' CPU` below). Speed figures and ratios "
                  "from those runs are not trustworthy: run again on a quiet machine.**", ""]
    elif noise.get("runs"):
        lines += [f"Quiet machine: other processes used at most {noise['max_others_cpu_share']:.0%} of the CPU "
                  "during any timed run.", ""]
    lines += ["## Goals", ""]
    lines += _table(["goal", "value", "target", "met"],
                    [[g["what"], _num(g["value"], 3), g["target"], _met(g["met"])] for g in results.get("goals", [])])
    lines += ["## Machine and versions", "",
              f"- nproc {machine.get('nproc')}, memory {_num((machine.get('memory_total_bytes') or 0) / 2**30, 1)} "
              f"GiB ({_num((machine.get('memory_available_bytes') or 0) / 2**30, 1)} GiB available at the start), "
              f"CPU {machine.get('cpu_model')}, {machine.get('platform')}",
              f"- load average at the start {machine.get('load_average')}, at the end "
              f"{[round(x, 2) for x in machine.get('load_average_end', [])]} (above ~0.5 another process shared "
              "the CPU)",
              "- " + ", ".join(f"{k} {v}" for k, v in versions.items()),
              f"- {cpu_bf16_line(results)}",
              f"- environment: {results.get('environment')}",
              f"- plan: {plan}", ""]
    if "startup" in sections:
        s = sections["startup"]
        lines += ["## 1. Start-up", "", "Wall time of the whole command, median of the runs (the goal), and the CPU "
                  "time the process spent (steadier on a shared machine). The last two rows are references: the "
                  "interpreter alone, and the libraries every ftcli command needs. ftcli's own modules are "
                  "byte-compiled first, as a wheel install leaves them (an editable checkout under "
                  "PYTHONDONTWRITEBYTECODE=1 "
                  "would compile them from source at every start, ~10 ms).", ""]
        cpu_ratio = s.get("cpu_ratio_to_import_torch", {})
        lines += _table(["command", "median s", "runs s", "/ import torch", "CPU s (median)", "CPU / import torch"],
                        [[k, _num(v, 3), ", ".join(_num(x, 3) for x in s["runs_s"][k]),
                          _num(s["ratio_to_import_torch"].get(k), 3), _num(s.get("cpu_median_s", {}).get(k), 3),
                          _num(cpu_ratio.get(k), 3)] for k, v in s["median_s"].items()])
    if "training" in sections:
        s = sections["training"]
        lines += ["## 2. Training speed and memory on the embedded model (SmolLM2-135M, quickstart data)", "",
                  f"Real (non-padding) tokens/s over the steps after the first {plan.get('skip')} (cumulative "
                  "`num_tokens` and the time of each step's log line, the same for both sides); peak RSS of the "
                  "whole process (wait4). `ftcli_grouped` (full run only) is ftcli with "
                  "training.group_by_length=true: the speed and the eval loss of grouping by length. "
                  "Same model folder, data, max_length, batch, lr schedule, LoRA settings, completion-only loss. "
                  "Tokens per CPU-s: the same tokens over the CPU time the process spent in those steps (sampled "
                  "from /proc): a cross-check that other processes disturb less; the goals use tokens/s. "
                  "What each side trained with, as measured on this machine:", ""]
        lines += _training_sides(results, s)
        lines += [f"### LoRA ({plan.get('lora_steps')} steps)", ""] + _arms_table(s["lora"], with_eval=True)
        lines += [_ratio_line("ftcli / trl_matched", s.get("lora_matched_ratios")),
                  _ratio_line("ftcli / trl_defaults", s.get("lora_defaults_ratios"))]
        if "lora_grouped_ratios" in s:
            lines += [_ratio_line("ftcli_grouped (ftcli with training.group_by_length=true) / trl_defaults",
                                  s["lora_grouped_ratios"])]
        if s.get("eval_loss_not_scored"):
            lines += [f"- eval loss: not scored, {s['eval_loss_not_scored']}"]
        else:
            lines += ["- eval loss: every adapter scored by bench/probes.py score (completion tokens of the quickstart "
                      "eval set, ftcli's masks), so both sides are measured alike"]
        over_seeds = s.get("eval_loss_over_seeds")
        if over_seeds:
            per_seed = []
            for seed in over_seeds["seeds"][1:]:
                f, t = (s["seeds"].get(f"{side}_seed{seed}", {}).get("eval_loss") for side in ("ftcli", "trl_defaults"))
                per_seed.append(f"seed {seed}: {_num(f, 4)} vs {_num(t, 4)}")
            lines += [f"- eval loss over seeds {over_seeds['seeds']} (20 steps end far apart from one seed to the "
                      f"next, so the goal compares means): ftcli {_num(over_seeds.get('ftcli'), 4)}, trl_defaults "
                      f"{_num(over_seeds.get('trl_defaults'), 4)}; the extra seeds, ftcli vs trl_defaults: "
                      + "; ".join(per_seed)]
        lines += [""]
        lines += [f"### QLoRA ({plan.get('qlora_steps')} steps, nf4 double quant, fp32 compute dtype, "
                  "autocast as resolved)", ""]
        lines += _arms_table(s["qlora"]) + [_ratio_line("ftcli / trl_matched", s.get("qlora_matched_ratios")), ""]
        if s.get("head"):
            lines += ["### Where ftcli's speed comes from: TRL's fused LM head as ftcli runs it on the CPU", "",
                      "Without Triton, TRL's fused LM head projects every position and folds each vocabulary tile "
                      "with a dozen torch passes; ftcli (ftcli/models/fused_head.py) projects the labelled positions "
                      "only and scores them with PyTorch's cross-entropy, chunk by chunk. bench/probes.py head times "
                      "ftcli's own trainer (forward and backward, autocast as resolved) over the same batches with "
                      "TRL's head (`trl`), with labelled positions only but TRL's folding (`labelled_only`), and as "
                      "ftcli runs it (`ftcli`), alternated in one process: these ratios are not the noise of "
                      "separate runs.", ""]
            rows = []
            for method, h in s["head"].items():
                if "error" in h:
                    rows.append([method, "failed", "", "", "", "", "", ""])
                    continue
                step = h.get("step_s_median", {})

                def ratio_cell(key, h=h):
                    r = h.get(key) or {}
                    return f"{_num(r.get('median'), 3)} ({', '.join(_num(x, 3) for x in r.get('range', []))})"

                rows.append([method, _pct(h.get("labelled_share")), _num(step.get("trl"), 3),
                             _num(step.get("labelled_only"), 3), _num(step.get("ftcli"), 3),
                             ratio_cell("trl_over_labelled_only"), ratio_cell("trl_over_ftcli"),
                             _num(h.get("largest_loss_difference"), 6)])
            lines += _table(["method", "labelled share of positions", "step s: trl", "labelled_only", "ftcli",
                             "trl / labelled_only (range)", "trl / ftcli (range)", "largest loss difference"], rows)
    if "packing" in sections:
        s = sections["packing"]
        lines += ["## 3. Packing", "",
                  f"LoRA, max_length {s.get('max_length')}"
                  + (f", batch {s['batch_size']}" if s.get("batch_size") else "")
                  + f", {s.get('examples')} synthetic chat examples of varied "
                  "length (bench/measure.py varied_chat_records: 45 to ~500 tokens, skewed short), "
                  f"{plan.get('packing_steps')} steps. `unpacked` pads plain batches in random order (the goal's "
                  "baseline, as TRL's packing was measured in the issue); `packed` sets data.packing=true; "
                  "`unpacked_grouped` (full run only) sets training.group_by_length=true, batches grouped by length "
                  "(ftcli/training/samplers.py), the other way to remove padding. Tokens are real (non-padding) tokens "
                  "as ftcli counts them for packed rows too.", ""]
        lines += _arms_table(s["arms"])
        efficiency = [r.get("packing_efficiency") for r in s["arms"].get("packed", {}).get("runs", [])]
        lines += [_ratio_line("packed / unpacked", s.get("ratios"))]
        if "ratios_to_grouped" in s:
            lines += [_ratio_line("packed / unpacked_grouped (training.group_by_length=true)", s["ratios_to_grouped"])]
        lines += [f"- packing efficiency (real tokens / row capacity): {efficiency}", ""]
    if "memory" in sections:
        s = sections["memory"]
        lines += ["## 4. Memory estimate against measured peak RSS", "",
                  "Estimate: `ftcli train RECIPE --dry-run --json` (ftcli/training/memory_estimate.py). Measured: "
                  "peak RSS of "
                  f"`ftcli train` ({s.get('steps')} step(s); training.group_by_length=true puts the longest batch "
                  "first, so the first step runs at max_length) on the varied-length data.", ""]
        if s.get("estimates_recomputed"):
            lines += [f"**{s['estimates_recomputed']}**", ""]
        rows = []
        for key, case in s["cases"].items():
            parts = case.get("estimate_parts") or {}
            rows.append([key, _mib(case.get("estimate_bytes")), _mib(case.get("peak_rss_bytes")),
                         _num(case.get("estimate_over_measured"), 3),
                         ", ".join(f"{k} {_mib(v)}" for k, v in parts.items()), case.get("from", "")])
        lines += _table(["recipe", "estimate MiB", "measured MiB", "estimate / measured", "estimate parts MiB",
                         "measured in"], rows)
        fits = s.get("per_token_fit") or {}
        if fits:
            lines += ["Which part is off: from the two lengths of each method, the memory each batch token adds "
                      "(activations, logits) and the rest (weights, libraries, allocator).", ""]
            lines += _table(["method", "KiB per token: measured", "estimated", "fixed MiB: measured", "estimated"],
                            [[method, _num((f.get("measured_bytes_per_token") or 0) / 1024, 1),
                              _num((f.get("estimated_bytes_per_token") or 0) / 1024, 1),
                              _mib(f.get("measured_fixed_bytes")), _mib(f.get("estimated_fixed_bytes"))]
                             for method, f in fits.items()])
    if "load" in sections:
        s = sections["load"]
        lines += ["## 5. Load time of the builtin model", ""]
        lines += [f"- after its first conversion: ftcli (resolve_model + load_model) "
                  f"{_num(s.get('ftcli_load_s_median'), 3)}"
                  f" s (runs {s.get('ftcli_load_s')}), plain from_pretrained of the same folder "
                  f"{_num(s.get('plain_load_s_median'), 3)} s (runs {s.get('plain_load_s')}); ratio "
                  f"{_num(s.get('ftcli_over_plain'), 3)}"]
        if "first_conversion_s" in s:
            lines += [f"- the first conversion itself (GGUF -> safetensors, once per machine): "
                      f"{_num(s['first_conversion_s'], 1)} s, peak RSS {_mib(s.get('first_conversion_peak_rss_bytes'))}"
                      " MiB"]
        if "error" in s:
            lines += [f"- failed: `{str(s['error']).strip().splitlines()[-1:]}`"]
        lines += [""]
    if "preference" in sections:
        s = sections["preference"]
        lines += ["## 6. Preference tuning (DPO)", "",
                  f"recipes/dpo.yaml on a fresh LoRA adapter (model.adapter=null; the reference is the base with the "
                  f"adapter disabled on both sides), {s.get('steps')} steps of its batch of pairs: `ftcli train` "
                  "against bench/trl_dpo_baseline.py, a hand-written TRL DPOTrainer script with the same model folder, "
                  "pairs (as chat turns, through the same template), max_length, batch, lr schedule, beta, LoRA "
                  "settings and the precision ftcli resolved. Tokens: the non-padding tokens of both answers' "
                  "sequences, as both sides count them.", ""]
        lines += _arms_table(s["arms"])
        lines += [_ratio_line("ftcli / trl_matched", s.get("ratios"))]
        estimate = s.get("estimate") or {}
        parts = estimate.get("estimate_parts") or {}
        lines += ["- memory estimate (`ftcli train recipes/dpo.yaml --dry-run`): "
                  f"{_mib(estimate.get('estimate_bytes'))} MiB against ftcli's measured peak "
                  f"{_mib(estimate.get('measured_bytes'))} MiB: "
                  f"{_num(estimate.get('estimate_over_measured'), 3)} ("
                  + ", ".join(f"{k} {_mib(v)}" for k, v in parts.items()) + ")", ""]
    if "rl" in sections:
        s = sections["rl"]
        lines += ["## 7. RL with declared rewards (GRPO)", "",
                  f"recipes/grpo.yaml on a fresh LoRA adapter, {s.get('steps')} steps of 2 prompts x 4 sampled "
                  "answers: `ftcli train` against bench/trl_grpo_baseline.py, a hand-written TRL GRPOTrainer script "
                  "with the same model folder, prompts (chat turns through the same template), sampling settings, "
                  "batch, lr, LoRA settings, precision, and the same three rewards written in Python. The answers "
                  "sampled differ between the sides, and with them the tokens of a step: the goal is steps/s.", ""]
        lines += _arms_table(s["arms"])
        ratios = s.get("ratios") or {}
        lines += [f"- ftcli / trl_matched: steps/s {_num(ratios.get('steps_per_s'), 3)}, tokens/s "
                  f"{_num(ratios.get('tokens_per_s'), 3)}, peak RSS {_num(ratios.get('peak_rss'), 3)}", ""]
    if "data" in sections:
        lines += _data_section(sections["data"])
    if "utilization" in sections:
        lines += utilization_section(sections["utilization"])
    if "scaling" in sections:
        s = sections["scaling"]
        lines += ["## 10. Two processes on one machine (`--nproc 2`)", "",
                  f"recipes/quickstart.yaml, global batch {s.get('global_batch')}: one process against `ftcli train "
                  "--nproc 2` (DDP over gloo) with half the batch each, the cores shared out between them. Tokens: "
                  "both processes' real tokens.", ""]
        lines += _arms_table(s["arms"])
        threads = {name: ((arm.get("runs") or [{}])[0].get("cpu_threads") or {}).get("threads")
                   for name, arm in s["arms"].items()}
        lines += [f"- threads per process (run.json): {threads}; tokens/s with two processes / one: "
                  f"{_num(s.get('efficiency'), 3)}", ""]
    return "\n".join(lines).rstrip() + "\n"


def utilization_section(s: dict) -> list[str]:
    """## 9: model FLOP utilization per arm, and the step profile's parts side by side."""
    lines = ["## 9. Model FLOP utilization and where a step's time goes", "",
             "ftcli's own trainer and settings on the recipe (bench/probes.py utilization). Model FLOPs per step "
             "(bench/flops.py): 4x the frozen matmul weights and 6x the trainable ones per real token, causal "
             "attention over the real tokens, the LM head on labelled positions only; no padding, no recomputation. "
             "Against the same process's best matmul rate in the training dtype, measured just before (the model's "
             "own weight shapes at 512 positions, and 2048^3). The profile is one more step under torch.profiler "
             "(which slows small operators more than large ones), each operator's own time in one part.", ""]
    rows = []
    for name, arm in s.items():
        if not isinstance(arm, dict) or "runs" not in arm:
            continue
        tokens = arm.get("tokens") or {}
        padding = None
        if tokens.get("positions"):
            padding = 1 - tokens["real"] / tokens["positions"]
        rows.append([name, _num(arm.get("precision")), _num(arm.get("threads")), _num(arm.get("dropout")),
                     _num(arm.get("attention")),
                     _num(arm.get("real_tokens_per_s"), 1), _num(arm.get("step_s"), 3),
                     _num(None if arm.get("flops_per_real_token") is None else arm["flops_per_real_token"] / 1e9, 3),
                     _num(arm.get("achieved_gflops"), 1), _num(arm.get("peak_gflops"), 1), _pct(arm.get("mfu")),
                     _pct(padding), str(len(arm["runs"])), arm.get("speed_from", "")])
    lines += _table(["arm", "precision", "threads", "dropout", "attention", "real tokens/s", "step s",
                     "GFLOP / real token", "achieved GFLOP/s", "matmul peak GFLOP/s", "MFU", "padding", "runs",
                     "speed from"], rows)
    for key, value in s.items():
        if key.endswith("_dropout_ratio"):
            lines += [f"- {key.removesuffix('_dropout_ratio')}: tokens/s with ftcli's CPU dropout masks / with "
                      f"torch's dropout: {_num(value, 3)}"]
        if key == "lora_attention_ratio":
            lines += [f"- lora, bf16: tokens/s with attention in fp32 / with torch's SDPA under autocast: "
                      f"{_num(value, 3)}"]
    profiled = {name: arm["profile"]["parts_s"] for name, arm in s.items()
                if isinstance(arm, dict) and (arm.get("profile") or {}).get("parts_s")}
    if profiled:
        names = list(profiled)
        parts = list(next(iter(profiled.values())))
        totals = {name: sum(profiled[name].values()) or 1.0 for name in names}
        lines += ["", "Seconds of one profiled step per part (share of the step):", ""]
        lines += _table(["part", *names], [[part, *(f"{profiled[n][part]:.3f} ({profiled[n][part] / totals[n]:.0%})"
                                                   for n in names)] for part in parts])
        lines += ["", "![where a step's time goes](step_profile.png)"]
    return lines + [""]


def _data_section(s: dict) -> list[str]:
    """## 8: data preparation, ftcli's dry run against load_dataset + TRL's SFTTrainer preparation, per size."""
    num_proc = s.get("num_proc") or {}
    lines = ["## 8. Data preparation (cold caches)", "",
             f"`ftcli train RECIPE --dry-run --json` (model {s.get('model')}, LoRA, chat data, max_length "
             f"{s.get('max_length')}, data.num_proc at its default `{num_proc.get('recipe_default')}`; ftcli reported "
             f"num_proc {num_proc.get('reported') or 'not'}; {s.get('cpu_count')} CPUs, {s.get('cpu_affinity')} "
             "usable) with an empty data cache (a fresh FTCLI_CACHE_DIR whose converted/ links the warm one: the "
             "model is not converted again), against bench/trl_data_prep.py: `datasets.load_dataset(\"json\")` "
             "with an empty HF_DATASETS_CACHE, the messages turned into prompt-completion pairs, and SFTTrainer's "
             "own preparation (tokenization, completion-only labels, truncation), single process, no model loaded. "
             "Synthetic chat files (bench/measure.py synthetic_chat_records: ~480 bytes, ~109 tokens an example). "
             "Wall time and peak RSS (wait4) of each whole process, median of the repeats; `TRL prep s` is the "
             "part the script times itself (load_dataset and preparation, without its imports).", ""]
    rows, notes = [], []
    for key, row in (s.get("sizes") or {}).items():
        ftcli, trl = row.get("ftcli") or {}, row.get("trl") or {}
        rows.append([f"{int(key):,}", _mib(row.get("file_bytes")), str(row.get("repeats")),
                     _num(ftcli.get("wall_s"), 1), _mib(ftcli.get("peak_rss_bytes")), _num(trl.get("wall_s"), 1),
                     _num(trl.get("prep_s"), 1), _mib(trl.get("peak_rss_bytes")), _num(row.get("wall_ratio"), 3),
                     _num(row.get("rss_ratio"), 3), f"{_values(ftcli.get('rows'))} / {_values(trl.get('rows'))}"])
        cached = row.get("cached")
        if cached:
            notes.append(f"- @{int(key):,}: the dry run again on the data cache its cold run filled: "
                         f"{_num(cached.get('wall_s'), 2)} s, peak RSS {_mib(cached.get('peak_rss_bytes'))} MiB")
        if ftcli.get("cache_bytes") is not None or trl.get("cache_bytes") is not None:
            notes.append(f"- @{int(key):,}: on disk, ftcli's data cache {_mib(ftcli.get('cache_bytes'))} MiB, the "
                         f"datasets cache of the TRL script {_mib(trl.get('cache_bytes'))} MiB")
        if row.get("same_rows") is False:
            notes.append(f"- @{int(key):,}: **the two sides prepared different numbers of rows**")
        disturbed = []
        for side in ("ftcli", "trl"):
            for run in (row.get(side) or {}).get("runs", []):
                for what, item in ((side, run), (f"{side} cached", run.get("cached"))):
                    if item and not item.get("ok"):
                        error = (item.get("error") or "").strip().splitlines()[-1:]
                        notes.append(f"- @{int(key):,}: {what} repeat {run.get('repeat')} failed: `{error}`")
                    elif item and (item.get("others_cpu_share") or 0) > DISTURBED:
                        disturbed.append(f"{what} {run.get('repeat')} ({_pct(item['others_cpu_share'])})")
        if disturbed:
            notes.append(f"- @{int(key):,}: runs disturbed by other processes (their share of the CPU): "
                         + ", ".join(disturbed))
    lines += _table(["examples", "file MiB", "repeats", "ftcli wall s", "ftcli peak MiB", "TRL wall s", "TRL prep s",
                     "TRL peak MiB", "wall ftcli / TRL", "RSS ftcli / TRL", "rows ftcli / TRL"], rows)
    return lines + notes + ([""] if notes else [])
