"""Eval metrics: the text metrics of predictions against references (ftcli/text_match.py), perplexity, and which way
each metric is better (the --fail-under gates)."""

from __future__ import annotations

import math

from ftcli.text_match import contains, exact_match, exact_match_norm, token_f1

# Metric name -> True when a higher value is better. loss and perplexity are the only lower-is-better metrics.
HIGHER_IS_BETTER = {
    "preference_accuracy": True,   # preference data: see ftcli/inference/preference.py
    "reward_margin": True,
    "loss": False,
    "perplexity": False,
    "exact_match": True,
    "exact_match_norm": True,
    "contains": True,
    "f1": True,
}
GENERATION_METRICS = ("exact_match", "exact_match_norm", "contains", "f1")


_SCORERS = {"exact_match": exact_match, "exact_match_norm": exact_match_norm, "contains": contains, "f1": token_f1}


def score_pair(prediction: str, reference: str) -> dict[str, float]:
    return {name: scorer(prediction, reference) for name, scorer in _SCORERS.items()}


def generation_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean of each generation metric over the pairs (fractions in [0, 1])."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return {}
    per_pair = [score_pair(p, r) for p, r in zip(predictions, references)]
    return {name: sum(s[name] for s in per_pair) / len(per_pair) for name in GENERATION_METRICS}


def perplexity(loss: float) -> float:
    """exp(mean token loss); inf instead of an OverflowError for a very bad model."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def passes(metric: str, value: float, bar: float, higher: bool | None = None) -> bool:
    """Whether value meets the bar: at least the bar for higher-is-better metrics, at most it for loss/perplexity.
    `higher` gives the direction of a metric not listed here (a benchmark's, as lm-evaluation-harness reports it)."""
    if math.isnan(value):
        return False
    return value >= bar if (HIGHER_IS_BETTER[metric] if higher is None else higher) else value <= bar
