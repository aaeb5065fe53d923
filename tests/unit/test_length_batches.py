"""ftcli's group_by_length order: little padding, batches in random order, the same order for the same seed/epoch."""

from __future__ import annotations

import random

import pytest

from ftcli.training.samplers import LengthBatchedSampler, length_batched_order


def padding(lengths, order, batch_size):
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


@pytest.fixture
def varied_lengths():
    rng = random.Random(0)
    return [rng.randint(5, 500) for _ in range(400)]


def test_every_example_once_with_little_padding(varied_lengths):
    order = length_batched_order(varied_lengths, 8, seed=1)
    assert sorted(order) == list(range(len(varied_lengths)))
    shuffled = list(range(len(varied_lengths)))
    random.Random(1).shuffle(shuffled)
    assert padding(varied_lengths, order, 8) < 0.1 * padding(varied_lengths, shuffled, 8)


def test_batches_are_not_in_length_order(varied_lengths):
    """The failure this module exists for: transformers' sampler yields longest-to-shortest within 50 batches."""
    order = length_batched_order(varied_lengths, 8, seed=1)
    batch_max = [max(varied_lengths[i] for i in order[s:s + 8]) for s in range(0, len(order), 8)]
    assert batch_max[0] == max(varied_lengths)            # the memory peak comes at the first step
    rest = batch_max[1:]
    descending_pairs = sum(a >= b for a, b in zip(rest, rest[1:]))
    assert 0.3 < descending_pairs / (len(rest) - 1) < 0.7  # random order, neither sorted way
    first_half = sum(rest[:len(rest) // 2]) / (len(rest) // 2)
    assert 0.7 < first_half / (sum(rest) / len(rest)) < 1.3


def test_same_seed_same_order_other_epoch_other_order(varied_lengths):
    sampler = LengthBatchedSampler(varied_lengths, 4, seed=3)
    first = list(sampler)
    assert list(LengthBatchedSampler(varied_lengths, 4, seed=3)) == first  # resume replays the same order
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(sampler) == sorted(first)
    assert len(sampler) == len(varied_lengths)


def test_tiny_datasets_and_a_partial_last_batch():
    assert length_batched_order([], 4, seed=0) == []
    order = length_batched_order([3, 9, 1, 7, 5], 2, seed=0)
    assert sorted(order) == [0, 1, 2, 3, 4]
    assert order[0] == 1   # the longest example's batch leads
