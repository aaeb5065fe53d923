"""How a prediction matches a reference text: exact, normalised, contained, token F1; shared by eval's metrics and
GRPO's rewards, so that both score an answer alike."""

from __future__ import annotations

import unicodedata
from collections import Counter


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
