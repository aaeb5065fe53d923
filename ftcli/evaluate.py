"""`ftcli eval`: loss, perplexity and generation metrics of a run, optionally against its base model."""
# CONTRACT (owned by the eval helper; replace the stubs, keep the signatures):

from __future__ import annotations


def parse_gates(texts: list[str]) -> dict[str, float]:
    """METRIC=VALUE strings -> {metric: bar}; UsageError for unknown metrics or bad numbers."""
    raise NotImplementedError


def run_eval(run, *, data=None, max_samples=None, max_new_tokens=None, batch_size=None,
             compare_base=False, console=None) -> dict:
    """Evaluate the run (base + adapter from the run dir alone); write eval/<timestamp>.json and eval/latest.json."""
    raise NotImplementedError


def render_eval(result: dict, console) -> None:
    raise NotImplementedError


def check_gates(result: dict, gates: dict[str, float] | None, run) -> None:
    """QualityGateError (exit 6) naming each metric below its bar (gates default to recipe eval.fail_under)."""
    raise NotImplementedError
