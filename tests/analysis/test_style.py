"""Bayes over a style model's likelihoods and the logistic-regression baseline: exact values
on hand-made input (the trained-model checks are in tests/training/test_styles.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from aurl.analysis.style import (
    StyleClassifier,
    contour_similarity,
    fit_logistic,
    fit_style_classifier,
    guess_style,
    likelihood_features,
    predict_logistic,
    rhythm_similarity,
    style_posterior,
)
from aurl.data.notes import NOTE_DTYPE
from aurl.errors import CheckpointError


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


def _notes(onsets, pitches) -> np.ndarray:
    n = np.zeros(len(onsets), dtype=NOTE_DTYPE)
    n["onset"], n["pitch"], n["duration"], n["velocity"] = onsets, pitches, 0.25, 80
    return n


def test_rhythm_similarity_is_the_jaccard_of_sixteenth_onsets():
    a = _notes([0, 1, 2, 3], [60, 62, 64, 65])
    # same onsets, other pitches: 1; onsets 0, 1, 2.5, 3 share 3 of 5 grid cells
    assert rhythm_similarity(a, _notes([0, 1, 2, 3], [40, 41, 42, 43])) == 1.0
    assert rhythm_similarity(a, _notes([0, 1, 2.5, 3], [60] * 4)) == pytest.approx(3 / 5)
    # a chord counts once: the cell is what matters; an onset 1/64 beat off lands in the cell
    assert rhythm_similarity(a, _notes([0, 0, 1.01, 2, 3], [60, 64, 60, 60, 60])) == 1.0
    # the span is the shorter piece's: b's later onsets do not count against a short a
    assert rhythm_similarity(a, _notes([0, 1, 2, 3, 4, 5, 6], [60] * 7)) == 1.0
    assert math.isnan(rhythm_similarity(a, _notes([], [])))


def test_contour_similarity_compares_the_up_down_repeat_strings():
    up = _notes([0, 1, 2, 3, 4], [60, 62, 64, 65, 67])  # UUUU
    assert contour_similarity(up, _notes([0, 1, 2, 3, 4], [50, 51, 55, 56, 70])) == 1.0
    # UUUU vs DDDD: nothing in common; vs UUDD: 2 matches, 2 * 2 / 8 = 0.5
    assert contour_similarity(up, _notes([0, 1, 2, 3, 4], [70, 69, 68, 67, 66])) == 0.0
    assert contour_similarity(up, _notes([0, 1, 2, 3, 4], [60, 62, 64, 62, 60])) == 0.5
    # the skyline is the melody: a lower voice under the tune changes nothing
    chords = np.sort(np.concatenate([up, _notes([0, 1, 2, 3, 4], [48, 40, 50, 41, 52])]),
                     order=["onset", "pitch"])  # fmt: skip
    assert contour_similarity(up, chords) == 1.0
    assert math.isnan(contour_similarity(up, _notes([0], [60])))


def test_likelihood_features_keep_only_the_margins():
    np.testing.assert_allclose(likelihood_features([3.0, 4.0, 5.0]), [-1.0, 0.0, 1.0])
    # a piece that is one bit per note harder under every style has the same features
    np.testing.assert_allclose(likelihood_features([4.0, 5.0, 6.0]), [-1.0, 0.0, 1.0])


def test_style_classifier_learns_a_biased_models_margins_and_round_trips_as_json():
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1], 60)
    # a model biased toward style 0: every piece is 0.3 bits/note cheaper under it, style-1
    # pieces only 0.2 cheaper under style 1 than they would be: Bayes calls most pieces style 0
    bits = np.stack([4.0 - 0.3 + rng.normal(0, 0.03, y.size),
                     4.0 - 0.2 * y + rng.normal(0, 0.03, y.size)], axis=1)  # fmt: skip
    assert (bits.argmin(axis=1) == y).mean() < 0.55
    metrics = rng.normal(0, 1, (y.size, 2))  # uninformative
    clf = fit_style_classifier(["a", "b"], bits, metrics, y, metric_names=["m1", "m2"],
                               max_tokens=512)  # fmt: skip
    assert clf.features == ("bits:a", "bits:b", "m1", "m2")
    x = np.stack([clf.vector(b, {"m1": m[0], "m2": m[1]}) for b, m in zip(bits, metrics)])
    assert (clf.predict(x).argmax(axis=1) == y).mean() > 0.95
    again = StyleClassifier.from_dict(json.loads(json.dumps(clf.to_dict())))
    np.testing.assert_allclose(again.predict(x), clf.predict(x))
    assert again.styles == ("a", "b") and again.max_tokens == 512
    with pytest.raises(CheckpointError, match="version"):
        StyleClassifier.from_dict({**clf.to_dict(), "version": 99})
    with pytest.raises(CheckpointError, match="2 styles"):
        StyleClassifier.from_dict({**clf.to_dict(), "bias": [0.0, 0.0, 0.0]})
