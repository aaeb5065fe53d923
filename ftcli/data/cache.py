"""Cache of tokenized datasets, keyed by everything that shapes them: data bytes, tokenizer, template, settings."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ftcli.atomic import atomic_write_json, staged_dir
from ftcli.data.types import DataReport
from ftcli.paths import cache_dir

CACHE_FORMAT_VERSION = 1   # bump when tokenization or masking logic changes
META_FILE = "meta.json"


def data_cache_root() -> Path:
    """Where tokenized datasets are cached: data/ under ftcli's cache folder."""
    return cache_dir() / "data"


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


def load_cached(key: str):
    """(train, eval, chat_template, train_report, eval_report) or None when absent or unreadable."""
    entry = data_cache_root() / key
    meta_path = entry / META_FILE
    if not meta_path.is_file():
        return None
    from datasets import load_from_disk

    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        train = load_from_disk(str(entry / "train"))
        evaluation = load_from_disk(str(entry / "eval")) if meta["eval_report"] is not None else None
    except Exception:  # a damaged entry is rebuilt, never trusted
        return None
    eval_report = DataReport.from_dict(meta["eval_report"]) if meta["eval_report"] is not None else None
    return train, evaluation, meta["chat_template"], DataReport.from_dict(meta["train_report"]), eval_report


def store(key: str, train, evaluation, chat_template: str | None, train_report: DataReport,
          eval_report: DataReport | None) -> None:
    """Write the entry atomically (staged folder renamed into place); a failed write leaves no entry."""
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

    entry = data_cache_root() / key
    was_enabled = is_progress_bar_enabled()
    disable_progress_bar()
    try:
        with staged_dir(entry) as staging:
            train.save_to_disk(str(staging / "train"))
            if evaluation is not None:
                evaluation.save_to_disk(str(staging / "eval"))
            atomic_write_json(staging / META_FILE, {
                "chat_template": chat_template,
                "train_report": train_report.to_dict(),
                "eval_report": eval_report.to_dict() if eval_report is not None else None,
            })
    finally:
        if was_enabled:
            enable_progress_bar()
