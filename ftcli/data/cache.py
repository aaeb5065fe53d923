"""Cache of tokenized datasets, keyed by everything that shapes them: data bytes, tokenizer, template, settings;
and the remembered content hashes of data files, so that a cache hit does not read the data again."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ftcli.atomic import atomic_write_json
from ftcli.data.types import DataReport
from ftcli.hashing import sha256_file
from ftcli.paths import cache_dir

CACHE_FORMAT_VERSION = 3   # bump when tokenization, masking or the entry's layout changes
META_FILE = "meta.json"
TRAIN_FILE, EVAL_FILE = "train.arrow", "eval.arrow"   # Arrow streams, memory-mapped when read
SPLIT_FILES = {"train": TRAIN_FILE, "eval": EVAL_FILE}
FILE_HASHES = "file-hashes.json"


def data_cache_root() -> Path:
    """Where tokenized datasets are cached: data/ under ftcli's cache folder."""
    return cache_dir() / "data"


def remembered_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read again only when its size, modification time or inode changed since it was
    last hashed (the memo lives in the cache folder; a file rewritten within the same nanosecond at the same size
    would go unnoticed, as it would for make)."""
    path = Path(path).resolve()
    stat = path.stat()
    signature = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
    memo_path = data_cache_root() / FILE_HASHES
    try:
        memo = json.loads(memo_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        memo = {}
    known = memo.get(str(path))
    if isinstance(known, dict) and known.get("signature") == signature:
        return known["sha256"]
    digest = sha256_file(path)
    memo[str(path)] = {"signature": signature, "sha256": digest}
    memo = {name: entry for name, entry in memo.items() if os.path.exists(name)}   # forget deleted files
    try:
        atomic_write_json(memo_path, memo)
    except OSError:   # a read-only cache still prepares data; it only hashes again next time
        pass
    return digest


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the vocabulary, merges, normalisation and special tokens (not the file paths)."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = {"special": tokenizer.special_tokens_map, "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
                "pad": tokenizer.pad_token_id, "len": len(tokenizer)}
    digest.update(json.dumps(specials, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def cache_key(parts: dict) -> str:
    blob = json.dumps({"version": CACHE_FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def entry_dir(key: str) -> Path:
    return data_cache_root() / key


def load_cached(key: str):
    """(train, eval, chat_template, train_report, eval_report) or None when absent or unreadable."""
    entry = entry_dir(key)
    meta_path = entry / META_FILE
    if not meta_path.is_file():
        return None
    from datasets import Dataset

    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        train = Dataset.from_file(str(entry / TRAIN_FILE))
        evaluation = Dataset.from_file(str(entry / EVAL_FILE)) if meta["eval_report"] is not None else None
    except Exception:  # a damaged entry is rebuilt, never trusted
        return None
    eval_report = DataReport.from_dict(meta["eval_report"]) if meta["eval_report"] is not None else None
    return train, evaluation, meta["chat_template"], DataReport.from_dict(meta["train_report"]), eval_report


def write_entry(staging: Path, chat_template: str | None, train_report: DataReport,
                eval_report: DataReport | None) -> None:
    """The entry's description beside its split files (written into `staging` by the pipeline)."""
    atomic_write_json(staging / META_FILE, {
        "chat_template": chat_template,
        "train_report": train_report.to_dict(),
        "eval_report": eval_report.to_dict() if eval_report is not None else None,
    })


def write_empty_split(path: Path) -> None:
    """An Arrow file with the sequence columns and no rows (the train split of an eval-only entry)."""
    import pyarrow as pa

    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema):
        pass
