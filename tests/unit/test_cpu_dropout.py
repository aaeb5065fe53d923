"""The CPU dropout masks drawn from 16-bit random lanes: the keep rate and scale of torch's dropout, identity outside
training, reproducible under a seed, and swapped in for LoRA's dropout modules."""

from __future__ import annotations

import pytest
import torch

from ftcli.models.cpu_dropout import LANES, use_cpu_mask_dropout


def _dropout(p: float):
    module = torch.nn.Sequential(torch.nn.Dropout(p))
    assert use_cpu_mask_dropout(module) == 1
    return module[0]


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_mask_keeps_one_minus_p_and_scales_to_the_same_expectation(p):
    dropout = _dropout(p).train()
    x = torch.ones(400, 2500)   # one million elements: the keep rate to about +-0.001
    y = dropout(x)
    kept = y != 0
    rounded = round(p * LANES) / LANES
    assert abs(rounded - p) <= 0.5 / LANES
    assert float(kept.float().mean()) == pytest.approx(1 - rounded, abs=2e-3)
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / (1 - rounded)))
    assert float(y.mean()) == pytest.approx(1.0, abs=5e-3)   # unbiased, as torch's dropout
    # every lane of a 64-bit draw is used: the four columns of a row of 4 see the same rate
    lanes = kept.reshape(-1, 4).float().mean(dim=0)
    assert torch.allclose(lanes, torch.full_like(lanes, 1 - rounded), atol=5e-3)


def test_identity_outside_training_and_reproducible_with_a_seed():
    dropout = _dropout(0.3)
    x = torch.randn(64, 48)
    assert torch.equal(dropout.eval()(x), x)
    dropout.train()
    torch.manual_seed(7)
    first = dropout(x)
    torch.manual_seed(7)
    assert torch.equal(dropout(x), first)
    assert not torch.equal(dropout(x), first)


def test_gradients_flow_through_the_kept_elements():
    dropout = _dropout(0.5).train()
    x = torch.randn(32, 32, requires_grad=True)
    y = dropout(x)
    y.sum().backward()
    assert torch.equal(x.grad != 0, y != 0)


def test_lora_dropout_modules_are_swapped_and_zero_dropout_is_left_alone(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    layers = len([m for m in model.modules() if type(m) is torch.nn.Dropout and m.p > 0])
    assert layers > 0 and use_cpu_mask_dropout(model) == layers
    assert not [m for m in model.modules() if type(m) is torch.nn.Dropout and m.p > 0]
    assert {name for name, _ in model.named_parameters()} == {
        name for name, _ in get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                           LoraConfig(r=4, lora_dropout=0.1,
                                                      target_modules=["q_proj", "v_proj"])).named_parameters()}
