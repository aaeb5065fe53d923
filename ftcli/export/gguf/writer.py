"""Write a Llama-architecture Hugging Face folder as one llama.cpp GGUF file, refusing what it can't write right."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ftcli.errors import NotAvailableError, UsageError

GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0")
ARCHITECTURE = "llama"
Q8_0_BLOCK = 32  # Q8_0 quantizes rows in blocks of 32 values; other rows fall back to f16, as llama.cpp does


@dataclass(frozen=True)
class LlamaShape:
    """The hyperparameters a llama GGUF records, read from config.json and checked."""

    layers: int
    hidden: int
    feed_forward: int
    heads: int
    kv_heads: int
    head_dim: int
    context_length: int
    rope_theta: float
    rms_eps: float
    vocab_size: int
    tied_embeddings: bool


def llama_shape(model_dir: Path) -> LlamaShape:
    """The model's Llama hyperparameters; NotAvailableError naming every feature a llama GGUF can't express."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type != "llama":
        raise NotAvailableError(
            f"ftcli writes GGUF only for Llama-architecture models; this one is {config.model_type!r}",
            hint="export the merged model (--format merged) and convert it with llama.cpp's convert_hf_to_gguf.py",
        )
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    problems = []
    if rope_type != "default":  # transformers 5 folds rope_scaling into rope_parameters
        problems.append(f"rope scaling {rope_type!r} (only plain RoPE is written)")
    if theta is None:
        problems.append("no rope theta in the config")
    if config.hidden_act != "silu":
        problems.append(f"activation {config.hidden_act!r} (llama uses silu)")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("bias terms in attention or MLP layers")
    if head_dim * config.num_attention_heads != config.hidden_size:
        problems.append(f"head_dim {head_dim} x {config.num_attention_heads} heads != hidden size {config.hidden_size}")
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        problems.append(f"pretraining_tp {config.pretraining_tp}")
    if problems:
        raise NotAvailableError("ftcli can't write this model as a llama GGUF correctly: " + "; ".join(problems),
                                hint="convert the merged model with llama.cpp's convert_hf_to_gguf.py")
    return LlamaShape(
        layers=config.num_hidden_layers, hidden=config.hidden_size, feed_forward=config.intermediate_size,
        heads=config.num_attention_heads, kv_heads=config.num_key_value_heads or config.num_attention_heads,
        head_dim=head_dim, context_length=config.max_position_embeddings, rope_theta=float(theta),
        rms_eps=float(config.rms_norm_eps), vocab_size=config.vocab_size,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
    )


def permute_rows(weights, heads: int):
    """Reorder q_proj / k_proj output rows the way llama.cpp expects: per head, the two rotary halves (HF's
    rotate_half layout) interleaved into pairs. Use the number of KV heads for k_proj."""
    rows = weights.shape[0]
    return (weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def unpermute_rows(weights, heads: int):
    """The inverse of permute_rows."""
    rows = weights.shape[0]
    return (weights.reshape(heads, rows // heads // 2, 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def gguf_name(hf_name: str, layers: int) -> str | None:
    """llama.cpp's tensor name for a Hugging Face parameter name (token_embd, blk.N.attn_q, ...), from gguf's map."""
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers).get_name(hf_name, try_suffixes=(".weight",))


def expected_names(shape: LlamaShape) -> set[str]:
    per_layer = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                 "ffn_down")
    names = {f"blk.{i}.{part}.weight" for i in range(shape.layers) for part in per_layer}
    names |= {"token_embd.weight", "output_norm.weight"}
    if not shape.tied_embeddings:
        names.add("output.weight")
    return names


def rows_permutation(name: str, shape: LlamaShape) -> int | None:
    """Heads to permute by for attn_q / attn_k tensors, None for the rest."""
    if ".attn_q." in name:
        return shape.heads
    if ".attn_k." in name:
        return shape.kv_heads
    return None


def tensor_type(array, quant: str):
    """1-D tensors (norms) stay f32; 2-D ones take the requested type (q8_0 only where rows split in blocks)."""
    import gguf

    types = gguf.GGMLQuantizationType
    if array.ndim == 1 or quant == "f32":
        return types.F32
    if quant == "q8_0":
        return types.Q8_0 if array.shape[-1] % Q8_0_BLOCK == 0 else types.F16
    return {"f16": types.F16, "bf16": types.BF16}[quant]


def add_tensor(writer, name: str, array, quant: str) -> str:
    """Encode one float32 array at its type and queue it; returns the type's name."""
    import gguf

    qtype = tensor_type(array, quant)
    data = gguf.quants.quantize(array, qtype)
    writer.add_tensor(name, data, raw_dtype=qtype if qtype not in (gguf.GGMLQuantizationType.F32,
                                                                  gguf.GGMLQuantizationType.F16) else None)
    return qtype.name


def file_type(quant: str) -> int:
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]


def check_quant(quant: str) -> str:
    if quant not in GGUF_QUANTS:
        raise UsageError(f"--quant {quant!r} is not one of {', '.join(GGUF_QUANTS)}")
    return quant


def load_float_tensors(model_dir: Path) -> dict:
    """Every tensor of the folder's safetensors files as float32 numpy arrays."""
    from safetensors import safe_open

    tensors = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key).float().numpy()
    return tensors


def add_hyperparameters(writer, shape: LlamaShape) -> None:
    writer.add_context_length(shape.context_length)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.feed_forward)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_vocab_size(shape.vocab_size)


def write_model_gguf(model_dir: Path, out_file: Path, *, quant: str, chat_template: str | None, name: str,
                     _permute_qk: bool = True, console=None) -> dict:
    """Write model_dir (a merged Llama folder) as one GGUF file; returns what was written. The tensors encoded show
    on `console` (ftcli.progress).

    _permute_qk=False writes q/k without llama.cpp's row order: a deliberately broken file for tests of the check.
    """
    import gguf

    from ftcli.export.gguf.vocab import add_tokenizer
    from ftcli.progress import progress

    check_quant(quant)
    shape = llama_shape(model_dir)
    tensors = load_float_tensors(model_dir)
    if shape.tied_embeddings:
        tensors.pop("lm_head.weight", None)
    named = {}
    for hf_name, array in tensors.items():
        target = gguf_name(hf_name, shape.layers)
        if target is None:
            raise NotAvailableError(f"ftcli can't place tensor {hf_name!r} in a llama GGUF",
                                    hint="convert the merged model with llama.cpp's convert_hf_to_gguf.py")
        named[target] = array
    missing, extra = expected_names(shape) - set(named), set(named) - expected_names(shape)
    if missing or extra:
        raise NotAvailableError(f"the model's tensors don't match a llama GGUF (missing: {sorted(missing)[:4]}, "
                                f"unexpected: {sorted(extra)[:4]})")
    if named["token_embd.weight"].shape[0] != shape.vocab_size:
        raise NotAvailableError(f"the embedding has {named['token_embd.weight'].shape[0]} rows but the config "
                                f"says vocab_size {shape.vocab_size}")

    writer = gguf.GGUFWriter(path=None, arch=ARCHITECTURE)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    add_hyperparameters(writer, shape)
    writer.add_file_type(file_type(quant))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab = add_tokenizer(writer, model_dir, vocab_size=shape.vocab_size, chat_template=chat_template)
    types: dict[str, int] = {}
    with progress(console, f"writing the GGUF ({quant})", total=len(named), unit="tensors") as bar:
        for target in sorted(named, key=_tensor_order):
            array = named[target]
            heads = rows_permutation(target, shape)
            if heads is not None and _permute_qk:
                array = permute_rows(array, heads)
            kind = add_tensor(writer, target, array, quant)
            types[kind] = types.get(kind, 0) + 1
            bar.advance()
        bar.describe(f"writing {Path(out_file).name}")
        out_file = finish_gguf(writer, out_file)
    return {"file": out_file.name, "bytes": out_file.stat().st_size, "quant": quant, "tensor_types": types,
            "architecture": ARCHITECTURE, "tied_embeddings": shape.tied_embeddings, "heads": shape.heads,
            "kv_heads": shape.kv_heads, "rope_theta": shape.rope_theta, **vocab}


def _tensor_order(name: str) -> tuple:
    """llama.cpp's order: token_embd, then blocks by number, then output_norm, output."""
    if name.startswith("blk."):
        return (1, int(name.split(".")[1]), name)
    return (0 if name.startswith("token_embd") else 2, 0, name)


def finish_gguf(writer, out_file) -> Path:
    """Write header, metadata and tensors of a filled GGUFWriter to `out_file` and close it."""
    out_file = Path(out_file)
    writer.write_header_to_file(path=out_file)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_file
