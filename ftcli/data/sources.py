"""Read raw data records from local files, `datasets` folders and hub datasets, each with the place it came from."""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftcli.errors import DataError, NotAvailableError
from ftcli.hashing import sha256_file, sha256_folder
from ftcli.paths import is_local_path

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
MAX_LISTED_PROBLEMS = 5
HUB_OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@dataclass(frozen=True)
class RawRecord:
    """One record as read, with `origin` naming its file and line (or row) for error messages."""

    fields: dict[str, Any]
    origin: str


@dataclass(frozen=True)
class SourceData:
    """The records of one source and a fingerprint of its content (sha256 of the bytes, or the hub revision)."""

    name: str
    records: list[RawRecord]
    fingerprint: str


def as_source_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _existing_path(reference: str) -> Path:
    path = Path(os.path.expanduser(reference))
    if not path.exists():
        raise NotAvailableError(
            f"data file not found: {path}",
            hint="check data.train / data.eval in the recipe (relative paths are relative to the recipe file)",
        )
    return path


def read_source(reference: str, split: str) -> SourceData:
    """All records of one data reference; NotAvailableError (4) when it doesn't exist, DataError (3) when unreadable."""
    if not is_local_path(reference):
        return _read_hub(reference, split)
    path = _existing_path(reference)
    if path.is_dir():
        return _read_saved_dataset(path, split)
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise DataError(
            f"{path}: unsupported data file type {suffix or '(no suffix)'!r}",
            hint=f"use one of {', '.join(FILE_SUFFIXES)}, or a folder saved with datasets' save_to_disk",
        )
    content = path.read_bytes()
    if not content.strip():
        raise DataError(f"{path}: the data file is empty", hint="point data.train / data.eval at a file with records")
    fingerprint = hashlib.sha256(content).hexdigest()
    content = content.removeprefix(codecs.BOM_UTF8)   # some editors write one; json.loads refuses it
    reader = {".jsonl": _parse_jsonl, ".json": _parse_json, ".csv": _parse_csv, ".parquet": _parse_parquet}[suffix]
    records = reader(path, content)
    if not records:
        raise DataError(f"{path}: the data file holds no records", hint="add at least one record")
    return SourceData(name=str(path), records=records, fingerprint=fingerprint)


def source_fingerprint(reference: str) -> str:
    """sha256 of a local file's bytes (or of a saved folder's files), without parsing it."""
    path = _existing_path(reference)
    return sha256_folder(path) if path.is_dir() else sha256_file(path)


def _decode(path: Path, content: bytes) -> str:
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = content[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: invalid UTF-8 (byte 0x{content[exc.start]:02x} at offset {exc.start})",
            hint="re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)",
        ) from None


def _parse_jsonl(path: Path, content: bytes) -> list[RawRecord]:
    records: list[RawRecord] = []
    problems: list[str] = []
    for number, raw in enumerate(content.split(b"\n"), start=1):
        if len(problems) >= MAX_LISTED_PROBLEMS:
            break
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.append(f"{path}:{number}: invalid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})")
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(value, dict):
            problems.append(f"{path}:{number}: expected a JSON object per line, got {type(value).__name__}")
            continue
        records.append(RawRecord(value, f"{path}:{number}"))
    raise_problems(problems, hint="fix or remove the lines named above (one JSON object per line)")
    return records


def _parse_json(path: Path, content: bytes) -> list[RawRecord]:
    text = _decode(path, content)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):   # JSON Lines named .json
            return _parse_jsonl(path, content)
        raise DataError(
            f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})",
            hint="a .json file holds one JSON array of records; use .jsonl for one record per line",
        ) from None
    if isinstance(value, dict):
        lists = [key for key, item in value.items() if isinstance(item, list)]
        if len(lists) != 1:
            raise DataError(
                f"{path}: expected a JSON array of records (or an object with one list of records)",
                hint="write the records as [{...}, {...}]",
            )
        value = value[lists[0]]
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON array of records, got {type(value).__name__}")
    records, problems = [], []
    for index, item in enumerate(value):
        if isinstance(item, dict):
            records.append(RawRecord(item, f"{path} record {index}"))
        else:
            problems.append(f"{path} record {index}: expected a JSON object, got {type(item).__name__}")
    raise_problems(problems[:MAX_LISTED_PROBLEMS])
    return records


def _parse_csv(path: Path, content: bytes) -> list[RawRecord]:
    text = _decode(path, content)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    records = []
    try:
        row_start = 2
        for row in reader:
            if None in row:
                raise DataError(f"{path}:{row_start}: more values than header columns "
                                f"({', '.join(reader.fieldnames or [])})")
            records.append(RawRecord(dict(row), f"{path}:{row_start}"))
            row_start = reader.line_num + 1
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None
    return records


def _parse_parquet(path: Path, content: bytes) -> list[RawRecord]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(content))
    except Exception as exc:  # pyarrow raises several unrelated types for a corrupt file
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    return [RawRecord(row, f"{path} row {index}") for index, row in enumerate(table.to_pylist())]


def _pick_split(splits: list[str], split: str, where: str) -> str:
    wanted = ("train",) if split == "train" else ("validation", "eval", "test", "valid", "dev")
    for name in wanted:
        if name in splits:
            return name
    if len(splits) == 1:
        return splits[0]
    raise DataError(
        f"{where}: no {split} split among {', '.join(splits)}",
        hint="name the split: save one split per folder, or for a hub dataset write ID:SPLIT",
    )


def _read_saved_dataset(path: Path, split: str) -> SourceData:
    if not any((path / name).exists() for name in ("dataset_info.json", "dataset_dict.json", "state.json")):
        raise DataError(
            f"{path} is a directory, not a data file or a folder saved by datasets' save_to_disk",
            hint=f"point at a {'/'.join(FILE_SUFFIXES)} file inside it, or list several files in data.train",
        )
    from datasets import DatasetDict, load_from_disk

    try:
        loaded = load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"{path}: cannot load the saved dataset ({exc})") from None
    if isinstance(loaded, DatasetDict):
        name = _pick_split(list(loaded), split, str(path))
        loaded, where = loaded[name], f"{path}[{name}]"
    else:
        where = str(path)
    records = [RawRecord(row, f"{where} row {index}") for index, row in enumerate(loaded)]
    if not records:
        raise DataError(f"{where}: the saved dataset is empty")
    return SourceData(name=where, records=records, fingerprint=sha256_folder(path))


def _read_hub(reference: str, split: str) -> SourceData:
    dataset_id, _, named_split = reference.partition(":")
    if any(os.environ.get(name, "").lower() in ("1", "true", "yes", "on") for name in HUB_OFFLINE_ENV):
        raise NotAvailableError(
            f"hub dataset {dataset_id} is not available offline (HF_HUB_OFFLINE is set)",
            hint="download it where the hub is reachable and point data.train at a local file or saved folder",
        )
    from datasets import get_dataset_split_names, load_dataset

    try:
        name = named_split or _pick_split(get_dataset_split_names(dataset_id), split, dataset_id)
        loaded = load_dataset(dataset_id, split=name)
    except DataError:
        raise
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NotAvailableError(
            f"hub dataset {dataset_id} is not available: {first_line}",
            hint="check the id and your connection, or use a local file",
        ) from None
    where = f"{dataset_id}[{name}]"
    records = [RawRecord(row, f"{where} row {index}") for index, row in enumerate(loaded)]
    if not records:
        raise DataError(f"{where}: the dataset is empty")
    return SourceData(name=where, records=records, fingerprint=f"hub:{dataset_id}:{name}:{loaded._fingerprint}")


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
