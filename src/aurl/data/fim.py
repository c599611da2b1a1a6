"""Fill-in-the-middle (FIM) windows: a window cut into prefix / middle / suffix and reordered so
that a left-to-right model learns to write the middle knowing what follows it.

Layout (suffix-prefix-middle, "SPM", Bavarian et al. 2022, "Efficient Training of Language
Models to Fill in the Middle")::

    [SUF] suffix [PRE] prefix [MID] middle [EOM]

SPM rather than PSM: the prefix then sits right before the middle, so the middle continues the
prefix's last events at the shortest attention distance (music is most predictable from what
just sounded), and the middle's tokens follow the prefix exactly as in a plain window.

Sentinel ids lie above the 774 music ids, which keep their ids and order: ``EOM`` = 774 (the
one sentinel a model predicts: its output column sits right after the music ids), ``SUF`` 775,
``PRE`` 776, ``MID`` 777 (inputs only: the infilling procedure places them, so they are never
scored and never sampled). A model without FIM keeps 774 ids.

Cuts fall on time-step boundaries (the first event of a time step, as windows start), drawn
uniformly among the window's boundaries (the window's start counts: an empty prefix). Bar lines
would be a subset of these; cutting at any onset teaches every span the composer may ask for
(``aurl infill --span`` takes seconds), and never splits a time step's events.

The join. A note started in the middle and still sounding where the suffix begins would leave
its NOTE_OFF in the suffix, telling the middle which pitch it must strike. At infilling time
the suffix is made of the kept notes only, so that NOTE_OFF cannot exist there; to train what
infilling meets, such a note ends where the middle ends: its NOTE_OFF is dropped from the suffix,
and the model's features (musical time, grammar state) are computed over the *source* sequence
``prefix + middle + closing NOTE_OFFs + suffix`` in time order, then gathered into the FIM
order (:func:`fim_window` returns ``pos``: the source position of each FIM token, -1 for a
sentinel, whose feature is zero). EOM therefore means: every note the middle started and left
sounding ends here. Notes started in the prefix keep their own NOTE_OFFs (in the middle or the
suffix): the prefix is known.

The loss covers every music token and EOM (not ``SUF``/``PRE``/``MID``, which are placed): as
Bavarian et al. do, a FIM window keeps its whole token budget, so training for infilling costs
plain generation as little as possible at the same number of steps. Each target is scored under
the grammar mask of the state just before its source position (:func:`fim_allowed`); EOM is
allowed from ``MID`` to the end of the middle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from aurl.data.grammar import Grammar, GrammarState
from aurl.data.vocab import FIM_EOM as EOM
from aurl.data.vocab import FIM_MID as MID
from aurl.data.vocab import FIM_PRE as PRE
from aurl.data.vocab import FIM_SENTINELS as SENTINELS
from aurl.data.vocab import FIM_SUF as SUF
from aurl.data.vocab import PAD, Kind, Vocab

if TYPE_CHECKING:  # torch is imported by the functions that use it: composing on a numpy
    import torch  # engine imports this module without torch


@dataclass(frozen=True)
class FimWindow:
    """One window in FIM order.

    Attributes:
        ids: (T,) ``[SUF] suffix [PRE] prefix [MID] middle [EOM]``.
        source: (S,) the window in time order with the middle's notes closed where it ends
            (features and grammar masks are computed over it).
        pos: (T,) index into ``source`` of each id; -1 for the sentinels.
        middle: (T,) bool: ``MID`` and the middle's tokens (the positions where EOM may come).
    """

    ids: np.ndarray
    source: np.ndarray
    pos: np.ndarray
    middle: np.ndarray


def step_boundaries(ids: np.ndarray, vocab: Vocab) -> np.ndarray:
    """Indices ``i > 0`` where ``ids[i]`` is the first event of a time step (``ids[i - 1]`` a
    TIME_SHIFT, ``ids[i]`` not one)."""
    shift = vocab.kind[np.asarray(ids)] == Kind.TIME_SHIFT
    return np.flatnonzero(shift[:-1] & ~shift[1:]) + 1


def open_notes(ids: np.ndarray, vocab: Vocab) -> list[tuple[int, int]]:
    """(family, pitch) of the notes ``ids`` start and leave sounding, in the order started;
    family -1 before the first INSTRUMENT of ``ids``."""
    kind, value = vocab.kind[ids], vocab.value[ids]
    family, sounding = -1, {}
    for k, v in zip(kind.tolist(), value.tolist()):
        if k == Kind.INSTRUMENT:
            family = v
        elif k == Kind.NOTE_ON:
            sounding[(family, v)] = True
        elif k == Kind.NOTE_OFF:
            sounding.pop((family, v), None)
    return list(sounding)


def close_middle(
    middle: np.ndarray, suffix: np.ndarray, vocab: Vocab, family0: int = -1
) -> tuple[np.ndarray, np.ndarray]:
    """(closing NOTE_OFF ids, suffix without the NOTE_OFFs of the notes ``middle`` left
    sounding). The closing offs come in ascending pitch (the canonical order of a step's offs).
    ``family0``: the family in force where the middle starts (-1: unknown)."""
    opened = open_notes(middle, vocab)
    if not opened:
        return np.zeros(0, np.int64), suffix
    family = family0
    for k, v in zip(vocab.kind[middle].tolist(), vocab.value[middle].tolist()):
        if k == Kind.INSTRUMENT:
            family = v
    pending = set(opened)
    keep = np.ones(len(suffix), bool)
    kind, value = vocab.kind[suffix], vocab.value[suffix]
    for i, (k, v) in enumerate(zip(kind.tolist(), value.tolist())):
        if not pending:
            break
        if k == Kind.INSTRUMENT:
            family = v
        elif k in (Kind.NOTE_ON, Kind.NOTE_OFF) and (family, v) in pending:
            pending.discard((family, v))
            keep[i] = k == Kind.NOTE_ON  # a restrike (the grammar forbids it) ends the search
    closing = np.array(sorted(vocab.note_off_id(p) for _, p in opened), dtype=np.int64)
    return closing, suffix[keep]


def fim_window(ids: np.ndarray, i: int, j: int, vocab: Vocab) -> FimWindow:
    """The FIM window of ``ids`` (time order) with the middle ``ids[i:j]`` (``0 <= i < j <=
    len(ids)``; the caller cuts at :func:`step_boundaries`)."""
    ids = np.asarray(ids, dtype=np.int64)
    prefix, middle, suffix = ids[:i], ids[i:j], ids[j:]
    closing, suffix = close_middle(middle, suffix, vocab)
    # the closing offs join the suffix's first NOTE_OFFs in ascending pitch (canonical order)
    is_off = vocab.kind[suffix] == Kind.NOTE_OFF
    lead = len(suffix) if is_off.all() else int(np.argmin(is_off))
    head = np.concatenate([suffix[:lead], closing])
    order = np.argsort(head, kind="stable")  # off ids ascend with pitch
    where = np.empty(len(head), np.int64)
    where[order] = np.arange(len(head))  # position of each head entry once sorted
    s0 = len(prefix) + len(middle)  # where the suffix's step starts in the source
    source = np.concatenate([prefix, middle, head[order], suffix[lead:]])
    suffix_pos = np.concatenate([s0 + where[:lead], s0 + len(head) + np.arange(len(suffix) - lead)])
    one = np.array([-1])
    pos = np.concatenate([
        one, suffix_pos, one, np.arange(len(prefix)), one,
        np.arange(len(prefix), len(prefix) + len(middle)), one,
    ])  # fmt: skip
    out = np.concatenate([[SUF], suffix, [PRE], prefix, [MID], middle, [EOM]]).astype(np.int64)
    is_middle = np.zeros(len(out), bool)
    is_middle[len(suffix) + 2 + len(prefix) : -1] = True  # MID and the middle
    return FimWindow(ids=out, source=source, pos=pos, middle=is_middle)


def plain_window(ids: np.ndarray) -> FimWindow:
    """A window left in time order, in the form of :func:`fim_window` (a batch mixes both)."""
    ids = np.asarray(ids, dtype=np.int64)
    return FimWindow(ids=ids, source=ids, pos=np.arange(len(ids)), middle=np.zeros(len(ids), bool))


def draw_fim(
    ids: np.ndarray, rng: np.random.Generator, vocab: Vocab, *, rate: float, window: int
) -> FimWindow:
    """With probability ``rate`` the FIM window of ``ids[: window - SENTINELS]`` cut at two
    distinct time-step boundaries drawn uniformly (the start counts as one; the suffix is never
    empty); otherwise ``ids[:window]`` in time order. Draws from ``rng`` only."""
    if rng.random() >= rate:
        return plain_window(ids[:window])
    ids = np.asarray(ids[: window - SENTINELS], dtype=np.int64)
    cuts = np.concatenate([[0], step_boundaries(ids, vocab)])
    if len(cuts) < 2:
        return plain_window(ids)
    i, j = np.sort(rng.choice(len(cuts), size=2, replace=False))
    return fim_window(ids, int(cuts[i]), int(cuts[j]), vocab)


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


def collate_fim(items: list[FimWindow], pad_id: int = PAD) -> dict[str, torch.Tensor]:
    """``fim_source`` (B, S) padded with PAD, ``fim_pos`` (B, T) -1 on padding, ``fim_middle``
    (B, T) bool, for ids (B, T) padded to the longest item."""
    import torch

    T = max(len(w.ids) for w in items)
    S = max(len(w.source) for w in items)
    source = torch.full((len(items), S), pad_id, dtype=torch.long)
    pos = torch.full((len(items), T), -1, dtype=torch.long)
    middle = torch.zeros((len(items), T), dtype=torch.bool)
    for b, w in enumerate(items):
        source[b, : len(w.source)] = torch.from_numpy(w.source)
        pos[b, : len(w.pos)] = torch.from_numpy(w.pos)
        middle[b, : len(w.middle)] = torch.from_numpy(w.middle)
    return {"fim_source": source, "fim_pos": pos, "fim_middle": middle}


def fim_allowed(
    grammar: Grammar,
    ids: torch.Tensor,
    source: torch.Tensor,
    pos: torch.Tensor,
    middle: torch.Tensor,
    state: GrammarState,
) -> torch.Tensor:
    """(B, T, V + 1) bool: row t = what may follow FIM position t: the music ids the grammar
    allows just before the source position of token t + 1 (read over ``source`` from
    ``state``), and EOM (column V) inside the middle. Rows before a placed sentinel and the
    last row are all False (never scored).

    Args:
        grammar: The grammar (over the music ids).
        ids: (B, T) FIM ids (only the shape is read).
        source: (B, S) time-order ids.
        pos: (B, T) source position of each id, -1 for sentinels and padding.
        middle: (B, T) bool, where EOM may come next.
        state: The grammar state each source row starts from.
    """
    import torch

    B, T = ids.shape
    V = grammar.vocab.size
    after = grammar.sequence_masks(source, state)  # (B, S, V): allowed after source[:, :s+1]
    before = torch.cat([grammar.allowed(state)[:, None].to(after.device), after[:, :-1]], dim=1)
    nxt = pos[:, 1:]  # (B, T - 1) source position of the next token
    rows = before.gather(1, nxt.clamp(min=0)[:, :, None].expand(B, T - 1, V))
    rows = rows & (nxt >= 0)[:, :, None]
    allowed = torch.zeros(B, T, V + 1, dtype=torch.bool, device=after.device)
    allowed[:, :-1, :V] = rows
    allowed[:, :, V] = middle.to(after.device)
    return allowed
