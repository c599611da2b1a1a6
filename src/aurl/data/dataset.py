"""Training windows over a token cache: a lazy Dataset, length-grouped batches, curriculum,
padding collate, exact resumption, and a deterministic evaluation iterator.

Items are *window slots*: a piece of ``L`` tokens owns ``max(1, ceil(L / window))`` slots of
the reference window (``data.window``), so long pieces are seen in proportion to their length.
A slot is read at a random offset drawn from ``(seed, epoch, slot)``, moved forward to the
next time step's first event when one is near (a window then starts on an event boundary),
and augmented with a generator drawn from the same key: every window is a pure function of
``(seed, epoch, slot, window length)``, whatever the number of workers or processes.

The batch sampler hands the dataset keys ``(slot, window, epoch)``, so the curriculum's window
length for a step travels with the batch into worker processes. Plain integer keys (e.g. from
``torch.utils.data.DistributedSampler``) use the dataset's own ``window`` and ``epoch``.

Batches are dicts: ``ids`` (B, T) int64 padded with PAD, ``attention_mask`` (B, T) bool (True on
real tokens), ``index`` (B,) cache row, ``offset`` (B,) first token's position in the piece,
``meter`` (B, 2) int64 the piece's time signature (numerator, denominator) from the cache index.
The tokens before ``offset`` are the window's past: :func:`aurl.data.window_state.window_start`
turns them into the state a model's first position starts from.
A language-model loss predicts ``ids[:, 1:]`` from ``ids[:, :-1]`` under the mask.

Packed batches (``data.pack``, :class:`PackedBatchSampler` and :func:`collate_packed`) hold a
varying number of windows (*segments*), each exactly the window the unpacked loader makes for
its key, in the same form (one row per segment, padded to the longest); besides they say where
each segment goes in the ``batch_size`` rows the model's blocks see: ``pack_row`` (S,) its
row, ``pack_col`` (S,) its first column there (segments back to back in key order), and
``pack_width`` () the rows' length (``window``, PAD after a row's last segment).

When the dataset augments with an :class:`~aurl.data.augment.Augmenter`, batches also say what
was drawn for each window (identity values where a transform did not fire): ``transpose`` (B,)
int64 semitones, ``family_map`` (B, families) int64 permutation, ``velocity_factor`` and
``stretch_factor`` (B,) float64. :func:`aurl.data.window_state.window_masks` reads them to give
each window the grammar state of its augmented prefix.

With ``fim_rate > 0`` a share of the windows comes in fill-in-the-middle order
(:mod:`aurl.data.fim`, drawn from its own stream ``(seed, epoch, slot, 1)``), and every batch
also has ``fim_source`` (B, S) the windows in time order, ``fim_pos`` (B, T) each id's place in
it (-1: a sentinel or padding) and ``fim_middle`` (B, T) bool (where EOM may come next).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aurl.config import MAX_STYLE_REPEAT, DataConfig, VocabConfig
from aurl.data.anticipation import draw_anticipation
from aurl.data.augment import Augmenter, AugmentParams
from aurl.data.cache import TokenCache
from aurl.data.fim import collate_fim, draw_fim
from aurl.data.vocab import PAD, Kind, Vocab
from aurl.errors import ConfigError, DataError

LOOKAHEAD = 2  # pack_batches: slots considered per packed batch, in batches' worth of tokens

Key = int | tuple[int, int, int] | tuple[int, int, int, int]  # (slot, window, epoch[, row])


def window_at(step: int, window: int, curriculum: Sequence[tuple[int, int]]) -> int:
    """The window length at optimizer ``step``: the last curriculum entry reached, else ``window``.

    >>> window_at(1500, 256, ((0, 256), (1000, 512), (2000, 1024)))
    512
    """
    length = window
    for start, w in sorted(curriculum):
        if step >= start:
            length = w
    return length


def _open(cache: TokenCache | str | Path) -> TokenCache:
    return cache if isinstance(cache, TokenCache) else TokenCache(cache)


class WindowDataset(torch.utils.data.Dataset):
    """Fixed-length windows of one split of a cache, read lazily through the cache's mmaps.

    Args:
        cache: A :class:`TokenCache` or its folder.
        split: "train", "valid" or "test".
        window: Reference window: slots per piece and the length for integer keys.
        seed: Seeds offsets and augmentation (with the epoch and the slot).
        augment: ``f(ids, rng) -> ids`` (e.g. an :class:`Augmenter`), or None.
        vocab_config: When given, the cache must have been built with it.
        boundary_search: How far (tokens) to look forward for a time-step boundary.
        fim_rate: Share of windows cut into prefix / middle / suffix and reordered
            (:mod:`aurl.data.fim`); 0 draws nothing and leaves every window as it was.
        anticipation_rate: Share of windows whose top line is copied ahead as controls
            (:mod:`aurl.data.anticipation`, in the FIM fields' form); 0 draws nothing.
        anticipation_beats: How far ahead (beats; the model's ``model.anticipation``).
    """

    def __init__(
        self,
        cache: TokenCache | str | Path,
        split: str = "train",
        *,
        window: int = 512,
        seed: int = 0,
        augment: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
        vocab_config: VocabConfig | None = None,
        boundary_search: int = 64,
        fim_rate: float = 0.0,
        anticipation_rate: float = 0.0,
        anticipation_beats: float = 0.0,
        style_repeat: tuple[tuple[str, int], ...] = (),
    ) -> None:
        self.cache = _open(cache)
        if vocab_config is not None:
            self.cache.check_vocab(vocab_config)
        self.pieces = self.cache.split_indices(split)  # (P,) cache rows
        if len(self.pieces) == 0:
            raise DataError(
                f"cache {self.cache.path} has no {split!r} pieces: prepare more files or change "
                "data.valid_fraction / data.test_fraction"
            )
        self.split, self.window, self.seed, self.epoch = split, window, seed, 0
        self.augment, self.boundary_search = augment, boundary_search
        self.fim_rate = fim_rate
        if anticipation_rate > 0 and anticipation_beats <= 0:
            raise ConfigError(
                f"data.anticipation_rate={anticipation_rate} needs model.anticipation > 0 "
                "(how many beats ahead the controls come)"
            )
        self.anticipation_rate, self.anticipation_beats = anticipation_rate, anticipation_beats
        self.piece_lengths = self.cache.lengths[self.pieces]  # (P,)
        slots = np.maximum(1, -(-self.piece_lengths // window))  # (P,) ceil, at least one
        slots = slots * piece_repeats(self.cache, self.pieces, style_repeat)
        self.slot_piece = np.repeat(np.arange(len(self.pieces)), slots)  # (N,) slot -> piece
        self.vocab = vocab = Vocab(self.cache.vocab_config)
        # a time step's first event follows a TIME_SHIFT and is not one itself
        self._is_shift = vocab.kind == Kind.TIME_SHIFT
        self._families = vocab.config.num_instruments

    def __len__(self) -> int:
        return len(self.slot_piece)

    def set_epoch(self, epoch: int) -> None:
        """Epoch used for integer keys (as with ``DistributedSampler.set_epoch``)."""
        self.epoch = epoch

    def slot_lengths(self, window: int | None = None) -> np.ndarray:
        """(N,) length of each slot's window: ``min(piece length, window)``."""
        return np.minimum(self.piece_lengths[self.slot_piece], window or self.window)

    def _start(self, tokens: np.ndarray, offset: int, latest: int) -> int:
        """``offset`` moved forward to the first event of the next time step, if one is near."""
        if offset == 0:
            return 0
        head = np.asarray(tokens[offset - 1 : min(offset + self.boundary_search, latest + 1)])
        shift = self._is_shift[head]
        hits = np.flatnonzero(shift[:-1] & ~shift[1:])  # head[j] shift, head[j + 1] event
        return offset + int(hits[0]) if hits.size else offset

    def __getitem__(self, key: Key) -> dict[str, Any]:
        row_in_pack = None  # packed batches: the row the sampler put this window in
        if np.isscalar(key):
            slot, window, epoch = int(key), self.window, self.epoch
        else:
            slot, window, epoch, *rest = key
            row_in_pack = rest[0] if rest else None
        row = int(self.pieces[self.slot_piece[slot]])
        tokens = self.cache.tokens(row)
        rng = np.random.default_rng([self.seed, epoch, slot])
        latest = len(tokens) - window  # last offset giving a full window
        offset = 0 if latest <= 0 else self._start(tokens, int(rng.integers(latest + 1)), latest)
        # a little slack so that augmentation (which may drop tokens) still fills the window
        margin = 16 if self.augment is not None else 0
        ids = np.asarray(tokens[offset : offset + window + margin], dtype=np.int64)
        drawn = {}
        if isinstance(self.augment, Augmenter):  # record what was drawn (window_state)
            ids, params = self.augment.apply(ids, rng)
            drawn = augment_fields(params, self._families)
        elif self.augment is not None:
            ids = self.augment(ids, rng)
        meter = self.cache.meters[row]
        item = {"ids": ids[:window], "index": row, "offset": offset, "meter": meter, **drawn}
        if row_in_pack is not None:
            item["pack"] = (row_in_pack, window)  # its packed row, and the rows' length
        if self.fim_rate > 0:  # its own stream: the windows drawn above stay what they were
            fim_rng = np.random.default_rng([self.seed, epoch, slot, 1])
            fim = draw_fim(ids, fim_rng, self.vocab, rate=self.fim_rate, window=window)
            item.update(ids=fim.ids, fim=fim)
        if self.anticipation_rate > 0:  # its own stream too
            a_rng = np.random.default_rng([self.seed, epoch, slot, 2])
            ant = draw_anticipation(
                ids, a_rng, self.vocab, rate=self.anticipation_rate,
                beats=self.anticipation_beats, window=window,
            )  # fmt: skip
            item.update(ids=ant.ids, fim=ant)
        return item


def augment_fields(params: AugmentParams, families: int) -> dict[str, Any]:
    """An item's record of its augmentation, in the form :func:`collate` stacks: identity
    values (0, ``arange(families)``, 1.0) where a transform did not fire."""
    fmap = params.family_map
    return {
        "transpose": params.transpose,
        "family_map": np.arange(families) if fmap is None else np.asarray(fmap, dtype=np.int64),
        "velocity_factor": 1.0 if params.velocity is None else params.velocity,
        "stretch_factor": 1.0 if params.stretch is None else params.stretch,
    }


def collate(items: Sequence[dict[str, Any]], pad_id: int = PAD) -> dict[str, torch.Tensor]:
    """Pad ``ids`` on the right to the longest item; mask True on real tokens; stack the
    augmentation records (:func:`augment_fields`) when the items have them, and the FIM
    fields (:func:`aurl.data.fim.collate_fim`) when the items are FIM windows."""
    lengths = [len(it["ids"]) for it in items]
    ids = torch.full((len(items), max(lengths)), pad_id, dtype=torch.long)  # (B, T)
    for b, it in enumerate(items):
        ids[b, : lengths[b]] = torch.from_numpy(np.asarray(it["ids"], dtype=np.int64))
    mask = torch.arange(ids.shape[1])[None, :] < torch.tensor(lengths)[:, None]  # (B, T)
    batch = {
        "ids": ids,
        "attention_mask": mask,
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
        "offset": torch.tensor([it["offset"] for it in items], dtype=torch.long),
    }
    if "meter" in items[0]:
        batch["meter"] = torch.from_numpy(np.stack([it["meter"] for it in items]).astype(np.int64))
    if "family_map" in items[0]:
        batch["transpose"] = torch.tensor([it["transpose"] for it in items], dtype=torch.long)
        fmaps = np.stack([it["family_map"] for it in items])  # (B, families)
        batch["family_map"] = torch.from_numpy(fmaps.astype(np.int64))
        for key in ("velocity_factor", "stretch_factor"):
            batch[key] = torch.tensor([it[key] for it in items], dtype=torch.float64)
    if "fim" in items[0]:
        batch.update(collate_fim([it["fim"] for it in items], pad_id))
    return batch


def collate_packed(items: Sequence[dict[str, Any]], pad_id: int = PAD) -> dict[str, torch.Tensor]:
    """:func:`collate` of the segments of a packed batch, plus where each lies in the packed
    rows: ``pack_row`` (S,), ``pack_col`` (S,) and ``pack_width`` () (module docstring).

    Columns come from the segments' actual lengths, back to back in the order the sampler gave.
    The rows are ``window`` long (one shape for every batch: a compiled kernel is not rebuilt
    per batch), or as long as the longest row where that is longer: the sampler planned with
    ``min(piece length, window)``, and augmentation may add a few shift tokens to a piece
    shorter than the window."""
    batch = collate(items, pad_id)
    rows = torch.tensor([it["pack"][0] for it in items], dtype=torch.long)  # (S,)
    lengths = batch["attention_mask"].sum(1)  # (S,)
    cols = torch.zeros_like(rows)
    used: dict[int, int] = {}
    for s, (r, n) in enumerate(zip(rows.tolist(), lengths.tolist())):
        cols[s] = used.get(r, 0)
        used[r] = cols[s].item() + n
    width = max(items[0]["pack"][1], *used.values())
    batch.update(pack_row=rows, pack_col=cols, pack_width=torch.tensor(width))
    return batch


def pack_batches(
    order: np.ndarray, lengths: np.ndarray, rows: int, width: int, lookahead: int = LOOKAHEAD
) -> list[list[tuple[int, int]]]:
    """Slots in ``order`` packed into batches of ``rows`` rows of ``width`` tokens:
    ``[[(slot, row), ...], ...]``.

    The rule: take slots in order (after those the last batch could not place) until their
    lengths (``lengths[slot] <= width``) add up to ``lookahead`` batches' ``rows x width``
    tokens; place them longest first (stable), each in the first row with room (first-fit
    decreasing); those that fit nowhere wait for the next batch. The lookahead gives the short
    windows that fill the rows' ends; once the order is spent, batches are made while the
    waiting slots fill one, and the rest (less than a batch) are dropped for the epoch, as the
    unpacked sampler drops its last partial batch. Deterministic: a function of ``order`` and
    ``lengths`` only.
    """
    capacity = rows * width
    batches: list[list[tuple[int, int]]] = []
    waiting: list[int] = []
    next_i = 0
    while True:
        total = int(lengths[waiting].sum()) if waiting else 0
        while total < lookahead * capacity and next_i < len(order):
            waiting.append(int(order[next_i]))
            total += int(lengths[order[next_i]])
            next_i += 1
        if total < capacity:
            return batches
        free = np.full(rows, width, dtype=np.int64)  # (rows,) room left in each row
        placed: list[tuple[int, int]] = []
        left: list[int] = []
        for slot in sorted(waiting, key=lambda s: -int(lengths[s])):  # stable: ties in order
            fits = np.flatnonzero(free >= lengths[slot])
            if fits.size:
                free[fits[0]] -= lengths[slot]
                placed.append((slot, int(fits[0])))
            else:
                left.append(slot)
        batches.append(placed)
        wait = set(left)
        waiting = [s for s in waiting if s in wait]  # in their order, for the next batch


class LengthGroupedBatchSampler(torch.utils.data.Sampler):
    """Batches of slots of similar window length, shuffled per epoch, shared out across ranks.

    Each epoch draws a permutation from ``(seed, epoch)``, cuts it into groups of ``group``
    batches, sorts each group by window length (less padding), and shuffles the batch order.
    Rank ``r`` of ``world`` takes batches ``r, r + world, ...`` (the count is rounded down to a
    multiple of ``world`` so that every rank runs the same number of steps).

    Args:
        dataset: The :class:`WindowDataset`.
        batch_size: Windows per batch (per rank).
        seed: Seeds the order.
        shuffle: False: slots in order, no grouping (evaluation).
        length_grouped: Sort inside groups by length.
        rank, world: This process's share.
        window: Reference window length (``data.window``) when no curriculum applies.
        curriculum: ``(step, window)`` pairs; the window of batch ``b`` is that of step
            ``b // batches_per_step`` counted from the start of training.
        batches_per_step: Batches per optimizer step (gradient accumulation).
        group: Batches per sorting group.
    """

    def __init__(
        self,
        dataset: WindowDataset,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        length_grouped: bool = True,
        rank: int = 0,
        world: int = 1,
        window: int | None = None,
        curriculum: Sequence[tuple[int, int]] = (),
        batches_per_step: int = 1,
        group: int = 64,
    ) -> None:
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.shuffle, self.length_grouped = shuffle, length_grouped
        self.rank, self.world = rank, world
        self.window = window or dataset.window
        self.curriculum, self.batches_per_step = tuple(curriculum), batches_per_step
        self.group = group
        self.epoch, self.start = 0, 0  # start: batches of this epoch to skip (resumption)
        n = len(dataset)
        if n < batch_size * world:
            raise DataError(
                f"{n} windows in split {dataset.split!r} cannot fill one batch of {batch_size} "
                f"on each of {world} processes: lower data.batch_size or add data"
            )

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return len(self.dataset) // self.batch_size // self.world

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def window_of(self, batch: int) -> int:
        """Window length of batch ``batch`` of the current epoch (curriculum)."""
        step = (self.epoch * len(self) + batch) // self.batches_per_step
        return window_at(step, self.window, self.curriculum)

    def epoch_batches(self) -> np.ndarray:
        """(batches on this rank, batch_size) slot ids of the current epoch."""
        n = len(self.dataset)
        per_rank = len(self)
        total = per_rank * self.world * self.batch_size
        if not self.shuffle:
            order = np.arange(total)
            return order.reshape(-1, self.batch_size)[self.rank :: self.world]
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(n)[:total]
        if self.length_grouped:
            lengths = self.dataset.slot_lengths(self.window)
            size = self.group * self.batch_size
            for g in range(0, total, size):
                chunk = order[g : g + size]
                order[g : g + size] = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches = order.reshape(-1, self.batch_size)  # (batches, batch_size)
        batches = batches[rng.permutation(len(batches))]
        return batches[self.rank :: self.world]

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        batches = self.epoch_batches()
        for b in range(self.start, len(batches)):
            w = self.window_of(b)
            yield [(int(s), w, self.epoch) for s in batches[b]]


class PackedBatchSampler(torch.utils.data.Sampler):
    """Packed batches (``data.pack``): each epoch's slots, in the order the unpacked sampler
    draws (a permutation from ``(seed, epoch)``), packed by :func:`pack_batches` into
    ``batch_size`` rows of ``window`` tokens; rank ``r`` of ``world`` takes batches ``r, r +
    world, ...`` (the count rounded down to a multiple of ``world``). Keys are ``(slot, window,
    epoch, row)``; :func:`collate_packed` lays the segments out. A batch is a function of
    ``(seed, epoch, batch number)``, so a resumed loader sees the same batches.

    Args:
        dataset: The :class:`WindowDataset`.
        batch_size: Packed rows per batch (per rank).
        seed: Seeds the order.
        rank, world: This process's share.
        window: Row length (``data.window``).
    """

    def __init__(self, dataset: WindowDataset, batch_size: int, *, seed: int = 0, rank: int = 0,
                 world: int = 1, window: int | None = None) -> None:  # fmt: skip
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world = rank, world
        self.window = window or dataset.window
        self.epoch, self.start = 0, 0  # start: batches of this epoch to skip (resumption)
        self._plans: dict[int, list[list[tuple[int, int]]]] = {}  # epoch -> its batches
        if len(self._plan()) < world:
            raise DataError(
                f"the {len(dataset)} windows of split {dataset.split!r} cannot fill "
                f"{world} packed batch(es) of {batch_size} x {self.window} tokens: lower "
                "data.batch_size or data.window, or add data"
            )

    def _plan(self) -> list[list[tuple[int, int]]]:
        """This rank's batches of the current epoch (computed once per epoch)."""
        if self.epoch not in self._plans:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.dataset))
            lengths = self.dataset.slot_lengths(self.window)
            plan = pack_batches(order, lengths, self.batch_size, self.window)
            plan = plan[: len(plan) // self.world * self.world]
            self._plans = {self.epoch: plan[self.rank :: self.world]}  # keep one epoch's
        return self._plans[self.epoch]

    def __len__(self) -> int:
        """Batches of the current epoch on this rank (it varies a little by epoch)."""
        return len(self._plan())

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def window_of(self, batch: int) -> int:
        """The row length (no curriculum with packing)."""
        return self.window

    def epoch_batches(self) -> list[list[tuple[int, int]]]:
        """This rank's batches of the current epoch: ``[(slot, row), ...]`` each."""
        return self._plan()

    def __iter__(self) -> Iterator[list[tuple[int, int, int, int]]]:
        plan = self._plan()
        for b in range(self.start, len(plan)):
            yield [(slot, self.window, self.epoch, row) for slot, row in plan[b]]


class Loader:
    """Endless training batches with an exact, checkpointable position.

    The DataLoader prefetches, so the position is counted here, on the batches handed to the
    caller: ``state_dict()`` after ``k`` batches resumes at batch ``k + 1`` exactly.

    Args:
        dataset: The :class:`WindowDataset`.
        sampler: Its :class:`LengthGroupedBatchSampler`.
        num_workers: DataLoader worker processes (each maps the shards itself).
    """

    def __init__(
        self, dataset: WindowDataset, sampler: LengthGroupedBatchSampler | PackedBatchSampler,
        *, num_workers: int = 0,
    ) -> None:  # fmt: skip
        self.dataset, self.sampler, self.num_workers = dataset, sampler, num_workers
        self.epoch, self.position = 0, 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # one DataLoader for every epoch: its workers persist (a small corpus has an epoch
        # every few steps, and starting workers each time would stall a GPU); the keys carry
        # the epoch into them, and the sampler, read in this process, is set before each pass
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            collate_fn=collate_packed if isinstance(self.sampler, PackedBatchSampler) else collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
        while True:
            self.sampler.set_epoch(self.epoch, self.position)
            self.dataset.set_epoch(self.epoch)
            for batch in loader:
                self.position += 1
                yield batch
            self.epoch, self.position = self.epoch + 1, 0

    def window(self) -> int:
        """Window length of the next batch."""
        self.sampler.set_epoch(self.epoch, self.position)
        return self.sampler.window_of(self.position)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.sampler.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.sampler.seed) != self.sampler.seed:
            raise DataError(
                f"loader state was saved with seed {state['seed']}, this run uses "
                f"{self.sampler.seed}: resume with the same training.seed"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def piece_repeats(
    cache: TokenCache, pieces: np.ndarray, style_repeat: tuple[tuple[str, int], ...]
) -> np.ndarray:
    """(P,) how many times an epoch each of ``pieces`` (cache rows) is drawn: ``data.style_repeat``
    by the pieces' style labels, 1 for the rest.

    Raises:
        ConfigError: a style the cache has no pieces of (the message lists the ones it has), or
            a count outside 1..MAX_STYLE_REPEAT.
    """
    repeats = np.ones(len(pieces), dtype=np.int64)
    if not style_repeat:
        return repeats
    names = cache.style_names
    labels = cache.styles[pieces]
    for name, n in style_repeat:
        if name not in names:
            raise ConfigError(
                f"data.style_repeat: the cache {cache.path} has no style {name!r}; its styles "
                f"are {names or 'none (prepare a corpus with a manifest)'}"
            )
        if not 1 <= n <= MAX_STYLE_REPEAT:  # DataConfig checks it too, before anything runs
            raise ConfigError(
                f"data.style_repeat: {name} {n}; give a count from 1 to {MAX_STYLE_REPEAT}"
            )
        repeats[labels == names.index(name)] = n
    return repeats


def build_loader(
    cache: TokenCache | str | Path,
    data_config: DataConfig,
    *,
    split: str = "train",
    seed: int = 0,
    rank: int = 0,
    world: int = 1,
    augment: bool = True,
    batches_per_step: int = 1,
    vocab_config: VocabConfig | None = None,
    anticipation_beats: float = 0.0,
) -> Loader:
    """The training loader of ``data_config``: window, curriculum, batch size, workers, grouping
    and augmentation (with ``augment``), for process ``rank`` of ``world``."""
    cache = _open(cache)
    augmenter = Augmenter(data_config.augment, Vocab(cache.vocab_config)) if augment else None
    dataset = WindowDataset(
        cache, split, window=data_config.window, seed=seed, augment=augmenter,
        vocab_config=vocab_config, fim_rate=data_config.fim_rate,
        anticipation_rate=data_config.anticipation_rate, anticipation_beats=anticipation_beats,
        style_repeat=data_config.style_repeat if split == "train" else (),
    )  # fmt: skip
    sampler: LengthGroupedBatchSampler | PackedBatchSampler
    if data_config.pack and split == "train":
        if data_config.curriculum:  # the trainer refuses it first, with the other checks
            raise ConfigError("data.pack=true packs rows of one length: set data.curriculum=[]")
        sampler = PackedBatchSampler(dataset, data_config.batch_size, seed=seed, rank=rank,
                                     world=world)  # fmt: skip
    else:
        sampler = LengthGroupedBatchSampler(
            dataset, data_config.batch_size, seed=seed, length_grouped=data_config.length_grouped,
            rank=rank, world=world, curriculum=data_config.curriculum,
            batches_per_step=batches_per_step,
        )  # fmt: skip
    return Loader(dataset, sampler, num_workers=data_config.num_workers)


# --------------------------------------------------------------------------------------------
# Evaluation: whole pieces, deterministic
# --------------------------------------------------------------------------------------------


def iter_pieces(cache: TokenCache | str | Path, split: str) -> Iterator[tuple[int, np.ndarray]]:
    """``(cache row, (L,) int64 ids)`` of every piece of ``split``, in cache order."""
    cache = _open(cache)
    for row in cache.split_indices(split):
        yield int(row), np.asarray(cache.tokens(int(row)), dtype=np.int64)


def eval_batches(
    cache: TokenCache | str | Path,
    split: str,
    *,
    window: int,
    batch_size: int,
    stride: int | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Every token of every piece of ``split``, scored exactly once, in a fixed order.

    Pieces are cut into windows starting every ``stride`` tokens (default ``window // 2``) so
    that later windows give their tokens ``window - stride`` tokens of context. Besides the
    :func:`collate` keys, each batch has ``score_mask`` (B, T) bool: True where the token is a
    target to score (predicted from the tokens before it); each token but a piece's first is
    True exactly once over the whole iteration.
    """
    cache = _open(cache)
    stride = stride or max(1, window // 2)
    if not 0 < stride <= window:
        raise DataError(f"evaluation stride {stride} must lie in 1..window ({window})")
    items: list[dict[str, Any]] = []
    for row, ids in iter_pieces(cache, split):
        n_windows = 1 + max(0, math.ceil((len(ids) - window) / stride))
        scored_until = 1  # tokens [0, scored_until) are scored already (or have no context)
        for k in range(n_windows):
            start = k * stride
            piece = ids[start : start + window]
            score = np.zeros(len(piece), dtype=bool)
            score[max(0, scored_until - start) :] = True
            scored_until = start + len(piece)
            item = {"ids": piece, "index": row, "offset": start, "score": score}
            items.append({**item, "meter": cache.meters[row]})
            if len(items) == batch_size:
                yield _eval_collate(items)
                items = []
    if items:
        yield _eval_collate(items)


def _eval_collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    batch = collate(items)
    score = torch.zeros_like(batch["attention_mask"])
    for b, it in enumerate(items):
        score[b, : len(it["score"])] = torch.from_numpy(it["score"])
    batch["score_mask"] = score
    return batch
