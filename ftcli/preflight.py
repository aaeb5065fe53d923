"""`ftcli train --dry-run`: check data, template and model settings and estimate memory, training nothing."""
# CONTRACT (owned by the data helper; replace the stubs, keep the signatures):

from __future__ import annotations


def run_preflight(recipe, *, trust_remote_code: bool = False) -> dict:
    """Load tokenizer and data, never a run dir; return the report (JSON-serialisable)."""
    raise NotImplementedError


def render_preflight(report: dict, console) -> None:
    raise NotImplementedError


def estimate_peak_memory(recipe, model_config, device: str) -> dict:
    """Estimated peak bytes (total and by part: weights, adapter+optimizer, activations, logits)."""
    raise NotImplementedError
