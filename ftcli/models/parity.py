"""Parity between a candidate model and the reference it must reproduce, measured as llama.cpp measures a converted
or quantized model: KL divergence of the next-token distributions and top-token agreement, with ties respected."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ftcli.errors import QualityGateError

# Short fixed exchanges, rendered through the run's chat template; every position (template tokens, user and
# assistant text) is compared. Plain ASCII and no numbers glued to words, so any byte-level BPE splits them alike.
CHECK_CONVERSATIONS = (
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Say red blue", "red blue"),
    ("Name three colours.", "Red, green and blue."),
    ("Sort these numbers: 7 3 5", "3 5 7"),
    ("Reverse the words: cat dog sun", "sun dog cat"),
    ("Write a short greeting.", "Hello, nice to meet you!"),
    ("What do cats like to eat?", "Cats like fish and meat."),
    ("Is the moon bigger than the sun?", "No, the sun is much bigger."),
)

# The spacing of representable numbers just above 1 in each format the candidate's weights were rounded to. q8_0
# stores each block of 32 weights as int8 codes of the block's largest magnitude: a step of 1/127 of it, as coarse as
# bf16's 7-bit mantissa.
EPSILON = {"float32": 2.0 ** -23, "float16": 2.0 ** -10, "bfloat16": 2.0 ** -7, "q8_0": 2.0 ** -7}
# Rounding every weight to a format with spacing eps moves each logit by up to a few eps of the logits' scale, the
# errors of the layers adding up: a position is a tie the format cannot resolve when the reference's top token and
# the candidate's are closer than TIE_ULPS * eps * (the largest |logit| there) in the reference's own logits.
TIE_ULPS = 4


@dataclass(frozen=True)
class Bounds:
    """What a candidate must meet against its reference; None leaves a figure ungated (still recorded)."""

    fmt: str                               # key of EPSILON: what the candidate was rounded to
    min_agreement: float                   # tie-aware top-token agreement
    max_kl_mean: float
    max_kl_max: float | None = None
    max_abs_logit_diff: float | None = None  # for candidates of the same fp32 numbers, computed in another order

    def tie_tolerance(self, scale):
        """Per position (scale: the largest |reference logit| there): reference logits closer than this are a tie.

        A candidate whose every logit lies within d of the reference's can swap only tokens closer than 2d, so where
        the bounds cap |logit difference| ties come from that cap; elsewhere from the format's rounding."""
        if self.max_abs_logit_diff is not None:
            return 2 * self.max_abs_logit_diff
        return TIE_ULPS * EPSILON[self.fmt] * scale

    def describe(self) -> str:
        parts = [f"tie-aware agreement >= {self.min_agreement:.1%}", f"mean KL <= {self.max_kl_mean:g}"]
        if self.max_kl_max is not None:
            parts.append(f"max KL <= {self.max_kl_max:g}")
        if self.max_abs_logit_diff is not None:
            parts.append(f"max |logit difference| <= {self.max_abs_logit_diff:g}")
        return ", ".join(parts)


# Every gate's bounds, in one place (README, "Parity gates", lists them; bench/PARITY.md has the figures measured on
# SmolLM2-135M). Each sits an order of magnitude or more above what the rounding costs and as far below a defect:
# a GGUF without llama.cpp's q/k row order has mean KL ~1.4 and ~50% agreement.
EXACT = Bounds("float32", min_agreement=1.0, max_kl_mean=1e-6, max_kl_max=1e-4, max_abs_logit_diff=1e-3)
HALF = Bounds("float16", min_agreement=0.99, max_kl_mean=2e-4, max_kl_max=1e-2)
BRAIN_HALF = Bounds("bfloat16", min_agreement=0.97, max_kl_mean=2e-3, max_kl_max=5e-2)
BOUNDS = {
    "merge_float32": EXACT,        # the merge arithmetic: fp32 against fp32, only the order of operations differs
    "merge_float16": HALF,
    "merge_bfloat16": BRAIN_HALF,
    # the dequantized-4-bit merge against the model as trained, whose 4-bit layers compute in bf16 on the CPU
    "qlora_merge": Bounds("bfloat16", min_agreement=0.95, max_kl_mean=2e-2),
    "gguf_f32": Bounds("float32", min_agreement=1.0, max_kl_mean=1e-6, max_kl_max=1e-4, max_abs_logit_diff=1e-4),
    "gguf_f16": HALF,
    "gguf_bf16": BRAIN_HALF,
    "gguf_q8_0": Bounds("q8_0", min_agreement=0.97, max_kl_mean=2e-2, max_kl_max=0.2),
}
# A llama.cpp LoRA file rounds the adapter only; at f32, applying it is a reordering of the merge's fp32 arithmetic.
BOUNDS.update({f"gguf_lora_{quant}": BOUNDS[f"gguf_{quant}"] for quant in ("f16", "bf16", "q8_0")},
              gguf_lora_f32=BOUNDS["merge_float32"])


@dataclass(frozen=True)
class Parity:
    """How closely a candidate model's next-token distributions follow a reference model's, over all non-padding
    positions."""

    positions: int
    agreement: float              # tie-aware: the candidate's top token is the reference's, or ties with it there
    top_token_agreement: float    # plain argmax agreement (llama.cpp's "same top"), flips at near ties
    kl_mean: float                # KL(reference || candidate) per position, in nats
    kl_median: float
    kl_p99: float
    kl_max: float
    max_abs_logit_diff: float
    fmt: str                      # what the tie tolerance assumed the candidate was rounded to

    def as_dict(self) -> dict:
        return {key: _round(value) for key, value in asdict(self).items()}

    def describe(self) -> str:
        return (f"top-token agreement {100 * self.agreement:.1f}% with ties at {self.fmt} precision "
                f"({100 * self.top_token_agreement:.1f}% exact argmax) over {self.positions} positions, "
                f"KL divergence mean {self.kl_mean:.3g} max {self.kl_max:.3g}, "
                f"max |logit difference| {self.max_abs_logit_diff:.3g}")

    def failures(self, bounds: Bounds) -> list[str]:
        """What breaks the bounds, one phrase each; empty when the candidate passes."""
        failed = []
        if self.agreement < bounds.min_agreement:
            failed.append(f"top-token agreement {self.agreement:.1%} < {bounds.min_agreement:.1%}")
        if self.kl_mean > bounds.max_kl_mean:
            failed.append(f"mean KL divergence {self.kl_mean:.3g} > {bounds.max_kl_mean:g}")
        if bounds.max_kl_max is not None and self.kl_max > bounds.max_kl_max:
            failed.append(f"max KL divergence {self.kl_max:.3g} > {bounds.max_kl_max:g}")
        if bounds.max_abs_logit_diff is not None and self.max_abs_logit_diff > bounds.max_abs_logit_diff:
            failed.append(f"max |logit difference| {self.max_abs_logit_diff:.3g} > {bounds.max_abs_logit_diff:g}")
        return failed


def _round(value):
    return float(f"{value:.6g}") if isinstance(value, float) else value


def check_messages(*, answered: bool = True) -> list[list[dict[str, str]]]:
    """The check conversations as chat messages: each question with its answer, or the question alone."""
    return [[{"role": "user", "content": question}] + ([{"role": "assistant", "content": answer}] if answered else [])
            for question, answer in CHECK_CONVERSATIONS]


def check_texts(chat_template: str | None, tokenizer) -> list[str]:
    """The check conversations as text: through the chat template, or as plain 'question answer' lines."""
    if chat_template is None:
        return [f"{question} {answer}" for question, answer in CHECK_CONVERSATIONS]
    return [tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False)
            for messages in check_messages()]


def encode(tokenizer, texts: list[str]) -> dict:
    """One right-padded batch; special tokens are already in the rendered texts, so none are added."""
    if tokenizer.pad_token is None:  # padding is masked out, so any token will do
        tokenizer.pad_token = tokenizer.eos_token
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        return dict(tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False))
    finally:
        tokenizer.padding_side = previous_side


def logits(model, batch: dict):
    """fp32 logits on the CPU for the batch (inference mode, no cache)."""
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        output = model(**{key: value.to(device) for key, value in batch.items()}, use_cache=False)
    return output.logits.float().cpu()


def compare(reference, candidate, attention_mask, bounds: Bounds) -> Parity:
    """Parity of candidate logits against reference logits ([batch, positions, vocabulary]) where the mask is set."""
    import torch

    mask = attention_mask.bool()
    reference, candidate = reference[mask].double(), candidate[mask].double()   # [positions, vocabulary]
    log_p = torch.log_softmax(reference, dim=-1)
    log_q = torch.log_softmax(candidate, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1).clamp_min(0.0)   # rounding can leave -1e-17
    reference_top = reference.argmax(dim=-1)
    candidate_top = candidate.argmax(dim=-1)
    rows = torch.arange(reference.shape[0])
    gap = reference[rows, reference_top] - reference[rows, candidate_top]   # >= 0, 0 where the tops are equal
    ties = gap <= bounds.tie_tolerance(reference.abs().amax(dim=-1))
    return Parity(
        positions=int(reference.shape[0]),
        agreement=float(ties.double().mean()),
        top_token_agreement=float((reference_top == candidate_top).double().mean()),
        kl_mean=float(kl.mean()),
        kl_median=float(kl.median()),
        kl_p99=float(torch.quantile(kl, 0.99)),
        kl_max=float(kl.max()),
        max_abs_logit_diff=float((reference - candidate).abs().max()),
        fmt=bounds.fmt,
    )


def require(check: Parity, bounds: Bounds, *, what: str, hint: str) -> None:
    """QualityGateError (exit 6) naming every bound the candidate breaks."""
    failed = check.failures(bounds)
    if failed:
        raise QualityGateError(f"{what} does not reproduce its reference: {'; '.join(failed)} ({check.describe()})",
                               hint=hint)
