"""Dropout for training on the CPU with masks drawn 16 random bits per element rather than one generator call each.

torch's CPU dropout draws every element of its mask from the generator separately (bernoulli_), which costs more
than the LoRA matmuls the dropout feeds. Four 16-bit lanes of one 64-bit draw give the same mask distribution with
the probability rounded to a multiple of 1/65536 (0.05 becomes 0.0500031), and the kept values are scaled by the
exact inverse of the rounded keep probability, so the expected output equals the input as with torch's dropout.
"""

from __future__ import annotations

from functools import cache

LANES = 65536   # values of one 16-bit lane


@cache
def _make_class():
    import torch

    class CpuMaskDropout(torch.nn.Dropout):
        """nn.Dropout (same p, same module tree and state) whose training mask comes from 16-bit random lanes."""

        def forward(self, x):
            if not self.training or self.p == 0 or x.device.type != "cpu":
                return super().forward(x)
            dropped = round(self.p * LANES)
            count = x.numel()
            # random_(-2**63, None) fills all 64 bits (random_() leaves the sign bit, one lane's top bit, at zero)
            bits = torch.empty((count + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
            lanes = bits.view(torch.int16)[:count].view(x.shape)
            keep = lanes >= dropped - LANES // 2
            return x * keep * (LANES / (LANES - dropped))

    return CpuMaskDropout


def use_cpu_mask_dropout(model) -> int:
    """Replace the model's nn.Dropout modules with positive p (LoRA's dropout among them) by CpuMaskDropout, in
    place; the number replaced."""
    import torch

    cls = _make_class()
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Dropout and child.p > 0:
                swapped = cls(child.p, child.inplace)
                swapped.train(child.training)
                setattr(module, name, swapped)
                replaced += 1
    return replaced
