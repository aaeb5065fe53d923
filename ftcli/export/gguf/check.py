"""Read a written model GGUF back with transformers and hold it to the merged model it came from."""

from __future__ import annotations

from pathlib import Path

from ftcli.errors import QualityGateError

GGUF_HINT = "this is a bug worth reporting; export --format merged and convert with llama.cpp meanwhile"


def check_model_gguf(gguf_file: Path, reference_dir: Path, *, quant: str, chat_template: str | None,
                     console=None) -> dict:
    """Compare the GGUF (loaded by transformers, which undoes llama.cpp's q/k order) with reference_dir on the
    check conversations: next-token distributions (parity.BOUNDS["gguf_QUANT"]), tokenization and the chat template
    it carries; QualityGateError (exit 6) naming every difference. Its steps show on `console` (ftcli.progress)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftcli.models import parity
    from ftcli.progress import progress

    gguf_file = Path(gguf_file)
    bounds = parity.BOUNDS[f"gguf_{quant}"]
    with progress(console, "checking the GGUF", total=3, unit="steps", estimate=False) as bar:
        bar.describe("the merged model's logits")
        tokenizer = AutoTokenizer.from_pretrained(reference_dir)
        texts = parity.check_texts(chat_template, tokenizer)
        batch = parity.encode(tokenizer, texts)
        reference = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32, use_safetensors=True)
        reference.eval()
        expected = parity.logits(reference, batch)
        del reference
        bar.advance()
        bar.describe(f"reading {gguf_file.name} back with transformers")
        loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                      dtype=torch.float32, **_dense_weights())
        loaded.eval()
        check = parity.compare(expected, parity.logits(loaded, batch), batch["attention_mask"], bounds)
        del loaded
        bar.advance()
        bar.describe("its tokenizer and chat template")
        gguf_tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        same_tokens = all(
            gguf_tokenizer(text, add_special_tokens=False).input_ids
            == tokenizer(text, add_special_tokens=False).input_ids for text in texts
        )
        same_template = _renders_alike(gguf_tokenizer, tokenizer, chat_template)
        bar.advance()
    failures = [f"at {quant}: {failure}" for failure in check.failures(bounds)]
    if not same_tokens:
        failures.append("its tokenizer splits the check texts differently")
    if not same_template:
        failures.append("the chat template it carries renders conversations differently from the run's")
    if failures:
        raise QualityGateError(
            f"the GGUF written for the merged model does not reproduce it: {'; '.join(failures)} "
            f"({check.describe()}); nothing was left in place", hint=GGUF_HINT)
    return {"parity": check.as_dict(), "bounds": bounds.describe(), "tokenizer_identical": same_tokens,
            "chat_template_identical": same_template, "bit_exact": check.max_abs_logit_diff == 0}


def _renders_alike(gguf_tokenizer, tokenizer, chat_template: str | None) -> bool:
    """The GGUF's own chat template (what llama.cpp and Ollama apply) renders the check conversations, with and
    without a generation prompt, exactly as the run's template does (a run without one trained on plain text, and
    the GGUF keeps whatever template the base tokenizer had)."""
    from ftcli.models.parity import check_messages

    carried = getattr(gguf_tokenizer, "chat_template", None)
    if chat_template is None or carried is None:
        return chat_template is None
    for answered in (True, False):   # whole conversations, and prompts awaiting an answer
        for messages in check_messages(answered=answered):
            rendered = [t.apply_chat_template(messages, chat_template=template, tokenize=False,
                                              add_generation_prompt=not answered)
                        for t, template in ((gguf_tokenizer, carried), (tokenizer, chat_template))]
            if rendered[0] != rendered[1]:
                return False
    return True


def _dense_weights() -> dict:
    """Ask transformers for plain dequantized weights (it may keep GGUF blocks packed when kernels exist)."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}
