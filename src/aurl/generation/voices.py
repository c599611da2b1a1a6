"""Voice assignment: which of ``n`` voices (0 = highest, e.g. Soprano) sings each note.

The method, stated once (it is what :func:`assign_voices` does):

1. Walk the distinct onsets in time order. A note that is still sounding keeps its voice
   (a voice never jumps in the middle of a note).
2. The notes starting at an onset go to the voices that are free at that moment, highest
   note to the highest voice, keeping the order of pitches (no crossing among the new notes).
   When fewer notes start than voices are free, the subset of free voices is the one that keeps
   that order and moves the voices least: the sum of ``|pitch - last pitch of the voice|``,
   with a voice that has not sung yet standing at its place in an even spread (voice ``i`` of
   ``n`` at the ``i``-th of ``n`` quantiles of the piece's pitches); the first such subset in
   lexicographic order where several cost the same. Searched exhaustively up to
   :data:`MAX_SUBSETS` subsets (n is 4 for SATB: at most 6), else by dynamic programming over
   (new note, free voice), which finds the same subset (up to floating-point ties): a piece of
   40 tracks infilled at once once asked for C(40, 20) subsets at an onset (a hang).
3. More notes than free voices (denser than ``n`` parts): the extra notes join the voice whose
   last pitch is nearest, so nothing is dropped (that voice then holds a chord).

The result is a pure function of the note array, so the same piece always splits the same way.
"""

from __future__ import annotations

from itertools import combinations
from math import comb

import numpy as np

from aurl.analysis.part_writing import SATB, SATB_RANGES  # noqa: F401  (the voices' names, ranges)


def voice_names(n: int) -> tuple[str, ...]:
    """Track names for ``n`` voices: SATB for 4, the top/bottom ones for fewer, numbered past 4."""
    if n == 4:
        return SATB
    if n == 3:
        return ("Soprano", "Alto", "Bass")
    if n == 2:
        return ("Soprano", "Bass")
    return tuple(f"Voice {i + 1}" for i in range(n))


def voice_ranges(voices: int) -> np.ndarray | None:
    """(voices, 2) the textbook ranges (MIDI pitches) of ``voices`` SATB voices from the
    bottom (bass first), as :func:`voice_names` names them; None where they are not SATB's
    (1 voice, or more than 4)."""
    if voices < 2:
        return None
    names = voice_names(voices)
    if not all(n in SATB for n in names):
        return None
    return np.array([SATB_RANGES[SATB.index(n)] for n in names[::-1]], dtype=np.int64)


#: Subsets of free voices searched one by one at an onset; more go to :func:`_first_best`.
MAX_SUBSETS = 4096


def _first_best(cost: np.ndarray) -> list[int]:
    """Columns ``j_0 < j_1 < ...``, one per row of ``cost`` (k rows, k <= m columns), with the
    least sum of ``cost[i, j_i]``, the first in lexicographic order among equals: dynamic
    programming in O(k * m) where the exhaustive search takes C(m, k) subsets."""
    k, m = cost.shape
    # best[i, j]: the least cost of rows i.. on columns j.. (inf where too few columns are left)
    best = np.full((k + 1, m + 2), np.inf)
    best[k, :] = 0.0
    for i in range(k - 1, -1, -1):
        for j in range(m - (k - i), -1, -1):
            best[i, j] = min(cost[i, j] + best[i + 1, j + 1], best[i, j + 1])
    out, j = [], 0
    for i in range(k):  # the first column that keeps the optimum, row by row
        while cost[i, j] + best[i + 1, j + 1] > best[i, j]:
            j += 1
        out.append(j)
        j += 1
    return out


def assign_voices(notes: np.ndarray, n: int) -> np.ndarray:
    """Voice index (0 = highest) of every note of a note array (see the module docstring).

    Args:
        notes: Note array (``onset``, ``duration``, ``pitch`` are read), any order.
        n: Number of voices (>= 1).

    Returns:
        (N,) int array aligned with ``notes``.
    """
    if n < 1:
        raise ValueError(f"n voices must be >= 1, got {n}")
    voice = np.zeros(len(notes), dtype=np.int64)
    if len(notes) == 0 or n == 1:
        return voice
    onset = notes["onset"].astype(np.float64)
    end = onset + notes["duration"].astype(np.float64)
    pitch = notes["pitch"].astype(np.int64)
    # where each voice starts before it has sung: an even spread over the piece's pitches
    last = list(np.quantile(pitch, np.linspace(1.0, 0.0, n)))
    busy_until = [-np.inf] * n
    # by onset, highest pitch first, longer first among unisons (the input order never matters)
    order = np.lexsort((-(end - onset), -pitch, onset))
    eps = 1e-6
    i = 0
    while i < len(order):
        j = i
        while j < len(order) and onset[order[j]] <= onset[order[i]] + eps:
            j += 1
        group = order[i:j]  # new notes at this onset, highest first
        t = onset[order[i]]
        free = [v for v in range(n) if busy_until[v] <= t + eps]
        k = min(len(group), len(free))
        best, best_cost = free[:k], np.inf
        if comb(len(free), k) > MAX_SUBSETS:  # (k, free) |pitch - last|: the same subset
            cost = np.abs(pitch[group[:k], None] - np.array([last[v] for v in free])[None, :])
            best = [free[j] for j in _first_best(cost)]
        else:
            for subset in combinations(free, k):  # ascending voice index = descending pitch
                cost = sum(abs(pitch[g] - last[v]) for g, v in zip(group[:k], subset))
                if cost < best_cost:
                    best, best_cost = list(subset), cost
        for g, v in zip(group[:k], best):
            voice[g] = v
        for g in group[k:]:  # denser than n parts: join the nearest voice
            voice[g] = int(np.argmin([abs(pitch[g] - p) for p in last]))
        for g in group:
            v = voice[g]
            last[v] = float(pitch[g])
            busy_until[v] = max(busy_until[v], end[g])
        i = j
    return voice
