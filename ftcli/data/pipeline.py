"""Recipe data -> tokenized datasets: sources, record formats, chat templates, loss masking, validation, cache.

The public entry of the data package: sources (files, folders, hub), formats (records -> Conversations), templates
(chat template choice and rendering), tokenize (masks), packing (rows, collators) and cache. A missing file or an
unreachable hub dataset is NotAvailableError (exit 4); bad content is DataError (exit 3), naming the file and line.
"""

from __future__ import annotations

import random

from ftcli.data.formats import to_conversations
from ftcli.data.sources import as_source_list, read_source, source_fingerprint
from ftcli.data.templates import CHATML_TEMPLATE, resolve_chat_template, split_for_generation
from ftcli.data.types import IGNORE_INDEX, Conversation, DataReport, PreparedData
from ftcli.errors import DataError, UsageError
from ftcli.paths import is_local_path
from ftcli.recipe.schema import DataConfig, Recipe

__all__ = [
    "IGNORE_INDEX", "CHATML_TEMPLATE", "Conversation", "DataReport", "PreparedData", "resolve_chat_template",
    "load_conversations", "prepare_data", "tokenize_conversations", "make_collator", "split_for_generation",
    "with_eval_source", "data_fingerprints",
]
PACKING_UNSUPPORTED = ("prefix", "prompt")   # their virtual tokens shift positions and bypass the packed mask


def with_eval_source(data: DataConfig, source: str) -> DataConfig:
    """`data` with its eval split read from `source` (eval --data FILE), in any supported format."""
    return data.model_copy(update={"eval": str(source), "val_split": None})


def _read_conversations(sources: list[str], data: DataConfig, split: str,
                        fingerprints: dict[str, str] | None = None) -> list[Conversation]:
    conversations: list[Conversation] = []
    for reference in sources:
        source = read_source(reference, split)
        if fingerprints is not None:
            fingerprints[source.name] = source.fingerprint
        conversations.extend(to_conversations(source.records, data))
    return conversations


def _split_conversations(data: DataConfig, seed: int, fingerprints: dict[str, str] | None = None
                         ) -> tuple[list[Conversation], list[Conversation] | None]:
    train = _read_conversations(as_source_list(data.train), data, "train", fingerprints)
    if data.eval is not None:
        return train, _read_conversations(as_source_list(data.eval), data, "eval", fingerprints)
    if data.val_split is None:
        return train, None
    held_out = max(1, round(len(train) * data.val_split))
    if held_out >= len(train):
        raise DataError(
            f"data.val_split {data.val_split} of {len(train)} examples leaves nothing to train on",
            hint="lower data.val_split or give a separate data.eval file",
        )
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    eval_indices = set(order[:held_out])
    return ([c for i, c in enumerate(train) if i not in eval_indices],
            [c for i, c in enumerate(train) if i in eval_indices])


def load_conversations(data: DataConfig, split: str = "train", *, seed: int = 42) -> list[Conversation]:
    """Read and validate records of `split` (train | eval; eval honours val_split), DataError (exit 3) on bad input."""
    if split not in ("train", "eval"):
        raise UsageError(f"unknown data split {split!r}; use train or eval")
    if split == "eval" and data.eval is not None:   # the training files are not needed (they may be gone)
        return _read_conversations(as_source_list(data.eval), data, "eval")
    train, evaluation = _split_conversations(data, seed)
    if split == "train":
        return train
    if evaluation is None:
        raise DataError("the recipe has no eval data", hint="set data.eval or data.val_split, or pass --data FILE")
    return evaluation


def data_fingerprints(data: DataConfig) -> dict[str, str] | None:
    """sha256 of every local source's content (None when a source is a hub dataset: not cacheable by content)."""
    fingerprints = {}
    for reference in as_source_list(data.train) + as_source_list(data.eval):
        if not is_local_path(reference):
            return None
        fingerprints[reference] = source_fingerprint(reference)
    return fingerprints


def tokenize_conversations(conversations: list[Conversation], recipe: Recipe, tokenizer, chat_template: str | None,
                           *, packing: bool | None = None, split: str = "train"):
    """(datasets.Dataset of input_ids + labels [+ seq_lengths when packed], DataReport), same masking as training.

    Examples with no trained token left after truncation are dropped and counted; DataError when none remain or
    when more than data.max_dropped_fraction are dropped."""
    from datasets import Dataset

    from ftcli.data.packing import pack_examples
    from ftcli.data.tokenize import length_stats, tokenize_examples

    data = recipe.data
    packing = data.packing if packing is None else packing
    report = DataReport(examples=len(conversations))
    if not conversations:
        raise DataError(f"no {split} examples", hint="check data.train / data.eval")
    examples = tokenize_examples(conversations, data, tokenizer, chat_template, report)
    kept = []
    first_dropped = None
    for conversation, example in zip(conversations, examples):
        report.truncated += example.full_length > data.max_length
        if all(label == IGNORE_INDEX for label in example.labels):
            report.dropped += 1
            first_dropped = first_dropped or conversation.origin
            continue
        kept.append(example)
    report.length_stats = length_stats([e.full_length for e in examples])
    report.total_tokens = sum(len(e.input_ids) for e in kept)
    report.trained_tokens = sum(sum(1 for t in e.labels if t != IGNORE_INDEX) for e in kept)
    _check_dropped(report, data, split, first_dropped)
    if packing:
        rows = pack_examples([(e.input_ids, e.labels) for e in kept], data.max_length)
        report.trained_tokens = sum(sum(1 for t in r.labels if t != IGNORE_INDEX) for r in rows)
        report.packing_efficiency = round(report.total_tokens / (len(rows) * data.max_length), 4)
        columns = {"input_ids": [r.input_ids for r in rows], "labels": [r.labels for r in rows],
                   "seq_lengths": [r.seq_lengths for r in rows]}
    else:
        columns = {"input_ids": [e.input_ids for e in kept], "labels": [e.labels for e in kept]}
    report.rows = len(columns["input_ids"])
    return Dataset.from_dict(columns), report


def _check_dropped(report: DataReport, data: DataConfig, split: str, first_dropped: str | None) -> None:
    if not report.dropped:
        return
    fraction = report.dropped / report.examples
    where = f" (the first: {first_dropped})" if first_dropped else ""
    if report.dropped == report.examples:
        raise DataError(
            f"no {split} example has a trainable token left after truncation to data.max_length "
            f"{data.max_length}{where}",
            hint="raise data.max_length, shorten the prompts, or set data.train_on: all",
        )
    if fraction > data.max_dropped_fraction:
        raise DataError(
            f"{report.dropped} of {report.examples} {split} examples ({fraction:.1%}) have no trainable token left "
            f"after truncation to data.max_length {data.max_length}, more than data.max_dropped_fraction "
            f"{data.max_dropped_fraction}{where}",
            hint="raise data.max_length, shorten the prompts, or raise data.max_dropped_fraction",
        )


def _check_packing(recipe: Recipe) -> None:
    if recipe.data.packing and recipe.method.kind in PACKING_UNSUPPORTED:
        raise UsageError(
            f"data.packing is not supported with method {recipe.method.kind}: its virtual tokens would let "
            "packed examples attend to each other",
            hint="set data.packing: false",
        )


def prepare_data(recipe: Recipe, tokenizer) -> PreparedData:
    """Validate, render, tokenize, mask and (optionally) pack train and eval data; cached by content."""
    from ftcli.data import cache as data_cache

    data = recipe.data
    _check_packing(recipe)
    template = resolve_chat_template(data, tokenizer)
    fingerprints = data_fingerprints(data)
    key = None
    if fingerprints is not None:
        key = data_cache.cache_key({
            # num_proc changes how fast, never what: the same cache entry serves any number of processes.
            "data": data.model_dump(mode="json", exclude={"num_proc"}),
            "seed": recipe.training.seed if data.val_split else None,
            "files": fingerprints, "tokenizer": data_cache.tokenizer_fingerprint(tokenizer), "template": template,
        })
        cached = data_cache.load_cached(key)
        if cached is not None:
            return PreparedData(*cached)
    read_fingerprints: dict[str, str] = {}
    train_conversations, eval_conversations = _split_conversations(data, recipe.training.seed, read_fingerprints)
    train, train_report = tokenize_conversations(train_conversations, recipe, tokenizer, template, split="train")
    train_report.fingerprints = read_fingerprints
    evaluation, eval_report = None, None
    if eval_conversations is not None:
        evaluation, eval_report = tokenize_conversations(eval_conversations, recipe, tokenizer, template,
                                                         split="eval")
        eval_report.fingerprints = read_fingerprints
    if key is not None and sorted(read_fingerprints.values()) == sorted(fingerprints.values()):
        # (a file changed between hashing and reading is not stored under the old content's key)
        data_cache.store(key, train, evaluation, template, train_report, eval_report)
    return PreparedData(train, evaluation, template, train_report, eval_report)


def make_collator(recipe: Recipe, tokenizer):
    """The data collator for training and eval batches (padding or packed)."""
    from ftcli.data.packing import PackedCollator, PaddingCollator

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise UsageError("the tokenizer has neither a pad nor an EOS token", hint="use a tokenizer that defines one")
    if not recipe.data.packing:
        return PaddingCollator(pad_id)
    return PackedCollator(pad_id, flatten=recipe.model.attn_implementation == "flash_attention_2")
