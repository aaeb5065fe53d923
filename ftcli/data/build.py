"""Turn a split's sources into one Arrow table, in parallel: every record read, validated, rendered, tokenized and
masked once, by one process writing its own Arrow file; no process holds more than one piece of the data."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field
from pathlib import Path

from ftcli.data.formats import RecordConverter, RecordProblem
from ftcli.data.sources import MAX_LISTED_PROBLEMS, Piece, plan_pieces, raise_problems, read_piece
from ftcli.data.tokenize import TOKENIZE_CHUNK, tokenize_chunk, tokenize_preference_chunk
from ftcli.data.types import IGNORE_INDEX, Conversation
from ftcli.errors import DataError
from ftcli.recipe.schema import PREFERENCE_FORMATS, DataConfig, DataSourceConfig

# Below this much data one process is faster than starting several.
PARALLEL_MIN_BYTES = 8 << 20
PARALLEL_MIN_ROWS = 20_000
WRITE_BATCH_ROWS = 8192   # rows per record batch of a split's file: few batch headers to read when it is opened
MAX_LISTED_DROPS = 5
READ_HINT = "fix or remove the records named above"
SEQUENCE_COLUMNS = ("input_ids", "labels")
ROW_FIGURES = ("length", "trained", "record", "mismatches")
PAIR_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
UNPAIRED_COLUMNS = ("prompt_ids", "completion_ids", "label")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not on Linux
        return os.cpu_count() or 1


def resolve_processes(num_proc: int | str, pieces: list[Piece]) -> int:
    """data.num_proc as a number of processes: auto uses every core for large data, one process for small data."""
    if num_proc != "auto":
        return max(1, min(int(num_proc), len(pieces)))
    size = sum((piece.stop or 0) - piece.start for piece in pieces if piece.kind == "jsonl")
    rows = sum(piece.stop - piece.start for piece in pieces if piece.kind == "dataset")
    if size < PARALLEL_MIN_BYTES and rows < PARALLEL_MIN_ROWS:
        return 1
    return max(1, min(available_cores(), len(pieces)))


@dataclass
class PieceResult:
    """What one piece produced: its Arrow file and counts, or the problems that stop the preparation."""

    path: str | None = None
    records: int = 0
    problems: list[str] = field(default_factory=list)
    read_problem: bool = False               # the first problem is in reading (not in the record's content)
    fatal: tuple[str, str | None] | None = None
    dropped: list[tuple[int, str]] = field(default_factory=list)   # (record in the piece, origin), the first ones
    hint: str | None = None
    # Per written row, as numpy arrays once the piece is done: what the parent needs to split, mix and report
    # without opening the piece's Arrow file.
    columns: dict = field(default_factory=lambda: {name: [] for name in ROW_FIGURES})


def example_columns(data_format: str) -> tuple[str, ...]:
    """The columns of one example: a sequence and its labels, a preference pair's three parts, or an unpaired
    answer's prompt, completion and label."""
    return {"preference": PAIR_COLUMNS, "unpaired_preference": UNPAIRED_COLUMNS}.get(data_format, SEQUENCE_COLUMNS)


def columns_schema(names):
    """The Arrow schema of these columns: token ids as lists of int32, labels and the per-row figures."""
    import pyarrow as pa

    types = {
        "label": pa.bool_(),         # an unpaired answer is desirable
        "length": pa.int32(),        # tokens before truncation
        "trained": pa.int32(),       # labelled tokens after truncation (0: the example is dropped)
        "record": pa.int64(),        # the record's index in its piece
        "mismatches": pa.int16(),    # turn boundaries found through character offsets
    }
    return pa.schema([(name, types.get(name, pa.list_(pa.int32()))) for name in names])


def arrow_schema(data_format: str):
    return columns_schema([*example_columns(data_format), *ROW_FIGURES])


def tokenize_rows(chunk: list[Conversation], config: DataConfig, tokenizer, chat_template: str | None) -> dict:
    """The chunk's rows: its token columns, length, trained (the example's trained tokens) and mismatches."""
    if config.format in PREFERENCE_FORMATS:
        examples, mismatches = tokenize_preference_chunk(chunk, config, tokenizer, chat_template)
        rows = {"prompt_ids": [e.prompt_ids for e in examples], "length": [e.full_length for e in examples],
                # an example trains only while every answer keeps a token
                "trained": [min(len(answer) for answer in e.answer_ids) for e in examples],
                "mismatches": mismatches}
        if config.format == "preference":
            rows["chosen_ids"] = [e.answer_ids[0] for e in examples]
            rows["rejected_ids"] = [e.answer_ids[1] for e in examples]
        else:
            rows["completion_ids"] = [e.answer_ids[0] for e in examples]
            rows["label"] = [c.chosen is not None for c in chunk]
        return rows
    examples, mismatches = tokenize_chunk(chunk, config, tokenizer, chat_template)
    return {"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples],
            "length": [e.full_length for e in examples],
            "trained": [sum(1 for label in e.labels if label != IGNORE_INDEX) for e in examples],
            "mismatches": mismatches}


def split_configs(data: DataConfig, sources: list[DataSourceConfig]) -> list[DataConfig]:
    """Per source, the data section with that source's format, columns, sharegpt and system prompt."""
    return [data.model_copy(update={"format": s.format, "columns": s.columns, "sharegpt": s.sharegpt,
                                    "system_prompt": s.system_prompt}) for s in sources]


def build_piece(piece: Piece, configs: list[DataConfig], tokenizer, chat_template: str | None,
                path: Path, advance=None) -> PieceResult:
    """Read, validate, tokenize and write one piece; problems are collected, not raised (they cross processes).
    `advance(n)` is told of the records done, a chunk at a time (the progress display)."""
    import pyarrow as pa

    config = configs[piece.source]
    converter = RecordConverter(config)
    result = PieceResult(path=str(path), hint=converter.hint)
    schema = arrow_schema(config.format)
    chunk: list[tuple[int, Conversation]] = []
    reported = 0

    def flush(writer) -> None:
        nonlocal reported
        columns = tokenize_rows([c for _, c in chunk], config, tokenizer, chat_template)
        columns["record"] = [record for record, _ in chunk]
        for name in ROW_FIGURES:
            result.columns[name] += columns[name]
        for (record, conversation), trained in zip(chunk, columns["trained"]):
            if not trained and len(result.dropped) < MAX_LISTED_DROPS:
                result.dropped.append((record, conversation.origin))
        writer.write_batch(pa.record_batch([pa.array(columns[n], type=schema.field(n).type) for n in schema.names],
                                           schema=schema))
        chunk.clear()
        if advance is not None:
            advance(result.records - reported)
            reported = result.records

    try:
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for record in read_piece(piece):
                try:
                    conversation = converter(record)
                except RecordProblem as exc:
                    result.read_problem = result.read_problem or (not result.problems and record.problem is not None)
                    result.problems.append(f"{record.origin}: {exc}")
                    if len(result.problems) >= MAX_LISTED_PROBLEMS:
                        break
                    continue
                finally:
                    result.records += 1
                if result.problems:
                    continue   # keep validating, stop tokenizing: this preparation will not be used
                chunk.append((result.records - 1, conversation))
                if len(chunk) >= TOKENIZE_CHUNK:
                    flush(writer)
            if chunk and not result.problems:
                flush(writer)
    except DataError as exc:
        result.fatal = (exc.message, exc.hint)
    import numpy as np

    result.columns = {name: np.asarray(values, dtype=np.int64) for name, values in result.columns.items()}
    return result


# What forked processes inherit instead of receiving it with every piece (the tokenizer and datasets are large).
_FORKED_STATE: dict = {}


def _build_forked(index: int) -> PieceResult:
    state = _FORKED_STATE
    counter = state["done"]   # records done by all processes, which the parent shows

    def advance(records: int) -> None:
        with counter.get_lock():
            counter.value += records

    return build_piece(state["pieces"][index], state["configs"], state["tokenizer"], state["chat_template"],
                       state["folder"] / f"part-{index:05d}.arrow", advance)


@dataclass
class BuiltSplit:
    """A split prepared into the pieces' Arrow files, and per row (numpy arrays, in file order) what the pipeline
    needs to split, mix and report without reading the token columns."""

    part_paths: list[str]
    length: object                   # tokens before truncation
    trained: object                  # trained tokens after truncation (0: dropped)
    mismatches: object
    row_source: object               # the source index of each row
    row_record: object               # the record's index over all sources of the split
    records_per_source: list[int]
    dropped: list[tuple[int, str]]   # (record over the split, origin) of the first dropped examples
    processes: int

    @property
    def rows(self) -> int:
        return len(self.row_record)

    def write_rows(self, rows, columns: list[str], path: Path):
        """The rows `rows` (indices into the split, repeats allowed) with `columns`, written to the Arrow file
        `path` in batches of WRITE_BATCH_ROWS, from the pieces' files read without memory-mapping (so that their
        pages do not stay in this process's memory); rows come out in file order, each as many times as `rows`
        names it. Returns the memory-mapped datasets.Dataset of that file."""
        import numpy as np
        import pyarrow as pa
        from datasets import Dataset

        copies = np.bincount(np.asarray(rows, dtype=np.int64), minlength=self.rows)
        start, pending, writer = 0, [], None
        with pa.OSFile(str(path), "wb") as sink:
            for part in self.part_paths:
                with pa.OSFile(part, "rb") as source, pa.ipc.open_stream(source) as reader:
                    for batch in reader:
                        wanted = np.repeat(np.arange(batch.num_rows), copies[start:start + batch.num_rows])
                        start += batch.num_rows
                        selected = batch.select(columns)
                        writer = writer or pa.ipc.new_stream(sink, selected.schema)
                        if len(wanted):
                            pending.append(selected.take(pa.array(wanted)))
                        if sum(b.num_rows for b in pending) >= WRITE_BATCH_ROWS:
                            # One batch of the pending rows: opening a file reads every batch's header, and
                            # thousands of small batches left hundreds of MB of its pages in memory at 2M rows.
                            writer.write_table(pa.Table.from_batches(pending).combine_chunks())
                            pending = []
            if writer is None:   # no rows at all: the columns' schema, empty
                writer = pa.ipc.new_stream(sink, columns_schema(columns))
            if pending:
                writer.write_table(pa.Table.from_batches(pending).combine_chunks())
            writer.close()
        return Dataset.from_file(str(path))


def build_split(data: DataConfig, sources: list[DataSourceConfig], split: str, tokenizer,
                chat_template: str | None, folder: Path, console=None) -> BuiltSplit:
    """Every record of `sources` prepared into Arrow files under `folder`; DataError naming the first problems.
    The records done show on `console` as they are (ftcli.progress)."""
    import numpy as np

    from ftcli.progress import progress

    pieces = plan_pieces(sources, split, processes=max(1, available_cores()))
    processes = resolve_processes(data.num_proc, pieces)
    configs = split_configs(data, sources)
    folder.mkdir(parents=True, exist_ok=True)
    with progress(console, f"preparing {split} data (read, validate, tokenize)", unit="examples") as bar:
        if processes > 1:
            results = _build_in_processes(pieces, configs, tokenizer, chat_template, folder, processes, bar)
        else:
            results = []
            for index, piece in enumerate(pieces):
                results.append(build_piece(piece, configs, tokenizer, chat_template,
                                           folder / f"part-{index:05d}.arrow", bar.advance))
                if results[-1].problems or results[-1].fatal:
                    break
        _raise_first_problems(results)   # inside: a failed preparation gets no closing progress line

    records = np.array([result.records for result in results], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(records)[:-1]])
    rows = np.array([len(result.columns["record"]) for result in results], dtype=np.int64)
    records_per_source = [0] * len(sources)
    for piece, count in zip(pieces, records):
        records_per_source[piece.source] += int(count)
    for index, count in enumerate(records_per_source):
        if count == 0:
            raise DataError(f"{sources[index].path}: no records", hint="add at least one record")

    def joined(name: str):
        return np.concatenate([result.columns[name] for result in results])

    dropped = [(int(offset) + record, origin) for result, offset in zip(results, offsets)
               for record, origin in result.dropped]
    return BuiltSplit([result.path for result in results], joined("length"), joined("trained"),
                      joined("mismatches"), np.repeat([piece.source for piece in pieces], rows),
                      np.repeat(offsets, rows) + joined("record"), records_per_source, dropped, processes)


def _build_in_processes(pieces, configs, tokenizer, chat_template, folder: Path, processes: int, bar):
    import multiprocessing

    # The parent's tokenizer may already have used its own threads; in forked children that can deadlock, and the
    # processes are the parallelism now.
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    context = multiprocessing.get_context("fork")
    done = context.Value("q", 0)
    _FORKED_STATE.update(pieces=pieces, configs=configs, tokenizer=tokenizer, chat_template=chat_template,
                         folder=folder, done=done)
    results = []
    # Objects alive now stay out of the collector's reach in the children, so that collecting does not copy every
    # page of the parent's heap into each of them.
    gc.freeze()
    try:
        with context.Pool(processes) as pool:
            pending = pool.imap(_build_forked, range(len(pieces)))
            while True:
                try:   # waiting a second at most, to show what the processes have done meanwhile
                    result = pending.next(timeout=1.0)
                except multiprocessing.TimeoutError:
                    bar.update(completed=done.value)
                    continue
                except StopIteration:
                    break
                bar.update(completed=done.value)
                results.append(result)
                if sum(len(r.problems) for r in results) >= MAX_LISTED_PROBLEMS or result.fatal:
                    break   # leaving the with block stops the other processes
    finally:
        gc.unfreeze()
        _FORKED_STATE.clear()
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    return results


def _raise_first_problems(results: list[PieceResult]) -> None:
    problems: list[str] = []
    hint = None
    for result in results:
        if result.fatal and not problems:
            message, fatal_hint = result.fatal
            raise DataError(message, hint=fatal_hint)
        if result.problems and hint is None:
            hint = READ_HINT if result.read_problem else result.hint
        problems += result.problems
        if result.fatal or len(problems) >= MAX_LISTED_PROBLEMS:
            break
    raise_problems(problems[:MAX_LISTED_PROBLEMS], hint=hint)
