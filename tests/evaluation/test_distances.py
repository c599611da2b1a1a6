"""Set distances: hand-computed values and scipy as the reference path for KDE, OA and KL."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, stats

from aurl.data.notes import notes_from_file
from aurl.evaluation import distances as D


def test_intra_and_inter_set_distances() -> None:
    assert sorted(D.intra_set_distances(np.array([0.0, 1.0, 3.0]))) == [1.0, 2.0, 3.0]
    assert D.intra_set_distances(np.array([[0.0, 0.0], [3.0, 4.0]])).tolist() == [5.0]
    assert D.inter_set_distances(np.array([0.0, 1.0]), np.array([3.0])).tolist() == [3.0, 2.0]
    # an undefined (NaN) piece is left out
    assert D.intra_set_distances(np.array([0.0, np.nan, 2.0])).tolist() == [2.0]
    assert D.intra_set_distances(np.array([1.0])).size == 0


def test_kde_matches_scipy() -> None:
    x = np.random.default_rng(0).normal(size=40)
    grid = np.linspace(-4, 4, 50)
    np.testing.assert_allclose(D.kde(x, grid), stats.gaussian_kde(x)(grid), rtol=1e-10)


def test_overlap_area_and_kl_match_scipy_quadrature() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, 60), rng.normal(0.7, 1.3, 80)
    ka, kb = stats.gaussian_kde(a), stats.gaussian_kde(b)
    oa_ref = integrate.quad(lambda t: min(ka(t)[0], kb(t)[0]), -15, 15, limit=200)[0]
    kl_ref = integrate.quad(lambda t: ka(t)[0] * math.log(ka(t)[0] / kb(t)[0]), -8, 8)[0]
    assert D.overlap_area(a, b, points=4000) == pytest.approx(oa_ref, abs=2e-3)
    assert D.kl_divergence(a, b, points=4000) == pytest.approx(kl_ref, abs=5e-3)


def test_identical_and_disjoint_sets() -> None:
    a = np.array([0.1, 0.4, 0.5, 0.9])
    assert D.overlap_area(a, a) == pytest.approx(1.0, abs=1e-4)
    assert D.kl_divergence(a, a) == pytest.approx(0.0, abs=1e-9)
    assert D.overlap_area(a, a + 100) == pytest.approx(0.0, abs=1e-6)
    assert D.kl_divergence(a, a + 100) > 10
    assert math.isnan(D.overlap_area(a, np.zeros(0)))
    # zero spread does not break the KDE
    assert D.overlap_area(np.ones(5), np.ones(5)) == pytest.approx(1.0, abs=1e-4)


def test_frechet_distance_by_hand() -> None:
    # reference [-1, 1]: mean 0, spread 1 -> unchanged; generated [1, 3]: mean 2.
    # both sample variances 2: FD = (2 - 0)^2 + 2 + 2 - 2 sqrt(2 * 2) = 4
    assert D.frechet_distance(np.array([[1.0], [3.0]]), np.array([[-1.0], [1.0]])) == pytest.approx(
        4.0
    )
    x = np.random.default_rng(2).normal(size=(30, 4))
    assert D.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(D.frechet_distance(x[:1], x))


def test_a_set_compared_with_itself(fixtures_dir) -> None:
    pieces = [notes_from_file(p) for p in sorted((fixtures_dir / "midi").glob("*.mid"))]
    feats = D.set_features(pieces)
    assert feats["pitch_range"].shape == (len(pieces),)
    assert feats["pitch_class_transition_matrix"].shape == (len(pieces), 144)
    out = D.compare_sets(feats, feats)
    assert out["frechet_distance"] == pytest.approx(0.0, abs=1e-6)
    for name in ("pitch_class_histogram", "note_density"):
        assert out[name]["intra_overlap_area"] == pytest.approx(1.0, abs=1e-4)
        assert out[name]["intra_kl_divergence"] == pytest.approx(0.0, abs=1e-9)
        assert out[name]["overlap_area"] < 1.0  # inter also pairs each piece with itself (0)
    summary = D.summarize_set(feats)
    assert summary["polyphony"]["defined"] == len(pieces)


def test_summary_matches_the_pairwise_functions() -> None:
    rng = np.random.default_rng(4)
    gen, ref = rng.normal(0.5, 1.0, (30, 3)), rng.normal(0.0, 1.0, (40, 3))
    comp = D.compare_feature(gen, ref)
    s = comp.summary()
    assert comp.inter.shape == (30 * 40,) and comp.intra_reference.shape == (40 * 39 // 2,)
    oa = D.overlap_area(comp.intra_reference, comp.inter, points=4000)
    kl = D.kl_divergence(comp.intra_reference, comp.inter, points=4000)
    assert s["overlap_area"] == pytest.approx(oa, abs=2e-3)
    assert s["kl_divergence"] == pytest.approx(kl, abs=2e-3)
    assert s["intra_overlap_area"] == pytest.approx(
        D.overlap_area(comp.intra_reference, comp.intra_generated, points=4000), abs=2e-3
    )
