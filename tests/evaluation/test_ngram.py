"""Kneser-Ney n-gram baseline: a hand-computed bigram and normalisation over the vocabulary."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aurl.evaluation.ngram import NgramModel

TRAIN = [np.array([0, 1, 2, 1, 2, 3])]


def test_bigram_by_hand() -> None:
    # bigrams (0,1) (1,2) x2 (2,1) (2,3): singletons 3, doubles 1 -> D2 = 3 / (3 + 2) = 0.6.
    # continuation counts: 1 <- {0, 2}: 2; 2 <- {1}: 1; 3 <- {2}: 1 -> D1 = 2 / (2 + 2) = 0.5,
    # P1(w) = max(cc - 0.5, 0) / 4 + 0.5 * 3 / 4 / 4: P1(1) = 0.46875, P1(2) = P1(3) = 0.21875.
    m = NgramModel(order=2, vocab_size=4).fit(TRAIN)
    assert m.levels[1].discount == pytest.approx(0.6)
    assert m.levels[0].discount == pytest.approx(0.5)
    p = m.prob(np.array([[1, 2], [1, 3], [2, 1], [3, 2], [0, 1]]))
    expected = [
        (2 - 0.6) / 2 + 0.6 * 1 / 2 * 0.21875,  # P(2 | 1)
        0.6 * 1 / 2 * 0.21875,  # P(3 | 1): unseen after 1
        (1 - 0.6) / 2 + 0.6 * 2 / 2 * 0.46875,  # P(1 | 2)
        0.21875,  # P(2 | 3): context never seen -> unigram
        (1 - 0.6) / 1 + 0.6 * 1 / 1 * 0.46875,  # P(1 | 0)
    ]
    np.testing.assert_allclose(p, expected)
    r = m.score([np.array([0, 1, 2, 3])])
    assert r.tokens == 3
    assert r.nll == pytest.approx(-math.log(0.68125 * 0.765625 * 0.33125))


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_probabilities_sum_to_one(order: int) -> None:
    rng = np.random.default_rng(order)
    train = [np.concatenate([[0], rng.integers(4, 20, 60), [1]]) for _ in range(5)]
    m = NgramModel(order=order, vocab_size=20).fit(train)
    histories = [
        train[0][3 : 3 + order - 1],
        train[1][: order - 1],
        np.array([7, 7, 7])[: order - 1],
    ]
    for h in histories:
        grams = np.column_stack([np.tile(h, (20, 1)), np.arange(20)]).astype(np.int64)
        assert m.prob(grams).sum() == pytest.approx(1.0)


def test_higher_order_fits_repetitive_music_better() -> None:
    loop = np.concatenate([[0], np.tile([4, 9, 5, 10, 6, 11], 30), [1]])
    uni = NgramModel(1, 20).fit([loop]).score([loop])
    four = NgramModel(4, 20).fit([loop]).score([loop])
    assert four.nll < 0.2 * uni.nll
