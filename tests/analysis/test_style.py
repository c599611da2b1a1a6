"""Bayes over a style model's likelihoods and the logistic-regression baseline: exact values
on hand-made input (the trained-model checks are in tests/training/test_styles.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aurl.analysis.style import (
    fit_logistic,
    guess_style,
    predict_logistic,
    style_posterior,
)


def test_posterior_is_the_normalised_likelihood():
    # p(x|a) = 1/4 * p(x|b): with a uniform prior p(a|x) = 1/5, p(b|x) = 4/5
    post = style_posterior([math.log(0.01), math.log(0.04)])
    np.testing.assert_allclose(post, [0.2, 0.8], rtol=1e-12)
    # only differences count: a thousand nats more on both sides changes nothing
    np.testing.assert_allclose(style_posterior([-1000.0, -1000.0 + math.log(4)]), [0.2, 0.8])
    assert np.isnan(style_posterior([np.nan, np.nan])).all()


def test_guess_names_the_most_likely_style_with_bits_per_note():
    # nll in nats summed over a piece of 10 notes: 10 * ln 2 nats -> 1 bit per note
    guess = guess_style(["chorale", "folk"], [20 * math.log(2), 10 * math.log(2)], notes=10)
    assert guess.style == "folk"
    assert guess.bits_per_note == pytest.approx({"chorale": 2.0, "folk": 1.0})
    # folk is 2^10 times as likely: p = 1024 / 1025
    assert guess.probabilities["folk"] == pytest.approx(1024 / 1025)
    assert guess.line() == "folk 1.00 (chorale 0.00)"


def test_logistic_regression_separates_what_a_feature_separates():
    rng = np.random.default_rng(0)
    # three classes told apart by feature 0 (means -3, 0, 3); feature 1 is noise, feature 2
    # is NaN in a few rows (replaced by the training mean)
    y = np.repeat([0, 1, 2], 40)
    x = np.stack([3.0 * (y - 1) + rng.normal(0, 0.5, y.size), rng.normal(0, 1, y.size),
                  rng.normal(0, 1, y.size)], axis=1)  # fmt: skip
    x[::7, 2] = np.nan
    model = fit_logistic(x, y, 3)
    test = np.array([[-3.0, 0.0, np.nan], [0.0, 5.0, 0.0], [3.0, -5.0, 1.0]])
    p = predict_logistic(model, test)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    assert list(p.argmax(axis=1)) == [0, 1, 2] and (p.max(axis=1) > 0.8).all()
    assert abs(model.weights[0, 2] - model.weights[0, 0]) > 5 * abs(model.weights[1]).max()
