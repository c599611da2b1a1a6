"""The state at the start of each training window, augmentation included: the grammar's (for
the masks) and a model's (musical time and grammar features, :func:`window_start`).

A window cut at ``offset`` from a cached piece is masked (grammar-masked cross-entropy) from the
state the grammar reaches after the piece's first ``offset`` tokens, not from the initial state
(which would expect START). The dataset augments the window but the prefix comes from the
cache as it is, so this module carries the prefix's state across the window's augmentation (the
:class:`~aurl.data.augment.AugmentParams` that :mod:`aurl.data.dataset` records in each batch).
The masks are then those of the augmented prefix followed by the window, read as one sequence.

Only the fields that ``Grammar._mask`` reads matter (``time`` is not one of them):

- transposition by ``k``: the sounding pitches move by ``k``; ``last_pitch``, and ``last_value``
  after a note, too.
- family map (a permutation of all the families): sounding pitches and sustain move to their
  family's image; ``family``, and ``last_value`` after an INSTRUMENT, are mapped.
- velocity factor: ``last_velocity``, and ``last_value`` after a VELOCITY, go through
  :func:`~aurl.data.augment.velocity_map`.
- stretch and jitter: nothing. They move the window's TIME_SHIFT runs (times counted from the
  window's start) and never touch TEMPO; the prefix keeps its own shifts, and the one rule that
  reads a shift (after a shift shorter than the maximum comes an event) reads the prefix's last
  token, which stays what it was.

The state is transformed, not the prefix's tokens: that costs one gather over (families,
pitches) per window instead of a pass over the prefix, and a pitch moved past the vocabulary's
range still counts as ``last_pitch`` (a token could not say it).

What stays approximate (counted on real data in ``tests/data/test_window_state.py``):

1. Velocity: :func:`~aurl.data.augment.scale_velocity` drops a VELOCITY that repeats the bin
   in force *within the window*; the window's first VELOCITY has nothing to compare with. When
   the factor merges its bin with the prefix's last one (``b1 != b0`` but ``map[b1] ==
   map[b0]``) the window repeats the bin in force: the masks are those of the augmented prefix
   plus window, and that one token breaks them. No start state avoids it without lying about
   the bin in force, which the window's NOTE_ONs before that VELOCITY play with.
2. Transposition: the shift is drawn to keep the window's notes in range. A note sounding at the
   window's start and still sounding at its end (its NOTE_OFF is not in the window) does not
   take part; moved out of range it cannot sound in the state, so the polyphony counts one note
   fewer while it lasts (a NOTE_ON over the cap may be allowed).
3. Family map: it keeps the order of the families that have an INSTRUMENT token in the window.
   When a window starts inside a time step (no step boundary near the drawn offset) in the
   middle of family ``f``'s events and ``f`` has no INSTRUMENT in the window, the next
   INSTRUMENT ``g > f`` of that step may map below ``f``'s image: the ascending-family rule
   breaks at that token, as it would in the augmented prefix plus window.

The trainer's grammar-masked loss always counts the target as allowed, so none of these makes
the loss infinite.

On a GPU all of this runs on the device (:func:`window_inputs`): the prefixes are gathered from
a :class:`TokenTable` there, the grammar's dense scan reads nothing back to the host, the
augmentation records are checked and looked up on the host where the loader left them, and one
scan of the window serves both the masks and the model's features.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import numpy as np
import torch

from aurl.data.augment import velocity_map
from aurl.data.grammar import Grammar, GrammarState
from aurl.data.vocab import PAD, Kind


class _Tokens(Protocol):
    def tokens(self, i: int) -> np.ndarray: ...


class _Model(Protocol):
    def start_after(self, history: torch.Tensor, *, empty: torch.Tensor | None = None,
                    device: Any = None, initial: Any = None) -> Any: ...  # fmt: skip


PREFIX_PART = 2048  # prefixes are scanned in parts of this many tokens (the same state)
CHECKPOINT_EVERY = 1024  # PrefixCheckpoints: a piece's state after every this many tokens


class TokenTable:
    """Pieces of a cache as one flat tensor on a device, so that the windows' prefixes are
    gathered there in one indexing operation per batch (:meth:`prefixes`), not copied row by
    row on the host. int16 while the vocabulary fits (half of int32, a quarter of int64).

    Args:
        cache: the token cache.
        rows: the cache rows to hold (e.g. the train split's); default all.
        device: where the table lives (the training device).
    """

    def __init__(self, cache: _Tokens, rows: np.ndarray, device: torch.device | str) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        lengths = np.array([len(cache.tokens(int(r))) for r in rows], dtype=np.int64)
        n_rows = int(rows.max()) + 1 if len(rows) else 0
        starts = np.full(n_rows, -1, dtype=np.int64)  # (cache rows,) first token in the table
        starts[rows] = np.cumsum(lengths) - lengths
        flat = np.concatenate([np.asarray(cache.tokens(int(r))) for r in rows] or [[]])
        dtype = torch.int16 if flat.size == 0 or int(flat.max()) < 2**15 else torch.int32
        self.flat = torch.as_tensor(flat.astype(np.int64), device=device).to(dtype)  # (N,)
        self.starts = torch.as_tensor(starts, device=device)
        self.lengths = lengths
        self.rows = rows
        # a model's states every CHECKPOINT_EVERY tokens (add_checkpoints), used by window_start
        self.checkpoints: PrefixCheckpoints | None = None

    def add_checkpoints(self, model: _Model, every: int = CHECKPOINT_EVERY) -> None:
        """Keep ``model``'s window-start state every ``every`` tokens of each piece, so that
        :func:`window_start` scans at most ``every - 1`` tokens of a window's prefix."""
        self.checkpoints = PrefixCheckpoints(model, self, every)

    def prefixes(self, index: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """(B, L) on the table's device: the first ``offset`` tokens of cache row ``index``
        (both (B,), best on the host: L, the longest offset, is read from them), right-aligned
        behind PAD tokens, as :func:`prefix_ids` gives them."""
        return self.span(index, torch.zeros_like(offset), offset)

    def span(self, index: torch.Tensor, begin: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
        """(B, L) on the table's device: tokens ``begin:end`` of cache row ``index`` (all (B,),
        best on the host), right-aligned behind PAD tokens (L: the longest span)."""
        dev = self.flat.device
        n = end - begin
        L = int(n.max()) if len(n) else 0
        j = torch.arange(L, device=dev)[None, :] - (L - n.to(dev, non_blocking=True))[:, None]
        # j: (B, L) position in the span, < 0 for the padding in front
        first = self.starts[index.to(dev, non_blocking=True)] + begin.to(dev, non_blocking=True)
        src = first[:, None] + j.clamp(min=0)
        return torch.where(j >= 0, self.flat[src].long(), PAD)  # (B, L)


class PrefixCheckpoints:
    """A model's window-start state (:meth:`start_after`: musical time, grammar features) after
    every ``every`` tokens of each piece of a :class:`TokenTable`, computed once, on the table's
    device, so that a window's prefix is scanned from its last checkpoint (fewer than ``every``
    tokens) rather than from the piece's start.

    What it saves grows with the pieces: a window 30,000 tokens into a Palestrina mass or a
    quartet movement (``all``) cost every row of its batch a scan of 30,000 tokens (prefixes are
    right-aligned to the batch's longest). The states are those of the whole-prefix scan,
    bitwise: a scan in parts carries the same state from part to part
    (``tests/data/test_window_prefix.py``). They read no weights, so training never makes
    them stale.

    Args:
        model: the model whose ``start_after`` states are kept.
        table: the pieces (their tokens and where each starts).
        every: tokens between checkpoints.
        rows_at_once: pieces scanned together while building (bounds the scan's memory).
    """

    def __init__(self, model: _Model, table: TokenTable, every: int = CHECKPOINT_EVERY,
                 rows_at_once: int = 64) -> None:  # fmt: skip
        self.every = every
        dev = table.flat.device
        counts = table.lengths // every  # checkpoints per piece (at every, 2 every, ...)
        n_rows = len(table.starts)
        first = np.full(n_rows, -1, dtype=np.int64)  # (cache rows,) its first checkpoint
        first[table.rows] = np.cumsum(counts) - counts
        self.first = torch.as_tensor(first, device=dev)
        self.total = int(counts.sum())
        self.table: Any = None  # every checkpoint's state, one row each (a WindowStart)
        states: list[tuple[np.ndarray, Any]] = []  # (checkpoint numbers, start) per part
        for j in range(1, int(counts.max(initial=0)) + 1):  # round j: tokens (j-1)e .. je
            live = np.flatnonzero(counts >= j)
            for lo in range(0, len(live), rows_at_once):
                chunk = live[lo : lo + rows_at_once]
                rows = torch.as_tensor(table.rows[chunk], device=dev)
                begin = torch.full((len(chunk),), (j - 1) * every, dtype=torch.long)
                part = table.span(rows, begin, begin + every)
                before = None
                if j > 1:
                    before = self._gather(torch.as_tensor(first[table.rows[chunk]] + j - 2))
                start = model.start_after(part, initial=before, device=dev)
                states.append((first[table.rows[chunk]] + j - 1, start))
            self._store(states)

    def _store(self, parts: list[tuple[np.ndarray, Any]]) -> None:
        """Write the finished rounds' states into the flat tables (created on first use)."""
        for numbers, start in parts:
            at = torch.as_tensor(numbers, device=_device_of(start))
            if self.table is None:
                self.table = _empty_like(start, self.total)
            _scatter(self.table, at, start)
        parts.clear()

    def _gather(self, numbers: torch.Tensor) -> Any:
        return _index(self.table, numbers.to(_device_of(self.table)))

    def start(self, model: _Model, batch: dict[str, torch.Tensor], table: TokenTable) -> Any:
        """:func:`window_start`'s state before augmentation, from each window's last checkpoint
        plus the scan of what follows it (rows whose offset is 0 or a checkpoint: no scan)."""
        offset, index = batch["offset"], batch["index"]  # host tensors: no device sync here
        done = offset // self.every  # (B,) checkpoints passed
        begin = done * self.every
        rest = table.span(index, begin, offset)
        dev = rest.device
        initial = None
        if bool((done > 0).any()):
            has = (done > 0).to(dev)
            at = self.first[index.to(dev)] + done.to(dev) - 1
            initial = _index(self.table, torch.where(has, at, 0))  # row 0: replaced below
            if not bool((done > 0).all()):  # rows before their first checkpoint: a piece's start
                fresh = model.start_after(rest[:, :0], device=dev)
                initial = _where(has, initial, fresh)
        return model.start_after(rest, empty=(offset == begin).to(dev), initial=initial,
                                 device=dev)  # fmt: skip


def _fields(start: Any) -> dict[str, Any]:
    """The tensors of a WindowStart (ticks, tempo, the grammar state's fields, onsets)."""
    out: dict[str, Any] = {"ticks": start.ticks, "tempo": start.tempo}
    if start.grammar is not None:
        state, onset = start.grammar
        out.update({f"g.{f.name}": getattr(state, f.name) for f in dataclasses.fields(state)})
        out["onset"] = onset
    return out


def _rebuild(like: Any, values: dict[str, Any]) -> Any:
    new = dataclasses.replace(like, ticks=values["ticks"], tempo=values["tempo"], features=None)
    if like.grammar is not None:
        state = dataclasses.replace(
            like.grammar[0],
            **{f.name: values[f"g.{f.name}"] for f in dataclasses.fields(like.grammar[0])},
        )
        new.grammar = (state, values["onset"])
    return new


def _device_of(start: Any) -> torch.device:
    return next(v.device for v in _fields(start).values() if v is not None)


def _empty_like(start: Any, n: int) -> Any:
    return _rebuild(start, {k: None if v is None else v.new_zeros((n, *v.shape[1:]))
                            for k, v in _fields(start).items()})  # fmt: skip


def _scatter(table: Any, at: torch.Tensor, start: Any) -> None:
    dst = _fields(table)
    for k, v in _fields(start).items():
        if v is not None:
            dst[k][at] = v


def _index(table: Any, at: torch.Tensor) -> Any:
    return _rebuild(table, {k: None if v is None else v[at] for k, v in _fields(table).items()})


def _where(keep: torch.Tensor, a: Any, b: Any) -> Any:
    fb = _fields(b)
    return _rebuild(a, {
        k: None if v is None else torch.where(keep.view(-1, *([1] * (v.dim() - 1))), v, fb[k])
        for k, v in _fields(a).items()
    })  # fmt: skip


def prefix_ids(batch: dict[str, torch.Tensor], cache: _Tokens | TokenTable) -> torch.Tensor:
    """(B, L) each window's un-augmented prefix, the first ``offset`` tokens of piece ``index``
    of ``cache``, right-aligned behind PAD tokens (L: the longest offset, 0 when none); from a
    :class:`TokenTable` gathered on its device, else copied row by row on the host."""
    if isinstance(cache, TokenTable):
        return cache.prefixes(batch["index"], batch["offset"])
    offsets = batch["offset"].tolist()
    B, L = len(offsets), max(offsets, default=0)
    prefix = torch.full((B, L), PAD, dtype=torch.long)  # (B, L)
    for r, (row, off) in enumerate(zip(batch["index"].tolist(), offsets)):
        if off:
            prefix[r, L - off :] = torch.from_numpy(np.asarray(cache.tokens(row)[:off], np.int64))
    return prefix


def prefix_states(grammar: Grammar, batch: dict[str, torch.Tensor], cache: _Tokens) -> GrammarState:
    """The state after each window's un-augmented prefix: the first ``offset`` tokens of piece
    ``index`` of ``cache``; the initial state where ``offset`` is 0.

    The prefixes go through ``Grammar.state_after`` in one batched call, right-aligned behind
    PAD tokens, which change nothing but the "last token" fields that the prefix's own last
    token then sets.
    """
    ids, offsets = batch["ids"], batch["offset"].tolist()
    B, L = ids.shape[0], max(offsets)
    state = grammar.initial_state(B, ids.device)
    if L == 0:
        return state
    after = None  # the prefixes in parts: a dense scan holds (B, part, families x pitches)
    for part in prefix_ids(batch, cache).to(ids.device).split(PREFIX_PART, dim=1):
        after = grammar.state_after(part, after)
    has = torch.tensor([off > 0 for off in offsets], device=ids.device)  # (B,)
    for f in dataclasses.fields(state):
        a, b = getattr(after, f.name), getattr(state, f.name)
        keep = has.view(B, *([1] * (a.dim() - 1)))
        setattr(state, f.name, torch.where(keep, a, b))
    return state


def augment_state(
    grammar: Grammar,
    state: GrammarState,
    *,
    transpose: torch.Tensor,
    family_map: torch.Tensor,
    velocity_factor: torch.Tensor,
) -> GrammarState:
    """``state`` carried across each row's augmentation (see the module docstring).

    Args:
        grammar: The grammar of ``state``.
        state: B states.
        transpose: (B,) semitones.
        family_map: (B, families) permutations of the families.
        velocity_factor: (B,) velocity factors (1.0: the identity).

    Raises:
        ValueError: A row of ``family_map`` is not a permutation.
    """
    dev = state.family.device
    B, F, P = state.sounding.shape
    # checked and looked up where the records are (the loader's host tensors: no device sync)
    fams = torch.arange(F, device=family_map.device)
    if not torch.equal(family_map.long().sort(dim=1).values, fams.expand(B, F)):
        raise ValueError("family_map rows must be permutations of the families")
    vmap = torch.from_numpy(velocity_map(velocity_factor.cpu().numpy(), grammar.vocab))
    vmap = vmap.to(dev, non_blocking=True)
    k = transpose.to(dev, non_blocking=True).long()  # (B,)
    fmap = family_map.to(dev, non_blocking=True).long()  # (B, F)
    # family g of the new state is family inverse[g] of the old one
    inverse = fmap.argsort(dim=1)  # (B, F)
    sounding = state.sounding.gather(1, inverse[:, :, None].expand(B, F, P))  # (B, F, P)
    src = torch.arange(P, device=dev)[None, :] - k[:, None]  # (B, P) old index of new pitch
    inside = (src >= 0) & (src < P)
    sounding = sounding.gather(2, src.clamp(0, P - 1)[:, None, :].expand(B, F, P))
    sounding = sounding & inside[:, None, :]
    sustain = state.sustain.gather(1, inverse)  # (B, F)

    def mapped(table: torch.Tensor, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``table[row, x]`` where ``valid``, else ``x``."""
        got = table.gather(1, x.clamp(0, table.shape[1] - 1)[:, None])[:, 0]
        return torch.where(valid, got, x)

    family = mapped(fmap, state.family, state.family < F)
    last_velocity = mapped(vmap, state.last_velocity, state.last_velocity >= 0)
    last_pitch = torch.where(state.last_pitch >= 0, state.last_pitch + k, state.last_pitch)
    lk, lv = state.last_kind, state.last_value
    note = (lk == int(Kind.NOTE_ON)) | (lk == int(Kind.NOTE_OFF))
    last_value = torch.where(note, lv + k, lv)
    last_value = mapped(vmap, last_value, lk == int(Kind.VELOCITY))
    last_value = mapped(fmap, last_value, lk == int(Kind.INSTRUMENT))
    return dataclasses.replace(
        state, sounding=sounding, sustain=sustain, count=sounding.flatten(1).sum(1),
        family=family, last_velocity=last_velocity, last_pitch=last_pitch, last_value=last_value,
    )  # fmt: skip


def window_states(grammar: Grammar, batch: dict[str, torch.Tensor], cache: _Tokens) -> GrammarState:
    """The grammar state at the start of each window of ``batch``: its prefix's state carried
    across the window's augmentation (batches without augmentation records: the prefix's)."""
    state = prefix_states(grammar, batch, cache)
    if "family_map" not in batch:
        return state
    return augment_state(
        grammar, state, transpose=batch["transpose"], family_map=batch["family_map"],
        velocity_factor=batch["velocity_factor"],
    )  # fmt: skip


def augment_onsets(onset: torch.Tensor, transpose: torch.Tensor) -> torch.Tensor:
    """Pitch onsets (B, P) of a model's grammar-feature state carried across a transposition by
    ``transpose`` (B,) semitones (pitches moved in from outside the range: 0, never sounding)."""
    B, P = onset.shape
    src = torch.arange(P, device=onset.device)[None, :] - transpose.to(onset.device).long()[:, None]
    inside = (src >= 0) & (src < P)
    return torch.where(inside, onset.gather(1, src.clamp(0, P - 1)), 0)


def window_start(model: _Model, batch: dict[str, torch.Tensor], cache: _Tokens | TokenTable) -> Any:
    """The state each window of ``batch`` starts from in ``model`` (its ``start_after`` over the
    window's prefix: musical time, grammar-feature state), carried across the window's
    augmentation as :func:`window_states` carries the grammar's; for ``forward(start=...)``.

    Musical time needs no carrying: transposition, family and velocity maps leave it alone, and
    stretch and jitter retime the window only (module docstring). The returned object is the
    model's (e.g. :class:`aurl.models.model.WindowStart`), changed in place.
    """
    checkpoints = getattr(cache, "checkpoints", None)
    if checkpoints is not None:
        start = checkpoints.start(model, batch, cache)
    else:
        start = model.start_after(prefix_ids(batch, cache), empty=batch["offset"] == 0)
    if "family_map" in batch and getattr(start, "grammar", None) is not None:
        state, onset = start.grammar
        state = augment_state(
            model.grammar_features.grammar, state, transpose=batch["transpose"],
            family_map=batch["family_map"], velocity_factor=batch["velocity_factor"],
        )  # fmt: skip
        start.grammar = (state, augment_onsets(onset, batch["transpose"]))
    return start


def window_inputs(
    model: _Model, batch: dict[str, torch.Tensor], cache: _Tokens | TokenTable,
    grammar: Grammar | None = None,
) -> tuple[Any, torch.Tensor | None]:  # fmt: skip
    """What a training batch needs beside its ids, computed on the model's device: the state
    its windows start from (:func:`window_start`) with the windows' own grammar features in
    it (``start.features``), and with ``grammar`` the (B, T, V) masks of the grammar-masked
    loss (else None). The features and the masks read one grammar scan of the window.

    ``batch`` as the loader gives it (host tensors: offsets and augmentation records are read
    there; ``ids`` go to the device); ``cache`` best a :class:`TokenTable` on the device.
    """
    features = getattr(model, "grammar_features", None)
    start = window_start(model, batch, cache)
    ids = batch["ids"]
    if features is None:
        if grammar is None:
            return start, None
        dev = model.embed.weight.device
        ids = ids.to(dev, non_blocking=True)
        return start, window_masks(grammar, {**batch, "ids": ids}, cache)
    ids = ids.to(start.grammar[1].device, non_blocking=True)
    scan = features.grammar.scan(ids, start.grammar[0])
    start.features = features.from_scan(ids, scan, start.grammar)[:3]
    return start, grammar.masks_of(scan) if grammar is not None else None


def window_masks(grammar: Grammar, batch: dict[str, torch.Tensor], cache: _Tokens) -> torch.Tensor:
    """(B, T, V) bool: row t = the ids the grammar allows after ``batch["ids"][:, : t + 1]``,
    each window starting from :func:`window_states`."""
    return grammar.sequence_masks(batch["ids"], window_states(grammar, batch, cache))
