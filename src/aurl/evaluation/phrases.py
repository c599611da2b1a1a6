"""Phrase and cadence metrics: does a piece breathe in phrases, and do its phrases close?

One analysis per piece (:func:`analyze_phrases`), the same :mod:`aurl.analysis` calls as
``aurl analyze`` (skyline phrases ending at rests and held notes, windowed keys, per-beat
chords, cadences read at each phrase's arrival in the local key), then pure metrics over it.
Each metric returns NaN where it is undefined. Bach chorales, the reference corpus, end
nearly every phrase (fermata) on a cadence; a model that wanders harmonically does not.

Set level (:func:`phrase_summary`, used by :func:`aurl.evaluation.report.evaluate_sets`): the
mean, spread and defined count of each per-piece metric, and the pooled phrase-length
distribution over :data:`LENGTH_BINS`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from aurl.analysis import chords as ch
from aurl.analysis.melody import skyline
from aurl.analysis.report import input_status
from aurl.analysis.structure import Phrase, phrase_boundaries, phrase_cadences
from aurl.data.notes import pitched

NAN = float("nan")
BEATS_PER_BAR = 4.0  # as ``aurl analyze`` without a time signature
#: Phrase-length bins in beats: [0, 2), [2, 4), [4, 6), [6, 8), [8, 12), [12, 16), [16, inf).
LENGTH_BINS = np.array([0.0, 2.0, 4.0, 6.0, 8.0, 12.0, 16.0, np.inf])


@dataclass(frozen=True)
class PhraseAnalysis:
    """Phrases, the cadences at their arrivals, whether the last one closes on a cadence, and
    the piece's span in beats (first onset to last release of a pitched note)."""

    phrases: list[Phrase]
    cadences: list[ch.Cadence]
    last_closes: bool
    beats: float


def analyze_phrases(notes: np.ndarray) -> PhraseAnalysis:
    """Phrases and cadences of one piece (an empty analysis where ``aurl analyze`` has none:
    no notes, drums only, a single note, or too long)."""
    status, _ = input_status(notes)
    if status != "ok":
        return PhraseAnalysis([], [], False, 0.0)
    return _with_cadences(notes, phrase_boundaries(notes))


def analyze_phrases_at(notes: np.ndarray, ends: np.ndarray) -> PhraseAnalysis:
    """:func:`analyze_phrases` with known phrase ends instead of the skyline detector's.

    Args:
        notes: The piece.
        ends: (n, 2) ``[arrival, end]`` beats of each phrase's last note, sorted (Bach's
            fermatas: :func:`aurl.data.fermatas.load_fermatas`). Phrase ``i`` runs from the
            previous phrase's end (the first onset for the first) to its own end.
    """
    status, _ = input_status(notes)
    if status != "ok" or len(ends) == 0:
        return PhraseAnalysis([], [], False, 0.0)
    onsets = skyline(notes)["onset"]
    starts = np.concatenate([[float(pitched(notes)["onset"].min())], ends[:-1, 1]])
    phrases = [
        Phrase(float(a), float(e), float(r), int(((onsets >= a) & (onsets < e)).sum()))
        for a, (r, e) in zip(starts, ends)
    ]
    return _with_cadences(notes, phrases)


def _with_cadences(notes: np.ndarray, phrases: list[Phrase]) -> PhraseAnalysis:
    """The cadences at the arrivals of ``phrases`` (the analysis shared by both entries)."""
    p = pitched(notes)
    beats = float(np.max(p["onset"] + p["duration"]) - np.min(p["onset"]))
    cadences, last = phrase_cadences(notes, phrases, beats_per_bar=BEATS_PER_BAR)
    return PhraseAnalysis(phrases, cadences, last is not None, beats)


def phrase_end_matches(
    phrases: Sequence[Phrase], ends: np.ndarray, *, tolerance: float = 0.5
) -> tuple[int, int, int]:
    """How many detected phrase arrivals match a known one: ``(matched, detected, known)``.

    One-to-one, in time order: each known arrival (``ends[:, 0]``, e.g. a fermata) takes the
    nearest unmatched detected arrival within ``tolerance`` beats. Precision is
    ``matched / detected``, recall ``matched / known``.
    """
    found = sorted(ph.arrival for ph in phrases)
    used = [False] * len(found)
    matched = 0
    for t in np.asarray(ends, dtype=np.float64).reshape(-1, 2)[:, 0]:
        best, gap = -1, tolerance + 1e-9
        for i, f in enumerate(found):
            if not used[i] and abs(f - t) <= gap:
                best, gap = i, abs(f - t)
        if best >= 0:
            used[best] = True
            matched += 1
    return matched, len(found), len(ends)


def cadences_per_phrase(a: PhraseAnalysis) -> float:
    """``cadences / phrases`` (at most one cadence per phrase arrival, so in [0, 1]);
    NaN without phrases."""
    return len(a.cadences) / len(a.phrases) if a.phrases else NAN


def cadences_per_beat(a: PhraseAnalysis) -> float:
    """``cadences / beats``, beats from the first onset to the last release; NaN for a piece
    of no length."""
    return len(a.cadences) / a.beats if a.beats > 0 else NAN


def ends_on_cadence(a: PhraseAnalysis) -> float:
    """1.0 when the last phrase's arrival is a cadence (any kind: authentic, plagal,
    deceptive, half), else 0.0; NaN without phrases. Its set mean is the share of pieces that
    end on a cadence."""
    if not a.phrases:
        return NAN
    return 1.0 if a.last_closes else 0.0


def phrase_lengths(a: PhraseAnalysis) -> np.ndarray:
    """Each phrase's length ``end - start`` in beats, (phrases,)."""
    return np.array([ph.end - ph.start for ph in a.phrases], dtype=np.float64)


def phrase_length_mean(a: PhraseAnalysis) -> float:
    """Mean phrase length in beats, ``sum(end - start) / phrases``; NaN without phrases."""
    return float(phrase_lengths(a).mean()) if a.phrases else NAN


def phrase_length_histogram(lengths: np.ndarray) -> np.ndarray:
    """Share of ``lengths`` (beats) in each bin of :data:`LENGTH_BINS`, (7,); all NaN for no
    phrases."""
    if len(lengths) == 0:
        return np.full(len(LENGTH_BINS) - 1, NAN)
    counts, _ = np.histogram(lengths, bins=LENGTH_BINS)
    return counts / counts.sum()


#: The per-piece phrase metrics (name -> function of a :class:`PhraseAnalysis`).
PHRASE_METRICS: dict[str, Callable[[PhraseAnalysis], float]] = {
    "cadences_per_phrase": cadences_per_phrase,
    "cadences_per_beat": cadences_per_beat,
    "ends_on_cadence": ends_on_cadence,
    "phrase_length_mean": phrase_length_mean,
    "phrases": lambda a: float(len(a.phrases)),
}


def phrase_features(pieces: Sequence[np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(name -> per-piece values (N,), every phrase length pooled over the set)."""
    analyses = [analyze_phrases(notes) for notes in pieces]
    feats = {
        name: np.array([fn(a) for a in analyses], dtype=np.float64)
        for name, fn in PHRASE_METRICS.items()
    }
    pooled = [phrase_lengths(a) for a in analyses]
    return feats, np.concatenate(pooled) if pooled else np.zeros(0)


def phrase_summary(features: dict[str, np.ndarray], lengths: np.ndarray) -> dict[str, object]:
    """Per metric mean, std and defined count over the pieces where it is defined, plus the
    pooled phrase-length histogram (shares per :data:`LENGTH_BINS` bin) and median."""
    out: dict[str, object] = {}
    for name, x in features.items():
        x = x[np.isfinite(x)]
        out[name] = {
            "mean": float(x.mean()) if x.size else NAN,
            "std": float(x.std()) if x.size else NAN,
            "defined": int(x.size),
        }
    out["phrase_length_histogram"] = phrase_length_histogram(lengths).tolist()
    out["phrase_length_median"] = float(np.median(lengths)) if len(lengths) else NAN
    return out
