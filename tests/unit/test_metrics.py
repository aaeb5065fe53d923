"""Text metrics and quality-gate direction, with hand-computed values."""

from __future__ import annotations

import math

import pytest

from ftcli import text_match
from ftcli.errors import UsageError
from ftcli.inference import metrics
from ftcli.inference.evaluate import parse_gates


@pytest.mark.parametrize("text, expected", [
    ("  The  Cat,\tsat!\n", "the cat sat"),
    ("Paris.", "paris"),
    ("«Bonjour» — l'ami", "bonjour l ami"),   # Unicode punctuation, apostrophe splits the words
    ("", ""),
    ("...", ""),
])
def test_normalize_lowercases_strips_punctuation_and_collapses_whitespace(text, expected):
    assert text_match.normalize(text) == expected


def test_exact_match_ignores_only_surrounding_whitespace():
    assert text_match.exact_match(" red blue\n", "red blue") == 1.0
    assert text_match.exact_match("Red blue", "red blue") == 0.0
    assert text_match.exact_match("red  blue", "red blue") == 0.0


def test_exact_match_norm_ignores_case_punctuation_and_spacing():
    assert text_match.exact_match_norm("Red,  BLUE!", "red blue") == 1.0
    assert text_match.exact_match_norm("red blue green", "red blue") == 0.0


def test_contains_needs_whole_words_of_the_normalised_reference():
    assert text_match.contains("The answer is: Paris.", "paris") == 1.0
    assert text_match.contains("red blue green", "Blue green") == 1.0
    assert text_match.contains("100 apples", "10") == 0.0           # not a word-boundary match
    assert text_match.contains("green blue", "blue green") == 0.0   # order matters
    assert text_match.contains("", "") == 1.0
    assert text_match.contains("something", "") == 0.0


def test_token_f1_by_hand():
    # prediction words: the cat sat on mat (5); reference: the cat is on the mat (6).
    # overlap (multiset): the x1, cat, on, mat = 4 -> precision 4/5, recall 4/6, F1 = 2PR/(P+R) = 8/11.
    assert text_match.token_f1("The cat sat on mat.", "the cat is on the mat") == pytest.approx(8 / 11)
    assert text_match.token_f1("red red red", "red blue") == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert text_match.token_f1("dog", "cat") == 0.0
    assert text_match.token_f1("", "") == 1.0
    assert text_match.token_f1("", "cat") == 0.0
    assert text_match.token_f1("cat", "") == 0.0


def test_generation_scores_are_means_over_pairs():
    scores = metrics.generation_scores(["red blue", "Blue dog.", "cat"], ["red blue", "blue dog", "green tree"])
    assert scores == {
        "exact_match": pytest.approx(1 / 3),
        "exact_match_norm": pytest.approx(2 / 3),
        "contains": pytest.approx(2 / 3),
        "f1": pytest.approx(2 / 3),
    }
    assert metrics.generation_scores([], []) == {}
    with pytest.raises(ValueError):
        metrics.generation_scores(["a"], [])


def test_perplexity_is_exp_loss_and_saturates():
    assert metrics.perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert metrics.perplexity(1e6) == math.inf


@pytest.mark.parametrize("metric, value, bar, ok", [
    ("f1", 0.5, 0.5, True),
    ("f1", 0.49, 0.5, False),
    ("exact_match", 0.9, 0.5, True),
    ("loss", 1.9, 2.0, True),          # lower is better: passes at or under the bar
    ("loss", 2.1, 2.0, False),
    ("perplexity", 8.0, 8.0, True),
    ("perplexity", 9.0, 8.0, False),
    ("f1", math.nan, 0.0, False),
    ("loss", math.nan, 100.0, False),
])
def test_gate_direction(metric, value, bar, ok):
    assert metrics.passes(metric, value, bar) is ok


def test_parse_gates_accepts_known_metrics_and_last_wins():
    assert parse_gates(["f1=0.5", "loss = 2", "f1=0.25"]) == {"f1": 0.25, "loss": 2.0}
    assert parse_gates([]) == {}


@pytest.mark.parametrize("text, needle", [
    ("accuracy=0.5", "unknown metric 'accuracy'"),
    ("f1", "not METRIC=VALUE"),
    ("f1=high", "not a finite number"),
    ("loss=nan", "not a finite number"),
    ("loss=inf", "not a finite number"),
])
def test_parse_gates_refuses_bad_input(text, needle):
    with pytest.raises(UsageError) as caught:
        parse_gates([text])
    assert needle in str(caught.value)
    assert caught.value.exit_code == 2
