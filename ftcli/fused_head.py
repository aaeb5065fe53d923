"""Make TRL's fused LM head project only the positions that have a label on the CPU, as it already does on GPUs.

TRL's SFTTrainer scores tokens through a fused LM head (hidden states times the vocabulary, in tiles, never the full
logits). With Triton (CUDA, XPU) it projects only the positions whose label is not -100; elsewhere it projects every
position, so that compiled graphs on devices like Neuron keep one shape per batch. ftcli trains the CPU eagerly (no
compilation to keep), and on completion-only data most positions are prompt: projecting them all through a 49k
vocabulary took about 30% of a SmolLM2 LoRA step on the quickstart data (bench/RESULTS.md). The loss, its gradients and the
logged metrics are the same either way, since unlabelled positions contribute zero.
"""

from __future__ import annotations

# The devices where ftcli asks for labelled positions only (eager execution, no Triton kernels to pick).
COMPACT_DEVICE_TYPES = ("cpu",)


def project_labelled_positions_only() -> bool:
    """Install the choice once per process; False (and nothing changed) when this TRL has no such choice to make."""
    try:
        from trl.trainer import utils as trl_utils
    except ImportError:
        return False
    # trl.trainer.utils asks `_use_triton(device)` only to decide whether to keep labelled positions alone; the
    # kernels module keeps its own reference for choosing Triton kernels, which this leaves untouched.
    triton_choice = getattr(trl_utils, "_use_triton", None)
    if triton_choice is None or not callable(triton_choice):
        return False
    if hasattr(triton_choice, "trl_choice"):  # installed already
        return True

    def labelled_positions_only(device) -> bool:
        return device.type in COMPACT_DEVICE_TYPES or triton_choice(device)

    labelled_positions_only.trl_choice = triton_choice  # type: ignore[attr-defined]
    trl_utils._use_triton = labelled_positions_only
    return True


def with_fused_head(model):
    """`model` (a transformers model or a PeftModel over one) answering `fused_lm_head=True` with per-token
    log-probabilities of the labels, projected as in training; the plain forward (generation) is unchanged."""
    from trl.trainer.utils import add_fused_lm_head

    project_labelled_positions_only()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "ftcli_fused_head", False):
        add_fused_lm_head(base)
        base.ftcli_fused_head = True
    return model
