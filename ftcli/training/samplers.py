"""The training order ftcli uses for group_by_length: batches of similar-length examples, in random batch order.

transformers' LengthGroupedSampler yields the batches of each mega-batch longest first, so a short run trains on
one length (often one kind of task) at a time; here batches are built the same way (little padding) and then
shuffled, so each step sees a random part of the data. README gives the measured effect.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

MEGA_BATCH_BATCHES = 50  # as transformers: enough candidates per bucket to keep padding low


def length_batched_order(lengths: Sequence[int], batch_size: int, seed: int) -> list[int]:
    """Example indices whose consecutive batch_size slices hold similar lengths, with the slices in random order.

    The longest batch comes first so that a run that does not fit in memory fails at its first step."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    rng = random.Random(seed)
    shuffled = list(range(len(lengths)))
    rng.shuffle(shuffled)
    span = MEGA_BATCH_BATCHES * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(shuffled), span):
        mega = sorted(shuffled[start:start + span], key=lambda i: lengths[i], reverse=True)
        batches.extend(mega[i:i + batch_size] for i in range(0, len(mega), batch_size))
    rng.shuffle(batches)
    if batches:
        longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
        batches[0], batches[longest] = batches[longest], batches[0]
    return [index for batch in batches for index in batch]


class LengthBatchedSampler:
    """A data sampler over length_batched_order; a new order every epoch, the same one for the same seed and epoch
    (resume skips the batches already trained and must see the same order)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(length_batched_order(self.lengths, self.batch_size, self.seed + self.epoch))

    def __len__(self) -> int:
        return len(self.lengths)
