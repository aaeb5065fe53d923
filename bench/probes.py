"""Measurements that need the libraries loaded, each run by bench/run.py in a fresh process; one JSON document out.
Run from the repository root, as bench/run.py runs them:

    python -m bench.probes score RECIPE ADAPTER_DIR... [--set KEY=VALUE ...]
    python -m bench.probes estimate SPEC_JSON
    python -m bench.probes load RECIPE [--repeats N]
    python -m bench.probes convert RECIPE          (run with an empty FTCLI_CACHE_DIR: times the first conversion)
    python -m bench.probes head RECIPE [--batches N] [--repeats N] [--set KEY=VALUE ...]
    python -m bench.probes utilization RECIPE [--warmup N] [--steps N] [--profile-steps N] [--torch-dropout]
                                              [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path


def _quiet() -> None:
    """Library chatter off stderr (it would bury a real error in the child's log)."""
    from ftcli.models.quiet import quiet_libraries

    quiet_libraries()


def score(recipe_path: str, adapters: list[str], overrides: list[str], max_examples: int | None = None) -> dict:
    """Completion-only eval loss (token-weighted mean over the recipe's eval data, ftcli's masks) of each adapter on
    the recipe's base model: one scorer for ftcli's and the hand-written script's adapters alike."""
    import torch
    from peft import PeftModel

    from ftcli.data import pipeline as data
    from ftcli.data.packing import PaddingCollator
    from ftcli.data.types import IGNORE_INDEX
    from ftcli.models import load as models
    from ftcli.recipe.loader import load_recipe

    _quiet()
    recipe = load_recipe(Path(recipe_path), overrides).recipe
    tokenizer = models.load_tokenizer(recipe.model)
    prepared = data.prepare_data(recipe.model_copy(update={"data": recipe.data.model_copy(update={"packing": False})}),
                                 tokenizer)
    if prepared.eval is None:
        raise SystemExit("the recipe has no eval data")
    collate = PaddingCollator(tokenizer.pad_token_id)
    rows = [prepared.eval[i] for i in range(min(len(prepared.eval), max_examples or len(prepared.eval)))]
    losses = {}
    for adapter in adapters:
        model = PeftModel.from_pretrained(models.load_model(recipe.model), adapter).eval().get_base_model()
        decoder, head = model.get_decoder(), model.get_output_embeddings()
        total, count = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(rows), 8):
                batch = collate(rows[start:start + 8])
                hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
                labels = batch["labels"][:, 1:]
                scored = labels != IGNORE_INDEX   # the LM head only where there is a target: a fraction of the cost
                logits = head(hidden[:, :-1][scored]).float()
                total += float(torch.nn.functional.cross_entropy(logits, labels[scored], reduction="sum"))
                count += int(scored.sum())
        losses[adapter] = round(total / count, 5)
        del model
    return {"eval_loss": losses, "eval_examples": len(rows)}


def estimate(spec_path: str) -> dict:
    """ftcli's memory estimate (the same report as `ftcli train RECIPE --dry-run --json`) of each recipe in the spec:
    a JSON list of {"key": ..., "recipe": path, "overrides": [...]}."""
    from ftcli.recipe.loader import load_recipe
    from ftcli.training.preflight import run_preflight

    _quiet()
    estimates = {}
    for item in json.loads(Path(spec_path).read_text(encoding="utf-8")):
        recipe = load_recipe(Path(item["recipe"]), item.get("overrides", [])).recipe
        report = run_preflight(recipe)
        estimates[item["key"]] = {"memory": report["memory"], "parameters": report["parameters"]}
    return estimates


def load(recipe_path: str, repeats: int) -> dict:
    """Seconds to load the recipe's (already converted) base model: ftcli's path (resolve + load_model) against a
    plain from_pretrained of the same folder, alternated, libraries imported beforehand."""
    import torch
    from transformers import AutoModelForCausalLM

    from ftcli.models import load as models
    from ftcli.recipe.loader import load_recipe

    _quiet()
    recipe = load_recipe(Path(recipe_path), []).recipe
    local_dir = models.resolve_model(recipe.model).local_dir
    AutoModelForCausalLM.from_pretrained(local_dir, dtype=torch.float32)  # page cache warm for both
    ftcli_s, plain_s = [], []
    for _ in range(repeats):
        # Each load starts with the previous model collected: otherwise its freeing lands in the next timing
        # (single loads of 0.05 s took 0.25 s that way, on either side).
        gc.collect()
        started = time.perf_counter()
        models.load_model(recipe.model)
        ftcli_s.append(time.perf_counter() - started)
        gc.collect()
        started = time.perf_counter()
        AutoModelForCausalLM.from_pretrained(local_dir, dtype=torch.float32)
        plain_s.append(time.perf_counter() - started)
    return {"ftcli_load_s": [round(x, 3) for x in ftcli_s], "plain_load_s": [round(x, 3) for x in plain_s],
            "ftcli_load_s_median": round(statistics.median(ftcli_s), 3),
            "plain_load_s_median": round(statistics.median(plain_s), 3), "local_dir": str(local_dir)}


def convert(recipe_path: str) -> dict:
    """Seconds for the first use of the recipe's builtin model (GGUF -> safetensors folder) in this cache."""
    from ftcli.models import load as models
    from ftcli.recipe.loader import load_recipe

    _quiet()
    recipe = load_recipe(Path(recipe_path), []).recipe
    started = time.perf_counter()
    models.resolve_model(recipe.model)
    return {"first_conversion_s": round(time.perf_counter() - started, 2)}


def head(recipe_path: str, batches: int, repeats: int, overrides: list[str]) -> dict:
    """Where ftcli's training speed comes from: ftcli's own trainer, forward and backward over the same batches, with
    TRL's fused LM head as TRL runs it on the CPU (every position, its tile folding), with labelled positions only,
    and as ftcli runs it (labelled positions, chunked cross-entropy: ftcli/models/fused_head.py), alternated in this one
    process so that other processes and memory layout weigh on every arm alike."""
    import tempfile
    from itertools import islice

    import torch
    from rich.console import Console
    from trl.trainer import utils as trl_utils

    from ftcli.data.types import IGNORE_INDEX
    from ftcli.recipe.loader import load_recipe
    from ftcli.runs.rundir import RunDir
    from ftcli.training.session import TrainingSession
    from ftcli.training.trainer import RealTokenCount

    _quiet()
    recipe = load_recipe(Path(recipe_path), overrides).recipe
    session = TrainingSession(recipe, RunDir(Path(tempfile.mkdtemp(prefix="bench-head-")), "head"),
                              trust_remote_code=False, console=Console(quiet=True))
    session.prepare()
    trainer = session.make_trainer(RealTokenCount(), [])
    labelled_only, ftcli_scorer = trl_utils._use_triton, trl_utils._ChunkedLogProbFunction
    every_position, trl_scorer = labelled_only.trl_choice, ftcli_scorer.trl_function
    arms = {"trl": (every_position, trl_scorer), "labelled_only": (labelled_only, trl_scorer),
            "ftcli": (labelled_only, ftcli_scorer)}
    steps = list(islice(trainer.get_train_dataloader(), batches + 1))   # the first warms every arm up
    model = trainer.model.train()
    seconds: dict[str, list[float]] = {arm: [] for arm in arms}
    losses: dict[str, list[float]] = {arm: [] for arm in arms}
    for repeat in range(repeats):
        for arm in (list(arms) if repeat % 2 == 0 else list(arms)[::-1]):
            trl_utils._use_triton, trl_utils._ChunkedLogProbFunction = arms[arm]
            for index, batch in enumerate(steps):
                model.zero_grad(set_to_none=True)
                started = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=session.precision == "bf16"):
                    loss = trainer.compute_loss(model, dict(batch))
                loss.backward()
                if index:   # not the warm-up batch
                    seconds[arm].append(time.perf_counter() - started)
                    losses[arm].append(loss.item())
    trl_utils._use_triton, trl_utils._ChunkedLogProbFunction = arms["ftcli"]

    def over(slow: str, fast: str) -> dict:
        per_batch = [a / b for a, b in zip(seconds[slow], seconds[fast])]
        return {"median": round(statistics.median(per_batch), 4),
                "range": [round(min(per_batch), 4), round(max(per_batch), 4)]}

    labels = [batch["labels"][:, 1:] for batch in steps[1:]]
    return {"batches": batches, "repeats": repeats, "precision": session.precision,
            "labelled_share": round(sum(int((row != IGNORE_INDEX).sum()) for row in labels)
                                    / sum(row.numel() for row in labels), 4),
            "step_s_median": {arm: round(statistics.median(v), 4) for arm, v in seconds.items()},
            "trl_over_ftcli": over("trl", "ftcli"), "trl_over_labelled_only": over("trl", "labelled_only"),
            "largest_loss_difference": max(abs(a - b) for arm in ("labelled_only", "ftcli")
                                           for a, b in zip(losses[arm], losses["trl"]))}


def matmul_rates(rows: int, weights: list[tuple[int, int]], dtype_name: str, seconds: float = 0.6) -> dict:
    """GFLOP/s of this process's matmuls in `dtype_name`: each (out, in) weight applied to `rows` positions as a linear
    layer applies it (F.linear), and a 2048^3 square product; the best is the peak a training step is measured
    against."""
    import torch
    import torch.nn.functional as F

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    cases = {f"{rows}x{k}x{n}": (lambda x, w: F.linear(x, w), torch.randn(rows, k, dtype=dtype),
                                 torch.randn(n, k, dtype=dtype), 2 * rows * k * n) for n, k in weights}
    cases["2048x2048x2048"] = (torch.mm, torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype),
                               2 * 2048**3)
    rates = {}
    for label, (op, a, b, flops) in cases.items():
        for _ in range(3):   # warm-up: first calls pick kernels and touch the memory
            op(a, b)
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            op(a, b)
            done += 1
        rates[label] = round(flops * done / (time.perf_counter() - started) / 1e9, 1)
    return {"dtype": dtype_name, "threads": torch.get_num_threads(), "gflops": rates,
            "peak_gflops": max(rates.values())}


def utilization(recipe_path: str, warmup: int, steps: int, profile_steps: int, overrides: list[str],
                torch_dropout: bool = False, torch_attention: bool = False) -> dict:
    """ftcli's training steps as `ftcli train` runs them (its trainer, data and settings) on the recipe: the model
    FLOP utilization of `steps` timed steps after `warmup` ones, against this process's matmul peak in the training
    dtype measured just before, then `profile_steps` more under torch.profiler, grouped by bench/step_profile.py.
    torch_dropout: torch's own dropout modules put back in place of ftcli's CPU masks; torch_attention: PyTorch's
    SDPA in the training dtype put back in place of ftcli's fp32 attention (the comparisons' other arms)."""
    import tempfile

    import torch
    from rich.console import Console
    from transformers import TrainerCallback

    from bench.flops import batch_tokens, model_shapes, training_flops
    from bench.step_profile import CALLBACK_RANGES, breakdown, op_events
    from ftcli.data.types import IGNORE_INDEX
    from ftcli.recipe.loader import load_recipe
    from ftcli.runs.rundir import RunDir
    from ftcli.training.session import TrainingSession
    from ftcli.training.trainer import RealTokenCount

    _quiet()
    total_steps = warmup + steps + profile_steps
    recipe = load_recipe(Path(recipe_path), [*overrides, f"training.max_steps={total_steps}",
                                             "training.save_steps=1000000"]).recipe
    session = TrainingSession(recipe, RunDir(Path(tempfile.mkdtemp(prefix="bench-mfu-")), "mfu"),
                              trust_remote_code=False, console=Console(quiet=True))
    session.prepare()
    if torch_dropout:
        for module in list(session.model.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, torch.nn.Dropout) and type(child) is not torch.nn.Dropout:
                    setattr(module, name, torch.nn.Dropout(child.p).train(child.training))
    if torch_attention and session.cpu_attention:
        base = session.model.get_base_model() if hasattr(session.model, "get_base_model") else session.model
        base.set_attn_implementation("sdpa")
    trainer = session.make_trainer(RealTokenCount(), [])
    shapes = model_shapes(trainer.model)
    config = trainer.model.get_base_model().config if hasattr(trainer.model, "get_base_model") else trainer.model.config
    rank = getattr(recipe.method, "r", None)
    hidden, inner = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (getattr(config, "head_dim", None) or hidden // config.num_attention_heads)
    peak = matmul_rates(512, [(inner, hidden), (hidden, inner), (kv, hidden), (hidden, hidden)], session.precision)

    batches: list = []   # BatchTokens of every training batch, in order
    positions: list[int] = []   # and its positions, padding included
    scored = trainer.compute_loss

    def counting_loss(model, inputs, *args, **kwargs):
        if model.training:
            batches.append(batch_tokens(inputs["attention_mask"], inputs["labels"], IGNORE_INDEX))
            positions.append(inputs["attention_mask"].numel())
        return scored(model, inputs, *args, **kwargs)

    trainer.compute_loss = counting_loss
    call_event, log = trainer.callback_handler.call_event, trainer.log

    def ranged(fn, label):
        def wrapped(*args, **kwargs):
            with torch.profiler.record_function(label):
                return fn(*args, **kwargs)
        return wrapped

    trainer.callback_handler.call_event = ranged(call_event, CALLBACK_RANGES[0])
    trainer.log = ranged(log, CALLBACK_RANGES[1])
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)
    marks: dict[int, float] = {}

    class Clock(TrainerCallback):
        """Step-end times; starts the profiler after the timed steps, stops it after the profiled ones."""

        def on_step_end(self, args, state, control, **kwargs):
            marks[state.global_step] = time.perf_counter()
            if state.global_step == warmup + steps:
                profiler.start()
            elif state.global_step == total_steps:
                profiler.stop()

    trainer.add_callback(Clock())
    trainer.train()
    per_step = len(batches) // total_steps   # batches of a step (gradient accumulation)
    timed = [sum(batches[i * per_step:(i + 1) * per_step], start=type(batches[0])(0, 0, 0))
             for i in range(warmup, warmup + steps)]
    timed_s = marks[warmup + steps] - marks[warmup]
    flops = sum(training_flops(shapes, tokens) for tokens in timed)
    achieved = flops / timed_s / 1e9
    profiled_s = marks[total_steps] - marks[warmup + steps]
    parts = breakdown(op_events(profiler), profiled_s * 1e6, rank=rank, vocab_size=config.vocab_size)
    real = sum(t.real for t in timed)
    return {"method": recipe.method.kind, "precision": session.precision, "threads": torch.get_num_threads(),
            "dropout": "torch" if torch_dropout else session.cpu_dropout,
            "attention": "sdpa" if torch_attention or not session.cpu_attention else session.cpu_attention,
            "gradient_checkpointing": session.gradient_checkpointing, "steps": steps, "warmup": warmup,
            "shapes": asdict(shapes), "matmul": peak,
            "tokens": {"real": real, "labelled": sum(t.labelled for t in timed),
                       "attended_pairs": sum(t.attended_pairs for t in timed),
                       "positions": sum(positions[warmup * per_step:(warmup + steps) * per_step])},
            "flops_per_real_token": round(flops / real), "step_s": round(timed_s / steps, 4),
            "real_tokens_per_s": round(real / timed_s, 1), "achieved_gflops": round(achieved, 1),
            "mfu": round(achieved / peak["peak_gflops"], 4),
            "profile": {"steps": profile_steps, "wall_s": round(profiled_s, 4),
                        "parts_s": {part: round(us / 1e6, 4) for part, us in parts.items()}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("score")
    p.add_argument("recipe")
    p.add_argument("adapters", nargs="+")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--max-examples", type=int, default=None)
    commands.add_parser("estimate").add_argument("spec")
    p = commands.add_parser("load")
    p.add_argument("recipe")
    p.add_argument("--repeats", type=int, default=3)
    commands.add_parser("convert").add_argument("recipe")
    p = commands.add_parser("head")
    p.add_argument("recipe")
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p = commands.add_parser("utilization")
    p.add_argument("recipe")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument("--torch-dropout", action="store_true")
    p.add_argument("--torch-attention", action="store_true")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    if args.command == "score":
        result = score(args.recipe, args.adapters, args.overrides, args.max_examples)
    elif args.command == "estimate":
        result = estimate(args.spec)
    elif args.command == "load":
        result = load(args.recipe, args.repeats)
    elif args.command == "head":
        result = head(args.recipe, args.batches, args.repeats, args.overrides)
    elif args.command == "utilization":
        result = utilization(args.recipe, args.warmup, args.steps, args.profile_steps, args.overrides,
                             args.torch_dropout, args.torch_attention)
    else:
        result = convert(args.recipe)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
