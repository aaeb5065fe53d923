"""The typed results of data preparation, shared by the data modules and re-exported by ftcli.data.pipeline."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

IGNORE_INDEX = -100


@dataclass
class Conversation:
    """One normalised example: chat messages [{role, content}], or plain text for format: text; for a preference
    pair, messages is the prompt and chosen / rejected the two answers (assistant turns); an unpaired answer is half
    a pair: chosen when labelled desirable, rejected when not."""
    messages: list[dict[str, str]] | None = None
    text: str | None = None
    origin: str | None = None        # file:line (or row) it came from, for error messages
    chosen: list[dict[str, str]] | None = None
    rejected: list[dict[str, str]] | None = None

    @property
    def answers(self) -> list[list[dict[str, str]]]:
        """The judged answers: chosen then rejected, or the one answer of an unpaired example."""
        return [answer for answer in (self.chosen, self.rejected) if answer is not None]


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
    rows: int = 0                    # rows in the dataset handed to the trainer (packed rows when packing)
    prefix_mismatches: int = 0       # turn boundaries found through character offsets (tokens merged across them)
    sources: list[dict[str, Any]] = field(default_factory=list)   # per source: examples read and used, shares
    processes: int = 1               # processes that prepared the data

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataReport:
        return cls(**data)


@dataclass
class PreparedData:
    train: Any                       # datasets.Dataset with input_ids, labels (IGNORE_INDEX where not trained)
    eval: Any | None
    chat_template: str | None        # the exact template used (saved with the run)
    train_report: DataReport
    eval_report: DataReport | None
