"""TRL's fused LM head made fast on the CPU: only labelled positions projected, and their log-probabilities computed
by PyTorch's own vectorised kernels instead of TRL's GPU-shaped tile folding.

TRL's SFTTrainer scores tokens through a fused LM head (hidden states times the vocabulary without keeping the full
logits). Without Triton it projects every position, so that compiled graphs keep one shape per batch, and folds each
vocabulary tile into online log-sum-exp statistics with a dozen separate torch passes. Here the labelled positions
are scored with cross-entropy over the whole vocabulary in chunks, recomputed in the backward pass so that memory
stays bounded by a chunk. The loss, its gradients and the logged metrics are the same either way; README gives the
speed-up.
"""

from __future__ import annotations

# The devices where ftcli's choices apply (eager execution, no Triton kernels to pick).
CPU_DEVICE_TYPES = ("cpu",)
# Logits scored at once on the CPU (positions x vocabulary; 1024 positions of a 49k vocabulary): their fp32 copies
# are the memory the head adds, whatever the vocabulary size.
CPU_CHUNK_LOGITS = 1024 * 49152
OPTIONAL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _transformed_logits(hidden, weight, bias, temperature, softcap, logit_scale):
    """The logits TRL's head scores: projected, scaled, soft-capped, divided by the temperature, in fp32."""
    import torch
    import torch.nn.functional as F

    logits = F.linear(hidden, weight, bias).float() * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits / temperature


def _score_chunk(hidden, weight, bias, targets, temperature, softcap, logit_scale, outputs):
    """(log-probability of each target, then the optional statistics TRL's head returns, or None) for a chunk."""
    import torch
    import torch.nn.functional as F

    logits = _transformed_logits(hidden, weight, bias, temperature, softcap, logit_scale)
    log_probs = -F.cross_entropy(logits, targets, reduction="none")
    stats: list = [None] * len(OPTIONAL_OUTPUTS)
    if any(name in outputs for name in OPTIONAL_OUTPUTS):
        with torch.no_grad():  # logged only: SFT's loss uses the log-probabilities alone
            plain = logits.detach()
            log_p = plain - torch.logsumexp(plain, -1, keepdim=True)
            values = {"entropy": lambda: -(log_p.exp() * log_p).sum(-1),
                      "log_sum_sq_probs": lambda: torch.logsumexp(2 * log_p, -1),
                      "mean_logits": lambda: plain.mean(-1),
                      "is_top1": lambda: plain.argmax(-1) == targets}   # the first maximum, as TRL counts it
            stats = [values[name]() if name in outputs else None for name in OPTIONAL_OUTPUTS]
    return (log_probs, *stats)


def cpu_chunk_positions(vocab_size: int) -> int:
    """Positions per chunk of the CPU scoring for this vocabulary size."""
    return max(1, CPU_CHUNK_LOGITS // max(vocab_size, 1))


def cpu_label_log_probs(hidden, weight, bias, targets, temperature=1.0, softcap=None, logit_scale=1.0,
                        outputs=("log_probs",)):
    """TRL's ChunkedLogProbFunction outputs (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1) for the
    rows of `hidden`, chunk by chunk; when there is more than one chunk, each chunk's logits are recomputed in the
    backward pass rather than kept (one chunk is kept: its memory is the forward's anyway)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    parts = []
    rows = cpu_chunk_positions(weight.shape[0])
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    recompute = needs_grad and hidden.shape[0] > rows
    for start in range(0, max(hidden.shape[0], 1), rows):   # an empty batch still gives a (zero) graph
        chunk = (hidden[start:start + rows], weight, bias, targets[start:start + rows],
                 temperature, softcap, logit_scale, outputs)
        parts.append(checkpoint(_score_chunk, *chunk, use_reentrant=False) if recompute else _score_chunk(*chunk))
    return tuple(None if part[0] is None else torch.cat(part) for part in zip(*parts))


class CpuOrTrlLogProbs:
    """Stands in for TRL's ChunkedLogProbFunction in its fused head: ftcli's scoring on the CPU, TRL's elsewhere."""

    def __init__(self, trl_function):
        self.trl_function = trl_function

    def apply(self, hidden, weight, bias, targets, temperature, chunk_size, softcap=None, logit_scale=1.0,
              outputs=("log_probs",)):
        if hidden.device.type not in CPU_DEVICE_TYPES:
            return self.trl_function.apply(hidden, weight, bias, targets, temperature, chunk_size, softcap,
                                           logit_scale, outputs)
        return cpu_label_log_probs(hidden, weight, bias, targets, temperature, softcap, logit_scale, outputs)


def prepare_fused_head() -> bool:
    """Install both CPU choices in TRL's fused head, once per process; False (nothing changed) when this TRL does not
    have the two names they replace."""
    try:
        from trl.trainer import utils as trl_utils
    except ImportError:
        return False
    # trl.trainer.utils asks `_use_triton(device)` only to decide whether to keep labelled positions alone (the
    # kernels module keeps its own reference for choosing Triton kernels), and calls `_ChunkedLogProbFunction.apply`
    # to score them.
    triton_choice = getattr(trl_utils, "_use_triton", None)
    scorer = getattr(trl_utils, "_ChunkedLogProbFunction", None)
    if not callable(triton_choice) or not hasattr(scorer, "apply"):
        return False
    if not hasattr(triton_choice, "trl_choice"):
        def labelled_positions_only(device) -> bool:
            return device.type in CPU_DEVICE_TYPES or triton_choice(device)

        labelled_positions_only.trl_choice = triton_choice  # type: ignore[attr-defined]
        trl_utils._use_triton = labelled_positions_only
    if not isinstance(scorer, CpuOrTrlLogProbs):
        trl_utils._ChunkedLogProbFunction = CpuOrTrlLogProbs(scorer)
    return True


def with_fused_head(model):
    """`model` (a transformers model or a PeftModel over one) answering `fused_lm_head=True` with per-token
    log-probabilities of the labels, scored as in training; the plain forward (generation) is unchanged."""
    from trl.trainer.utils import add_fused_lm_head

    prepare_fused_head()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "ftcli_fused_head", False):
        add_fused_lm_head(base)
        base.ftcli_fused_head = True
    return model
