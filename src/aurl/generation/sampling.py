"""Sampling filters: pure functions over logits.

Every filter takes logits of shape ``(B, V)`` (any leading shape works for the elementwise ones)
and returns new logits; removed ids get ``-inf``. They compose in the order of
:func:`filter_logits`: repetition penalty, temperature, then top-k, top-p and min-p. Nothing here
knows about music: the musical masks live in :mod:`aurl.generation.constraints`.

The same filters exist for numpy arrays (:func:`filter_logits_numpy`, :func:`sample_numpy`), for
the loop that runs without torch (the onnx engine); the tests hold both sides equal. This module
imports torch only inside the torch functions.

References: nucleus sampling (Holtzman et al. 2020, "The Curious Case of Neural Text
Degeneration"), min-p (Nguyen et al. 2024), repetition penalty (Keskar et al. 2019, CTRL).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

NEG_INF = float("-inf")


@dataclass(frozen=True)
class SamplingOptions:
    """The knobs of one sampling strategy. ``temperature == 0`` means greedy."""

    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide logits by ``temperature`` (> 0). Lower is sharper; 1 leaves them unchanged."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    return logits if temperature == 1.0 else logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row (ties at the k-th value are all kept)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    import torch

    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely ids whose probability sum reaches ``p``.

    The most likely id is always kept, so ``p`` close to 0 reduces to greedy.
    """
    if p >= 1.0:
        return logits
    import torch

    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    # Mass strictly before each id: an id is kept while the ids above it have not reached p yet.
    mass_before = torch.cumsum(probs, dim=-1) - probs
    remove_sorted = mass_before >= p
    remove_sorted[..., 0] = False
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, NEG_INF)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep ids whose probability is at least ``min_p`` times the row's largest probability."""
    if min_p <= 0.0:
        return logits
    import torch

    # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p) (softmax's normaliser cancels)
    threshold = logits.max(dim=-1, keepdim=True).values + torch.log(torch.tensor(min_p))
    return logits.masked_fill(logits < threshold, NEG_INF)


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty on ids already generated: positive logits divided, negative multiplied.

    Args:
        logits: (B, V) next-token logits.
        seen: (B, V) bool, True where the id occurred in the row's history.
        penalty: > 1 discourages repeats; 1 is off.
    """
    if penalty == 1.0:
        return logits
    import torch

    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(
    logits: torch.Tensor, options: SamplingOptions, seen: torch.Tensor | None = None
) -> torch.Tensor:
    """Apply every active filter of ``options`` to (B, V) logits, in the documented order."""
    if seen is not None:
        logits = repetition_penalty(logits, seen, options.repetition_penalty)
    if options.greedy:
        return logits
    logits = apply_temperature(logits, options.temperature)
    logits = top_k_filter(logits, options.top_k)
    logits = top_p_filter(logits, options.top_p)
    return min_p_filter(logits, options.min_p)


def sample(
    logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw one id per row from already-filtered (B, V) logits; greedy takes the argmax.

    Returns:
        (B,) int64 ids.
    """
    if options.greedy:
        return logits.argmax(dim=-1)
    import torch

    probs = torch.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# --------------------------------------------------------------------------------------------
# The same filters in numpy (float32 logits, as the torch side computes them)
# --------------------------------------------------------------------------------------------


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def top_k_filter_numpy(logits: np.ndarray, k: int) -> np.ndarray:
    """:func:`top_k_filter` for numpy."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = -np.partition(-logits, k - 1, axis=-1)[..., k - 1 : k]  # (B, 1) k-th largest
    return np.where(logits < kth, np.float32(NEG_INF), logits)


def top_p_filter_numpy(logits: np.ndarray, p: float) -> np.ndarray:
    """:func:`top_p_filter` for numpy."""
    if p >= 1.0:
        return logits
    order = np.argsort(-logits, axis=-1, kind="stable")
    probs = _softmax(np.take_along_axis(logits, order, axis=-1))
    remove_sorted = np.cumsum(probs, axis=-1) - probs >= p
    remove_sorted[..., 0] = False
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, np.float32(NEG_INF), logits)


def min_p_filter_numpy(logits: np.ndarray, min_p: float) -> np.ndarray:
    """:func:`min_p_filter` for numpy."""
    if min_p <= 0.0:
        return logits
    threshold = logits.max(axis=-1, keepdims=True) + np.log(np.float32(min_p))
    return np.where(logits < threshold, np.float32(NEG_INF), logits)


def filter_logits_numpy(
    logits: np.ndarray, options: SamplingOptions, seen: np.ndarray | None = None
) -> np.ndarray:
    """:func:`filter_logits` for numpy (B, V) logits."""
    if seen is not None and options.repetition_penalty != 1.0:
        r = np.float32(options.repetition_penalty)
        logits = np.where(seen, np.where(logits > 0, logits / r, logits * r), logits)
    if options.greedy:
        return logits
    if options.temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {options.temperature}")
    if options.temperature != 1.0:
        logits = logits / np.float32(options.temperature)
    logits = top_k_filter_numpy(logits, options.top_k)
    logits = top_p_filter_numpy(logits, options.top_p)
    return min_p_filter_numpy(logits, options.min_p)


def sample_numpy(
    logits: np.ndarray, options: SamplingOptions, rng: np.random.Generator
) -> np.ndarray:
    """:func:`sample` for numpy: one id per row by inverting the cumulative distribution with
    one uniform draw per row (another random stream than torch's, so other ids per seed).

    Returns:
        (B,) int64 ids.
    """
    if options.greedy:
        return logits.argmax(axis=-1)
    u = rng.random(len(logits)).tolist()
    out = np.empty(len(logits), dtype=np.int64)
    # array methods rather than np.* functions: a step pays for calls, and the functions'
    # dispatch costs as much as their work on a few dozen values
    for b, row in enumerate(logits):  # the ids still possible: a few dozen of the vocabulary
        ids = (row != NEG_INF).nonzero()[0]
        if len(ids) == 0:  # nothing possible (the masks never leave a row so): id 0
            out[b] = 0
            continue
        cdf = row[ids].astype(np.float64)
        cdf -= cdf.max()
        np.exp(cdf, out=cdf)
        cdf.cumsum(out=cdf)  # the cumulative mass over the vocabulary, at these ids
        k = int(cdf.searchsorted(u[b] * cdf[-1], side="right"))  # first past u
        out[b] = ids[min(k, len(ids) - 1)]
    return out
