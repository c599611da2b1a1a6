"""Batches for the trainer: a deterministic, resumable, rank-sharded stream of windows.

The order of windows is a permutation per epoch drawn from ``(seed, epoch)``; process ``rank``
of ``world`` takes every ``world``-th window of it (what ``DistributedSampler`` does), so the
union of the ranks' batches at one step is exactly the batch one process would draw with
``world`` times the batch size. The whole position is ``(epoch, pos)``: saved in checkpoints,
it makes a resumed run draw the very batches the uninterrupted run would have drawn.
Augmentation draws from a generator seeded by ``(seed, epoch, window index)``, so it needs no
state of its own and survives resumption unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from aurl.config import Config
from aurl.data.vocab import PAD
from aurl.errors import DataError


def window_at(step: int, window: int, curriculum: Sequence[tuple[int, int]]) -> int:
    """The window length at ``step``: the last curriculum entry whose step has been reached."""
    length = window
    for start, w in sorted(curriculum):
        if step >= start:
            length = w
    return length


def window_index(lengths: np.ndarray, window: int) -> np.ndarray:
    """(N, 2) int64 (document, start) of the windows covering each document.

    Starts at 0, window, 2*window, ...; a document's last partial window is moved back to end
    at the document's end (overlapping its neighbour) so windows are full wherever the document
    is long enough. Documents shorter than ``window`` give one padded window.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    counts = np.maximum(1, -(-lengths // window))  # ceil; at least one window per document
    doc = np.repeat(np.arange(len(lengths)), counts)
    first = np.cumsum(counts) - counts
    k = np.arange(len(doc)) - np.repeat(first, counts)
    start = np.minimum(k * window, np.maximum(lengths[doc] - window, 0))
    return np.stack([doc, start], axis=1)


class WindowStream:
    """Endless batches of ``(batch_size, window)`` ids with an attention mask for one rank.

    Args:
        docs: token arrays (one per piece), e.g. a cache split.
        batch_size: windows per batch on this rank.
        window: window length (ignored when ``curriculum`` gives one for the step).
        seed: seeds the per-epoch order and the augmentation.
        rank, world: this process's share.
        shuffle: False gives the documents' order (validation).
        augment: ``f(ids, rng) -> ids`` applied to each window, or None.
        curriculum: ``(step, window)`` pairs.
    """

    def __init__(
        self, docs: Sequence[np.ndarray], *, batch_size: int, window: int, seed: int = 0,
        rank: int = 0, world: int = 1, shuffle: bool = True, augment: Any = None,
        curriculum: Sequence[tuple[int, int]] = (),
    ) -> None:  # fmt: skip
        if len(docs) == 0:
            raise DataError("the training data holds no pieces: prepare a cache with files in it")
        self.docs = docs
        lengths = getattr(docs, "lengths", None)  # a CacheSplit knows them without reading
        self.lengths = np.asarray(
            lengths if lengths is not None else [len(d) for d in docs], dtype=np.int64
        )
        self.batch_size, self.window, self.seed = batch_size, window, seed
        self.rank, self.world, self.shuffle = rank, world, shuffle
        self.augment, self.curriculum = augment, tuple(curriculum)
        self.epoch, self.pos = 0, 0  # pos: windows of this epoch consumed by all ranks together
        self._length, self._order_epoch = -1, -1
        self._order = np.empty((0, 2), dtype=np.int64)

    def num_windows(self, length: int) -> int:
        """How many windows of ``length`` tokens one epoch holds."""
        return len(window_index(self.lengths, length))

    def _prepare(self, length: int) -> None:
        if length != self._length or self._order_epoch != self.epoch:
            index = window_index(self.lengths, length)
            if self.shuffle:
                rng = np.random.default_rng([self.seed, self.epoch, length])
                index = index[rng.permutation(len(index))]
            self._order, self._length, self._order_epoch = index, length, self.epoch

    def next_batch(self, step: int = 0) -> dict[str, torch.Tensor]:
        """The next batch for this rank: ``ids`` (B, T) int64 and ``attention_mask`` (B, T) bool."""
        length = window_at(step, self.window, self.curriculum)
        if length != self._length and self._length != -1 and self.pos:
            self.epoch, self.pos = self.epoch + 1, 0  # a new window length starts a new epoch
        self._prepare(length)
        need = self.batch_size * self.world
        if self.pos + need > len(self._order):  # drop the ragged tail: every rank gets full batches
            self.epoch, self.pos = self.epoch + 1, 0
            self._prepare(length)
            if need > len(self._order):
                raise DataError(
                    f"the data gives {len(self._order)} windows of {length} tokens, fewer than "
                    f"one global batch ({need}): lower data.batch_size or data.window"
                )
        picks = self._order[self.pos + self.rank : self.pos + need : self.world]
        positions = np.arange(self.pos + self.rank, self.pos + need, self.world)
        self.pos += need
        ids = np.full((len(picks), length), PAD, dtype=np.int64)  # (B, T)
        for row, ((doc, start), p) in enumerate(zip(picks, positions)):
            w = np.asarray(self.docs[doc][start : start + length], dtype=np.int64)
            if self.augment is not None:
                w = self.augment(w, np.random.default_rng([self.seed, self.epoch, int(p), 1]))
            ids[row, : len(w)] = w[:length]
        ids_t = torch.from_numpy(ids)
        return {"ids": ids_t, "attention_mask": ids_t != PAD}

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "length": self._length}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._length, self._order_epoch = -1, -1
        if state.get("length", -1) != -1:
            self._prepare(int(state["length"]))


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------


class CacheSplit(Sequence):
    """The token arrays of one split of a :class:`~aurl.data.cache.TokenCache`, read lazily."""

    def __init__(self, cache, split: str) -> None:
        self.cache = cache
        self.index = cache.split_indices(split)
        self.lengths = np.asarray(cache.lengths[self.index], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.cache.tokens(int(self.index[i]))


def open_cache(config: Config):
    """Open ``data.cache`` and check it fits the config's vocabulary. Raises DataError."""
    from pathlib import Path

    from aurl.data.cache import TokenCache

    path = config.data.cache
    if not path:
        raise DataError("no training data: pass --data CACHE (a folder from 'aurl data prepare')")
    if not Path(path).exists():
        raise DataError(
            f"data cache {path} does not exist: run 'aurl data prepare DIR --out {path}'"
        )
    cache = TokenCache(path)
    cache.check_vocab(config.vocab)
    if len(cache.split_indices("train")) == 0:
        raise DataError(
            f"data cache {path} has no pieces in its train split: prepare it from a folder of "
            "MIDI files (see 'aurl data prepare --help')"
        )
    return cache
