"""Token n-gram baseline: interpolated Kneser-Ney over token ids, scored in bits per note.

The baseline a neural model must beat. Interpolated Kneser-Ney (Kneser & Ney 1995; the form of
Chen & Goodman, "An empirical study of smoothing techniques for language modeling", 1998, eq. 17)
with one absolute discount per order estimated as ``D = n1 / (n1 + 2 n2)`` (Ney et al. 1994;
``n1``, ``n2``: how many n-grams of that order occur once, twice)::

    P(w | h) = max(c(h w) - D, 0) / c(h .) + D N1+(h .) / c(h .) * P(w | h')

``h'`` is ``h`` without its oldest token. The highest order uses counts; lower orders use
continuation counts ``N1+(. h w)`` (in how many contexts a word follows ``h``); the unigram level
interpolates with the uniform distribution, so every id keeps some probability. An unseen
history backs off to ``P(w | h')`` in full. Sequences are left-padded with a symbol outside the
vocabulary so the first tokens have full-length histories.

Counting is vectorized: an n-gram is one int64 key (``ceil(log2(V + 1))`` bits per token), counted
with ``np.unique`` and looked up with ``np.searchsorted``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from aurl.data.vocab import Kind, Vocab
from aurl.evaluation.likelihood import LikelihoodResult


@dataclass
class _Level:
    """Sorted count tables of one order: ``(h, w)`` keys and the ``h`` context totals."""

    keys: np.ndarray  # (K,) sorted int64 keys of (h, w)
    counts: np.ndarray  # (K,) count (highest order) or continuation count (lower orders)
    ctx_keys: np.ndarray  # (C,) sorted keys of h
    ctx_total: np.ndarray  # (C,) sum over w of counts
    ctx_types: np.ndarray  # (C,) number of w with a nonzero count
    discount: float


def _lookup(table: np.ndarray, values: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """``values`` at the positions of ``keys`` in sorted ``table``; 0 where absent."""
    if table.size == 0:
        return np.zeros(keys.shape, dtype=values.dtype)
    pos = np.minimum(np.searchsorted(table, keys), table.size - 1)
    return np.where(table[pos] == keys, values[pos], 0)


def _discount(counts: np.ndarray) -> float:
    n1 = np.count_nonzero(counts == 1)
    n2 = np.count_nonzero(counts == 2)
    if n1 == 0:
        return 0.5  # no singletons (tiny data): a middling discount
    return float(n1 / (n1 + 2 * n2))


class NgramModel:
    """Interpolated Kneser-Ney n-gram model over token ids ``0 .. vocab_size - 1``.

    Args:
        order: n (4: each token is predicted from the 3 before it).
        vocab_size: Number of ids; probabilities are spread over exactly these.
    """

    def __init__(self, order: int = 4, vocab_size: int = 774) -> None:
        if order < 1:
            raise ValueError(f"order must be at least 1, got {order}")
        self.order = order
        self.vocab_size = vocab_size
        self.pad = vocab_size  # left padding symbol, never a target
        self.bits = max(1, math.ceil(math.log2(vocab_size + 1)))
        if self.bits * order > 62:
            raise ValueError(f"order {order} with {vocab_size} ids does not fit an int64 key")
        self.levels: list[_Level] = []

    # -- keys ------------------------------------------------------------------------------------

    def _grams(self, seq: np.ndarray) -> np.ndarray:
        """(T - 1, order) rows ``[h_1 .. h_{n-1}, w]`` for every target after the first token."""
        seq = np.asarray(seq, dtype=np.int64)
        padded = np.concatenate([np.full(self.order - 1, self.pad, dtype=np.int64), seq])
        rows = np.lib.stride_tricks.sliding_window_view(padded, self.order)  # (T, order)
        return rows[1:]  # the first token (START) is given, not predicted

    def _key(self, grams: np.ndarray) -> np.ndarray:
        """int64 key of each row of ``grams`` (N, k)."""
        key = np.zeros(grams.shape[0], dtype=np.int64)
        for j in range(grams.shape[1]):
            key = (key << self.bits) | grams[:, j]
        return key

    # -- fitting ---------------------------------------------------------------------------------

    def fit(self, sequences: Iterable[np.ndarray]) -> NgramModel:
        """Count the n-grams of ``sequences`` (each START ... END); returns self."""
        parts = [self._grams(s) for s in sequences if len(s) >= 2]
        grams = np.concatenate(parts) if parts else np.zeros((0, self.order), dtype=np.int64)
        if grams.size and (grams[:, -1].max() >= self.vocab_size or grams.min() < 0):
            raise ValueError(f"token ids must lie in 0..{self.vocab_size - 1}")
        # unique full-order n-grams with counts; lower orders derive from them
        uniq, counts = np.unique(grams, axis=0, return_counts=True)  # (K, order), (K,)
        self.levels = [None] * self.order  # index k - 1 holds order k
        for k in range(self.order, 0, -1):
            if k == self.order:
                rows, cnt = uniq, counts
            else:
                # continuation count of (h w) of order k: distinct left tokens of its (k + 1)-grams
                higher = self._level_rows  # unique (k + 1)-gram rows of the level above
                rows, cnt = np.unique(higher[:, 1:], axis=0, return_counts=True)
            self._level_rows = rows
            self.levels[k - 1] = self._table(rows, cnt)
        del self._level_rows
        return self

    def _table(self, rows: np.ndarray, cnt: np.ndarray) -> _Level:
        keys = self._key(rows)
        order = np.argsort(keys)
        keys, cnt = keys[order], cnt[order]
        ctx = self._key(rows[order, :-1]) if rows.shape[1] > 1 else np.zeros_like(keys)
        ctx_keys, inverse = np.unique(ctx, return_inverse=True)
        ctx_total = np.bincount(inverse, weights=cnt, minlength=ctx_keys.size)
        ctx_types = np.bincount(inverse, minlength=ctx_keys.size).astype(np.float64)
        return _Level(keys, cnt.astype(np.float64), ctx_keys, ctx_total, ctx_types, _discount(cnt))

    # -- probabilities ---------------------------------------------------------------------------

    def prob(self, grams: np.ndarray) -> np.ndarray:
        """``P(w | h)`` for rows ``[h_1 .. h_{n-1}, w]`` of ``grams`` (N, order)."""
        if not self.levels:
            raise ValueError("the n-gram model is not fitted: call fit() first")
        grams = np.asarray(grams, dtype=np.int64)
        p = np.full(grams.shape[0], 1.0 / self.vocab_size)
        for k in range(1, self.order + 1):
            lv = self.levels[k - 1]
            sub = grams[:, self.order - k :]  # (N, k): the last k - 1 history tokens and w
            cnt = _lookup(lv.keys, lv.counts, self._key(sub))
            ctx = self._key(sub[:, :-1]) if k > 1 else np.zeros(grams.shape[0], dtype=np.int64)
            total = _lookup(lv.ctx_keys, lv.ctx_total, ctx)
            types = _lookup(lv.ctx_keys, lv.ctx_types, ctx)
            seen = total > 0
            safe = np.where(seen, total, 1.0)
            mixed = np.maximum(cnt - lv.discount, 0.0) / safe + lv.discount * types / safe * p
            p = np.where(seen, mixed, p)
        return p

    def score(
        self, sequences: Iterable[np.ndarray], vocab: Vocab | None = None
    ) -> LikelihoodResult:
        """Total NLL of ``sequences`` (every token after the first), with note counts."""
        vocab = vocab or Vocab()
        is_note = vocab.kind == Kind.NOTE_ON
        nll, tokens, notes, n = 0.0, 0, 0, 0
        for seq in sequences:
            n += 1
            if len(seq) < 2:
                continue
            grams = self._grams(seq)
            nll -= float(np.log(self.prob(grams)).sum())
            tokens += grams.shape[0]
            notes += int(is_note[grams[:, -1]].sum())
        return LikelihoodResult(nll, tokens, notes, n)


def ngram_baseline(cache, *, order: int = 4, split: str = "test") -> LikelihoodResult:
    """Fit on the train split of a :class:`aurl.data.cache.TokenCache`, score ``split``."""
    vocab = Vocab(cache.vocab_config)
    model = NgramModel(order, vocab.size).fit(cache.tokens(i) for i in cache.split_indices("train"))
    return model.score((cache.tokens(i) for i in cache.split_indices(split)), vocab)
