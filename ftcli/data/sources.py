"""Find the records of a data source (files, globs and folders of shards, saved datasets, hub datasets) and read them
in pieces that separate processes read independently, every record with the file and line it came from."""

from __future__ import annotations

import codecs
import csv
import glob
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftcli.errors import DataError, NotAvailableError
from ftcli.paths import is_local_path
from ftcli.recipe.schema import DataSourceConfig

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
SPLITTABLE_SUFFIXES = (".jsonl", ".parquet")   # read in pieces; a .json array or a .csv is read whole
MAX_LISTED_PROBLEMS = 5
HUB_OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
SAVED_DATASET_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
MIN_PIECE_BYTES = 4 << 20       # smaller pieces cost more in process overhead than they gain
MAX_PIECE_BYTES = 64 << 20      # a piece is read whole by its process
DATASET_PIECE_ROWS = 50_000
SCAN_BLOCK = 16 << 20


@dataclass(frozen=True)
class RawRecord:
    """One record as read, with `origin` naming its file and line (or row); `problem` says why it is unusable."""

    fields: dict[str, Any] | None
    origin: str
    problem: str | None = None


@dataclass(frozen=True)
class Piece:
    """A part of one source that one process reads: a byte range of a JSON Lines file (starting at `first_line`),
    a whole .json or .csv file, a range of row groups of a Parquet file, or a range of rows of a dataset."""

    source: int                      # index of the source in its split
    kind: str                        # jsonl | json | csv | parquet | dataset
    name: str                        # the file (or dataset[split]) named in messages
    start: int = 0                   # bytes (jsonl), row group (parquet) or row (dataset)
    stop: int | None = None
    first_line: int = 1              # line number (jsonl) or row index (parquet) of the first record
    dataset: Any = None              # the datasets.Dataset of kind dataset (memory-mapped)


def reference_of(source: DataSourceConfig | str) -> str:
    return source if isinstance(source, str) else source.path


def _is_glob(reference: str) -> bool:
    return any(char in reference for char in "*?[")


def source_files(source: DataSourceConfig) -> list[Path] | None:
    """The data files of a local source (a file, a glob, or a folder of files), None for a saved dataset folder or
    a hub dataset; NotAvailableError when nothing is there."""
    reference = os.path.expanduser(source.path)
    if _is_glob(reference):
        files = sorted(Path(p) for p in glob.glob(reference, recursive=True) if Path(p).is_file())
        if not files:
            raise NotAvailableError(f"no data file matches {reference}",
                                    hint="check the glob in data.train / data.eval")
        for path in files:
            _check_suffix(path)
        return files
    if not is_local_path(source.path):
        return None
    path = Path(reference)
    if not path.exists():
        raise NotAvailableError(
            f"data file not found: {path}",
            hint="check data.train / data.eval in the recipe (relative paths are relative to the recipe file)",
        )
    if path.is_dir():
        if any((path / marker).exists() for marker in SAVED_DATASET_MARKERS):
            return None
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FILE_SUFFIXES)
        if not files:
            raise DataError(
                f"{path} is a folder with no data files ({', '.join(FILE_SUFFIXES)}) and not a folder saved by "
                "datasets' save_to_disk",
                hint="point data.train at a file, a glob such as data/*.jsonl, or a saved dataset folder",
            )
        return files
    _check_suffix(path)
    return [path]


def _check_suffix(path: Path) -> None:
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise DataError(
            f"{path}: unsupported data file type {path.suffix or '(no suffix)'!r}",
            hint=f"use one of {', '.join(FILE_SUFFIXES)}, or a folder saved with datasets' save_to_disk",
        )


def plan_pieces(sources: list[DataSourceConfig], split: str, processes: int) -> list[Piece]:
    """Every source of a split cut into pieces, in record order; about four pieces per process for big files, and
    one piece per file for a single process (no scan for line boundaries: it reads a file in order anyway)."""
    pieces: list[Piece] = []
    total = sum(path.stat().st_size for s in sources for path in (source_files(s) or []))
    target = (min(MAX_PIECE_BYTES, max(MIN_PIECE_BYTES, total // (4 * processes))) if processes > 1
              else max(total, 1))
    for index, source in enumerate(sources):
        files = source_files(source)
        if files is None:
            dataset, name = open_dataset(source, split)
            pieces += [Piece(index, "dataset", name, start, min(start + DATASET_PIECE_ROWS, len(dataset)),
                             first_line=start, dataset=dataset)
                       for start in range(0, len(dataset), DATASET_PIECE_ROWS)]
            continue
        for path in files:
            if path.stat().st_size == 0 or not _has_content(path):
                raise DataError(f"{path}: the data file is empty",
                                hint="point data.train / data.eval at a file with records")
            suffix = path.suffix.lower()
            if suffix == ".jsonl":
                pieces += _jsonl_pieces(index, path, target)
            elif suffix == ".parquet":
                pieces += _parquet_pieces(index, path, target)
            else:
                pieces.append(Piece(index, suffix[1:], str(path)))
    return pieces


def _has_content(path: Path) -> bool:
    with open(path, "rb") as handle:
        while block := handle.read(1 << 16):
            if block.strip().removeprefix(codecs.BOM_UTF8).strip():
                return True
    return False


def _jsonl_pieces(source: int, path: Path, target: int) -> list[Piece]:
    """Byte ranges of about `target` bytes ending at line ends, each with the number of its first line."""
    size = path.stat().st_size
    start = _bom_length(path)
    if size - start <= target:
        return [Piece(source, "jsonl", str(path), start, size)]
    pieces: list[Piece] = []
    line, piece_start, piece_line, position = 1, start, 1, start
    with open(path, "rb") as handle:
        handle.seek(start)
        while block := handle.read(SCAN_BLOCK):
            counted = 0   # newlines of the block before this index are in `line`
            while (wanted := piece_start + target - position) < len(block):
                cut = block.find(b"\n", max(counted, wanted))
                if cut < 0:
                    break
                line += block.count(b"\n", counted, cut + 1)
                counted = cut + 1
                pieces.append(Piece(source, "jsonl", str(path), piece_start, position + counted, piece_line))
                piece_start, piece_line = position + counted, line
            line += block.count(b"\n", counted)
            position += len(block)
    if piece_start < size:
        pieces.append(Piece(source, "jsonl", str(path), piece_start, size, piece_line))
    return pieces


def _bom_length(path: Path) -> int:
    with open(path, "rb") as handle:
        return len(codecs.BOM_UTF8) if handle.read(3) == codecs.BOM_UTF8 else 0


def _parquet_pieces(source: int, path: Path, target: int) -> list[Piece]:
    import pyarrow.parquet as pq

    try:
        metadata = pq.ParquetFile(path).metadata
    except Exception as exc:  # pyarrow raises several unrelated types for a corrupt file
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    pieces, group, row = [], 0, 0
    while group < metadata.num_row_groups:
        first_group, first_row, size = group, row, 0
        while group < metadata.num_row_groups and (size == 0 or size < target):
            size += metadata.row_group(group).total_byte_size
            row += metadata.row_group(group).num_rows
            group += 1
        pieces.append(Piece(source, "parquet", str(path), first_group, group, first_row))
    return pieces


def read_piece(piece: Piece) -> Iterator[RawRecord]:
    """The records of one piece, in order (unreadable ones carry their problem); DataError for an unreadable file."""
    readers = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet,
               "dataset": _read_dataset}
    return readers[piece.kind](piece)


def iter_records(sources: list[DataSourceConfig], split: str) -> Iterator[tuple[int, RawRecord]]:
    """(source index, record) for every record of the sources, in order, read in this process."""
    for piece in plan_pieces(sources, split, processes=1):
        for record in read_piece(piece):
            yield piece.source, record


def _lines(piece: Piece) -> Iterator[bytes]:
    """The lines of a byte range of a file, read a buffer at a time (never the whole range at once)."""
    stop = piece.stop if piece.stop is not None else os.path.getsize(piece.name)
    with open(piece.name, "rb") as handle:
        handle.seek(piece.start)
        position = piece.start
        while position < stop:
            raw = handle.readline()
            if not raw:
                return
            position += len(raw)
            yield raw


def _read_jsonl(piece: Piece) -> Iterator[RawRecord]:
    for number, raw in enumerate(_lines(piece), start=piece.first_line):
        if not raw.strip():
            continue
        origin = f"{piece.name}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield RawRecord(None, origin, f"invalid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})")
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            yield RawRecord(None, origin, f"not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(value, dict):
            yield RawRecord(None, origin, f"expected a JSON object per line, got {type(value).__name__}")
            continue
        yield RawRecord(value, origin)


def _decode(path: str, content: bytes) -> str:
    try:
        return content.removeprefix(codecs.BOM_UTF8).decode("utf-8")
    except UnicodeDecodeError as exc:
        line = content[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: invalid UTF-8 (byte 0x{content[exc.start]:02x} at offset {exc.start})",
            hint="re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)",
        ) from None


def _read_json(piece: Piece) -> Iterator[RawRecord]:
    path = piece.name
    text = _decode(path, Path(path).read_bytes())
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):   # JSON Lines named .json
            yield from _read_jsonl(Piece(piece.source, "jsonl", path, _bom_length(Path(path))))
            return
        raise DataError(
            f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})",
            hint="a .json file holds one JSON array of records; use .jsonl for one record per line",
        ) from None
    if isinstance(value, dict):
        lists = [key for key, item in value.items() if isinstance(item, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON array of records (or an object with one list of records)",
                            hint="write the records as [{...}, {...}]")
        value = value[lists[0]]
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON array of records, got {type(value).__name__}")
    for index, item in enumerate(value):
        origin = f"{path} record {index}"
        if isinstance(item, dict):
            yield RawRecord(item, origin)
        else:
            yield RawRecord(None, origin, f"expected a JSON object, got {type(item).__name__}")


def _read_csv(piece: Piece) -> Iterator[RawRecord]:
    path = piece.name
    reader = csv.DictReader(io.StringIO(_decode(path, Path(path).read_bytes()), newline=""))
    row_start = 2
    try:
        for row in reader:
            if None in row:
                raise DataError(f"{path}:{row_start}: more values than header columns "
                                f"({', '.join(reader.fieldnames or [])})")
            yield RawRecord(dict(row), f"{path}:{row_start}")
            row_start = reader.line_num + 1
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None


def _read_parquet(piece: Piece) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(piece.name).iter_batches(batch_size=4096,
                                                          row_groups=list(range(piece.start, piece.stop)))
        row = piece.first_line
        for batch in batches:
            for fields in batch.to_pylist():
                yield RawRecord(fields, f"{piece.name} row {row}")
                row += 1
    except DataError:
        raise
    except Exception as exc:  # pyarrow raises several unrelated types for a corrupt file
        raise DataError(f"{piece.name}: not a readable Parquet file ({exc})") from None


def _read_dataset(piece: Piece) -> Iterator[RawRecord]:
    rows = piece.dataset.select(range(piece.start, piece.stop))
    for row, fields in enumerate(rows, start=piece.start):
        yield RawRecord(fields, f"{piece.name} row {row}")


def _pick_split(splits: list[str], split: str, where: str) -> str:
    wanted = ("train",) if split == "train" else ("validation", "eval", "test", "valid", "dev")
    for name in wanted:
        if name in splits:
            return name
    if len(splits) == 1:
        return splits[0]
    raise DataError(
        f"{where}: no {split} split among {', '.join(splits)}",
        hint="name the split: data.train: {path: ..., split: NAME} (or ID:SPLIT for a hub dataset)",
    )


def open_dataset(source: DataSourceConfig, split: str):
    """(datasets.Dataset, its name for messages) of a saved dataset folder or a hub dataset (memory-mapped)."""
    if is_local_path(source.path):
        return _open_saved(Path(os.path.expanduser(source.path)), source, split)
    return _open_hub(source, split, streaming=False)


def _open_saved(path: Path, source: DataSourceConfig, split: str):
    from datasets import DatasetDict, load_from_disk

    try:
        loaded = load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"{path}: cannot load the saved dataset ({exc})") from None
    where = str(path)
    if isinstance(loaded, DatasetDict):
        name = source.split or _pick_split(list(loaded), split, str(path))
        if name not in loaded:
            raise DataError(f"{path}: no split {name!r} (it has {', '.join(loaded)})", hint="check the split")
        loaded, where = loaded[name], f"{path}[{name}]"
    if len(loaded) == 0:
        raise DataError(f"{where}: the saved dataset is empty")
    return loaded, where


def hub_reference(source: DataSourceConfig) -> tuple[str, str | None]:
    """(dataset id, split) of a hub source: its split field, else the ID:SPLIT spelling."""
    dataset_id, _, named_split = source.path.removeprefix("hf:").partition(":")
    return dataset_id, source.split or named_split or None


def _open_hub(source: DataSourceConfig, split: str, *, streaming: bool):
    dataset_id, named_split = hub_reference(source)
    if any(os.environ.get(name, "").lower() in ("1", "true", "yes", "on") for name in HUB_OFFLINE_ENV):
        raise NotAvailableError(
            f"hub dataset {dataset_id} is not available offline (HF_HUB_OFFLINE is set)",
            hint="download it where the hub is reachable and point data.train at a local file or saved folder",
        )
    from datasets import get_dataset_split_names, load_dataset

    options = {"name": source.config, "revision": source.revision}
    try:
        name = named_split or _pick_split(get_dataset_split_names(dataset_id, **options), split, dataset_id)
        loaded = load_dataset(dataset_id, split=name, streaming=streaming, **options)
    except DataError:
        raise
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NotAvailableError(
            f"hub dataset {dataset_id} is not available: {first_line}",
            hint="check the id, config, split and revision, and your connection; or use a local file",
        ) from None
    where = f"{dataset_id}[{name}]"
    if not streaming and len(loaded) == 0:
        raise DataError(f"{where}: the dataset is empty")
    return loaded, where


def stream_records(source: DataSourceConfig, index: int, split: str) -> Iterator[RawRecord]:
    """The records of one source read as training reaches them (hub datasets with streaming=True)."""
    files = source_files(source)
    if files is not None:
        for piece in plan_pieces([source], split, processes=1):
            yield from read_piece(piece)
        return
    if is_local_path(source.path):
        dataset, where = open_dataset(source, split)
        yield from _read_dataset(Piece(index, "dataset", where, 0, len(dataset), dataset=dataset))
        return
    dataset, where = _open_hub(source, split, streaming=True)
    for row, fields in enumerate(dataset):
        yield RawRecord(fields, f"{where} row {row}")


def raise_problems(problems: list[str], *, hint: str | None = None) -> None:
    """One DataError listing every problem found (the first names its place on the first line)."""
    if not problems:
        return
    if len(problems) == 1:
        raise DataError(problems[0], hint=hint)
    more = "" if len(problems) < MAX_LISTED_PROBLEMS else " (stopped after the first ones)"
    raise DataError(f"{problems[0]}\n" + "\n".join(f"  {p}" for p in problems[1:])
                    + f"\n  {len(problems)} problems{more}",
                    hint=hint)
