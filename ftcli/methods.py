"""Recipe method -> PEFT config, and the table of what each method can do."""
# CONTRACT (owned by the models helper; replace the stubs, keep the signatures):

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodTraits:
    mergeable: bool           # merge_and_unload works (lora, dora, qlora, ia3)
    quantized_base: bool      # base loaded through bitsandbytes (qlora)
    gguf_lora: bool           # exportable as a llama.cpp LoRA adapter (lora, qlora without modules_to_save)
    virtual_tokens: bool      # prefix / prompt tuning


METHOD_TRAITS: dict[str, MethodTraits] = {}


def peft_config_for(method, model, tokenizer=None):
    """The peft config for a recipe method; UsageError (exit 2) listing the model's linear module names when a
    target_modules entry matches nothing."""
    raise NotImplementedError


def apply_method(model, recipe, tokenizer=None):
    """Wrap the loaded base model in a PeftModel for the recipe's method (kbit preparation for qlora);
    returns (peft_model, {"trainable": int, "total": int})."""
    raise NotImplementedError
