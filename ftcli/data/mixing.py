"""Which prepared rows a split uses: the seeded val_split hold-out, and each source's weight, samples or fraction."""

from __future__ import annotations

from ftcli.errors import DataError
from ftcli.recipe.schema import DataSourceConfig


def held_out_records(total: int, fraction: float, seed: int):
    """The sorted indices of the records that data.val_split holds out (at least one), seeded."""
    import numpy as np

    held_out = max(1, round(total * fraction))
    if held_out >= total:
        raise DataError(
            f"data.val_split {fraction} of {total} examples leaves nothing to train on",
            hint="lower data.val_split or give a separate data.eval file",
        )
    return np.sort(np.random.default_rng(seed).permutation(total)[:held_out])


def wanted_examples(source: DataSourceConfig | None, available: int) -> int:
    """How many examples a source contributes: all, or as its weight, samples or fraction say."""
    if source is None or available == 0:
        return available
    if source.samples is not None:
        return source.samples
    if source.fraction is not None:
        return max(1, round(source.fraction * available))
    if source.weight is not None:
        return max(1, round(source.weight * available))
    return available


def mix_rows(rows_by_source: list, sources: list[DataSourceConfig | None], seed: int) -> list:
    """Per source, the rows it contributes: every row as many whole times as its amount allows, then a seeded
    random subset (without repeats) for the rest; each source draws from its own seeded stream."""
    import numpy as np

    selected = []
    for index, (rows, source) in enumerate(zip(rows_by_source, sources)):
        wanted = wanted_examples(source, len(rows))
        if wanted == len(rows):
            selected.append(rows)
            continue
        copies, rest = divmod(wanted, len(rows))
        generator = np.random.default_rng([seed, index])
        extra = np.sort(generator.choice(rows, size=rest, replace=False))
        selected.append(np.concatenate([np.tile(rows, copies), extra]).astype(np.int64))
    return selected
