"""Estimate the peak memory of a training recipe from the model config alone (no weights loaded)."""

from __future__ import annotations

from ftcli.data.types import IGNORE_INDEX
from ftcli.models.load import DTYPE_BYTES
from ftcli.recipe.schema import PREFERENCE_OBJECTIVES

NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 / 4 + 4 / (64 * 256)   # 4-bit codes + 8-bit absmax per 64 + fp32 per 256 blocks
INT8_BYTES_PER_WEIGHT = 1.0 + 4 / 4096                    # row-wise scales
ADAMW_BYTES_PER_TRAINABLE = 4 + 4 + 8                      # fp32 master weight, gradient, two moments
# TRL's fused LM head scores the labelled positions only (on GPUs with Triton; ftcli/models/fused_head.py on the CPU).
# On GPUs in tiles of at most this many positions by this many vocabulary entries, about LOGIT_TILE_COPIES fp32 copies
# of a tile alive at once; on the CPU ftcli scores chunks of ftcli.models.fused_head.CPU_CHUNK_LOGITS logits over the
# whole vocabulary, whose short-lived copies add about CPU_LOGIT_COPIES fp32 chunks to the process's peak (fitted to
# the peak RSS measured on the CPU at lengths 128 and 256, bench/RESULTS.md: they overlap the activations'
# peak in part).
LOGIT_TILE_TOKENS = 4096
LOGIT_TILE_VOCAB = 32768
LOGIT_TILE_COPIES = 6
CPU_LOGIT_COPIES = 1.5
FRAMEWORK_OVERHEAD = {"cpu": 700 * 2**20, "cuda": 1000 * 2**20}   # torch + libraries (RSS) / CUDA context
# bitsandbytes' 4/8-bit layers on the CPU compute in bf16 whatever the compute dtype, so autograd keeps
# less per token than for the same LoRA on fp32 layers: measured 0.80-0.86 of it at lengths 96 to 320.
QUANTIZED_CPU_ACTIVATION_FACTOR = 0.82
# bf16 autocast of fp32 weights on the CPU: matmul outputs are kept in bf16, norms, residuals and softmax inputs in
# fp32; measured 0.70 of the fp32 activations at lengths 96 to 320 (LoRA), plus a bf16 copy of the linear weights.
CPU_AUTOCAST_ACTIVATION_FACTOR = 0.70


def _text_config(model_config):
    getter = getattr(model_config, "get_text_config", None)
    return getter() if getter else model_config


def _dims(model_config) -> dict[str, int]:
    c = _text_config(model_config)
    hidden = c.hidden_size
    heads = getattr(c, "num_attention_heads", 1)
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    return {
        "hidden": hidden,
        "intermediate": getattr(c, "intermediate_size", None) or 4 * hidden,
        "layers": c.num_hidden_layers,
        "heads": heads,
        "kv_dim": (getattr(c, "num_key_value_heads", None) or heads) * head_dim,
        "q_dim": heads * head_dim,
        "vocab": c.vocab_size,
        "tied": bool(getattr(c, "tie_word_embeddings", getattr(model_config, "tie_word_embeddings", False))),
    }


def base_parameter_counts(model_config) -> tuple[int, int]:
    """(weights in the decoder layers' linear modules, all other weights) for a Llama-like decoder."""
    d = _dims(model_config)
    h = d["hidden"]
    attention = h * d["q_dim"] * 2 + h * d["kv_dim"] * 2
    mlp = 3 * h * d["intermediate"]
    linear = d["layers"] * (attention + mlp)
    other = d["vocab"] * h * (1 if d["tied"] else 2) + d["layers"] * 2 * h + h
    return linear, other


def _available_bytes(device: str) -> int | None:
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info()
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def labelled_tokens_per_batch(label_rows, batch_size: int) -> int:
    """The most labelled positions one batch can hold: those of the batch_size rows that have the most."""
    return largest_sum([sum(1 for label in labels if label != IGNORE_INDEX) for labels in label_rows], batch_size)


def largest_sum(counts, how_many: int) -> int:
    """The sum of the `how_many` largest of `counts` (a sequence or numpy array)."""
    import numpy as np

    counts = np.asarray(counts, dtype=np.int64)
    if len(counts) <= how_many:
        return int(counts.sum())
    return int(np.partition(counts, len(counts) - how_many)[-how_many:].sum())


def padded_length(recipe, longest_example: int | None) -> int:
    """The width of the widest batch: max_length for packed rows or unknown data, else the longest example (a
    batch pads to its longest sequence) up to max_length."""
    if recipe.data.packing or longest_example is None:
        return recipe.data.max_length
    if recipe.objective.kind == "grpo":   # a prompt and the longest completion it may sample
        return min(recipe.data.max_length, longest_example + recipe.objective.max_completion_length)
    return max(1, min(recipe.data.max_length, longest_example))


def estimate_peak_memory(recipe, model_config, device: str, *, trainable_parameters: int | None = None,
                         labelled_tokens: int | None = None, longest_example: int | None = None) -> dict:
    """Estimated peak bytes (total and by part: weights, adapter+optimizer, activations, logits).

    A deliberately simple model, accurate to tens of percent: the weights at their dtype (4/8-bit linear layers for
    qlora); AdamW on the trainable parameters; per layer and token the tensors autograd keeps (about 6 hidden- and
    3 intermediate-sized vectors; only the layer input with gradient checkpointing, plus one layer recomputed);
    TRL's fused LM head, tiled over the labelled positions (`labelled_tokens` per batch, from the data; every
    position when not given); plus a fixed framework overhead. Batches are as wide as the longest example
    (`longest_example` tokens, from the data) or data.max_length when not given.
    """
    from ftcli.models.load import resolve_dtype, resolve_precision
    from ftcli.models.methods import gradient_checkpointing_enabled

    d = _dims(model_config)
    device_kind = "cuda" if device.startswith("cuda") else "cpu"
    dtype = resolve_dtype(recipe.model.dtype, device)
    precision = resolve_precision(recipe.training.precision, device)
    checkpointing = gradient_checkpointing_enabled(recipe.training.gradient_checkpointing, device)
    trainable = trainable_parameters if trainable_parameters is not None else _guess_trainable(recipe, d)
    sequences = sequences_per_example(recipe)
    length = padded_length(recipe, longest_example)
    tokens = recipe.training.batch_size * length * sequences
    # (a pair's trained figure counts its shorter answer once: about half its scored positions)
    scored = tokens if labelled_tokens is None else min(tokens, labelled_tokens * sequences)

    weights, checkpoint_pages = _weight_bytes(recipe, model_config, dtype, device_kind)
    activations, autocast_weight_copies = _activation_bytes(recipe, model_config, length, dtype=dtype,
                                                            precision=precision, device_kind=device_kind,
                                                            checkpointing=checkpointing)
    parts = {
        "weights": int(weights),
        "adapter_and_optimizer": int(trainable * ADAMW_BYTES_PER_TRAINABLE),
        "activations": int(activations),
        "logits": int(tokens * d["vocab"] * 4 * 2 if _full_logits(recipe)
                      else _logit_bytes(scored, d["vocab"], device_kind)),
        "framework": FRAMEWORK_OVERHEAD[device_kind],
    }
    if checkpoint_pages:
        parts["checkpoint_pages"] = int(checkpoint_pages)
    if autocast_weight_copies:
        parts["autocast_weight_copies"] = int(autocast_weight_copies)
    total = sum(parts.values())
    available = _available_bytes(device)
    return {
        "device": device,
        "dtype": dtype,
        "precision": precision,
        "gradient_checkpointing": checkpointing,
        "tokens_per_batch": tokens,
        "labelled_tokens_per_batch": scored,
        "parts": parts,
        "total_bytes": int(total),
        "available_bytes": available,
        "fits": None if available is None else total <= available,
    }


def _weight_bytes(recipe, model_config, dtype: str, device_kind: str) -> tuple[float, int]:
    """(the base weights as loaded, the checkpoint file's pages a CPU quantization leaves mapped)."""
    linear, other = base_parameter_counts(model_config)
    quantization = recipe.effective_quantization
    if quantization is None:
        return (linear + other) * DTYPE_BYTES[dtype], 0
    per_weight = NF4_BYTES_PER_WEIGHT if quantization.bits == 4 else INT8_BYTES_PER_WEIGHT
    weights = linear * per_weight + other * DTYPE_BYTES[dtype]
    # Quantizing on the CPU reads every page of the checkpoint file; they stay mapped and count in the process's
    # RSS (measured: 502 MiB of file pages after loading SmolLM2's 513 MiB fp32 checkpoint in 4 bits).
    pages = (linear + other) * _checkpoint_bytes_per_weight(model_config) if device_kind == "cpu" else 0
    return weights, pages


def sequences_per_example(recipe) -> int:
    """Sequences whose activations one example keeps for the backward pass: two for a preference pair (prompt +
    chosen, prompt + rejected), one otherwise (the reference and KTO's KL passes keep none)."""
    if recipe.objective.kind in PREFERENCE_OBJECTIVES and "preference" in recipe.data.formats:
        return 2
    return 1


def _full_logits(recipe) -> bool:
    """TRL's ORPO and CPO (SimPO) trainers score every position of both answers through full fp32 logits and their
    log-softmax; the other objectives go through the fused LM head."""
    return recipe.objective.kind in ("orpo", "simpo")


def _activation_bytes(recipe, model_config, length: int, *, dtype: str, precision: str, device_kind: str,
                      checkpointing: bool) -> tuple[float, int]:
    """(what autograd keeps for the backward pass, the bf16 copies of the linear weights CPU autocast makes)."""
    d = _dims(model_config)
    weight_bytes = DTYPE_BYTES[dtype]
    half = precision in ("bf16", "fp16") or weight_bytes == 2
    cpu_autocast = device_kind == "cpu" and half and weight_bytes == 4
    act_bytes = 2 if half and not cpu_autocast else 4
    tokens = recipe.training.batch_size * length * sequences_per_example(recipe)
    # What autograd keeps per layer and token: norms (with their fp32 upcasts), q/k/v/o and residual inputs (about
    # 10 hidden-sized vectors) and gate, up, activation, product and down input (5 intermediate-sized ones).
    # bench/RESULTS.md measured these against peak RSS on the CPU (within 15% for lora/qlora at lengths 128 and 256).
    per_token_layer = act_bytes * (10 * d["hidden"] + 5 * d["intermediate"])
    if recipe.model.attn_implementation == "eager" or device_kind == "cpu":
        # Scores and probabilities materialised per head (eager, and sdpa's math kernel on the CPU).
        per_token_layer += act_bytes * 2 * d["heads"] * length
    per_token_layer += act_bytes * d["hidden"] * _adapted_modules_per_layer(recipe.method)  # LoRA inputs kept
    if checkpointing:
        activations = tokens * (d["layers"] * act_bytes * d["hidden"] + per_token_layer)
    else:
        activations = tokens * d["layers"] * per_token_layer
    if recipe.effective_quantization is not None and device_kind == "cpu":
        return activations * QUANTIZED_CPU_ACTIVATION_FACTOR, 0  # whatever the precision: bitsandbytes computes in bf16
    if cpu_autocast:
        linear, _ = base_parameter_counts(model_config)
        return activations * CPU_AUTOCAST_ACTIVATION_FACTOR, linear * 2
    return activations, 0


def _logit_bytes(scored: int, vocab: int, device_kind: str) -> int:
    """TRL's fused LM head: fp32 logits of the scored positions, in tiles on GPUs and chunks on the CPU."""
    if device_kind == "cpu":
        from ftcli.models.fused_head import cpu_chunk_positions

        return int(min(scored, cpu_chunk_positions(vocab)) * vocab * 4 * CPU_LOGIT_COPIES)
    return min(scored, LOGIT_TILE_TOKENS) * min(vocab, LOGIT_TILE_VOCAB) * 4 * LOGIT_TILE_COPIES


def _checkpoint_bytes_per_weight(model_config) -> int:
    """Bytes per weight in the checkpoint file, from the config's recorded dtype (fp32 when it says nothing)."""
    dtype = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
    return DTYPE_BYTES.get(str(dtype).removeprefix("torch."), 4)


def _adapted_modules_per_layer(method) -> int:
    """Modules per layer whose input LoRA keeps for its backward pass (every linear one for all-linear)."""
    if not hasattr(method, "r"):
        return 0
    targets = method.target_modules
    return 7 if targets == "all-linear" else len(targets)


def _guess_trainable(recipe, d: dict) -> int:
    """Trainable parameters without building the model: LoRA on every linear module, else the virtual tokens."""
    method = recipe.method
    if hasattr(method, "r"):
        h, i = d["hidden"], d["intermediate"]
        shapes = [(h, d["q_dim"]), (h, d["kv_dim"]), (h, d["kv_dim"]), (d["q_dim"], h), (h, i), (h, i), (i, h)]
        return d["layers"] * sum(method.r * (a + b) for a, b in shapes)
    if hasattr(method, "num_virtual_tokens"):
        return method.num_virtual_tokens * d["hidden"] * (2 * d["layers"] if method.kind == "prefix" else 1)
    return d["layers"] * (2 * d["kv_dim"] + d["intermediate"])   # ia3

