"""The floating-point work of a training step, counted from the model's shapes and the batch's tokens: the numerator
of the model FLOP utilization that bench/probes.py reports.

Model FLOPs count the multiplications a step needs, not what it happens to run: no recomputation under gradient
checkpointing, no padding, and the LM head only on labelled positions (the positions a loss is taken on). A matmul of
an (m x k) by a (k x n) matrix is 2mkn FLOPs. Per token and layer:
  frozen weights W:      forward 2|W|, gradient of the input 2|W|                    -> 4|W|
  trainable weights W:   forward, gradient of the input, gradient of the weights      -> 6|W|
  attention (causal):    scores QK^T and weighted values AV, each 2 x width per attended position, forward, and
                         twice that backward                                          -> 12 x width x attended
The LM head counts as frozen or trainable by its weight, on labelled positions only.
"""

from __future__ import annotations

from dataclasses import dataclass

LINEAR_TYPES = ("Linear", "Linear4bit", "Linear8bitLt")


@dataclass(frozen=True)
class ModelShapes:
    """What a step multiplies: the decoder's matmul weights (frozen and trainable), attention's width, the LM head."""

    frozen_matmul_params: int        # decoder weights in matmuls with no gradient of their own (the base under LoRA)
    trainable_matmul_params: int     # decoder weights in matmuls that get gradients (LoRA's A and B, full layers)
    attention_layers: int
    attention_width: int             # query heads x head size: the width of QK^T and AV per position
    head_params: int                 # hidden size x vocabulary
    head_trainable: bool


@dataclass(frozen=True)
class BatchTokens:
    """The tokens of one or more batches that cost work: real (non-padding) tokens, labelled ones, and the query-key
    pairs causal attention scores (a sequence of n real tokens has n(n+1)/2)."""

    real: int
    labelled: int
    attended_pairs: int

    def __add__(self, other: BatchTokens) -> BatchTokens:
        return BatchTokens(self.real + other.real, self.labelled + other.labelled,
                           self.attended_pairs + other.attended_pairs)


def training_flops(shapes: ModelShapes, tokens: BatchTokens) -> float:
    """Model FLOPs of the forward and backward passes over `tokens` (the optimizer's few FLOPs per trainable weight are
    left out: they are memory-bound and negligible next to the matmuls)."""
    decoder = (4 * shapes.frozen_matmul_params + 6 * shapes.trainable_matmul_params) * tokens.real
    attention = 12 * shapes.attention_layers * shapes.attention_width * tokens.attended_pairs
    head = (6 if shapes.head_trainable else 4) * shapes.head_params * tokens.labelled
    return float(decoder + attention + head)


def batch_tokens(attention_mask, labels, ignore_index: int = -100) -> BatchTokens:
    """BatchTokens of a padded batch (rows of attention_mask and labels as a causal LM trainer gets them; labels are
    shifted by one inside the loss, so a row's labelled positions are its labels other than ignore_index after the
    first). Packed rows count as one sequence each: an upper bound on their attended pairs."""
    lengths = [int(n) for n in attention_mask.sum(dim=-1).tolist()]
    labelled = int((labels[:, 1:] != ignore_index).sum())
    return BatchTokens(real=sum(lengths), labelled=labelled, attended_pairs=sum(n * (n + 1) // 2 for n in lengths))


def model_shapes(model) -> ModelShapes:
    """ModelShapes of a (PEFT-wrapped or plain, possibly 4-bit) causal LM, from its linear layers and config."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    frozen = trainable = 0
    for module in base.modules():
        # PEFT's LoRA layers are named Linear too but wrap the real one (base_layer): count only what multiplies.
        if module is head or type(module).__name__ not in LINEAR_TYPES or hasattr(module, "base_layer"):
            continue
        params = module.in_features * module.out_features
        if module.weight.requires_grad:
            trainable += params
        else:
            frozen += params
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return ModelShapes(frozen_matmul_params=frozen, trainable_matmul_params=trainable,
                       attention_layers=config.num_hidden_layers,
                       attention_width=config.num_attention_heads * head_dim,
                       head_params=head.in_features * head.out_features,
                       head_trainable=bool(head.weight.requires_grad))
