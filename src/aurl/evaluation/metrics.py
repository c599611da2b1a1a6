"""Musical metrics: pure functions over a note array (:data:`aurl.data.notes.NOTE_DTYPE`).

Every scalar metric is ``f(notes, ...) -> float`` and returns NaN where it is undefined (no notes,
zero length, too few measures). Histograms and matrices return float arrays (all NaN where
undefined). Times are in quarter-note beats (the ``onset``/``duration`` columns).

Definitions follow MusPy (Dong et al., "MusPy: A toolkit for symbolic music generation", ISMIR
2020, ``muspy/metrics/metrics.py``) and Yang & Lerch ("On the evaluation of generative models in
music", Neural Computing and Applications 2020, the ``mgeval`` toolbox). Where this module differs
from them, the function's docstring says so under "Differs". The common differences:

- Undefined values are NaN everywhere (MusPy returns 0 for the pitch range of an empty piece).
- Time-grid metrics (polyphony, groove) quantize beats to ``resolution`` steps per beat (MusPy
  works on the file's own ticks; its default resolution is 24, ours too). A note shorter than
  one step still occupies one step.
- Drum notes (program 128) are left out of pitch metrics (MusPy ignores drum tracks there) and
  kept in the time metrics (empty beats, groove, density, IOI), as MusPy does.
"""

from __future__ import annotations

import math

import numpy as np

from aurl.analysis.keys import Key, estimate_key, key_from_index, parse_key, scale_pitch_classes
from aurl.data.notes import pitched
from aurl.errors import DataError

NAN = float("nan")


def _scale_masks() -> np.ndarray:
    """(24, 12) bool: row ``Key.index`` marks the pitch classes of that key's (natural) scale."""
    masks = np.zeros((24, 12), dtype=bool)
    for index in range(24):
        masks[index, scale_pitch_classes(key_from_index(index))] = True
    return masks


SCALES = _scale_masks()

# Note-length classes of Yang & Lerch (mgeval ``note_length_hist``), in beats: whole, half,
# quarter, 8th, 16th, dotted half .. dotted 16th, half / quarter / 8th triplets.
LENGTH_CLASSES = np.array(
    [4.0, 2.0, 1.0, 0.5, 0.25, 3.0, 1.5, 0.75, 0.375, 4 / 3, 2 / 3, 1 / 3], dtype=np.float64
)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _entropy2(counts: np.ndarray) -> float:
    """Shannon entropy in bits of a histogram of counts; NaN for an empty histogram."""
    total = counts.sum()
    if total <= 0:
        return NAN
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum())


def _steps(notes: np.ndarray, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) time-grid steps of each note; every note lasts at least one step."""
    start = np.maximum(np.round(notes["onset"] * resolution).astype(np.int64), 0)
    end = np.round((notes["onset"] + notes["duration"]) * resolution).astype(np.int64)
    return start, np.maximum(end, start + 1)


def pianoroll(notes: np.ndarray, resolution: int = 24) -> np.ndarray:
    """Binary piano roll ``(T, 128)`` of the pitched notes, ``resolution`` steps per beat.

    ``T`` is the end of the last note in steps (time starts at 0); memory is ``T * 128`` bytes,
    so the metrics use a run-length form of it instead. Built from a difference array
    (one ``+1`` at each start and ``-1`` at each end, summed over time), so it is vectorized and
    two overlapping notes of one pitch still read as one sounding pitch.
    """
    notes = pitched(notes)
    if notes.shape[0] == 0:
        return np.zeros((0, 128), dtype=bool)
    start, end = _steps(notes, resolution)
    length = int(end.max())
    diff = np.zeros((length + 1, 128), dtype=np.int32)  # (T + 1, 128)
    pitch = notes["pitch"].astype(np.int64)
    np.add.at(diff, (start, pitch), 1)
    np.add.at(diff, (end, pitch), -1)
    return np.cumsum(diff[:-1], axis=0) > 0


def _sounding(notes: np.ndarray, resolution: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The piano roll run-length encoded: ``(steps, pitches, length)``.

    Between consecutive note boundaries the set of sounding pitches is constant, so only those
    boundaries are visited: ``steps[k]`` is the length of segment ``k`` in time steps and
    ``pitches[k]`` how many distinct pitches sound in it; ``length`` is the end of the last
    note. Memory grows with the number of notes, not with the length of the piece (a garbled
    sample may be hours long).
    """
    notes = pitched(notes)
    if notes.shape[0] == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), 0
    start, end = _steps(notes, resolution)
    times, inv = np.unique(np.concatenate([start, end]), return_inverse=True)  # (E,), (2N,)
    pitch = notes["pitch"].astype(np.int64)
    diff = np.zeros((times.shape[0], 128), dtype=np.int32)  # (E, 128) on the boundary axis
    n = start.shape[0]
    np.add.at(diff, (inv[:n], pitch), 1)
    np.add.at(diff, (inv[n:], pitch), -1)
    pitches = (np.cumsum(diff[:-1], axis=0) > 0).sum(axis=1)  # (E - 1,)
    return np.diff(times), pitches, int(times[-1])


def _length_class(values: np.ndarray) -> np.ndarray:
    """Index of the nearest :data:`LENGTH_CLASSES` entry for each value in beats."""
    return np.abs(values[:, None] - LENGTH_CLASSES[None, :]).argmin(axis=1)


# --------------------------------------------------------------------------------------------
# Pitch
# --------------------------------------------------------------------------------------------


def pitch_range(notes: np.ndarray) -> float:
    """Highest minus lowest pitch, in semitones (MusPy ``pitch_range``; Yang & Lerch PR).

    ``max(pitch) - min(pitch)`` over pitched notes.

    Differs: NaN with no notes (MusPy returns 0).
    """
    p = pitched(notes)["pitch"]
    return float(p.max() - p.min()) if p.shape[0] else NAN


def pitches_used(notes: np.ndarray) -> float:
    """Number of distinct pitches (MusPy ``n_pitches_used``; Yang & Lerch PC).

    ``|{pitch}|`` over pitched notes. Differs: NaN with no notes (MusPy returns 0).
    """
    p = pitched(notes)["pitch"]
    return float(np.unique(p).shape[0]) if p.shape[0] else NAN


def pitch_classes_used(notes: np.ndarray) -> float:
    """Number of distinct pitch classes (MusPy ``n_pitch_classes_used``).

    ``|{pitch mod 12}|`` over pitched notes. Differs: NaN with no notes (MusPy returns 0).
    """
    p = pitched(notes)["pitch"]
    return float(np.unique(p % 12).shape[0]) if p.shape[0] else NAN


def pitch_entropy(notes: np.ndarray) -> float:
    """Shannon entropy (bits) of the normalized pitch histogram (MusPy ``pitch_entropy``).

    ``-sum_{i=0}^{127} P(pitch=i) log2 P(pitch=i)``, notes counted once each, no duration weight.
    NaN with no notes.
    """
    p = pitched(notes)["pitch"].astype(np.int64)
    return _entropy2(np.bincount(p, minlength=128))


def pitch_class_histogram(notes: np.ndarray) -> np.ndarray:
    """(12,) normalized pitch-class histogram (Yang & Lerch PCH); all NaN with no notes.

    ``h[c] = #(notes with pitch mod 12 = c) / #(notes)`` (counts, not durations).
    """
    p = pitched(notes)["pitch"].astype(np.int64)
    if p.shape[0] == 0:
        return np.full(12, NAN)
    return np.bincount(p % 12, minlength=12) / p.shape[0]


def tonal_pitch_class_histogram(notes: np.ndarray, key: Key | str | None = None) -> np.ndarray:
    """(12,) pitch-class histogram relative to the key's tonic; all NaN with no key.

    ``h[i] = #(notes with (pitch - tonic) mod 12 = i) / #(notes)``: entry 0 is the tonic, 7 the
    dominant, 3 or 4 the third. Unlike :func:`pitch_class_histogram` it compares pieces in
    different keys (e.g. generated pieces of a model trained with transposition against a
    corpus in its written keys) by what each note does in its key.

    Args:
        notes: Note array.
        key: A :class:`~aurl.analysis.keys.Key`, a name, or None for the key
            :func:`aurl.analysis.keys.estimate_key` finds (all NaN when it cannot: fewer than two
            pitch classes).

    Differs: not in MusPy or Yang & Lerch (their PCH is absolute); ours.
    """
    p = pitched(notes)["pitch"].astype(np.int64)
    if p.shape[0] == 0:
        return np.full(12, NAN)
    if key is None:
        try:
            key = estimate_key(notes)
        except DataError:
            return np.full(12, NAN)
    elif isinstance(key, str):
        key = parse_key(key)
    return np.bincount((p - key.tonic) % 12, minlength=12) / p.shape[0]


def pitch_class_entropy(notes: np.ndarray) -> float:
    """Shannon entropy (bits) of the pitch-class histogram (MusPy ``pitch_class_entropy``).

    ``-sum_{c=0}^{11} P(pc=c) log2 P(pc=c)``; Wu & Yang, "The Jazz Transformer on the Front
    Line" (ISMIR 2020). NaN with no notes.
    """
    p = pitched(notes)["pitch"].astype(np.int64)
    return _entropy2(np.bincount(p % 12, minlength=12))


def pitch_in_scale_rate(notes: np.ndarray, key: Key | str | None = None) -> float:
    """Share of notes whose pitch class lies in the key's scale (MusPy ``pitch_in_scale_rate``).

    ``#(notes in scale) / #(notes)``; the scale is the major or natural minor scale of ``key``
    (from :func:`aurl.analysis.keys.scale_pitch_classes`), as in MusPy and MuseGAN (Dong et al.,
    AAAI 2018). NaN with no notes.

    Args:
        notes: Note array.
        key: A :class:`~aurl.analysis.keys.Key`, a name such as ``"D minor"``, or None for the
            key :func:`aurl.analysis.keys.estimate_key` finds in the notes (NaN when it cannot
            find one: fewer than two pitch classes).

    Differs: MusPy takes a root and a mode; None (estimate the key) is ours.
    """
    p = pitched(notes)["pitch"].astype(np.int64)
    if p.shape[0] == 0:
        return NAN
    if key is None:
        try:
            key = estimate_key(notes)
        except DataError:
            return NAN
    in_scale = np.zeros(12, dtype=bool)
    in_scale[scale_pitch_classes(key)] = True
    return float(in_scale[p % 12].mean())


def scale_consistency(notes: np.ndarray) -> float:
    """Largest pitch-in-scale rate over the 24 major and minor scales (MusPy ``scale_consistency``).

    ``max_{root, mode} pitch_in_scale_rate(root, mode)``; Mogren, "C-RNN-GAN" (2016).
    NaN with no notes.
    """
    p = pitched(notes)["pitch"].astype(np.int64)
    if p.shape[0] == 0:
        return NAN
    counts = np.bincount(p % 12, minlength=12)  # (12,)
    return float((SCALES @ counts).max() / p.shape[0])


def pitch_class_transition_matrix(notes: np.ndarray) -> np.ndarray:
    """(12, 12) normalized pitch-class transitions between successive onsets (Yang & Lerch PCTM).

    ``M[a, b]`` counts, for each pair of neighbouring onset times ``t_k < t_{k+1}``, every pair
    of a note of class ``a`` starting at ``t_k`` and a note of class ``b`` starting at
    ``t_{k+1}``; the matrix is divided by its sum. All NaN with fewer than two onset times.

    Differs: mgeval (through pretty_midi) links a note to the notes starting within 0.05 s of its
    end; here successive onset groups are linked, which also covers staccato and rests and needs
    no threshold.
    """
    n = pitched(notes)
    if n.shape[0] == 0:
        return np.full((12, 12), NAN)
    times, group = np.unique(n["onset"], return_inverse=True)
    if times.shape[0] < 2:
        return np.full((12, 12), NAN)
    pcs = n["pitch"].astype(np.int64) % 12
    # (G, 12) counts of each class per onset group; transitions = outer products of neighbours.
    per_group = np.zeros((times.shape[0], 12), dtype=np.float64)
    np.add.at(per_group, (group, pcs), 1.0)
    m = per_group[:-1].T @ per_group[1:]  # (12, 12)
    return m / m.sum()


# --------------------------------------------------------------------------------------------
# Texture
# --------------------------------------------------------------------------------------------


def polyphony(notes: np.ndarray, resolution: int = 24) -> float:
    """Mean number of sounding pitches over the steps where any pitch sounds (MusPy ``polyphony``).

    ``sum_t n_t / #(t : n_t > 0)`` with ``n_t`` the distinct pitches sounding at step ``t``.
    NaN with no notes.
    """
    steps, pitches, _ = _sounding(notes, resolution)
    busy = steps[pitches > 0].sum()
    return float((steps * pitches).sum() / busy) if busy else NAN


def polyphony_rate(notes: np.ndarray, threshold: int = 2, resolution: int = 24) -> float:
    """Share of time steps with at least ``threshold`` sounding pitches (MusPy ``polyphony_rate``).

    ``#(t : n_t >= threshold) / T`` with ``T`` the steps from 0 to the end of the last note;
    MuseGAN's "polyphonicity". NaN when ``T`` is 0.

    Differs: MusPy's code counts ``n_t > threshold`` while its text says "multiple pitches" for
    the default 2; we count ``n_t >= threshold`` so the default means two or more pitches.
    """
    steps, pitches, length = _sounding(notes, resolution)
    if length == 0:
        return NAN
    return float(steps[pitches >= threshold].sum() / length)


def empty_beat_rate(notes: np.ndarray) -> float:
    """Share of beats in which no note sounds (MusPy ``empty_beat_rate``; Pypianoroll).

    Beats are ``[b, b + 1)`` for ``b = 0 .. ceil(end) - 1`` with ``end`` the end of the last
    note; a note sounding over ``[s, e)`` fills beats ``floor(s) .. ceil(e) - 1``.
    ``#(empty beats) / #(beats)``; NaN when the piece has zero length.

    Differs: MusPy treats note spans as closed, so a note ending exactly on a beat also fills the
    next beat, and it counts one extra beat when the piece ends on a beat line.
    """
    if notes.shape[0] == 0:
        return NAN
    end = notes["onset"] + notes["duration"]
    n_beats = int(math.ceil(float(end.max())))
    if n_beats < 1:
        return NAN
    first = np.floor(notes["onset"]).astype(np.int64)
    last = np.maximum(np.ceil(end).astype(np.int64), first + 1)  # exclusive
    diff = np.zeros(n_beats + 1, dtype=np.int64)
    np.add.at(diff, np.clip(first, 0, n_beats), 1)
    np.add.at(diff, np.clip(last, 0, n_beats), -1)
    filled = np.count_nonzero(np.cumsum(diff[:-1]) > 0)
    return float((n_beats - filled) / n_beats)


def groove_consistency(
    notes: np.ndarray, beats_per_measure: float = 4.0, resolution: int = 24
) -> float:
    """One minus the mean Hamming distance of neighbouring measures' onset patterns (MusPy).

    ``1 - 1/(T-1) sum_{i=1}^{T-1} d(G_i, G_{i+1}) / R`` with ``G_i`` the binary onset vector of
    measure ``i`` on ``R = beats_per_measure * resolution`` steps and ``T`` the number of
    measures; Wu & Yang, "The Jazz Transformer on the Front Line" (ISMIR 2020). Assumes a
    constant meter. NaN with fewer than two measures.

    Differs: ``T = ceil(end / R)`` (measures that contain sound); MusPy uses
    ``end // R + 1``, which adds an empty measure when the piece ends on a bar line.
    """
    if notes.shape[0] == 0:
        return NAN
    measure_steps = int(round(beats_per_measure * resolution))
    start, end = _steps(notes, resolution)
    n_measures = int(math.ceil(end.max() / measure_steps))
    if n_measures < 2:
        return NAN
    patterns = np.zeros((n_measures, measure_steps), dtype=bool)  # (T, R)
    measure, position = np.divmod(start, measure_steps)
    patterns[measure, position] = True
    hamming = np.count_nonzero(patterns[:-1] != patterns[1:])
    return float(1.0 - hamming / (measure_steps * (n_measures - 1)))


def note_density(notes: np.ndarray) -> float:
    """Notes per beat: ``#(notes) / end`` with ``end`` the end of the last note in beats.

    Yang & Lerch's note count (NC) divided by the length, so pieces of different lengths
    compare; the same unit as ``generation.density``. NaN with no notes or zero length.
    """
    if notes.shape[0] == 0:
        return NAN
    end = float((notes["onset"] + notes["duration"]).max())
    return notes.shape[0] / end if end > 0 else NAN


# --------------------------------------------------------------------------------------------
# Rhythm
# --------------------------------------------------------------------------------------------


def _iois(notes: np.ndarray) -> np.ndarray:
    """Inter-onset intervals in beats between successive distinct onset times."""
    return np.diff(np.unique(notes["onset"]))


def ioi_mean(notes: np.ndarray) -> float:
    """Mean inter-onset interval in beats (Yang & Lerch average IOI).

    ``mean(t_{k+1} - t_k)`` over the sorted distinct onset times; NaN with fewer than two.

    Differs: mgeval measures seconds and keeps repeated onsets (a chord adds zero intervals);
    here beats, so tempo does not move it, and a chord is one onset.
    """
    ioi = _iois(notes)
    return float(ioi.mean()) if ioi.shape[0] else NAN


def ioi_histogram(notes: np.ndarray) -> np.ndarray:
    """(12,) normalized histogram of inter-onset intervals over :data:`LENGTH_CLASSES`.

    Each interval counts toward the nearest class (whole .. 16th, dotted, triplets), as Yang &
    Lerch bin note lengths. All NaN with fewer than two onset times.
    """
    ioi = _iois(notes)
    if ioi.shape[0] == 0:
        return np.full(LENGTH_CLASSES.shape[0], NAN)
    return np.bincount(_length_class(ioi), minlength=LENGTH_CLASSES.shape[0]) / ioi.shape[0]


def note_length_histogram(notes: np.ndarray) -> np.ndarray:
    """(12,) normalized note-length histogram (Yang & Lerch NLH, mgeval ``note_length_hist``).

    Each duration counts toward the nearest of :data:`LENGTH_CLASSES` (in beats, i.e. 4/4 bar
    lengths scaled as mgeval does). All NaN with no notes.
    """
    d = notes["duration"]
    if d.shape[0] == 0:
        return np.full(LENGTH_CLASSES.shape[0], NAN)
    return np.bincount(_length_class(d), minlength=LENGTH_CLASSES.shape[0]) / d.shape[0]


# --------------------------------------------------------------------------------------------
# Dynamics and repetition
# --------------------------------------------------------------------------------------------


def velocity_mean(notes: np.ndarray) -> float:
    """Mean MIDI velocity of all notes; NaN with no notes."""
    v = notes["velocity"]
    return float(v.mean()) if v.shape[0] else NAN


def velocity_std(notes: np.ndarray) -> float:
    """Population standard deviation of MIDI velocity (the spread); NaN with no notes."""
    v = notes["velocity"].astype(np.float64)
    return float(v.std()) if v.shape[0] else NAN


def repetition_rate(notes: np.ndarray, n: int = 4, resolution: int = 24) -> float:
    """Share of note n-grams that repeat an earlier n-gram of the same piece.

    The pitched notes in (onset, pitch) order become symbols ``(pitch, duration step, IOI step)``
    (duration and distance to the previous note's onset, quantized to ``resolution`` per beat);
    with ``N`` n-grams of ``n`` consecutive symbols and ``U`` distinct ones,
    ``repetition = (N - U) / N``. 0: nothing repeats; towards 1: loops. NaN with fewer than
    ``n`` notes. A compact stand-in for the self-similarity measures of Wu & Yang (2020);
    MusPy has no repetition metric.
    """
    p = pitched(notes)
    if p.shape[0] < n:
        return NAN
    start, end = _steps(p, resolution)
    gap = np.diff(start, prepend=start[0])
    symbols = np.stack([p["pitch"].astype(np.int64), end - start, gap], axis=1)  # (N, 3)
    # (N - n + 1, n * 3): each row one n-gram of consecutive symbols.
    windows = np.lib.stride_tricks.sliding_window_view(symbols, (n, 3)).reshape(-1, n * 3)
    unique = np.unique(windows, axis=0).shape[0]
    return float((windows.shape[0] - unique) / windows.shape[0])


# --------------------------------------------------------------------------------------------
# All of them
# --------------------------------------------------------------------------------------------

#: The scalar metrics summarised per set and compared between sets (name -> function).
SCALAR_METRICS = {
    "pitch_range": pitch_range,
    "pitches_used": pitches_used,
    "pitch_classes_used": pitch_classes_used,
    "pitch_entropy": pitch_entropy,
    "pitch_class_entropy": pitch_class_entropy,
    "pitch_in_scale_rate": pitch_in_scale_rate,
    "scale_consistency": scale_consistency,
    "polyphony": polyphony,
    "polyphony_rate": polyphony_rate,
    "empty_beat_rate": empty_beat_rate,
    "groove_consistency": groove_consistency,
    "note_density": note_density,
    "ioi_mean": ioi_mean,
    "velocity_mean": velocity_mean,
    "velocity_std": velocity_std,
    "repetition_rate": repetition_rate,
}

#: The vector metrics (name -> function returning a flat-able array).
VECTOR_METRICS = {
    "pitch_class_histogram": pitch_class_histogram,
    "tonal_pitch_class_histogram": tonal_pitch_class_histogram,
    "pitch_class_transition_matrix": pitch_class_transition_matrix,
    "ioi_histogram": ioi_histogram,
    "note_length_histogram": note_length_histogram,
}


def scalar_metrics(notes: np.ndarray) -> dict[str, float]:
    """Every metric of :data:`SCALAR_METRICS` for one piece (training-time sample monitoring)."""
    return {name: fn(notes) for name, fn in SCALAR_METRICS.items()}


def all_metrics(notes: np.ndarray) -> dict[str, float | np.ndarray]:
    """Scalar and vector metrics of one piece, by name."""
    out: dict[str, float | np.ndarray] = dict(scalar_metrics(notes))
    out.update({name: fn(notes) for name, fn in VECTOR_METRICS.items()})
    return out
