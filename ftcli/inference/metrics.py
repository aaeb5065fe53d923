"""Text metrics of a prediction against a reference: exact match, normalised exact match, contains, token F1."""

from __future__ import annotations

import math
import unicodedata
from collections import Counter

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


def normalize(text: str) -> str:
    """Lower case, punctuation removed (any Unicode punctuation), whitespace runs collapsed to one space."""
    no_punct = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text.lower())
    return " ".join(no_punct.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when equal after stripping leading and trailing whitespace, else 0.0."""
    return float(prediction.strip() == reference.strip())


def exact_match_norm(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def contains(prediction: str, reference: str) -> float:
    """1.0 when the normalised reference occurs in the normalised prediction on word boundaries."""
    ref, pred = normalize(reference), normalize(prediction)
    if not ref:
        return float(not pred)
    return float(f" {ref} " in f" {pred} ")


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of precision and recall over normalised words (a multiset overlap, as in SQuAD)."""
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    overlap = sum((Counter(pred) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


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


def passes(metric: str, value: float, bar: float) -> bool:
    """Whether value meets the bar: at least the bar for higher-is-better metrics, at most it for loss/perplexity."""
    if math.isnan(value):
        return False
    return value >= bar if HIGHER_IS_BETTER[metric] else value <= bar
