"""Parallel fifths and octaves: which new notes would move in them.

One rule for every decoder that writes voices: the composing commands
(:meth:`aurl.generation.compose._Masks.parallel_free`, around given notes) and free generation
(:class:`aurl.generation.constraints.LogitMasker` with ``generation.voice_leading``).

A piece's notes are not labelled with voices while it is decoded: which voice a new note
continues is read from the *last slice* (the notes sounding at the latest earlier onset), the
way :func:`aurl.generation.voices.assign_voices` will split the finished piece. A new note
continues either the note of the same rank counted from the bottom (where the voices keep
sounding, as in a four-part chorale, this is the S/A/T/B split) or any earlier note within
:data:`NEAR_STEP` semitones (where a voice has entered, dropped out or crossed another: what
the least-motion rule may then pick, ties included). A candidate is refused when any reading
makes a parallel with another voice: both voices of the pair move, the same way, from one
interval to the same interval class, 0 (unison / octave) or 7 (fifth), as
:func:`aurl.evaluation.tasks.voice_rules` counts.

Where the caller knows how many voices the piece has (free generation with ``--voices N``) and
the last slice holds that many notes, a note continues the note of its rank alone: every voice
sounds, and the least-motion rule splits a full chord by rank. The nearness readings are a wide
net: run over the held-out chorales they refuse 6.6% of Bach's own notes, the rank alone
1.3% (Bach moves in 0.05 parallels per 100 moves; BENCHMARKS.md, "Free generation in
voices"). The composing commands keep the wide net: read by rank, forcing around a given
melody moved in 1.7x Bach's parallels (docs/design.md).
"""

from __future__ import annotations

from bisect import bisect_left

from aurl.analysis.part_writing import PERFECT  # interval classes: unison / octave, fifth

NEAR_STEP = 5  # semitones: an earlier note this close may be the one a new note continues
BELOW, ABOVE, EITHER = 0, 1, 2  # which candidates a voice is judged against: above it, below, any


def refused(
    prev: list[int],
    now: list[int],
    low: int,
    high: int,
    extra: tuple[tuple[int, int, int], ...] = (),
    voices: int = 0,
) -> set[int]:
    """The pitches in ``low .. high - 1`` that a new note may not take: those that move in a
    parallel fifth or octave (the module docstring) with a note sounding below them.

    Args:
        prev: the last slice's pitches, ascending.
        now: the pitches sounding now (held, or started at this onset), ascending; a
            candidate's rank counts those below it, and only those are judged against it
            (notes start in ascending pitch, so the ones above come later and are judged then).
        low, high: the candidates' range; sounding pitches in it are judged like the rest
            (a caller never offers them).
        extra: more voices, ``(pitch, pitch in the last slice, side)``, judged against the
            candidates ``side`` of them (:data:`BELOW`: above it, as the sounding notes;
            :data:`ABOVE`: below it; :data:`EITHER`).
        voices: the number of voices the piece is written in (0: unknown); when ``prev``
            holds that many notes, each note continues the note of its rank alone.

    Each other voice that moved (under each reading of where it came from) fixes, with each
    earlier note a candidate may continue, the interval class a parallel would repeat: only
    candidates at that class from the voice are looked at, a few per pair.
    """
    if not prev:
        return set()
    near = NEAR_STEP if len(prev) != voices else -1  # a full slice: by rank alone
    moved = []  # (pitch now, pitch before, side) of the voices that moved
    for k, q in enumerate(now):
        for qf in _readings(q, k, prev, near):
            if qf != q:
                moved.append((q, qf, BELOW))
    moved += [(q, qf, side) for q, qf, side in extra if qf >= 0 and qf != q]
    bad: set[int] = set()
    for q, qf, side in moved:
        way = (q > qf) - (q < qf)
        for cf in prev:
            iv = abs(cf - qf) % 12
            if cf == qf or iv not in PERFECT:
                continue
            up = range(q + (iv or 12), high, 12) if side != ABOVE else ()
            down = range(q - (iv or 12), low - 1, -12) if side != BELOW else ()
            for c in (*up, *down):
                if c < low or c >= high or c == cf or c in bad or ((c > cf) - (c < cf)) != way:
                    continue
                if abs(c - cf) <= near or _by_rank(c, now, prev) == cf:
                    bad.add(c)
    return bad


def _readings(x: int, rank: int, prev: list[int], near: int) -> set[int]:
    """The pitches of the last slice ``prev`` a note at ``x`` of rank ``rank`` (from the
    bottom) may continue: the one of the same rank, and every one within ``near``."""
    out = {p for p in prev if abs(x - p) <= near}
    if rank < len(prev):
        out.add(prev[rank])
    return out


def _by_rank(c: int, now: list[int], prev: list[int]) -> int:
    """The last slice's note of a candidate's rank among the sounding notes (-1: none)."""
    rank = bisect_left(now, c)
    return prev[rank] if rank < len(prev) else -1
