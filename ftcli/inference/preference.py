"""How a run ranks preference pairs: the accuracy and mean margin of its implicit reward against its reference model
(the run it started from, or the base), as DPO defines the reward."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ftcli.data.types import Conversation

REFERENCE_ADAPTER = "reference"


def as_chosen_conversations(pairs: list[Conversation]) -> list[Conversation]:
    """Each pair as the conversation that ends with its chosen answer (for loss and generation metrics)."""
    return [Conversation(messages=(pair.messages or []) + (pair.chosen or []), origin=pair.origin) for pair in pairs]


@contextlib.contextmanager
def reference_model(loaded, parent_adapter) -> Iterator[None]:
    """Inside this block loaded.model computes as the run's reference: the parent adapter (loaded beside the run's
    own) when the run started from one, else the base with the adapter disabled."""
    if parent_adapter is None:
        with loaded.base_only():
            yield
        return
    model = loaded.model
    if REFERENCE_ADAPTER not in model.peft_config:
        model.load_adapter(str(parent_adapter), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    active = model.active_adapter
    model.set_adapter(REFERENCE_ADAPTER)
    try:
        yield
    finally:
        model.set_adapter(active)


def answer_log_probs(loaded, pairs, batch_size: int) -> list[tuple[float, float]]:
    """(chosen, rejected) summed log-probabilities of each pair's answer tokens under loaded.model as it is now."""
    import torch

    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    scores = []
    for side in ("chosen_ids", "rejected_ids"):
        sums = []
        for start in range(0, len(pairs), batch_size):
            batch = pairs[start:start + batch_size]
            sequences = [pair.prompt_ids + getattr(pair, side) for pair in batch]
            width = max(len(s) for s in sequences)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for row, sequence in enumerate(sequences):
                input_ids[row, :len(sequence)] = torch.tensor(sequence)
                attention[row, :len(sequence)] = 1
            with torch.inference_mode():
                logits = loaded.model(input_ids=input_ids.to(loaded.device),
                                      attention_mask=attention.to(loaded.device)).logits.float()
            token_logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(
                -1, input_ids[:, 1:, None].to(logits.device)).squeeze(-1)
            for row, pair in enumerate(batch):
                first = len(pair.prompt_ids) - 1           # the position that predicts the answer's first token
                last = len(sequences[row]) - 1
                sums.append(float(token_logps[row, first:last].double().sum()))
        scores.append(sums)
    return list(zip(*scores))


def preference_scores(policy: list[tuple[float, float]], reference: list[tuple[float, float]],
                      beta: float) -> dict[str, float]:
    """preference_accuracy: the share of pairs whose chosen answer gets the higher implicit reward
    beta * (log pi - log ref); reward_margin: the mean reward of chosen minus rejected."""
    margins = [beta * ((pc - rc) - (pr - rr)) for (pc, pr), (rc, rr) in zip(policy, reference)]
    if not margins:
        return {}
    return {"preference_accuracy": sum(m > 0 for m in margins) / len(margins),
            "reward_margin": sum(margins) / len(margins)}
