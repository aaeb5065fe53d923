"""Attention in fp32 for models training in bf16 autocast on the CPU: torch's CPU attention kernels took about three
times as long in bf16 as in fp32 at a LoRA step's shapes (bench/utilization/RESULTS.md), while the matmuls around
them gain from bf16. Registered as a transformers attention implementation of its own, so only the models given it
use it."""

from __future__ import annotations

from functools import cache

ATTENTION_NAME = "ftcli_cpu_sdpa_fp32"


@cache
def _register() -> None:
    import torch
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def fp32_sdpa(module, query, key, value, attention_mask, *args, **kwargs):
        # Under autocast SDPA computes in bf16 whatever its inputs' dtype (rotary embeddings leave them fp32).
        if query.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
            return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.float()
        with torch.autocast("cpu", enabled=False):
            return sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                          *args, **kwargs)

    AttentionInterface.register(ATTENTION_NAME, fp32_sdpa)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)   # the masks sdpa gets


def use_fp32_cpu_attention(model) -> bool:
    """Give `model` (plain or PEFT-wrapped) fp32 attention in place of PyTorch's SDPA; False, and nothing changed,
    when it runs another attention implementation (eager, or one the recipe chose)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "_attn_implementation", None) != "sdpa":
        return False
    _register()
    base.set_attn_implementation(ATTENTION_NAME)
    return base.config._attn_implementation == ATTENTION_NAME
