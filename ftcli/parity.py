"""Logit parity between two models on a few fixed conversations: max |logit difference| and next-token agreement."""

from __future__ import annotations

from dataclasses import asdict, dataclass

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


@dataclass(frozen=True)
class Parity:
    """How closely a candidate model's logits follow a reference model's, over all non-padding positions."""

    max_abs_logit_diff: float
    next_token_agreement: float   # fraction of positions where both models' greedy next token is the same
    positions: int

    def as_dict(self) -> dict:
        return {key: round(value, 6) if isinstance(value, float) else value for key, value in asdict(self).items()}

    def describe(self) -> str:
        return (f"next-token agreement {100 * self.next_token_agreement:.1f}% over {self.positions} positions, "
                f"max |logit difference| {self.max_abs_logit_diff:.3g}")


def check_texts(chat_template: str | None, tokenizer) -> list[str]:
    """The check conversations as text: through the chat template, or as plain 'question answer' lines."""
    if chat_template is None:
        return [f"{question} {answer}" for question, answer in CHECK_CONVERSATIONS]
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            chat_template=chat_template, tokenize=False,
        )
        for question, answer in CHECK_CONVERSATIONS
    ]


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


def compare(reference, candidate, attention_mask) -> Parity:
    mask = attention_mask.bool()
    diff = (reference - candidate).abs().amax(dim=-1)[mask]
    same = (reference.argmax(dim=-1) == candidate.argmax(dim=-1))[mask]
    return Parity(max_abs_logit_diff=float(diff.max()), next_token_agreement=float(same.float().mean()),
                  positions=int(mask.sum()))
