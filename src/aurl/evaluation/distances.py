"""Comparing a generated set of pieces with a reference set.

Yang & Lerch, "On the evaluation of generative models in music" (Neural Computing and
Applications, 2020; the ``mgeval`` toolbox): for each feature, the *intra-set* distances (between
pieces of one set) and the *inter-set* distances (between a generated and a reference piece) are
Euclidean distances between the pieces' feature values; their distributions are smoothed with a
Gaussian kernel density estimate, and the reference's intra-set distribution is compared with the
inter-set distribution by the overlapping area (OA, 1 = same) and the Kullback-Leibler divergence
(KL, 0 = same). A generated set that resembles the reference keeps the inter-set distances
distributed like the reference's own intra-set distances.

Where this differs from ``mgeval``:

- Intra-set distances are taken over the unordered pairs (``mgeval``'s leave-one-out lists each
  pair twice: the same distribution).
- OA and KL are integrated on one common grid that reaches five bandwidths past the data, so two
  identical sets give OA = 1 and KL = 0; ``mgeval`` integrates OA between the data's extremes and
  evaluates KL on two different grids.
- A feature that is NaN for a piece (undefined, e.g. no notes) leaves that piece out of that
  feature; a set with fewer than two defined pieces gives NaN.
- A distance distribution with zero spread (all distances equal) gets a small bandwidth instead
  of a singular-covariance error.

The Frechet distance over per-piece feature vectors (the FID recipe, Heusel et al. 2017, on the
scalar metrics standardised by the reference set) adds one joint number.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from aurl.data.notes import empty_notes
from aurl.evaluation import metrics as M
from aurl.progress import Progress, silent

GRID_POINTS = 512
_FLOOR = 1e-12  # density floor so KL stays finite where one density underflows


# --------------------------------------------------------------------------------------------
# Features per piece
# --------------------------------------------------------------------------------------------


def set_features(
    pieces: Sequence[np.ndarray], *, progress: Progress = silent
) -> dict[str, np.ndarray]:
    """Every metric of every piece: name -> (N,) for scalars, (N, D) for flattened vectors."""
    rows = [M.all_metrics(notes) for notes in progress(pieces, total=len(pieces), desc="metrics")]
    out: dict[str, np.ndarray] = {}
    for name in M.SCALAR_METRICS:
        out[name] = np.array([r[name] for r in rows], dtype=np.float64)
    for name in M.VECTOR_METRICS:
        dim = np.asarray(M.VECTOR_METRICS[name](empty_notes())).size
        out[name] = np.array([np.ravel(r[name]) for r in rows], dtype=np.float64).reshape(-1, dim)
    return out


def _defined(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` ((N,) or (N, D)) whose values are all finite, as (n, D)."""
    x = np.asarray(x, dtype=np.float64)
    x = x.reshape(x.shape[0], -1)  # (N, D)
    return x[np.isfinite(x).all(axis=1)]


# --------------------------------------------------------------------------------------------
# Distances and densities
# --------------------------------------------------------------------------------------------


def intra_set_distances(x: np.ndarray) -> np.ndarray:
    """Euclidean distances between all unordered pairs of pieces of one set: (n (n - 1) / 2,)."""
    x = _defined(x)
    if x.shape[0] < 2:
        return np.zeros(0)
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))  # (n, n)
    return d[np.triu_indices(x.shape[0], k=1)]


def inter_set_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Euclidean distances between every piece of ``x`` and every piece of ``y``: (n * m,)."""
    x, y = _defined(x), _defined(y)
    if x.shape[0] == 0 or y.shape[0] == 0:
        return np.zeros(0)
    return np.sqrt(((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)).ravel()  # (n * m,)


def bandwidth(values: np.ndarray) -> float:
    """Scott's rule ``std * n^(-1/5)`` (scipy ``gaussian_kde``'s default in one dimension).

    Zero spread falls back to a bandwidth of 1e-3 of the values' scale (at least 1e-6).
    """
    values = np.asarray(values, dtype=np.float64)
    bw = values.std(ddof=1) * values.shape[0] ** (-1 / 5) if values.shape[0] > 1 else 0.0
    if not bw > 0:
        bw = max(1e-3 * float(np.abs(values).max(initial=0.0)), 1e-6)
    return float(bw)


def kde(values: np.ndarray, grid: np.ndarray, bw: float | None = None) -> np.ndarray:
    """Gaussian kernel density of ``values`` at the points of ``grid`` (integrates to 1)."""
    values = np.asarray(values, dtype=np.float64)
    bw = bandwidth(values) if bw is None else bw
    z = (grid[:, None] - values[None, :]) / bw  # (G, n)
    return np.exp(-0.5 * z * z).sum(axis=1) / (values.shape[0] * bw * np.sqrt(2 * np.pi))


def common_grid(*samples: np.ndarray, points: int = GRID_POINTS) -> np.ndarray:
    """A grid covering all samples plus five bandwidths on each side (all but 6e-7 of a kernel)."""
    pad = 5 * max(bandwidth(x) for x in samples)
    lo = min(x.min() for x in samples) - pad
    hi = max(x.max() for x in samples) + pad
    return np.linspace(lo, hi, points)


def _overlap(pa: np.ndarray, pb: np.ndarray, grid: np.ndarray) -> float:
    return float(np.trapezoid(np.minimum(pa, pb), grid))


def _kl(pa: np.ndarray, pb: np.ndarray, grid: np.ndarray) -> float:
    pa, pb = np.maximum(pa, _FLOOR), np.maximum(pb, _FLOOR)
    pa, pb = pa / np.trapezoid(pa, grid), pb / np.trapezoid(pb, grid)
    return float(max(np.trapezoid(pa * np.log(pa / pb), grid), 0.0))


def overlap_area(a: np.ndarray, b: np.ndarray, points: int = GRID_POINTS) -> float:
    """Overlapping area ``integral min(p_a, p_b) dx`` of the two samples' KDEs; 1 = identical.

    NaN when either sample is empty.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size == 0 or b.size == 0:
        return float("nan")
    grid = common_grid(a, b, points=points)
    return _overlap(kde(a, grid), kde(b, grid), grid)


def kl_divergence(a: np.ndarray, b: np.ndarray, points: int = GRID_POINTS) -> float:
    """``KL(p_a || p_b) = integral p_a log(p_a / p_b) dx`` of the two samples' KDEs, in nats.

    Both densities are floored at 1e-12 and renormalised on the common grid. NaN when either
    sample is empty.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size == 0 or b.size == 0:
        return float("nan")
    grid = common_grid(a, b, points=points)
    return _kl(kde(a, grid), kde(b, grid), grid)


# --------------------------------------------------------------------------------------------
# Per feature and joint
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureComparison:
    """Yang & Lerch's numbers for one feature (distances in the feature's own unit)."""

    intra_reference: np.ndarray
    intra_generated: np.ndarray
    inter: np.ndarray

    def summary(self) -> dict[str, float]:
        """Means and spreads of the three distance sets, OA and KL (reference intra vs inter,
        and generated intra vs reference intra)."""

        def stat(x: np.ndarray, fn) -> float:
            return float(fn(x)) if x.size else float("nan")

        out = {
            "intra_reference_mean": stat(self.intra_reference, np.mean),
            "intra_reference_std": stat(self.intra_reference, np.std),
            "intra_generated_mean": stat(self.intra_generated, np.mean),
            "intra_generated_std": stat(self.intra_generated, np.std),
            "inter_mean": stat(self.inter, np.mean),
            "inter_std": stat(self.inter, np.std),
        }
        ref, gen, inter = self.intra_reference, self.intra_generated, self.inter
        nan = float("nan")
        out.update(overlap_area=nan, kl_divergence=nan, intra_overlap_area=nan)
        out.update(intra_kl_divergence=nan)
        if ref.size == 0:
            return out
        # one grid and one density per distance set (the KDEs are the costly part)
        present = [x for x in (ref, gen, inter) if x.size]
        grid = common_grid(*present)
        p_ref = kde(ref, grid)
        if inter.size:
            p_inter = kde(inter, grid)
            out["overlap_area"] = _overlap(p_ref, p_inter, grid)
            out["kl_divergence"] = _kl(p_ref, p_inter, grid)
        if gen.size:
            p_gen = kde(gen, grid)
            out["intra_overlap_area"] = _overlap(p_ref, p_gen, grid)
            out["intra_kl_divergence"] = _kl(p_ref, p_gen, grid)
        return out


def compare_feature(generated: np.ndarray, reference: np.ndarray) -> FeatureComparison:
    """Intra- and inter-set distances of one feature ((N,) or (N, D) per set)."""
    return FeatureComparison(
        intra_reference=intra_set_distances(reference),
        intra_generated=intra_set_distances(generated),
        inter=inter_set_distances(generated, reference),
    )


def frechet_distance(generated: np.ndarray, reference: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two sets of feature vectors (N, D).

    ``|mu_g - mu_r|^2 + Tr(S_g + S_r - 2 (S_g S_r)^(1/2))``. Columns are standardised by the
    reference's mean and spread (a constant column keeps scale 1) so no unit dominates; rows with
    a NaN are left out. NaN with fewer than two rows in either set.
    """
    g, r = _defined(generated), _defined(reference)
    if g.shape[0] < 2 or r.shape[0] < 2:
        return float("nan")
    mu, sd = r.mean(axis=0), r.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    g, r = (g - mu) / sd, (r - mu) / sd
    mu_g, mu_r = g.mean(axis=0), r.mean(axis=0)
    s_g = np.atleast_2d(np.cov(g, rowvar=False))
    s_r = np.atleast_2d(np.cov(r, rowvar=False))
    # Tr((S_g S_r)^(1/2)) = sum of sqrt(eigenvalues of A S_g A) with A = S_r^(1/2): the
    # symmetric form stays stable when a covariance is singular (a constant feature).
    w, v = np.linalg.eigh(s_r)
    a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(a @ s_g @ a), 0, None)).sum()
    value = ((mu_g - mu_r) ** 2).sum() + np.trace(s_g) + np.trace(s_r) - 2 * tr_covmean
    return float(max(value, 0.0))


def compare_sets(
    generated: dict[str, np.ndarray], reference: dict[str, np.ndarray]
) -> dict[str, dict[str, float] | float]:
    """Per-feature comparison of two :func:`set_features` results plus the Frechet distance.

    Returns:
        ``{feature: FeatureComparison.summary(), ..., "frechet_distance": float}``.
    """
    out: dict[str, dict[str, float] | float] = {}
    for name in generated:
        out[name] = compare_feature(generated[name], reference[name]).summary()
    scalars = list(M.SCALAR_METRICS)
    gen = np.stack([generated[n] for n in scalars], axis=1)  # (N, F)
    ref = np.stack([reference[n] for n in scalars], axis=1)  # (M, F)
    out["frechet_distance"] = frechet_distance(gen, ref)
    return out


def summarize_set(features: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Mean, std, and the count of defined pieces of each scalar metric over one set."""
    out = {}
    for name in M.SCALAR_METRICS:
        x = features[name]
        x = x[np.isfinite(x)]
        out[name] = {
            "mean": float(x.mean()) if x.size else float("nan"),
            "std": float(x.std()) if x.size else float("nan"),
            "defined": int(x.size),
        }
    return out
