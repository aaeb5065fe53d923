"""Read a written model GGUF back with transformers and hold it to the merged model it came from."""

from __future__ import annotations

from pathlib import Path

from ftcli.errors import QualityGateError

# f32 holds the very same numbers, so its logits must match (up to nothing but float noise); f16 must keep every
# greedy next token. bf16 and q8_0 round harder: measured on SmolLM2-135M over the check conversations, bf16 kept
# 99.4% of next tokens (max |dlogit| 0.26) and q8_0 97.2% (1.3); a file with a real defect falls far lower (a
# missing q/k permutation: 21-24%).
MAX_F32_LOGIT_DIFF = 1e-5
MIN_AGREEMENT = {"f32": 1.0, "f16": 1.0, "bf16": 0.90, "q8_0": 0.90}


def check_model_gguf(gguf_file: Path, reference_dir: Path, *, quant: str, chat_template: str | None) -> dict:
    """Compare the GGUF (loaded by transformers, which undoes llama.cpp's q/k order) with reference_dir on the
    check conversations, and its tokenizer with the reference tokenizer; QualityGateError when they differ."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftcli import parity

    gguf_file = Path(gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(reference_dir)
    texts = parity.check_texts(chat_template, tokenizer)
    batch = parity.encode(tokenizer, texts)
    reference = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32, use_safetensors=True)
    reference.eval()
    expected = parity.logits(reference, batch)
    del reference
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32,
                                                  **_dense_weights())
    loaded.eval()
    check = parity.compare(expected, parity.logits(loaded, batch), batch["attention_mask"])
    del loaded

    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    same_tokens = all(
        gguf_tokenizer(text, add_special_tokens=False).input_ids == tokenizer(text, add_special_tokens=False).input_ids
        for text in texts
    )
    failures = []
    if check.next_token_agreement < MIN_AGREEMENT[quant]:
        failures.append(f"next-token agreement {100 * check.next_token_agreement:.1f}% "
                        f"(at least {100 * MIN_AGREEMENT[quant]:.0f}% required at {quant})")
    if quant == "f32" and check.max_abs_logit_diff > MAX_F32_LOGIT_DIFF:
        failures.append(f"max |logit difference| {check.max_abs_logit_diff:.3g} at f32, which should be exact")
    if not same_tokens:
        failures.append("its tokenizer splits the check texts differently")
    if failures:
        raise QualityGateError(
            f"the GGUF written for the merged model does not reproduce it: {'; '.join(failures)} "
            f"({check.describe()}); nothing was left in place",
            hint="this is a bug worth reporting; export --format merged and convert with llama.cpp meanwhile",
        )
    return {"parity": check.as_dict(), "tokenizer_identical": same_tokens, "bit_exact": check.max_abs_logit_diff == 0}


def _dense_weights() -> dict:
    """Ask transformers for plain dequantized weights (it may keep GGUF blocks packed when kernels exist)."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}
