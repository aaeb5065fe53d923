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


def best_fit_rows(lengths, max_length: int):
    """Best-fit decreasing: longest first, each into the fullest row it still fits in (ties: the earliest row).

    Returns (example indices in row order, the number of examples in each row), as numpy arrays: a few bytes per
    example, whatever the data's size."""
    import heapq

    import numpy as np

    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    row_of = np.empty(len(order), dtype=np.int64)
    rows_by_space: dict[int, list[int]] = {}    # space left -> heap of the rows with exactly that much
    spaces: list[int] = []                      # the space values that have rows, sorted
    row_count = 0
    for step, size in enumerate(lengths[order].tolist()):
        slot = bisect.bisect_left(spaces, size)
        if slot < len(spaces):
            space = spaces[slot]
            row = heapq.heappop(rows_by_space[space])
            if not rows_by_space[space]:
                del rows_by_space[space]
                spaces.pop(slot)
        else:
            space, row = max_length, row_count
            row_count += 1
        row_of[step] = row
        left = space - size
        if left > 0:
            if left not in rows_by_space:
                rows_by_space[left] = []
                bisect.insort(spaces, left)
            heapq.heappush(rows_by_space[left], row)
    steps = np.argsort(row_of, kind="stable")    # by row, then in the order the examples went in
    return order[steps], np.bincount(row_of, minlength=row_count)


def pack_examples(examples: list[tuple[list[int], list[int]]], max_length: int) -> list[PackedRow]:
    """Rows of best-fit packed examples (see best_fit_rows), each example's first token never a target."""
    members, counts = best_fit_rows([len(ids) for ids, _ in examples], max_length)
    rows, position = [], 0
    for count in counts.tolist():
        row = PackedRow([], [], [])
        for index in members[position:position + count].tolist():
            input_ids, labels = examples[index]
            row.input_ids.extend(input_ids)
            row.labels.extend([IGNORE_INDEX, *labels[1:]])
            row.seq_lengths.append(len(input_ids))
        rows.append(row)
        position += count
    return rows


def pack_dataset(dataset, lengths, max_length: int, path, *, block_rows: int = 2048):
    """`dataset` (input_ids, labels) packed into rows written to the Arrow file `path`, a block of rows at a time;
    returns the packed datasets.Dataset (memory-mapped) with input_ids, labels, seq_lengths and trained."""
    import numpy as np
    import pyarrow as pa
    from datasets import Dataset

    members, counts = best_fit_rows(lengths, max_length)
    starts = np.concatenate([[0], np.cumsum(counts)])
    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
                        ("seq_lengths", pa.list_(pa.int32())), ("trained", pa.int32())])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for first in range(0, len(counts), block_rows):
            last = min(first + block_rows, len(counts))
            block = dataset.select(members[starts[first]:starts[last]])[:]
            columns: dict[str, list] = {name: [] for name in schema.names}
            position = 0
            for count in counts[first:last].tolist():
                row = PackedRow([], [], [])
                for ids, labels in zip(block["input_ids"][position:position + count],
                                       block["labels"][position:position + count]):
                    row.input_ids.extend(ids)
                    row.labels.extend([IGNORE_INDEX, *labels[1:]])
                    row.seq_lengths.append(len(ids))
                position += count
                columns["input_ids"].append(row.input_ids)
                columns["labels"].append(row.labels)
                columns["seq_lengths"].append(row.seq_lengths)
                columns["trained"].append(sum(1 for label in row.labels if label != IGNORE_INDEX))
            writer.write_batch(pa.record_batch([pa.array(columns[n], type=schema.field(n).type)
                                                for n in schema.names], schema=schema))
    return Dataset.from_file(str(path))


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
