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
from aurl.analysis.keys import estimate_keys_windowed
from aurl.analysis.report import input_status
from aurl.analysis.structure import Phrase, phrase_boundaries
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
    p = pitched(notes)
    if status != "ok":
        return PhraseAnalysis([], [], False, 0.0)
    beats = float(np.max(p["onset"] + p["duration"]) - np.min(p["onset"]))
    phrases = phrase_boundaries(notes)
    segments = estimate_keys_windowed(notes, hop=BEATS_PER_BAR, window=4 * BEATS_PER_BAR)
    chords = ch.recognize_chords(notes, resolution=1.0)
    if not segments or not phrases:
        return PhraseAnalysis(phrases, [], False, beats)
    cadences = ch.detect_cadences(chords, segments, arrivals=[ph.arrival for ph in phrases])
    last = ch.detect_cadences(chords, segments, arrivals=[phrases[-1].arrival])
    return PhraseAnalysis(phrases, cadences, bool(last), beats)


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
