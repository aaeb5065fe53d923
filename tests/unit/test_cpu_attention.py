"""Attention in fp32 under bf16 autocast on the CPU: SDPA then computes in fp32 (outside autocast), the model's
outputs and gradients stay those of bf16 training, and models on another attention implementation are left alone."""

from __future__ import annotations

import torch

from ftcli.models.cpu_attention import ATTENTION_NAME, use_fp32_cpu_attention


def _model(path, attn_implementation="sdpa"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn_implementation)


def _sdpa_calls(monkeypatch) -> list:
    """(query dtype, autocast on) of every SDPA call from now on."""
    calls, real = [], torch.nn.functional.scaled_dot_product_attention

    def spy(query, *args, **kwargs):
        calls.append((query.dtype, torch.is_autocast_enabled("cpu")))
        return real(query, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


def _forward(model, ids, mask):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return model(input_ids=ids, attention_mask=mask).logits.float()


def test_sdpa_runs_in_fp32_outside_autocast(tiny_model_dir, monkeypatch):
    ids = torch.randint(3, 200, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0   # padding: a real mask, not the causal shortcut
    model = _model(tiny_model_dir)
    calls = _sdpa_calls(monkeypatch)
    plain = _forward(model, ids, mask)
    assert calls and all(autocast for _, autocast in calls)   # torch's: bf16 under autocast
    calls.clear()
    assert use_fp32_cpu_attention(model) and model.config._attn_implementation == ATTENTION_NAME
    ours = _forward(model, ids, mask)
    assert calls and all(dtype == torch.float32 and not autocast for dtype, autocast in calls)
    # the same model up to bf16 rounding of the attention (the projections around it are bf16 either way)
    assert (ours - plain).abs().max() < 0.05 * plain.abs().max()
    ours[:, -1].sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    calls.clear()
    with torch.no_grad():   # without autocast nothing changes: fp32 in, torch's own call
        model(input_ids=ids, attention_mask=mask)
    assert calls and all(dtype == torch.float32 and not autocast for dtype, autocast in calls)


def test_other_attention_implementations_are_left_alone(tiny_model_dir):
    model = _model(tiny_model_dir, attn_implementation="eager")
    assert not use_fp32_cpu_attention(model)
    assert model.config._attn_implementation == "eager"


def test_peft_models_get_it_on_their_base(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj"]))
    assert use_fp32_cpu_attention(model)
    assert model.get_base_model().config._attn_implementation == ATTENTION_NAME
