"""Melody: extraction from polyphony, contour, intervals, range and motifs.

All functions take note arrays (:mod:`aurl.data.notes`); a melody is itself a note array with no
two notes sounding at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aurl.data.notes import pitched

# Onsets closer than this (beats) count as simultaneous: about a 1/64 note, below the 1/32-beat
# grid of the tokenizer, so quantised and lightly humanised files behave the same.
EPS = 1e-3


def sounding_extreme(
    notes: np.ndarray, start: np.ndarray, end: np.ndarray, *, highest: bool
) -> np.ndarray:
    """Highest (or lowest) pitch of the notes overlapping each interval ``(start, end)``.

    A note overlaps when ``onset < end`` and ``onset + duration > start``. Vectorised over the
    intervals with one pass per distinct pitch: with onsets sorted, the notes that start before
    ``end`` are a prefix, and one of them still sounds after ``start`` iff the running maximum
    of their end times does.

    Args:
        notes: Note array (callers drop drums).
        start: Interval starts, shape (W,).
        end: Interval ends, shape (W,).
        highest: True for the highest pitch, False for the lowest.

    Returns:
        int64 array (W,), -1 where no note overlaps.
    """
    start = np.asarray(start, dtype=np.float64)
    end = np.asarray(end, dtype=np.float64)
    out = np.full(start.shape, -1, dtype=np.int64)
    found = np.zeros(start.shape, dtype=bool)
    pitches = np.unique(notes["pitch"])
    for p in pitches[::-1] if highest else pitches:
        sel = notes[notes["pitch"] == p]
        order = np.argsort(sel["onset"], kind="stable")
        onsets = sel["onset"][order]
        max_end = np.maximum.accumulate((sel["onset"] + sel["duration"])[order])
        idx = np.searchsorted(onsets, end, side="left")  # notes starting before `end`
        hit = (idx > 0) & (max_end[np.maximum(idx - 1, 0)] > start) & ~found
        out[hit] = p
        found |= hit
        if found.all():
            break
    return out


def skyline(notes: np.ndarray, *, drop_covered: bool = True) -> np.ndarray:
    """Melody by the skyline algorithm (Uitdenbogerd & Zobel 1999), with one refinement.

    At each onset the highest new note is kept; each kept note is cut at the next kept onset.
    With ``drop_covered`` a new note is also dropped while a higher note, started earlier, still
    sounds: an inner voice moving under a held soprano note does not become the tune.

    Args:
        notes: Note array; drums are ignored.
        drop_covered: Drop new notes sounding under a held higher note.

    Returns:
        A monophonic note array (sorted by onset).
    """
    notes = pitched(notes)
    if len(notes) == 0:
        return notes.copy()
    order = np.lexsort((-notes["pitch"].astype(np.int64), notes["onset"]))
    notes = notes[order]
    # first row of each onset group = its highest note (onsets within EPS are one group)
    new_group = np.concatenate([[True], np.diff(notes["onset"]) > EPS])
    top = notes[new_group]
    if drop_covered and len(top) > 1:
        # highest note that started before this onset and still sounds just after it
        held = sounding_extreme(notes, top["onset"] + EPS, top["onset"] - EPS, highest=True)
        top = top[held <= top["pitch"]]
    top = top.copy()
    next_onset = np.concatenate([top["onset"][1:], [np.inf]])
    cut = np.minimum(top["onset"] + top["duration"], next_onset) - top["onset"]
    scale = np.divide(cut, top["duration"], out=np.ones(len(top)), where=top["duration"] > 0)
    top["duration"] = cut
    top["duration_s"] = top["duration_s"] * scale
    return top


def intervals(melody: np.ndarray) -> np.ndarray:
    """Successive pitch intervals in semitones, shape (n - 1,) int64."""
    return np.diff(melody["pitch"].astype(np.int64))


def parsons_code(melody: np.ndarray) -> str:
    """Contour as Parsons code: ``*`` then U (up), D (down), R (repeat) per interval."""
    if len(melody) == 0:
        return ""
    steps = np.sign(intervals(melody))
    return "*" + "".join(np.array(["D", "R", "U"])[steps + 1])


def interval_histogram(melody: np.ndarray, max_interval: int = 12) -> dict[int, int]:
    """Counts of intervals from ``-max_interval`` to ``+max_interval`` (wider ones clipped)."""
    iv = np.clip(intervals(melody), -max_interval, max_interval)
    counts = np.bincount(iv + max_interval, minlength=2 * max_interval + 1)
    return {i - max_interval: int(c) for i, c in enumerate(counts)}


@dataclass(frozen=True)
class MelodyStats:
    """Summary numbers of a melody (NaN where undefined)."""

    notes: int
    lowest: int  # -1 for an empty melody
    highest: int
    range: int  # semitones between lowest and highest
    steps: int  # intervals of 1 or 2 semitones
    leaps: int  # intervals of 3 or more semitones
    repeats: int  # unisons
    step_leap_ratio: float  # steps / leaps; NaN without leaps
    mean_abs_interval: float  # NaN for fewer than 2 notes
    parsons: str


def melody_stats(melody: np.ndarray) -> MelodyStats:
    """Range, step/leap counts and contour of a melody."""
    iv = np.abs(intervals(melody))
    steps = int(((iv >= 1) & (iv <= 2)).sum())
    leaps = int((iv >= 3).sum())
    has = len(melody) > 0
    lo = int(melody["pitch"].min()) if has else -1
    hi = int(melody["pitch"].max()) if has else -1
    return MelodyStats(
        notes=len(melody),
        lowest=lo,
        highest=hi,
        range=hi - lo,
        steps=steps,
        leaps=leaps,
        repeats=int((iv == 0).sum()),
        step_leap_ratio=steps / leaps if leaps else float("nan"),
        mean_abs_interval=float(iv.mean()) if len(iv) else float("nan"),
        parsons=parsons_code(melody),
    )


@dataclass(frozen=True)
class Motif:
    """A repeated interval pattern.

    Attributes:
        intervals: The pattern, in semitones (``len(intervals) + 1`` notes).
        starts: Indices into the melody of the first note of each non-overlapping occurrence.
        onsets: Onsets (beats) of those occurrences.
        transpositions: First pitch of each occurrence minus the first one's, in semitones.
    """

    intervals: tuple[int, ...]
    starts: tuple[int, ...]
    onsets: tuple[float, ...]
    transpositions: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.starts)


def find_motifs(
    melody: np.ndarray,
    *,
    min_notes: int = 4,
    max_notes: int = 12,
    min_count: int = 2,
    top: int = 10,
) -> list[Motif]:
    """Transposition-invariant motifs: interval n-grams that repeat without overlapping.

    Every n-gram of intervals (``min_notes - 1`` .. ``max_notes - 1`` long) is grouped with
    ``np.unique`` over a sliding-window view, longest first; occurrences are counted greedily
    left to right without overlap. A motif is dropped when each of its occurrences lies inside
    an occurrence of a longer kept motif (it is only a piece of that one). Patterns of only
    repeated notes are ignored. Per length only the ``8 * top`` most frequent patterns are
    examined, which bounds the work on long pieces.

    Args:
        melody: Monophonic note array (e.g. from :func:`skyline`).
        min_notes: Shortest motif, in notes.
        max_notes: Longest motif, in notes.
        min_count: Fewest occurrences.
        top: Most motifs returned, ranked by notes covered (length x count), then length.

    Returns:
        Motifs, best first.
    """
    iv = intervals(melody)
    pitches = melody["pitch"].astype(np.int64)
    found: list[Motif] = []
    # reach[p]: furthest end (in intervals) of a kept occurrence starting at p; its running
    # maximum says how far kept motifs cover from any position on
    reach = np.full(len(iv) + 1, -1, dtype=np.int64)
    for n in range(min(max_notes - 1, len(iv)), max(min_notes - 1, 1) - 1, -1):
        grams = np.lib.stride_tricks.sliding_window_view(iv, n)  # (len(iv) - n + 1, n)
        uniq, inverse, counts = np.unique(grams, axis=0, return_inverse=True, return_counts=True)
        members = np.split(np.argsort(inverse.reshape(-1), kind="stable"), np.cumsum(counts)[:-1])
        candidates = np.flatnonzero(counts >= min_count)
        candidates = candidates[np.argsort(-counts[candidates], kind="stable")][: 8 * top]
        covered_to = np.maximum.accumulate(reach)
        for g in candidates.tolist():
            if not uniq[g].any():  # a repeated single pitch is not a motif
                continue
            starts = np.array(_non_overlapping(members[g], n), dtype=np.int64)
            if len(starts) < min_count or (covered_to[starts] >= starts + n).all():
                continue
            reach[starts] = np.maximum(reach[starts], starts + n)
            found.append(
                Motif(
                    intervals=tuple(int(x) for x in uniq[g]),
                    starts=tuple(int(x) for x in starts),
                    onsets=tuple(float(melody["onset"][x]) for x in starts),
                    transpositions=tuple(int(pitches[x] - pitches[starts[0]]) for x in starts),
                )
            )
    found.sort(key=lambda m: (-(len(m.intervals) + 1) * m.count, -len(m.intervals)))
    return found[:top]


def _non_overlapping(positions: np.ndarray, n: int) -> list[int]:
    """Greedy left-to-right choice of occurrences at least ``n`` intervals apart."""
    chosen: list[int] = []
    for p in positions.tolist():
        if not chosen or p >= chosen[-1] + n:
            chosen.append(p)
    return chosen
