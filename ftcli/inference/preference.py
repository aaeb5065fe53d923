"""How a run judges preference data: the accuracy and mean margin of its implicit reward against its reference model
(the run it started from, or the base), as DPO and KTO define the reward."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ftcli.data.types import Conversation

REFERENCE_ADAPTER = "reference"


def as_chosen_conversations(examples: list[Conversation]) -> list[Conversation]:
    """Each pair, and each desirable unpaired answer, as the conversation that ends with its chosen answer (for loss
    and generation metrics)."""
    return [Conversation(messages=(example.messages or []) + example.chosen, origin=example.origin)
            for example in examples if example.chosen is not None]


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


def answer_log_probs(loaded, examples, batch_size: int, console=None, label: str = "run") -> list[list[float]]:
    """Per example (PreferenceExample), the summed log-probabilities of each answer's tokens under loaded.model as it
    is now; the progress shows on `console`."""
    import torch

    from ftcli.progress import progress

    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    answers = [(index, example.prompt_ids, answer) for index, example in enumerate(examples)
               for answer in example.answer_ids]
    sums: list[list[float]] = [[] for _ in examples]
    with progress(console, f"scoring the answers ({label})", total=len(answers), unit="answers") as bar:
        for start in range(0, len(answers), batch_size):
            batch = answers[start:start + batch_size]
            sequences = [prompt + answer for _, prompt, answer in batch]
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
            for row, (index, prompt, _) in enumerate(batch):
                first = len(prompt) - 1                    # the position that predicts the answer's first token
                last = len(sequences[row]) - 1
                sums[index].append(float(token_logps[row, first:last].double().sum()))
            bar.advance(len(batch))
    return sums


def preference_scores(policy: list[list[float]], reference: list[list[float]], desirable: list[bool | None],
                      beta: float) -> dict[str, float]:
    """From each answer's implicit reward beta * (log pi - log ref): preference_accuracy, the share of examples
    judged right (a pair (desirable None) when its chosen answer gets the higher reward, an unpaired answer when its
    reward has the sign of its label); reward_margin, the mean reward of the chosen and desirable answers minus that
    of the rejected and undesirable ones (for pairs alone: the mean of chosen minus rejected)."""
    rewards = [[beta * (p - r) for p, r in zip(ps, rs)] for ps, rs in zip(policy, reference)]
    if not rewards:
        return {}
    right, good, bad = [], [], []
    for answer_rewards, label in zip(rewards, desirable):
        if label is None:
            chosen, rejected = answer_rewards
            right.append(chosen > rejected)
            good.append(chosen)
            bad.append(rejected)
        else:
            (reward,) = answer_rewards
            right.append((reward > 0) == label)
            (good if label else bad).append(reward)
    return {"preference_accuracy": sum(right) / len(right), "reward_margin": _mean(good) - _mean(bad)}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
