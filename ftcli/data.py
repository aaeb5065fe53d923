"""Recipe data -> tokenized datasets: sources, record formats, chat templates, loss masking, validation, cache."""
# CONTRACT (owned by the data helper; replace the stubs, keep the signatures):

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ftcli.recipe import DataConfig, Recipe

IGNORE_INDEX = -100


@dataclass
class Conversation:
    """One normalised example: chat messages [{role, content}], or plain text for format: text."""
    messages: list[dict[str, str]] | None = None
    text: str | None = None


@dataclass
class DataReport:
    """Figures for preflight, run.json and logs."""
    examples: int = 0
    truncated: int = 0
    dropped: int = 0                 # no trainable token left after truncation
    trained_tokens: int = 0
    total_tokens: int = 0
    length_stats: dict[str, float] = field(default_factory=dict)   # min, p50, p90, p99, max, mean
    packing_efficiency: float | None = None
    fingerprints: dict[str, str] = field(default_factory=dict)     # data file -> sha256


@dataclass
class PreparedData:
    train: Any                       # datasets.Dataset with input_ids, labels (IGNORE_INDEX where not trained)
    eval: Any | None
    chat_template: str | None        # the exact template used (saved with the run)
    train_report: DataReport
    eval_report: DataReport | None


def resolve_chat_template(data: DataConfig, tokenizer) -> str | None:
    """The template to use: recipe inline/file > tokenizer's own > data.default_chat_template; DataError otherwise
    (None only for format: text)."""
    raise NotImplementedError


def load_conversations(data: DataConfig, split: str = "train", *, seed: int = 42) -> list[Conversation]:
    """Read and validate records of `split` (train | eval; eval honours val_split), DataError (exit 3) on bad input."""
    raise NotImplementedError


def prepare_data(recipe: Recipe, tokenizer) -> PreparedData:
    """Validate, render, tokenize, mask and (optionally) pack train and eval data; cached by content."""
    raise NotImplementedError


def make_collator(recipe: Recipe, tokenizer):
    """The data collator for training and eval batches (padding or packed)."""
    raise NotImplementedError


def split_for_generation(conversation: Conversation, tokenizer, chat_template: str | None) -> tuple[str, str]:
    """(prompt rendered up to the last assistant turn with the generation prompt, reference answer text)."""
    raise NotImplementedError
