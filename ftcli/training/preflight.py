"""`ftcli train --dry-run`: check data, template and model settings and estimate memory, training nothing."""

from __future__ import annotations

from ftcli.training.knobs import knob_rows, knob_summary
from ftcli.training.memory_estimate import estimate_peak_memory, largest_sum

__all__ = ["run_preflight", "render_preflight", "estimate_peak_memory"]
SAMPLE_COUNT = 3
SAMPLE_CHARS = 1200


def _load_tokenizer(recipe, trust_remote_code: bool):
    from ftcli.models.load import load_tokenizer

    return load_tokenizer(recipe.model, trust_remote_code=trust_remote_code)


def run_preflight(recipe, *, trust_remote_code: bool = False, console=None) -> dict:
    """Load tokenizer and data, never a run dir; return the report (JSON-serialisable). The data preparation's
    progress shows on `console` (stderr)."""
    from ftcli.data.pipeline import first_conversations, prepare_data
    from ftcli.models import load as models

    # The first records first: a file that is broken from its start is reported before any model is loaded.
    conversations = first_conversations(recipe.data, SAMPLE_COUNT)
    tokenizer = _load_tokenizer(recipe, trust_remote_code)
    resolved = models.resolve_model(recipe.model, trust_remote_code=trust_remote_code)
    device = models.resolve_device(recipe.model.device)
    prepared = prepare_data(recipe, tokenizer, console=console)
    train = prepared.train_report
    samples = _samples(conversations, recipe, tokenizer, prepared.chat_template)
    model_config = _model_config(resolved.local_dir, trust_remote_code)
    parameters = count_parameters(recipe, model_config, tokenizer)
    longest = train.length_stats.get("max")
    memory = estimate_peak_memory(recipe, model_config, device, trainable_parameters=parameters["trainable"],
                                  labelled_tokens=_labelled_tokens_per_batch(prepared, recipe.training.batch_size),
                                  longest_example=int(longest) if longest is not None else None)
    return {
        "recipe": recipe.name,
        "model": {"reference": resolved.reference, "kind": resolved.kind, "local_dir": str(resolved.local_dir),
                  "model_type": getattr(model_config, "model_type", None)},
        "method": recipe.method.kind,
        "device": device,
        "chat_template": prepared.chat_template,
        "data": {
            "format": recipe.data.format,
            "formats": sorted(recipe.data.formats),
            "streaming": recipe.data.streaming,
            "sources": train.sources,
            "max_length": recipe.data.max_length,
            "train_on": recipe.data.train_on,
            "packing": recipe.data.packing,
            "train": train.to_dict(),
            "eval": prepared.eval_report.to_dict() if prepared.eval_report else None,
            "trained_token_ratio": round(train.trained_tokens / train.total_tokens, 4) if train.total_tokens else 0.0,
            "packing_efficiency": train.packing_efficiency,
        },
        "samples": samples,
        "parameters": parameters,
        "memory": memory,
        "knobs": knob_summary(recipe),   # ftcli/training/knobs.py
        "warnings": _warnings(recipe, tokenizer, prepared),
    }


def _labelled_tokens_per_batch(prepared, batch_size: int) -> int | None:
    """From the prepared rows' trained-token counts (a column read without Python objects); None when streaming."""
    if "trained" not in (getattr(prepared.train, "column_names", None) or []):
        return None
    return largest_sum(prepared.train.data.column("trained").to_numpy(), batch_size)


def _model_config(local_dir, trust_remote_code: bool):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(local_dir, trust_remote_code=bool(trust_remote_code))


def count_parameters(recipe, model_config, tokenizer=None) -> dict:
    """Trainable and total parameters of the recipe's PEFT model, built on the meta device (no weights loaded);
    remembered in the cache folder by model config, method and vocabulary size, so that a second dry run of a recipe
    does not import peft."""
    import hashlib
    import json

    from ftcli.atomic import atomic_write_json
    from ftcli.paths import cache_dir

    multipliers = dict(recipe.training.lr_multipliers)   # checked against the model too (in the key when given)
    key = hashlib.sha256(json.dumps([model_config.to_json_string(use_diff=False), recipe.method.model_dump(mode="json"),
                                     len(tokenizer) if tokenizer is not None else None,
                                     *([multipliers] if multipliers else [])]).encode()).hexdigest()[:32]
    remembered = cache_dir() / "parameters" / f"{key}.json"
    try:
        return json.loads(remembered.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    counts = _count_parameters(recipe, model_config, tokenizer)
    try:
        atomic_write_json(remembered, counts)
    except OSError:   # a read-only cache only costs the count next time
        pass
    return counts


def _count_parameters(recipe, model_config, tokenizer) -> dict:
    import warnings

    from ftcli.models.quiet import quiet_libraries

    quiet_libraries()
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from ftcli.models.methods import check_lr_multiplier_names, peft_config_for

    method = recipe.method
    if getattr(method, "init_text", None):   # initialising from text needs real embeddings; the count is the same
        method = method.model_copy(update={"init_text": None})
    # The meta device, not accelerate's init_empty_weights: under the latter, tied embeddings stay untied and the
    # total counts the LM head twice.
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # peft calls a deprecated transformers helper
        model = AutoModelForCausalLM.from_config(model_config)
        config = peft_config_for(method, model, tokenizer)
        check_lr_multiplier_names(recipe.training.lr_multipliers, model)
        peft_model = get_peft_model(model, config)
    if recipe.training.lr_multipliers:
        from ftcli.training.optimizer import check_multipliers_apply

        check_multipliers_apply(peft_model, recipe.training.lr_multipliers, method.kind)
    trainable, total = peft_model.get_nb_trainable_parameters()
    return {"trainable": int(trainable), "total": int(total),
            "trainable_percent": round(100 * trainable / total, 4) if total else 0.0}


def _samples(conversations, recipe, tokenizer, chat_template) -> list[dict]:
    """The first examples as text segments marked trained or not, exactly as tokenized for training (a preference
    pair: the prompt, then the chosen answer as trained, and the rejected answer beside it; an unpaired answer with
    its label)."""
    from ftcli.data.tokenize import tokenize_examples, tokenize_preference_chunk
    from ftcli.data.types import IGNORE_INDEX, DataReport

    samples = []
    if recipe.objective.kind == "grpo":
        return _prompt_samples(conversations, recipe, tokenizer, chat_template)
    for conversation in conversations:
        if conversation.answers:
            [example], _ = tokenize_preference_chunk([conversation], recipe.data, tokenizer, chat_template)
            answer = example.answer_ids[0]
            sample = {
                "origin": conversation.origin,
                "tokens": len(example.prompt_ids) + max(len(ids) for ids in example.answer_ids),
                "prompt_tokens": len(example.prompt_ids),
                "trained_tokens": min(len(ids) for ids in example.answer_ids),
                "truncated": example.full_length > recipe.data.max_length,
                "segments": [{"trained": False, "text": tokenizer.decode(example.prompt_ids)},
                             {"trained": True, "text": tokenizer.decode(answer)}],
            }
            if len(example.answer_ids) == 2:
                sample.update(chosen_tokens=len(answer), rejected_tokens=len(example.answer_ids[1]),
                              rejected=tokenizer.decode(example.answer_ids[1]))
            else:
                sample.update(completion_tokens=len(answer),
                              label="desirable" if conversation.chosen is not None else "undesirable")
            samples.append(sample)
            continue
        config = recipe.data.model_copy(update={"format": "text" if conversation.messages is None else "chat"})
        [example] = tokenize_examples([conversation], config, tokenizer, chat_template, DataReport())
        segments: list[dict] = []
        for token, label in zip(example.input_ids, example.labels):
            trained = label != IGNORE_INDEX
            if segments and segments[-1]["trained"] == trained:
                segments[-1]["ids"].append(token)
            else:
                segments.append({"trained": trained, "ids": [token]})
        samples.append({
            "origin": conversation.origin,
            "tokens": len(example.input_ids),
            "trained_tokens": sum(1 for label in example.labels if label != IGNORE_INDEX),
            "truncated": example.full_length > recipe.data.max_length,
            "segments": [{"trained": s["trained"], "text": tokenizer.decode(s["ids"])} for s in segments],
        })
    return samples


def _prompt_samples(conversations, recipe, tokenizer, chat_template) -> list[dict]:
    """GRPO's first prompts as the policy is given them (nothing in them is trained) and their reference answers."""
    from ftcli.data.prompts import prompt_limit
    from ftcli.data.templates import split_for_generation

    samples = []
    for conversation in conversations:
        prompt, reference = split_for_generation(conversation, tokenizer, chat_template)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        kept = ids[-prompt_limit(recipe):]
        samples.append({"origin": conversation.origin, "tokens": len(kept), "prompt_tokens": len(kept),
                        "trained_tokens": 0, "truncated": len(kept) < len(ids),
                        "segments": [{"trained": False, "text": tokenizer.decode(kept)}], "reference": reference})
    return samples


def _warnings(recipe, tokenizer, prepared) -> list[str]:
    from ftcli.data.templates import render

    warnings = []
    template = prepared.chat_template
    if template is not None:
        probe = render([{"role": "user", "content": "ping"}], tokenizer, template)
        if "system" in probe.lower():
            warnings.append("the chat template inserts a default system prompt into every example without one"
                            + (" (and data.train_on: all trains on it)" if recipe.data.train_on == "all" else ""))
    report = prepared.train_report
    if report.truncated:
        warnings.append(f"{report.truncated} of {report.examples} training examples are longer than "
                        f"data.max_length {recipe.data.max_length} and were truncated")
    if report.dropped:
        warnings.append(f"{report.dropped} training examples have no trainable token left after truncation "
                        "and were dropped")
    if report.prefix_mismatches:
        warnings.append(f"{report.prefix_mismatches} turn boundaries merged into one token with their neighbour "
                        "and were located by character offsets")
    balance = kto_balance_warning(recipe, prepared.train)
    if balance:
        warnings.append(balance)
    return warnings


def kto_balance_warning(recipe, train) -> str | None:
    """KTO's paper keeps desirable_weight x desirable answers / (undesirable_weight x undesirable answers) between 1
    and 4/3; outside that range, say which weight to set (unpaired data only: pairs are balanced)."""
    if recipe.objective.kind != "kto" or "label" not in (getattr(train, "column_names", None) or []):
        return None
    labels = train.data.column("label").to_numpy(zero_copy_only=False)
    desirable, undesirable = int(labels.sum()), int(len(labels) - labels.sum())
    objective = recipe.objective
    if not desirable or not undesirable:
        side = "undesirable" if not undesirable else "desirable"
        return f"objective kto: the training data has no {side} answer (label {str(side == 'desirable').lower()})"
    weighted = objective.desirable_weight * desirable / (objective.undesirable_weight * undesirable)
    if 1 <= weighted <= 4 / 3:
        return None
    low = objective.undesirable_weight * undesirable / desirable
    return (f"objective kto: {desirable} desirable and {undesirable} undesirable answers weigh "
            f"{weighted:.2f} to 1 (the KTO paper keeps 1 to 1.33): set desirable_weight between {low:.2f} and "
            f"{low * 4 / 3:.2f}")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def render_preflight(report: dict, console) -> None:
    from rich.table import Table
    from rich.text import Text

    console.print(Text(f"preflight: {report['recipe'] or 'recipe'} ({report['method']} on "
                       f"{report['model']['reference']}, {report['device']}); nothing was trained", style="bold"))
    for sample in report["samples"]:
        label = f", labelled {sample['label']}" if "label" in sample else ""
        console.print(Text(f"\n{sample['origin']}: {sample['tokens']} tokens, {sample['trained_tokens']} trained"
                           f"{', truncated' if sample['truncated'] else ''}{label} (trained tokens in green)",
                           style="dim"))
        text = Text()
        remaining = SAMPLE_CHARS
        for segment in sample["segments"]:
            piece = segment["text"][:remaining]
            text.append(piece, style="bold green" if segment["trained"] else "")
            remaining -= len(piece)
        console.print(text)
        if "rejected" in sample:
            console.print(Text(f"rejected ({sample['rejected_tokens']} tokens): ", style="dim")
                          + Text(sample["rejected"][:SAMPLE_CHARS], style="red"))
        if "reference" in sample:   # grpo: what the rewards check the sampled answers against
            console.print(Text("reference: ", style="dim") + Text(sample["reference"][:SAMPLE_CHARS], style="green"))
    data = report["data"]
    train = data["train"]
    if data.get("streaming"):
        console.print(Text("data: streaming; records are validated and counted as training reads them",
                           style="bold"))
    if len(data.get("sources") or []) > 1:
        shares = Table("source", "format", "records", "used", "share of examples", "share of tokens", title="mix")
        for source in data["sources"]:
            shares.add_row(source["source"], source["format"], f"{source['records']:,}", f"{source['used']:,}",
                           f"{source['share_examples']:.1%}", f"{source['share_tokens']:.1%}")
        console.print(shares)
    table = Table(title="data", show_header=False)
    stats = train["length_stats"]
    table.add_row("examples (train)", str(train["examples"]))
    if data["eval"]:
        table.add_row("examples (eval)", str(data["eval"]["examples"]))
    table.add_row("token length min/p50/p90/p99/max",
                  " / ".join(str(int(stats.get(k, 0))) for k in ("min", "p50", "p90", "p99", "max")))
    table.add_row(f"truncated (> {data['max_length']})", str(train["truncated"]))
    table.add_row("dropped (nothing to train)", str(train["dropped"]))
    table.add_row("trained-token ratio", f"{data['trained_token_ratio']:.1%} ({data['train_on']})")
    table.add_row("packing efficiency", f"{data['packing_efficiency']:.1%}" if data["packing_efficiency"] else "off")
    console.print(table)
    params = report["parameters"]
    memory = report["memory"]
    table = Table(title="model", show_header=False)
    table.add_row("trainable parameters", f"{params['trainable']:,} of {params['total']:,} "
                                          f"({params['trainable_percent']}%)")
    table.add_row("precision (resolved)", f"{memory['precision']}, weights {memory['dtype']}, gradient "
                                          f"checkpointing {'on' if memory['gradient_checkpointing'] else 'off'}")
    for part, value in memory["parts"].items():
        table.add_row(f"memory: {part}", _size(value))
    table.add_row("estimated peak memory", _size(memory["total_bytes"]))
    if memory.get("available_bytes"):
        table.add_row(f"available on {report['device']}", _size(memory["available_bytes"]))
    console.print(table)
    knobs = Table(title="method and optimisation knobs", show_header=False)
    for name, value in knob_rows(report["knobs"]):
        knobs.add_row(name, value)
    console.print(knobs)
    for warning in report["warnings"]:
        console.print(Text(f"warning: {warning}", style="yellow"))
