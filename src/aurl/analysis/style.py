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


# --------------------------------------------------------------------------------------------
# The shipped classifier: likelihoods per note plus metrics, one logistic regression
# --------------------------------------------------------------------------------------------

CLASSIFIER_FILE = "style_classifier.json"  # beside a style model's weights
CLASSIFIER_VERSION = 1


def likelihood_features(bits_per_note: Sequence[float] | np.ndarray) -> np.ndarray:
    """(K,) a piece's bits per note under each style minus their mean over the styles.

    Why per note and relative: the Bayes posterior sums log-likelihoods over every token, so
    its evidence grows with the piece and a small systematic bias of the model (one style's
    vector lowering every piece's loss a little) turns into certainty over a few hundred
    tokens. Per note, the margins are comparable across pieces of any length; relative to the
    mean, they carry only which style explains the piece best, not how predictable the piece
    is overall (which the metrics and the mean itself describe). The regression then learns
    how much a margin is worth for each style, i.e. corrects the model's biases.
    """
    b = np.asarray(bits_per_note, dtype=np.float64)
    return b - b.mean()


@dataclass(frozen=True)
class StyleClassifier:
    """Logistic regression over :func:`likelihood_features` and the scalar metrics.

    Fitted on pieces of a grouped split the model did not train on (the valid split) and
    shipped as plain JSON beside the model (:data:`CLASSIFIER_FILE`): no pickle, and a file a
    person can read. ``features`` names each input: ``bits:<style>`` then the metrics.
    """

    styles: tuple[str, ...]
    features: tuple[str, ...]
    logistic: Logistic
    max_tokens: int  # the opening scored, as when fitted

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(f for f in self.features if not f.startswith("bits:"))

    def vector(self, bits_per_note: Sequence[float], metrics: dict[str, float]) -> np.ndarray:
        """(F,) the feature vector of one piece (``bits_per_note`` in :attr:`styles` order)."""
        lik = likelihood_features(bits_per_note) if any(
            f.startswith("bits:") for f in self.features
        ) else np.zeros(0)  # fmt: skip
        return np.concatenate([lik, [float(metrics[m]) for m in self.metrics]])

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(N, K) style probabilities of feature rows ``x`` (N, F)."""
        return predict_logistic(self.logistic, np.atleast_2d(x))

    def to_dict(self) -> dict[str, object]:
        lg = self.logistic
        return {
            "version": CLASSIFIER_VERSION, "styles": list(self.styles),
            "features": list(self.features), "max_tokens": self.max_tokens,
            "mean": lg.mean.tolist(), "scale": lg.scale.tolist(),
            "weights": lg.weights.tolist(), "bias": lg.bias.tolist(),
        }  # fmt: skip

    @classmethod
    def from_dict(
        cls, d: dict[str, object], *, source: str = "style classifier"
    ) -> StyleClassifier:
        """The classifier :meth:`to_dict` wrote.

        Raises:
            CheckpointError: another version, or fields missing or of the wrong shape.
        """
        from aurl.errors import CheckpointError

        if d.get("version") != CLASSIFIER_VERSION:
            raise CheckpointError(
                f"{source}: version {d.get('version')!r}, this aurl reads "
                f"{CLASSIFIER_VERSION}: refit it (benchmarks/bench_styles.py --save-classifier)"
            )
        try:
            styles, features = tuple(d["styles"]), tuple(d["features"])
            lg = Logistic(*(np.asarray(d[k], dtype=np.float64)
                            for k in ("mean", "scale", "weights", "bias")))  # fmt: skip
            max_tokens = int(d["max_tokens"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: field {e} missing or malformed: refit it") from None
        f, k = len(features), len(styles)
        if (
            lg.mean.shape != (f,)
            or lg.scale.shape != (f,)
            or lg.weights.shape != (f, k)
            or (lg.bias.shape != (k,))
        ):
            raise CheckpointError(f"{source}: weights do not match {f} features x {k} styles")
        return cls(styles, features, lg, max_tokens)


def fit_style_classifier(
    styles: Sequence[str], bits_per_note: np.ndarray, metrics: np.ndarray, y: np.ndarray, *,
    metric_names: Sequence[str], max_tokens: int, l2: float = 1e-2, use_likelihood: bool = True,
    use_metrics: bool = True,
) -> StyleClassifier:  # fmt: skip
    """Fit the :class:`StyleClassifier` on ``bits_per_note`` (N, K), ``metrics`` (N, M) and
    labels ``y`` (N,) (style ids into ``styles``)."""
    parts, names = [], []
    if use_likelihood:
        parts.append(np.apply_along_axis(likelihood_features, 1, bits_per_note))
        names += [f"bits:{s}" for s in styles]
    if use_metrics:
        parts.append(np.asarray(metrics, dtype=np.float64))
        names += list(metric_names)
    x = np.concatenate(parts, axis=1)
    fitted = fit_logistic(x, y, len(styles), l2=l2)
    return StyleClassifier(tuple(styles), tuple(names), fitted, max_tokens)


# --------------------------------------------------------------------------------------------
# How much of a source piece a style transfer keeps
# --------------------------------------------------------------------------------------------

RHYTHM_GRID = 0.25  # beats: onsets are compared on a sixteenth-note grid


def rhythm_similarity(a: np.ndarray, b: np.ndarray, *, beats: float = 0.0) -> float:
    """Jaccard index of the two note arrays' onset positions on a sixteenth grid
    (:data:`RHYTHM_GRID` beats), over their first ``beats`` beats (0: the span of the shorter
    one): ``|A & B| / |A | B|``, 1 for the same rhythm, 0 for none in common. NaN where
    neither has an onset there. Pitch, voicing and how many notes start together do not count,
    only *when* something starts."""
    from aurl.data.notes import pitched

    a, b = pitched(a), pitched(b)
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    span = beats or min(a["onset"].max(), b["onset"].max()) + RHYTHM_GRID
    grid_a = {int(x) for x in np.round(a["onset"][a["onset"] < span] / RHYTHM_GRID)}
    grid_b = {int(x) for x in np.round(b["onset"][b["onset"] < span] / RHYTHM_GRID)}
    union = grid_a | grid_b
    return len(grid_a & grid_b) / len(union) if union else float("nan")


def contour_similarity(a: np.ndarray, b: np.ndarray, *, max_notes: int = 64) -> float:
    """How alike the two pieces' melodic contours are: the ``difflib`` ratio (``2 M / T``,
    matching symbols over total) of the Parsons codes (up / down / repeat) of their skylines'
    first ``max_notes`` notes (:func:`aurl.analysis.melody.skyline`). 1 for the same contour;
    two random U/D/R strings score about 0.4-0.5, so compare against a baseline, not zero.
    NaN where either has fewer than two melody notes."""
    from difflib import SequenceMatcher

    from aurl.analysis.melody import parsons_code, skyline

    ca = parsons_code(skyline(a)[:max_notes])[1:]
    cb = parsons_code(skyline(b)[:max_notes])[1:]
    if not ca or not cb:
        return float("nan")
    return SequenceMatcher(None, ca, cb, autojunk=False).ratio()
