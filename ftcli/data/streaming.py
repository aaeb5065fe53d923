"""data.streaming: training examples read, validated and tokenized as training reaches them, never prepared whole."""

from __future__ import annotations

from ftcli.data.types import IGNORE_INDEX, DataReport, PreparedData
from ftcli.errors import DataError

STREAM_CHUNK = 64          # records tokenized together
SHUFFLE_BUFFER = 1_000     # examples shuffled within a window (seeded, so a resumed run sees the same order)


def _round_robin(streams):
    """(stream index, item) taking one item from each stream in turn until every stream is exhausted."""
    active = list(enumerate(streams))
    while active:
        still = []
        for index, stream in active:
            item = next(stream, None)
            if item is not None:
                still.append((index, stream))
                yield index, item
        active = still


def stream_examples(recipe, tokenizer, chat_template):
    """{input_ids, labels} of every training record in source order (several sources alternate record by record);
    a bad record raises DataError naming its file and line when it is reached; examples left with no trained token
    after truncation are skipped."""
    from ftcli.data.build import READ_HINT, split_configs
    from ftcli.data.formats import RecordConverter, RecordProblem
    from ftcli.data.sources import stream_records
    from ftcli.data.tokenize import tokenize_chunk

    data = recipe.data
    sources = data.sources("train")
    configs = split_configs(data, sources)
    converters = [RecordConverter(config) for config in configs]
    pending: list[tuple[int, object]] = []

    def tokenized():
        examples = {}
        for index in sorted({source for source, _ in pending}):
            positions = [n for n, (source, _) in enumerate(pending) if source == index]
            chunk, _ = tokenize_chunk([pending[n][1] for n in positions], configs[index], tokenizer, chat_template)
            examples.update(zip(positions, chunk))
        pending.clear()
        for position in sorted(examples):
            example = examples[position]
            if any(label != IGNORE_INDEX for label in example.labels):
                yield {"input_ids": example.input_ids, "labels": example.labels}

    streams = [stream_records(source, index, "train") for index, source in enumerate(sources)]
    for index, record in _round_robin(streams):
        try:
            pending.append((index, converters[index](record)))
        except RecordProblem as exc:
            yield from tokenized()
            raise DataError(f"{record.origin}: {exc}",
                            hint=(READ_HINT if record.problem else converters[index].hint)
                            + "; then continue with: ftcli train RECIPE --resume") from None
        if len(pending) >= STREAM_CHUNK:
            yield from tokenized()
    yield from tokenized()


def prepare_streaming(recipe, tokenizer, chat_template, prepare_eval) -> PreparedData:
    """The training data as a datasets.IterableDataset over the sources; eval data (data.eval) prepared whole by
    `prepare_eval`, as without streaming."""
    from datasets import IterableDataset

    from ftcli.data.sources import source_files

    for source in recipe.data.sources("train"):
        source_files(source)   # a missing file fails now, not at the first step
    train = IterableDataset.from_generator(
        stream_examples, gen_kwargs={"recipe": recipe, "tokenizer": tokenizer, "chat_template": chat_template})
    train = train.shuffle(seed=recipe.data_seed, buffer_size=SHUFFLE_BUFFER)
    evaluation, eval_report = prepare_eval(recipe, tokenizer, chat_template) if recipe.data.eval else (None, None)
    return PreparedData(train, evaluation, chat_template, DataReport(), eval_report)
