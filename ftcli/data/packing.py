"""Pack examples into rows (best-fit decreasing) and collate batches, packed or padded.

Each row stays a separate sequence of at most max_length tokens (TRL's padding-free packing flattens the whole
batch into one, so attention grows with the batch's total length squared); per-row position_ids restart at 0 at
every example, and transformers turns them into a block-diagonal causal mask (only without a 2-D attention_mask and
with use_cache=False, which SFTTrainer sets), so examples in one row do not attend to each other. With
flash_attention_2 the collator flattens the rows, as its variable-length kernel sees example boundaries only there.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from ftcli.data.types import IGNORE_INDEX

# Batch key carrying the number of real (non-padding) tokens of a packed batch; the trainer removes it before the
# forward pass (ftcli/training/trainer.py), since position_ids alone can't tell padding from a short example.
REAL_TOKENS_KEY = "ftcli_real_tokens"


@dataclass
class PackedRow:
    input_ids: list[int]
    labels: list[int]
    seq_lengths: list[int]


def pack_examples(examples: list[tuple[list[int], list[int]]], max_length: int) -> list[PackedRow]:
    """Best-fit decreasing: longest first, each into the fullest row it still fits in."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))
    rows: list[PackedRow] = []
    free: list[tuple[int, int]] = []   # (space left, row index), sorted
    for index in order:
        input_ids, labels = examples[index]
        size = len(input_ids)
        slot = bisect.bisect_left(free, (size, -1))
        if slot < len(free):
            space, row_index = free.pop(slot)
        else:
            space, row_index = max_length, len(rows)
            rows.append(PackedRow([], [], []))
        row = rows[row_index]
        row.input_ids.extend(input_ids)
        # The first token of an example has no in-example context to be predicted from: never a target.
        row.labels.extend([IGNORE_INDEX, *labels[1:]])
        row.seq_lengths.append(size)
        if space - size > 0:
            bisect.insort(free, (space - size, row_index))
    return rows


def packed_position_ids(seq_lengths: list[int], padded_length: int) -> list[int]:
    """Positions restarting at 0 at each example; padding forms its own sequence so it joins no example."""
    positions = [p for length in seq_lengths for p in range(length)]
    return positions + list(range(padded_length - len(positions)))


class PaddingCollator:
    """Pads each batch on the right: pad id, labels -100, attention_mask 0 (never derived from the pad id)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def _width(self, lengths: list[int]) -> int:
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        return width

    def __call__(self, features: list[dict]) -> dict:
        import torch

        lengths = [len(f["input_ids"]) for f in features]
        width = self._width(lengths)
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, (feature, length) in enumerate(zip(features, lengths)):
            input_ids[row, :length] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            labels[row, :length] = torch.as_tensor(feature.get("labels", feature["input_ids"]), dtype=torch.long)
            attention_mask[row, :length] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


class PackedCollator(PaddingCollator):
    """Rows of packed examples: position_ids restart per example and no attention_mask, so the model builds a
    block-diagonal causal mask per row (see the module docstring).

    flatten=True concatenates the rows into one (for flash_attention_2, whose variable-length kernel isolates
    examples only in a batch of one row, and computes only the block-diagonal part, so flattening costs nothing)."""

    def __init__(self, pad_token_id: int, *, flatten: bool = False):
        super().__init__(pad_token_id)
        self.flatten = flatten

    def __call__(self, features: list[dict]) -> dict:
        import torch

        real_tokens = torch.tensor(sum(len(f["input_ids"]) for f in features), dtype=torch.long)
        if self.flatten:
            return {
                REAL_TOKENS_KEY: real_tokens,
                "input_ids": torch.tensor([[t for f in features for t in f["input_ids"]]], dtype=torch.long),
                "labels": torch.tensor([[t for f in features for t in f["labels"]]], dtype=torch.long),
                "position_ids": torch.tensor([[p for f in features for p in packed_position_ids(
                    f.get("seq_lengths") or [len(f["input_ids"])], len(f["input_ids"]))]], dtype=torch.long),
            }
        batch = super().__call__(features)
        width = batch["input_ids"].shape[1]
        batch["position_ids"] = torch.tensor(
            [packed_position_ids(f.get("seq_lengths") or [len(f["input_ids"])], width) for f in features],
            dtype=torch.long,
        )
        del batch["attention_mask"]
        batch[REAL_TOKENS_KEY] = real_tokens
        return batch
