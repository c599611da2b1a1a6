"""Structure: bar self-similarity, novelty segmentation, phrases, repeats and form labels.

Bars are compared by a feature of their pitch-class content (duration-weighted chroma) and their
rhythm (onsets on a sixteenth-note grid), each centred over the piece and scaled to unit length
so the self-similarity of two bars is a cosine in [-1, 1] (1: same content; about 0: unrelated).
Section boundaries come from two sources: where the music changes (Foote 2000, novelty of a
checkerboard kernel slid along the diagonal) and where it repeats (the edges of diagonal stripes
of high similarity, Bartsch & Wakefield 2001). Sections are then labelled in order: a section like
an earlier one gets its letter, a looser match a primed letter (A'), anything else a new letter.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from aurl.analysis.keys import chroma
from aurl.analysis.melody import skyline
from aurl.data.notes import pitched

if TYPE_CHECKING:
    from aurl.analysis.chords import Cadence


def bar_features(notes: np.ndarray, beats_per_bar: float = 4.0) -> np.ndarray:
    """Per-bar feature vectors: chroma (12) and onset pattern (``4 * beats_per_bar`` cells).

    Returns:
        Shape (bars, 12 + grid); each half scaled to unit length (zero for an empty bar).
    """
    notes = pitched(notes)
    if len(notes) == 0:
        return np.zeros((0, 12))
    end = float(np.max(notes["onset"] + notes["duration"]))
    n_bars = max(int(np.ceil(end / beats_per_bar - 1e-9)), 1)
    pcs = chroma(notes, np.arange(n_bars + 1) * beats_per_bar)  # (bars, 12)
    grid = max(int(round(4 * beats_per_bar)), 1)  # sixteenth notes per bar
    cell = np.floor(notes["onset"] / beats_per_bar * grid + 1e-6).astype(np.int64)
    cell = np.clip(cell, 0, n_bars * grid - 1)
    rhythm = np.bincount(cell, minlength=n_bars * grid).reshape(n_bars, grid).astype(float)
    return np.concatenate([_unit_rows(pcs), _unit_rows(rhythm)], axis=1)  # (bars, 12 + grid)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def self_similarity(features: np.ndarray) -> np.ndarray:
    """Cosine self-similarity of feature rows after removing their mean over the piece.

    Centring makes the measure relative to the piece: in a chorale every bar shares the key's
    pitch classes, and only what distinguishes a bar from the average should count. Two empty
    (or average) rows are similar (1); an empty row and a full one are not (0).

    Returns:
        Shape (bars, bars), symmetric, ones on the diagonal.
    """
    centred = features - features.mean(0, keepdims=True) if len(features) > 1 else features
    unit = _unit_rows(centred)
    sim = unit @ unit.T  # (bars, bars)
    blank = np.linalg.norm(unit, axis=1) == 0
    sim[np.ix_(blank, blank)] = 1.0
    return np.clip(sim, -1.0, 1.0)


def novelty(sim: np.ndarray, half_width: int = 4) -> np.ndarray:
    """Foote novelty at each bar line: a Gaussian-tapered checkerboard kernel on the diagonal.

    Returns:
        Shape (bars + 1,): entry ``i`` scores the change between bar ``i - 1`` and bar ``i``,
        scaled to [0, 1] (zero at the ends of the piece).
    """
    n = len(sim)
    if n < 2:
        return np.zeros(n + 1)
    L = half_width
    ax = np.arange(-L, L) + 0.5
    taper = np.exp(-((ax / (L / 2.0)) ** 2))
    kernel = np.outer(taper, taper) * np.sign(ax)[:, None] * np.sign(ax)[None, :]  # (2L, 2L)
    padded = np.zeros((n + 2 * L, n + 2 * L))
    padded[L : L + n, L : L + n] = sim
    out = np.zeros(n + 1)
    for i in range(1, n):  # bar lines; the window starts L bars before line i
        out[i] = float((kernel * padded[i : i + 2 * L, i : i + 2 * L]).sum())
    out = np.maximum(out, 0.0)
    top = out.max()
    return out / top if top > 0 else out


@dataclass(frozen=True)
class Repeat:
    """Bars ``[first, first + length)`` come back as ``[second, second + length)``."""

    first: int
    second: int
    length: int
    similarity: float


def find_repeats(sim: np.ndarray, *, threshold: float = 0.8, min_bars: int = 2) -> list[Repeat]:
    """Diagonal stripes of the self-similarity matrix: runs of similar bars at a fixed lag.

    Args:
        sim: Self-similarity matrix (bars, bars).
        threshold: Least similarity of each bar pair in a run.
        min_bars: Shortest run.

    Returns:
        Repeats, longest first.
    """
    n = len(sim)
    out = []
    for lag in range(1, n):
        diag = np.diagonal(sim, offset=lag)  # bar i vs bar i + lag
        hit = np.concatenate([[False], diag >= threshold, [False]])
        edges = np.flatnonzero(np.diff(hit.astype(np.int8)))
        for a, b in zip(edges[::2], edges[1::2]):
            # a run cannot overlap its own repetition: cut it at the lag
            length = min(int(b - a), lag)
            if length >= min_bars:
                out.append(Repeat(int(a), int(a + lag), length, float(diag[a : a + length].mean())))
    out.sort(key=lambda r: (-r.length, -r.similarity, r.first))
    return out


@dataclass(frozen=True)
class Section:
    """Bars ``[start, end)`` with a form label such as ``"A"`` or ``"A'"``."""

    start: int
    end: int
    label: str


@dataclass(frozen=True)
class Structure:
    """Everything :func:`analyze_structure` finds (bars are 0-based, in ``beats_per_bar``)."""

    beats_per_bar: float
    similarity: np.ndarray  # (bars, bars)
    novelty: np.ndarray  # (bars + 1,)
    boundaries: list[int]  # bar lines that start a section, with 0 and the bar count
    sections: list[Section]
    repeats: list[Repeat]

    @property
    def form(self) -> str:
        """Section labels in order, e.g. ``"A A B A"``."""
        return " ".join(s.label for s in self.sections)


def segment_similarity(sim: np.ndarray, a: tuple[int, int], b: tuple[int, int]) -> float:
    """Mean similarity of aligned bars of two sections, scaled by their length ratio."""
    (a0, a1), (b0, b1) = a, b
    m = min(a1 - a0, b1 - b0)
    if m <= 0:
        return 0.0
    k = np.arange(m)
    return float(sim[a0 + k, b0 + k].mean() * m / max(a1 - a0, b1 - b0))


def label_sections(
    sim: np.ndarray, bounds: list[int], *, same: float = 0.85, variant: float = 0.6
) -> list[Section]:
    """Form letters: the first section like an earlier one (>= ``same``) takes its label, a
    looser match (>= ``variant``) the same letter primed, anything else the next letter.

    Similarities are :func:`segment_similarity`, read in O(1) from cumulative sums along each
    diagonal, so long pieces with hundreds of sections stay fast.
    """
    n = len(sim)
    # diag_cums[d][i] = sum of sim[j, j + d] for j < i
    diag_cums = [np.concatenate([[0.0], np.cumsum(np.diagonal(sim, d))]) for d in range(n)]
    sections: list[Section] = []
    letters = 0
    primes: dict[str, int] = {}
    for a, b in zip(bounds[:-1], bounds[1:]):
        best, best_sim = None, -np.inf
        for sec in sections:  # earlier sections start before this one: offset a - sec.start > 0
            m = min(sec.end - sec.start, b - a)
            cums = diag_cums[a - sec.start]
            v = (cums[sec.start + m] - cums[sec.start]) / max(sec.end - sec.start, b - a)
            if v > best_sim:
                best, best_sim = sec, v
        if best is not None and best_sim >= same:
            label = best.label
        elif best is not None and best_sim >= variant:
            letter = best.label.rstrip("'")
            primes[letter] = primes.get(letter, 0) + 1
            label = letter + "'" * primes[letter]
        else:
            label = _letter(letters)
            letters += 1
        sections.append(Section(a, b, label))
    return sections


def _letter(i: int) -> str:
    return chr(ord("A") + i) if i < 26 else f"Z{i - 25}"


MAX_BARS = 2048  # bars of one self-similarity matrix (32 MB); longer pieces group their bars


def analyze_structure(
    notes: np.ndarray,
    *,
    beats_per_bar: float = 4.0,
    min_bars: int = 2,
    repeat_threshold: float = 0.8,
    novelty_threshold: float = 0.5,
    half_width: int = 4,
) -> Structure:
    """Self-similarity, sections and form labels of a piece.

    Boundaries are chosen greedily by strength: first the edges of repeats (longer repeats
    first, so whole sections beat motifs), each at least ``min_bars`` from the others, then
    novelty peaks of at least ``novelty_threshold``, each at least ``half_width`` bars from
    the others.

    Args:
        notes: Note array.
        beats_per_bar: Bar length in beats (4 for 4/4, 3 for 3/4, 3 for 6/8).
        min_bars: Shortest section and shortest repeat.
        repeat_threshold: Least bar similarity inside a repeat.
        novelty_threshold: Least novelty (0..1) of a boundary that is no repeat edge.
        half_width: Novelty kernel half width, in bars.

    Returns:
        The :class:`Structure` (no sections for a piece without pitched notes). Past
        :data:`MAX_BARS` bars, bars are read in groups (its ``beats_per_bar`` a multiple of
        the one asked): the similarity matrix grows with the square of the bar count (a
        piece of 32,000 quarter-beat bars once asked 8 GB).
    """
    notes = pitched(notes)
    if len(notes):
        bars = float(np.max(notes["onset"] + notes["duration"])) / beats_per_bar
        beats_per_bar *= max(1, math.ceil(bars / MAX_BARS - 1e-9))
    feats = bar_features(notes, beats_per_bar)
    n = len(feats)
    sim = self_similarity(feats)
    nov = novelty(sim, half_width)
    repeats = find_repeats(sim, threshold=repeat_threshold, min_bars=min_bars)
    if n == 0:
        return Structure(beats_per_bar, sim, nov, [], [], [])
    # (strength, bar, least distance to other boundaries)
    candidates: list[tuple[float, int, int]] = []
    for r in repeats:
        strength = 1.0 + r.length / n
        for bar in (r.first, r.first + r.length, r.second, r.second + r.length):
            candidates.append((strength, bar, min_bars))
    peaks = [
        i
        for i in range(1, n)
        if nov[i] >= novelty_threshold and nov[i] >= nov[i - 1] and nov[i] >= nov[i + 1]
    ]
    # the kernel cannot resolve changes closer than its half width: bars inside one section
    # differ too, and would otherwise split it
    candidates += [(float(nov[i]), i, max(half_width, min_bars)) for i in peaks]
    # one candidate per (bar, gap), its strongest: a weaker copy comes later and is refused
    # either way (its bar is chosen, or whatever refused the strongest is chosen still); the
    # nearest chosen bar on each side decides (bisect). A periodic piece of 8,000 bars once
    # made 3.2 million candidates, each checked against every chosen bar (minutes).
    strongest: dict[tuple[int, int], float] = {}
    for strength, bar, gap in candidates:
        if strength > strongest.get((bar, gap), -np.inf):
            strongest[(bar, gap)] = strength
    chosen = [0, n]
    for (bar, gap), _ in sorted(strongest.items(), key=lambda c: (-c[1], c[0][0])):
        at = bisect.bisect_left(chosen, bar)
        near = min(abs(bar - c) for c in chosen[max(0, at - 1) : at + 1])
        if near >= gap:
            chosen.insert(at, bar)
    bounds = chosen
    return Structure(beats_per_bar, sim, nov, bounds, label_sections(sim, bounds), repeats)


@dataclass(frozen=True)
class Phrase:
    """A melodic phrase: ``[start, end)`` in beats, ``arrival`` = onset of its last note."""

    start: float
    end: float
    arrival: float
    notes: int


def phrase_boundaries(
    notes: np.ndarray,
    *,
    long_factor: float = 2.0,
    min_long: float = 1.0,
    min_notes: int = 3,
) -> list[Phrase]:
    """Phrases of the melody (skyline): a phrase ends at a rest or a long note.

    A melody note closes a phrase when a rest of at least the median inter-onset interval
    follows it, or when its inter-onset interval is at least ``long_factor`` times the median
    and at least ``min_long`` beats (the held notes that end chorale lines). The last note
    always closes one. Phrases shorter than ``min_notes`` join the next one.

    Args:
        notes: Note array (polyphonic is fine; the skyline melody is used).
        long_factor: How much longer than the median a closing note is.
        min_long: Shortest closing note, in beats.
        min_notes: Fewest notes in a phrase.

    Returns:
        Phrases in order; empty for no pitched notes.
    """
    mel = skyline(notes)
    if len(mel) == 0:
        return []
    onsets = mel["onset"]
    ends = onsets + mel["duration"]
    ioi = np.diff(onsets)  # (n - 1,)
    median = float(np.median(ioi)) if len(ioi) else 1.0
    rest = onsets[1:] - ends[:-1]
    closes = (rest >= max(median, 1e-6) - 1e-9) | (
        (ioi >= long_factor * median) & (ioi >= min_long)
    )
    close_idx = np.concatenate([np.flatnonzero(closes), [len(mel) - 1]])
    phrases = []
    first = 0
    for i in close_idx.tolist():
        if i + 1 - first < min_notes and i != len(mel) - 1:
            continue  # too short: the phrase runs on
        phrases.append(
            Phrase(float(onsets[first]), float(ends[i]), float(onsets[i]), i + 1 - first)
        )
        first = i + 1
    return phrases


def phrase_cadences(
    notes: np.ndarray, phrases: list[Phrase], *, beats_per_bar: float = 4.0
) -> tuple[list[Cadence], Cadence | None]:
    """The cadences at the arrivals of ``phrases`` and the one at the last arrival (None when
    the last phrase does not close on a cadence), read as ``aurl analyze`` reads them: keys
    in windows of four bars every bar, chords per beat, each cadence in its local key.

    The one reading of "does this phrase close" shared by the evaluation
    (:mod:`aurl.evaluation.phrases`) and the cadence-aware ending of generation
    (:mod:`aurl.generation.cadence`).
    """
    from aurl.analysis import chords as ch
    from aurl.analysis.keys import estimate_keys_windowed

    if not phrases or len(pitched(notes)) == 0:
        return [], None
    segments = estimate_keys_windowed(notes, hop=beats_per_bar, window=4 * beats_per_bar)
    if not segments:
        return [], None
    chords = ch.recognize_chords(notes, resolution=1.0)
    cadences = ch.detect_cadences(chords, segments, arrivals=[ph.arrival for ph in phrases])
    last = ch.detect_cadences(chords, segments, arrivals=[phrases[-1].arrival])
    return cadences, (last[0] if last else None)
