"""Keys: names, scales, and key finding over note arrays.

The one key finder of Aurl: generation uses it for the default key of a primer and for the key
constraint (:func:`parse_key`, :func:`scale_pitch_classes`); evaluation uses it for harmony
metrics; ``aurl analyze`` uses it for global keys and modulations.

Key finding is the Krumhansl-Schmuckler algorithm (Krumhansl 1990, *Cognitive Foundations of
Musical Pitch*): the duration-weighted pitch-class histogram is correlated (Pearson) with a major
and a minor key profile rotated to each of the 12 tonics; the best of the 24 wins. The profile
set is selectable (Krumhansl-Kessler, Temperley 2007, Aarden-Essen 2003, Bellman-Budge 2005).
Windowed key finding smooths the 24 per-window scores with a Viterbi pass that charges a penalty
for every change of key, so a modulation needs sustained evidence, not one odd bar.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import numpy as np

from aurl.data.notes import pitched
from aurl.errors import ConfigError, DataError

Mode = Literal["major", "minor"]

# Spelling used for names we print: the common key-signature spelling of each tonic.
MAJOR_NAMES = ("C", "Db", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
MINOR_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "G#", "A", "Bb", "B")

MAJOR_SCALE = np.array([0, 2, 4, 5, 7, 9, 11])
NATURAL_MINOR_SCALE = np.array([0, 2, 3, 5, 7, 8, 10])
HARMONIC_MINOR_SCALE = np.array([0, 2, 3, 5, 7, 8, 11])
MELODIC_MINOR_SCALE = np.array([0, 2, 3, 5, 7, 9, 11])

# (major, minor) profiles, index 0 = tonic. Sources: Krumhansl & Kessler (1982); Temperley,
# *Music and Probability* (2007, Kostka-Payne corpus); Aarden (2003, Essen folk songs);
# Bellman (2005). The same numbers music21 ships in ``analysis.discrete``.
PROFILES: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "krumhansl": (
        (6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88),
        (6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17),
    ),
    "temperley": (
        (0.748, 0.060, 0.488, 0.082, 0.670, 0.460, 0.096, 0.715, 0.104, 0.366, 0.057, 0.400),
        (0.712, 0.084, 0.474, 0.618, 0.049, 0.460, 0.105, 0.747, 0.404, 0.067, 0.133, 0.330),
    ),
    "aarden": (
        (
            17.7661,
            0.145624,
            14.9265,
            0.160186,
            19.8049,
            11.3587,
            0.291248,
            22.062,
            0.145624,
            8.15494,
            0.232998,
            4.95122,
        ),
        (
            18.2648,
            0.737619,
            14.0499,
            16.8599,
            0.702494,
            14.4362,
            0.702494,
            18.6161,
            4.56621,
            1.93186,
            7.37619,
            1.75623,
        ),
    ),  # fmt: skip
    "bellman": (
        (16.80, 0.86, 12.95, 1.41, 13.49, 11.93, 1.25, 20.28, 1.80, 8.04, 0.62, 10.57),
        (18.16, 0.69, 12.99, 13.34, 1.07, 11.15, 1.38, 21.07, 7.49, 1.53, 0.92, 10.21),
    ),
}
# Temperley's profiles come from a common-practice corpus (Kostka-Payne), the closest of the four
# to what Aurl learns from; they also agree best with the chorales' key signatures.
DEFAULT_PROFILE = "temperley"
FINAL_BASS_WEIGHT = 0.2


@dataclass(frozen=True)
class Key:
    """A major or minor key.

    Attributes:
        tonic: Pitch class of the tonic, 0 (C) .. 11 (B).
        mode: ``"major"`` or ``"minor"``.
        name: Readable name, e.g. ``"Bb major"``, ``"F# minor"``.
        confidence: Pearson correlation of the notes with the key's profile (-1..1); 1.0 for a
            key parsed from a name.
    """

    tonic: int
    mode: Mode
    name: str
    confidence: float = 1.0

    @property
    def index(self) -> int:
        """Position among the 24 keys: majors 0..11, minors 12..23 (by tonic)."""
        return self.tonic + (12 if self.mode == "minor" else 0)

    @property
    def relative(self) -> Key:
        """The relative major (of a minor key) or minor (of a major key)."""
        if self.mode == "major":
            return make_key((self.tonic + 9) % 12, "minor")
        return make_key((self.tonic + 3) % 12, "major")

    @property
    def sharps(self) -> int:
        """Key signature as a count of sharps (negative: flats), in -6..5 (F#/Gb major -> +6)."""
        major_tonic = self.tonic if self.mode == "major" else (self.tonic + 3) % 12
        fifths = (major_tonic * 7) % 12  # steps round the circle of fifths from C
        return fifths if fifths <= 6 else fifths - 12

    def __str__(self) -> str:
        return self.name


def make_key(tonic: int, mode: Mode, confidence: float = 1.0) -> Key:
    """A :class:`Key` with its conventional name."""
    tonic = int(tonic) % 12
    names = MAJOR_NAMES if mode == "major" else MINOR_NAMES
    return Key(tonic, mode, f"{names[tonic]} {mode}", float(confidence))


def key_from_index(index: int, confidence: float = 1.0) -> Key:
    """The key at position ``index`` of the 24 (see :attr:`Key.index`)."""
    return make_key(index % 12, "minor" if index >= 12 else "major", confidence)


ALL_KEYS: tuple[Key, ...] = tuple(key_from_index(i) for i in range(24))

_LETTERS = {"c": 0, "d": 2, "e": 4, "f": 5, "g": 7, "a": 9, "b": 11}
_MODES = {
    "major": "major", "maj": "major", "ionian": "major", "dur": "major",
    "minor": "minor", "min": "minor", "m": "minor", "aeolian": "minor", "moll": "minor",
}  # fmt: skip
_KEY_RE = re.compile(r"^\s*([a-gA-G])((?:#|b|-|s|♯|♭)*)\s*[-_ ]?\s*([a-zA-Z]*)\s*$")


def parse_key(name: str) -> Key:
    """Parse a key name.

    Accepts ``"D minor"``, ``"Bb major"``, ``"F# min"``, ``"Dm"``, ``"C"``, music21 style
    ``"e-"`` (E-flat minor) and a bare tonic whose case gives the mode: ``"f#"`` is F# minor,
    ``"A"`` is A major.

    Args:
        name: The key name.

    Returns:
        The key, with confidence 1.0.

    Raises:
        ConfigError: The name is not a key; the message says what is accepted.
    """
    m = _KEY_RE.match(name) if isinstance(name, str) else None
    mode_word = m.group(3).lower() if m else ""
    if m is None or (mode_word and mode_word not in _MODES and m.group(3) != "M"):
        raise ConfigError(
            f"unknown key {name!r}: use a tonic A-G with optional # or b and a mode, "
            "e.g. 'D minor', 'Bb major', 'f#' (lower case = minor)"
        )
    letter, accidentals = m.group(1), m.group(2)
    tonic = _LETTERS[letter.lower()]
    tonic += sum(1 if a in "#s♯" else -1 for a in accidentals)
    if mode_word:
        mode: Mode = "major" if m.group(3) == "M" else _MODES[mode_word]  # type: ignore[assignment]
    else:
        mode = "minor" if letter.islower() else "major"
    return make_key(tonic % 12, mode)


def scale_pitch_classes(
    key: Key | str, minor: Literal["natural", "harmonic", "melodic"] = "natural"
) -> np.ndarray:
    """The 7 pitch classes of the key's scale, ascending from the tonic.

    Args:
        key: A :class:`Key` or a key name for :func:`parse_key`.
        minor: Which minor scale a minor key uses (``harmonic`` raises the 7th, ``melodic`` the
            6th and 7th); ignored for major keys.

    Returns:
        int64 array of shape (7,), values 0..11, e.g. D minor -> [2, 4, 5, 7, 9, 10, 0].
    """
    if isinstance(key, str):
        key = parse_key(key)
    if key.mode == "major":
        steps = MAJOR_SCALE
    else:
        scales = {
            "natural": NATURAL_MINOR_SCALE,
            "harmonic": HARMONIC_MINOR_SCALE,
            "melodic": MELODIC_MINOR_SCALE,
        }
        if minor not in scales:
            raise ConfigError(f"minor={minor!r}: choose one of {sorted(scales)}")
        steps = scales[minor]
    return ((steps + key.tonic) % 12).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Pitch-class histograms
# --------------------------------------------------------------------------------------------


def pitch_class_histogram(notes: np.ndarray, *, weight: str = "duration") -> np.ndarray:
    """Duration-weighted (or count) pitch-class histogram of the non-drum notes.

    Returns:
        float64 array of shape (12,), not normalised; all zeros for no pitched notes.
    """
    notes = pitched(notes)
    w = notes["duration"] if weight == "duration" else np.ones(len(notes))
    return np.bincount(notes["pitch"] % 12, weights=w, minlength=12).astype(np.float64)


def chroma(notes: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Sounding time of each pitch class inside each interval ``[edges[i], edges[i+1])``.

    Exact, without a grid: with ``F(t) = sum over started notes of min(t - onset, duration)``
    the time a pitch class sounds in ``[a, b)`` is ``F(b) - F(a)``, and
    ``F(t) = sum_{onset<t} (t - onset) - sum_{end<t} (t - end)`` comes from sorted onsets and
    ends with ``searchsorted`` and cumulative sums: O((notes + edges) log notes).

    Args:
        notes: Note array (drums are ignored).
        edges: Increasing times in beats, shape (W + 1,).

    Returns:
        float64 array of shape (W, 12), in beats of sounding time.
    """
    notes = pitched(notes)
    edges = np.asarray(edges, dtype=np.float64)
    pcs = notes["pitch"] % 12
    out = np.zeros((max(len(edges) - 1, 0), 12))
    if len(edges) < 2:
        return out
    for pc in np.unique(pcs):
        sel = notes[pcs == pc]
        onsets = np.sort(sel["onset"])
        ends = np.sort(sel["onset"] + np.maximum(sel["duration"], 0.0))
        f = _started_time(onsets, edges) - _started_time(ends, edges)  # (W + 1,)
        out[:, pc] = np.diff(f)
    return np.maximum(out, 0.0)  # float round-off only


def _started_time(sorted_times: np.ndarray, t: np.ndarray) -> np.ndarray:
    """``sum_{x < t} (t - x)`` for each t, given sorted x."""
    idx = np.searchsorted(sorted_times, t, side="left")
    csum = np.concatenate([[0.0], np.cumsum(sorted_times)])
    return idx * t - csum[idx]


# --------------------------------------------------------------------------------------------
# Key finding
# --------------------------------------------------------------------------------------------


def _profile_matrix(profile: str) -> np.ndarray:
    """(24, 12) rotated profiles, standardised so a dot product with a standardised histogram
    divided by 12 is the Pearson correlation."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown key profile {profile!r}; choose one of {sorted(PROFILES)}")
    major, minor = (np.asarray(p, dtype=np.float64) for p in PROFILES[profile])
    idx = (np.arange(12)[None, :] - np.arange(12)[:, None]) % 12  # row k: profile moved to k
    mat = np.concatenate([major[idx], minor[idx]])  # (24, 12)
    return (mat - mat.mean(1, keepdims=True)) / mat.std(1, keepdims=True)


def key_scores(histograms: np.ndarray, profile: str = DEFAULT_PROFILE) -> np.ndarray:
    """Pearson correlation of pitch-class histograms with the 24 key profiles.

    Args:
        histograms: Shape (12,) or (W, 12).
        profile: One of :data:`PROFILES`.

    Returns:
        Shape (24,) or (W, 24), majors 0..11 then minors 12..23; NaN where fewer than two
        pitch classes sound (no evidence for one key over its neighbours).
    """
    h = np.asarray(histograms, dtype=np.float64)
    single = h.ndim == 1
    h = np.atleast_2d(h)  # (W, 12)
    std = h.std(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (h - h.mean(1, keepdims=True)) / std
    scores = z @ _profile_matrix(profile).T / 12.0  # (W, 24)
    scores[(h > 0).sum(1) < 2] = np.nan
    return scores[0] if single else scores


def final_bass(notes: np.ndarray) -> int:
    """Pitch class of the lowest note still sounding at the very end; -1 for no pitched notes."""
    notes = pitched(notes)
    if len(notes) == 0:
        return -1
    ends = notes["onset"] + notes["duration"]
    return int(notes["pitch"][ends >= ends.max() - 1e-6].min() % 12)


def estimate_key(
    notes: np.ndarray,
    *,
    profile: str = DEFAULT_PROFILE,
    final_bass_weight: float = FINAL_BASS_WEIGHT,
) -> Key:
    """Global key of a note array (Krumhansl-Schmuckler, duration-weighted, final-bass cue).

    The 24 profile correlations get ``final_bass_weight`` added for the keys whose tonic is the
    lowest note sounding at the end: common-practice pieces end on the tonic, and this settles
    the usual confusions (relative major/minor, dominant key). On the 350 bundled Bach
    chorales it raises agreement with the score's key signature from 84.6% to 85.4% and with
    music21's analysis from 89.4% to 93.1% (``benchmarks/bench_key_agreement.py``). Pass 0 for
    excerpts that need not end on the tonic (e.g. a generation primer).

    Args:
        notes: Note array; drum notes are ignored.
        profile: Key profile set, one of :data:`PROFILES`.
        final_bass_weight: Bonus (correlation units) for keys on the final bass note.

    Returns:
        The best of the 24 keys; ``confidence`` is its profile correlation (without the bonus).

    Raises:
        DataError: Fewer than two pitch classes (empty, drums only, a single note or pitch
            class): no key can be estimated.
    """
    scores = key_scores(pitch_class_histogram(notes), profile)
    if np.isnan(scores).all():
        raise DataError(
            "cannot estimate a key: fewer than two pitch classes sound "
            "(no notes, drums only, zero-length notes, or a single pitch class)"
        )
    cue = (np.arange(24) % 12 == final_bass(notes)) * final_bass_weight
    best = int(np.nanargmax(scores + cue))
    return key_from_index(best, float(scores[best]))


@dataclass(frozen=True)
class KeySegment:
    """A stretch of music in one key: ``[start, end)`` in beats."""

    start: float
    end: float
    key: Key


def window_key_scores(
    notes: np.ndarray,
    *,
    hop: float = 4.0,
    window: float = 16.0,
    profile: str = DEFAULT_PROFILE,
) -> tuple[np.ndarray, np.ndarray]:
    """Key correlations for windows of ``window`` beats centred on steps of ``hop`` beats.

    Returns:
        ``(starts, scores)``: starts of the hop cells, shape (W,), and scores, shape (W, 24),
        NaN where a window holds fewer than two pitch classes.
    """
    notes = pitched(notes)
    if len(notes) == 0:
        return np.zeros(0), np.zeros((0, 24))
    end = float(np.max(notes["onset"] + notes["duration"]))
    n_cells = max(int(np.ceil(end / hop - 1e-9)), 1)
    starts = np.arange(n_cells) * hop
    cells = chroma(notes, np.arange(n_cells + 1) * hop)  # (W, 12)
    # A window covers `half` cells each side of its own: a moving sum via cumulative sums.
    half = max(int(round((window / hop - 1) / 2)), 0)
    csum = np.concatenate([np.zeros((1, 12)), np.cumsum(cells, axis=0)])  # (W + 1, 12)
    lo = np.clip(np.arange(n_cells) - half, 0, n_cells)
    hi = np.clip(np.arange(n_cells) + half + 1, 0, n_cells)
    return starts, key_scores(csum[hi] - csum[lo], profile)


def estimate_keys_windowed(
    notes: np.ndarray,
    *,
    hop: float = 4.0,
    window: float = 16.0,
    change_penalty: float = 0.5,
    profile: str = DEFAULT_PROFILE,
) -> list[KeySegment]:
    """Local keys and modulations: windowed key scores smoothed by Viterbi.

    Each hop cell (``hop`` beats, e.g. one 4/4 bar) gets the 24 correlations of the
    ``window`` beats around it; the key path maximises the summed correlation minus
    ``change_penalty`` per key change, so a modulation must out-score the old key for about
    ``change_penalty / gain`` cells before it is taken.

    Args:
        notes: Note array.
        hop: Cell length in beats.
        window: Analysis window in beats (centred on the cell).
        change_penalty: Cost of one key change, in correlation units.
        profile: Key profile set.

    Returns:
        Consecutive segments covering the piece (empty list for no pitched notes); a segment's
        key confidence is the mean correlation over its cells.
    """
    starts, scores = window_key_scores(notes, hop=hop, window=window, profile=profile)
    if len(starts) == 0 or np.isnan(scores).all():
        return []
    scores = np.where(np.isnan(scores), 0.0, scores)  # silent cells: no evidence either way
    n = len(starts)
    # Viterbi over 24 states; transition = -penalty unless the key stays.
    acc = scores[0].copy()
    back = np.zeros((n, 24), dtype=np.int64)
    for t in range(1, n):  # n = number of bars: a short loop over (24,) vectors
        stay = acc
        best_prev = int(np.argmax(acc))
        move = acc[best_prev] - change_penalty
        back[t] = np.where(stay >= move, np.arange(24), best_prev)
        acc = np.maximum(stay, move) + scores[t]
    path = np.zeros(n, dtype=np.int64)
    path[-1] = int(np.argmax(acc))
    for t in range(n - 1, 0, -1):
        path[t - 1] = back[t, path[t]]
    change = np.flatnonzero(np.diff(path)) + 1
    bounds = np.concatenate([[0], change, [n]])
    segments = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        k = int(path[a])
        conf = float(scores[a:b, k].mean())
        segments.append(
            KeySegment(float(starts[a]), float(starts[b - 1] + hop), key_from_index(k, conf))
        )
    return segments


def modulations(segments: list[KeySegment]) -> list[tuple[float, Key, Key]]:
    """Key changes as ``(beat, from_key, to_key)`` from :func:`estimate_keys_windowed`."""
    return [(b.start, a.key, b.key) for a, b in zip(segments[:-1], segments[1:])]
