"""Recipe data -> tokenized datasets: sources, record formats, chat templates, loss masking, validation, mixing, cache.

The public entry of the data package: sources (files, globs, folders, hub), formats (records -> Conversations),
templates (chat template choice and rendering), tokenize (masks), build (all of it into Arrow, in parallel), mixing
(val_split and weights), packing (rows, collators), streaming and cache. A missing file or an unreachable hub dataset
is NotAvailableError (exit 4); bad content is DataError (exit 3), naming the file and line.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ftcli.data.formats import RecordConverter, RecordProblem
from ftcli.data.mixing import held_out_records, mix_rows
from ftcli.data.sources import (
    MAX_LISTED_PROBLEMS,
    hub_reference,
    iter_records,
    open_dataset,
    raise_problems,
    source_files,
)
from ftcli.data.templates import CHATML_TEMPLATE, resolve_chat_template, split_for_generation
from ftcli.data.types import IGNORE_INDEX, Conversation, DataReport, PreparedData
from ftcli.errors import DataError, UsageError
from ftcli.recipe.schema import DataConfig, DataSourceConfig, Recipe

__all__ = [
    "IGNORE_INDEX", "CHATML_TEMPLATE", "Conversation", "DataReport", "PreparedData", "resolve_chat_template",
    "load_conversations", "first_conversations", "prepare_data", "tokenize_conversations", "make_collator",
    "split_for_generation", "with_eval_source", "data_fingerprints",
]
PACKING_UNSUPPORTED = ("prefix", "prompt")   # their virtual tokens shift positions and bypass the packed mask
SETTINGS_NOT_IN_KEY = {"num_proc", "streaming"}   # how fast, never what


def with_eval_source(data: DataConfig, source: str) -> DataConfig:
    """`data` with its eval split read from `source` (eval --data FILE), in any supported format."""
    return data.model_copy(update={"eval": str(source), "val_split": None})


# ---------------------------------------------------------------------------------------------- conversations


def _convert(sources: list[DataSourceConfig], data: DataConfig, split: str, wanted=None, limit: int | None = None,
             console=None) -> list[Conversation]:
    """The conversations of the records whose index over the split is in `wanted` (all when None)."""
    from ftcli.data.build import READ_HINT, split_configs
    from ftcli.progress import progress

    converters = [RecordConverter(config) for config in split_configs(data, sources)]
    conversations, problems, hint = [], [], None
    with progress(console, f"reading {split} data (read, validate)", unit="examples") as bar:
        for index, (source, record) in enumerate(iter_records(sources, split)):
            bar.advance()
            if wanted is not None and index not in wanted:
                continue
            try:
                conversations.append(converters[source](record))
            except RecordProblem as exc:
                hint = hint or (READ_HINT if record.problem else converters[source].hint)
                problems.append(f"{record.origin}: {exc}")
                if len(problems) >= MAX_LISTED_PROBLEMS:
                    break
            if limit is not None and len(conversations) >= limit:
                break
    raise_problems(problems, hint=hint)
    return conversations


def load_conversations(data: DataConfig, split: str = "train", *, seed: int = 42, console=None
                       ) -> list[Conversation]:
    """Read and validate the records of `split` (train | eval; eval honours val_split), held in memory: for eval
    sets and tests (training prepares through prepare_data). DataError (exit 3) on bad input. The records read
    show on `console` (ftcli.progress)."""
    if split not in ("train", "eval"):
        raise UsageError(f"unknown data split {split!r}; use train or eval")
    if split == "eval" and data.eval is not None:   # the training files are not needed (they may be gone)
        return _convert(data.sources("eval"), data, "eval", console=console)
    if data.val_split is None:
        if split == "eval":
            raise DataError("the recipe has no eval data", hint="set data.eval or data.val_split, or pass --data FILE")
        return _convert(data.sources("train"), data, "train", console=console)
    sources = data.sources("train")
    total = sum(1 for _ in iter_records(sources, "train"))
    held_out = set(held_out_records(total, data.val_split, seed).tolist())
    if split == "eval":
        return _convert(sources, data, "train", held_out, console=console)
    return _convert(sources, data, "train", set(range(total)) - held_out, console=console)


def first_conversations(data: DataConfig, count: int) -> list[Conversation]:
    """The first `count` training conversations, read without reading the rest (preflight's samples)."""
    return _convert(data.sources("train"), data, "train", limit=count)


# ---------------------------------------------------------------------------------------------- fingerprints


def source_fingerprints(source: DataSourceConfig, split: str) -> dict[str, str]:
    """{name: content fingerprint} of one source: sha256 of each file (remembered by size and mtime), or the hub
    dataset's own fingerprint with its config, split and revision."""
    from ftcli.data.cache import remembered_sha256

    files = source_files(source)
    if files is not None:
        return {str(path): remembered_sha256(path) for path in files}
    if Path(source.path).expanduser().is_dir():
        folder = Path(source.path).expanduser()
        return {f"{folder}/{path.relative_to(folder)}": remembered_sha256(path)
                for path in sorted(p for p in folder.rglob("*") if p.is_file())}
    dataset, where = open_dataset(source, split)
    dataset_id, _ = hub_reference(source)
    return {where: f"hub:{dataset_id}:{source.config}:{source.revision}:{dataset._fingerprint}"}


def data_fingerprints(data: DataConfig, splits: tuple[str, ...] = ("train", "eval")) -> dict[str, str]:
    """Content fingerprints of every source of `splits` (see source_fingerprints)."""
    fingerprints: dict[str, str] = {}
    for split in splits:
        for source in data.sources(split):
            fingerprints.update(source_fingerprints(source, split))
    return fingerprints


# ---------------------------------------------------------------------------------------------- reports


def length_stats(lengths) -> dict[str, float]:
    import numpy as np

    if len(lengths) == 0:
        return {}
    ordered = np.sort(np.asarray(lengths))
    n = len(ordered)

    def quantile(q: float) -> float:
        return float(ordered[min(n - 1, int(q * n))])

    return {"min": float(ordered[0]), "p50": quantile(0.5), "p90": quantile(0.9), "p99": quantile(0.99),
            "max": float(ordered[-1]), "mean": round(float(ordered.mean()), 2)}


def split_report(lengths, trained, mismatches, max_length: int) -> DataReport:
    """The figures of a split's examples (every converted record, dropped ones included) from their columns."""
    import numpy as np

    lengths, trained = np.asarray(lengths, dtype=np.int64), np.asarray(trained, dtype=np.int64)
    kept = trained > 0
    return DataReport(
        examples=len(lengths), truncated=int((lengths > max_length).sum()), dropped=int((~kept).sum()),
        trained_tokens=int(trained[kept].sum()), total_tokens=int(np.minimum(lengths, max_length)[kept].sum()),
        length_stats=length_stats(lengths), prefix_mismatches=int(np.asarray(mismatches).sum()),
    )


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


# ---------------------------------------------------------------------------------------------- in memory


def tokenize_conversations(conversations: list[Conversation], recipe: Recipe, tokenizer, chat_template: str | None,
                           *, packing: bool | None = None, split: str = "train", console=None):
    """(in-memory datasets.Dataset of input_ids + labels [+ seq_lengths when packed], DataReport), with the masks
    of training: for eval sets and samples. Examples with no trained token left after truncation are dropped and
    counted; DataError when none remain or when more than data.max_dropped_fraction are dropped."""
    from datasets import Dataset

    from ftcli.data.build import tokenize_rows
    from ftcli.data.packing import pack_examples
    from ftcli.data.tokenize import TOKENIZE_CHUNK

    data = recipe.data
    packing = data.packing if packing is None else packing
    if not conversations:
        raise DataError(f"no {split} examples", hint="check data.train / data.eval")
    from ftcli.progress import progress

    rows: dict[str, list] = {}
    with progress(console, f"tokenizing {split} data", total=len(conversations), unit="examples") as bar:
        for start in range(0, len(conversations), TOKENIZE_CHUNK):
            chunk = conversations[start:start + TOKENIZE_CHUNK]
            config = data.model_copy(update={"format": "text" if chunk[0].messages is None else "chat"})
            for name, values in tokenize_rows(chunk, config, tokenizer, chat_template).items():
                rows.setdefault(name, []).extend(values)
            bar.advance(len(chunk))
    trained = rows["trained"]
    report = split_report(rows["length"], trained, rows["mismatches"], data.max_length)
    first_dropped = next((c.origin for c, t in zip(conversations, trained) if not t), None)
    _check_dropped(report, data, split, first_dropped)
    kept = [(ids, labels) for ids, labels, t in zip(rows["input_ids"], rows["labels"], trained) if t]
    if packing:
        packed = pack_examples(kept, data.max_length)
        report.trained_tokens = sum(sum(1 for t in r.labels if t != IGNORE_INDEX) for r in packed)
        report.packing_efficiency = round(report.total_tokens / (len(packed) * data.max_length), 4)
        columns = {"input_ids": [r.input_ids for r in packed], "labels": [r.labels for r in packed],
                   "seq_lengths": [r.seq_lengths for r in packed]}
    else:
        columns = {"input_ids": [ids for ids, _ in kept], "labels": [labels for _, labels in kept]}
    report.rows = len(columns["input_ids"])
    return Dataset.from_dict(columns), report


# ---------------------------------------------------------------------------------------------- prepared in Arrow


def prepare_data(recipe: Recipe, tokenizer, console=None) -> PreparedData:
    """Validate, render, tokenize, mask, split, mix and (optionally) pack train and eval data into memory-mapped
    Arrow, cached by content; a cache hit reads no data file (see cache.remembered_sha256). With data.streaming the
    training data is an iterable dataset read as training goes (ftcli.data.streaming). The preparation's progress
    shows on `console` (ftcli.progress)."""
    _check_packing(recipe)
    template = resolve_chat_template(recipe.data, tokenizer)
    if recipe.objective.kind == "grpo":   # prompts and reference answers, not token sequences
        return _prepared_prompts(recipe, tokenizer, template, console)
    if recipe.data.streaming:
        from ftcli.data.streaming import prepare_streaming

        def prepare_eval(recipe, tokenizer, template):
            prepared = _prepared_cached(recipe, tokenizer, template, train=False, console=console)
            return prepared.eval, prepared.eval_report

        return prepare_streaming(recipe, tokenizer, template, prepare_eval)
    return _prepared_cached(recipe, tokenizer, template, console=console)


def _prepared_prompts(recipe: Recipe, tokenizer, template: str | None, console=None) -> PreparedData:
    """objective grpo's train (and eval) prompts with their reference answers (ftcli.data.prompts)."""
    from ftcli.data.prompts import prompt_split

    data = recipe.data
    train, train_report = prompt_split(load_conversations(data, "train", seed=recipe.data_seed, console=console),
                                       recipe, tokenizer, template, "train")
    train_report.fingerprints = data_fingerprints(data)
    evaluation = eval_report = None
    if data.eval is not None or data.val_split is not None:
        evaluation, eval_report = prompt_split(load_conversations(data, "eval", seed=recipe.data_seed,
                                                                  console=console), recipe, tokenizer, template,
                                               "eval")
    return PreparedData(train=train, eval=evaluation, chat_template=template, train_report=train_report,
                        eval_report=eval_report)


def _prepared_cached(recipe: Recipe, tokenizer, template: str | None, *, train: bool = True,
                     console=None) -> PreparedData:
    from ftcli.atomic import staged_dir
    from ftcli.data import cache as data_cache

    data = recipe.data
    seed = recipe.data_seed
    splits = ("train", "eval") if train else ("eval",)
    fingerprints = data_fingerprints(data, splits)
    key = data_cache.cache_key({
        "data": data.model_dump(mode="json", exclude=SETTINGS_NOT_IN_KEY | (set() if train else {"train"})),
        "seed": seed if (data.val_split or any(s.mixes for s in data.sources("train") + data.sources("eval")))
        else None,
        "files": fingerprints, "tokenizer": data_cache.tokenizer_fingerprint(tokenizer), "template": template,
    })
    cached = data_cache.load_cached(key)
    if cached is not None:
        return PreparedData(*cached)
    # Ranks of a multi-process run may prepare the same entry at once: the first one written is kept.
    with staged_dir(data_cache.entry_dir(key), keep_existing=True) as staging:
        train_data, evaluation, train_report, eval_report = _prepare(recipe, tokenizer, template, seed, staging,
                                                                     train=train, console=console)
        for report in (train_report, eval_report):
            if report is not None:
                report.fingerprints = fingerprints
        if train_data is None:   # only the eval set (streaming runs): an empty train table keeps one layout
            train_report = DataReport()
            data_cache.write_empty_split(staging / data_cache.TRAIN_FILE)
        data_cache.write_entry(staging, template, train_report, eval_report)
        del train_data, evaluation   # memory-mapped files of the staging folder
        shutil.rmtree(staging / "parts", ignore_errors=True)
        if data_fingerprints(data, splits) != fingerprints:
            raise DataError("a data file changed while it was being prepared", hint="run the command again")
    cached = data_cache.load_cached(key)
    if cached is None:
        raise DataError(f"the prepared data could not be read back from {data_cache.entry_dir(key)}",
                        hint="check the disk, or remove that folder and run again")
    return PreparedData(*cached)


def _prepare(recipe: Recipe, tokenizer, template: str | None, seed: int, staging: Path, *, train: bool = True,
             console=None):
    import numpy as np

    from ftcli.data.build import build_split

    data = recipe.data
    splits = {}
    if train:
        splits["train"] = build_split(data, data.sources("train"), "train", tokenizer, template,
                                      staging / "parts" / "train", console)
    if data.eval is not None:
        splits["eval"] = build_split(data, data.sources("eval"), "eval", tokenizer, template,
                                     staging / "parts" / "eval", console)
    results = {}
    for name, built in splits.items():
        rows = np.arange(built.rows)
        if name == "train" and data.val_split is not None:
            held_out = np.isin(built.row_record, held_out_records(sum(built.records_per_source), data.val_split, seed))
            results["train"] = _finish(recipe, built, rows[~held_out], "train", staging, seed)
            results["eval"] = _finish(recipe, built, rows[held_out], "eval", staging, seed, mix=False)
        else:
            results[name] = _finish(recipe, built, rows, name, staging, seed)
    train_dataset, train_report = results.get("train", (None, None))
    eval_dataset, eval_report = results.get("eval", (None, None))
    return train_dataset, eval_dataset, train_report, eval_report


def _finish(recipe: Recipe, built, rows, split: str, staging: Path, seed: int, *, mix: bool = True):
    """The rows of one split checked, mixed and packed: (datasets.Dataset, DataReport)."""
    import numpy as np

    from ftcli.data.build import example_columns
    from ftcli.data.cache import SPLIT_FILES
    from ftcli.data.packing import pack_dataset

    data = recipe.data
    lengths, trained = built.length[rows], built.trained[rows]
    report = split_report(lengths, trained, built.mismatches[rows], data.max_length)
    report.processes = built.processes
    dropped_here = np.isin([record for record, _ in built.dropped], built.row_record[rows])
    first_dropped = next((origin for (_, origin), here in zip(built.dropped, dropped_here) if here), None)
    _check_dropped(report, data, split, first_dropped)
    kept = rows[trained > 0]
    sources = data.sources(split if split == "eval" and data.eval is not None else "train")
    tokens = np.minimum(built.length, data.max_length)
    all_trained = built.trained
    by_source = [kept[built.row_source[kept] == index] for index in range(len(sources))]
    selected = mix_rows(by_source, sources if mix else [None] * len(sources), seed)
    if mix:   # (a val_split's eval rows are a sample of the train sources, not a mix)
        report.sources = _source_shares(sources, by_source, selected, tokens, all_trained, built.records_per_source)
    chosen = np.concatenate(selected) if selected else np.array([], dtype=np.int64)
    report.total_tokens = int(tokens[chosen].sum())
    report.trained_tokens = int(all_trained[chosen].sum())
    columns = [*example_columns(sources[0].format), "trained"]
    if data.packing:
        import pyarrow.compute as pc

        unpacked = built.write_rows(chosen, columns, staging / "parts" / f"{split}-rows.arrow")
        lengths = pc.list_value_length(unpacked.data.column("input_ids")).to_numpy()
        dataset = pack_dataset(unpacked, lengths, data.max_length, staging / SPLIT_FILES[split])
    else:
        dataset = built.write_rows(chosen, columns, staging / SPLIT_FILES[split])
    if data.packing:
        report.trained_tokens = int(np.asarray(dataset.data.column("trained").to_numpy()).sum())
        report.packing_efficiency = round(report.total_tokens / (len(dataset) * data.max_length), 4)
    report.rows = len(dataset)
    return dataset, report


def _source_shares(sources, by_source, selected, tokens, trained, records_per_source) -> list[dict]:
    used_tokens = [int(tokens[rows].sum()) for rows in selected]
    all_examples, all_tokens = sum(len(rows) for rows in selected) or 1, sum(used_tokens) or 1
    return [{
        "source": source.path, "format": source.format, "records": records, "examples": len(available),
        "used": len(rows), "tokens": tokens_used, "trained_tokens": int(trained[rows].sum()),
        "share_examples": round(len(rows) / all_examples, 4), "share_tokens": round(tokens_used / all_tokens, 4),
    } for source, available, rows, tokens_used, records in zip(sources, by_source, selected, used_tokens,
                                                                records_per_source)]


def make_collator(recipe: Recipe, tokenizer):
    """The data collator for training and eval batches (padding or packed)."""
    from ftcli.data.packing import PackedCollator, PaddingCollator

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise UsageError("the tokenizer has neither a pad nor an EOS token", hint="use a tokenizer that defines one")
    if not recipe.data.packing:
        return PaddingCollator(pad_id)
    return PackedCollator(pad_id, flatten=recipe.model.attn_implementation == "flash_attention_2")
