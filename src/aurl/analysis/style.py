"""Which style a piece is in: Bayes over a style model's conditional likelihoods, and the
baseline of issue #15, a logistic regression on the evaluation metrics. Pure numpy.

**The model's answer** (:func:`style_posterior`). A model trained with ``model.styles`` gives
each piece ``x`` a likelihood under every style ``s``: ``p(x | s)``, the product of its
next-token probabilities with ``s`` added at every position
(:func:`aurl.evaluation.style.style_log_likelihoods` computes ``log p(x | s)``). With a
uniform prior, ``p(s | x) = p(x | s) / sum_t p(x | t)``: a softmax over the log-likelihoods.
The sums run over every token, so the posterior sharpens with the length of the piece (a few
hundred tokens usually settle it); that is Bayes, not overconfidence of the classifier.

Why the likelihoods rather than a classifier on the VAE latent: the likelihoods need nothing
but the generating model itself (no second network, no second training run, no labelled
latent set), they use all of the piece rather than a compressed code, and the probabilities
are the model's own beliefs, so they improve as the model does. A latent classifier needs a
VAE whose latents carry style; Aurl has no such trained VAE yet (issue #12: the tiny VAEs do
not learn to use their latents in a CPU budget), and it would add a head to train and
calibrate. The cost of the likelihood route is one scoring pass per style.

**The baseline** (:func:`fit_logistic`, :func:`predict_logistic`): multinomial logistic
regression (softmax, L2-regularised, full-batch gradient descent) on the standardised scalar
metrics of :data:`aurl.evaluation.metrics.SCALAR_METRICS` (pitch range and entropy, polyphony,
IOI, scale consistency, ...), NaN features replaced by the training mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StyleGuess:
    """The most likely style of a piece and the posterior over every style."""

    style: str
    probabilities: dict[str, float]  # style -> p(style | piece), summing to 1
    bits_per_note: dict[str, float]  # style -> the piece's bits per note given that style

    def to_dict(self) -> dict[str, object]:
        return {
            "style": self.style,
            "probabilities": self.probabilities,
            "bits_per_note": self.bits_per_note,
        }

    def line(self) -> str:
        """``folk 0.93 (chorale 0.05, palestrina 0.02)``."""
        ranked = sorted(self.probabilities.items(), key=lambda kv: -kv[1])
        rest = ", ".join(f"{s} {p:.2f}" for s, p in ranked[1:])
        return f"{ranked[0][0]} {ranked[0][1]:.2f}" + (f" ({rest})" if rest else "")


def style_posterior(log_likelihoods: Sequence[float] | np.ndarray) -> np.ndarray:
    """``p(s | x)`` under a uniform prior from ``log p(x | s)`` (natural log), one per style:
    ``exp(l_s - max l) / sum_t exp(l_t - max l)``. NaN where every likelihood is undefined."""
    logl = np.asarray(log_likelihoods, dtype=np.float64)
    if logl.size == 0 or not np.isfinite(logl).any():
        return np.full(logl.shape, np.nan)
    w = np.exp(logl - np.nanmax(logl))
    w = np.where(np.isfinite(w), w, 0.0)
    return w / w.sum()


def guess_style(styles: Sequence[str], nll: Sequence[float], notes: int) -> StyleGuess:
    """The :class:`StyleGuess` from each style's negative log-likelihood ``nll`` (nats, summed
    over the piece's tokens) and the piece's note count (for bits per note)."""
    post = style_posterior(-np.asarray(nll, dtype=np.float64))
    best = int(np.nanargmax(post)) if np.isfinite(post).any() else 0
    bits = {s: float(n / np.log(2) / max(notes, 1)) for s, n in zip(styles, nll)}
    return StyleGuess(
        style=styles[best],
        probabilities={s: float(p) for s, p in zip(styles, post)},
        bits_per_note=bits,
    )


# --------------------------------------------------------------------------------------------
# The baseline: logistic regression on the metrics
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Logistic:
    """A fitted multinomial logistic regression over standardised features."""

    mean: np.ndarray  # (F,) feature means of the training set (NaN features -> the mean)
    scale: np.ndarray  # (F,) standard deviations (1 where constant)
    weights: np.ndarray  # (F, K)
    bias: np.ndarray  # (K,)


def _standardise(x: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    x = np.where(np.isfinite(x), x, mean[None, :])
    return (x - mean[None, :]) / scale[None, :]


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def fit_logistic(
    x: np.ndarray, y: np.ndarray, n_classes: int, *, l2: float = 1e-2, steps: int = 2000,
    lr: float = 0.5,
) -> Logistic:  # fmt: skip
    """Fit softmax regression of labels ``y`` (N,) in ``0..n_classes-1`` on features ``x``
    (N, F) by full-batch gradient descent on the mean cross-entropy plus ``l2 * |W|^2 / 2``
    (a convex objective: the step count only has to be enough)."""
    x = np.asarray(x, dtype=np.float64)
    mean = np.nanmean(np.where(np.isfinite(x), x, np.nan), axis=0)
    mean = np.where(np.isfinite(mean), mean, 0.0)
    xs = np.where(np.isfinite(x), x, mean[None, :])
    scale = xs.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    z = _standardise(x, mean, scale)  # (N, F)
    onehot = np.eye(n_classes)[np.asarray(y, dtype=np.int64)]  # (N, K)
    w = np.zeros((z.shape[1], n_classes))
    b = np.zeros(n_classes)
    for _ in range(steps):
        grad = (_softmax(z @ w + b) - onehot) / len(z)  # (N, K)
        w -= lr * (z.T @ grad + l2 * w)
        b -= lr * grad.sum(axis=0)
    return Logistic(mean, scale, w, b)


def predict_logistic(model: Logistic, x: np.ndarray) -> np.ndarray:
    """(N, K) class probabilities of features ``x`` (N, F)."""
    z = _standardise(np.asarray(x, dtype=np.float64), model.mean, model.scale)
    return _softmax(z @ model.weights + model.bias)
