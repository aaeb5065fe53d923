"""Progress notes to a rich console, or nowhere when a caller passes none."""

from __future__ import annotations


def note(console, text: str) -> None:
    """Print `text` as it is (no rich markup, no highlighting) on `console`; do nothing when `console` is None."""
    if console is not None:
        console.print(text, markup=False, highlight=False)
