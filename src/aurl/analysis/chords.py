"""Chords: template recognition, Roman numerals, progression statistics and cadences.

Chord recognition follows Pardo & Birmingham (2002, "Algorithms for chordal analysis"): each
time cell (a beat or half bar) gets the sounding time of each pitch class, and every chord
template (12 roots x 11 qualities) is scored as

    score = weight on template tones - weight on other tones - MISS_PENALTY * missing tones
            + BASS_BONUS * [lowest sounding note is the root] - QUALITY_PRIOR[quality]

with the weights normalised to sum 1. Missing tones are template tones with under
``MISSING_BELOW`` of the weight; the bass bonus settles inversions of symmetric chords (dim7,
aug) and sus2/sus4 pairs. The prior charges the rarer qualities: adding a tone of weight w to a
template gains 2w, so a seventh (or sus, aug) needs about half its prior in weight to beat the
plain triad, and a passing eighth note in four voices (w ~ 0.06) does not make a seventh chord.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from aurl.analysis.keys import Key, KeySegment, chroma, make_key
from aurl.analysis.melody import sounding_extreme
from aurl.data.notes import pitched

# name: intervals above the root (the first three define the triad for inversions)
QUALITIES: dict[str, tuple[int, ...]] = {
    "maj": (0, 4, 7),
    "min": (0, 3, 7),
    "dim": (0, 3, 6),
    "aug": (0, 4, 8),
    "sus4": (0, 5, 7),
    "sus2": (0, 2, 7),
    "7": (0, 4, 7, 10),
    "maj7": (0, 4, 7, 11),
    "min7": (0, 3, 7, 10),
    "hdim7": (0, 3, 6, 10),
    "dim7": (0, 3, 6, 9),
}
QUALITY_NAMES = tuple(QUALITIES)
_SUFFIX = {
    "maj": "", "min": "m", "dim": "dim", "aug": "aug", "sus4": "sus4", "sus2": "sus2",
    "7": "7", "maj7": "maj7", "min7": "m7", "hdim7": "m7b5", "dim7": "dim7",
}  # fmt: skip
ROOT_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")

MISS_PENALTY = 0.15
MISSING_BELOW = 0.03
BASS_BONUS = 0.05
QUALITY_PRIOR = {
    "maj": 0.0, "min": 0.0, "dim": 0.05, "aug": 0.15, "sus4": 0.15, "sus2": 0.15,
    "7": 0.1, "maj7": 0.15, "min7": 0.15, "hdim7": 0.1, "dim7": 0.1,
}  # fmt: skip


def _templates() -> np.ndarray:
    """(Q * 12, 12) binary templates; row ``q * 12 + root``."""
    out = np.zeros((len(QUALITIES), 12, 12))
    for q, ivs in enumerate(QUALITIES.values()):
        for root in range(12):
            out[q, root, [(root + i) % 12 for i in ivs]] = 1.0
    return out.reshape(-1, 12)  # (Q * 12, 12)


TEMPLATES = _templates()
_TEMPLATE_ROOTS = np.tile(np.arange(12), len(QUALITIES))  # (Q * 12,)
_TEMPLATE_PRIOR = np.repeat([QUALITY_PRIOR[q] for q in QUALITIES], 12)  # (Q * 12,)


@dataclass(frozen=True)
class Chord:
    """A chord over ``[start, end)`` beats.

    Attributes:
        start: Start in beats.
        end: End in beats.
        root: Root pitch class; -1 for no chord (silence).
        quality: A key of :data:`QUALITIES`, or ``"N"`` for no chord.
        bass: Lowest sounding pitch class at the start; -1 for none.
        score: Template score (see module docstring); NaN for no chord.
    """

    start: float
    end: float
    root: int
    quality: str
    bass: int
    score: float

    @property
    def label(self) -> str:
        """Lead-sheet name, e.g. ``"Am"``, ``"Bb7"``, ``"F#m7b5"``, ``"C/E"``; ``"N"``."""
        if self.quality == "N":
            return "N"
        name = ROOT_NAMES[self.root] + _SUFFIX[self.quality]
        if self.bass >= 0 and self.bass != self.root:
            name += "/" + ROOT_NAMES[self.bass]
        return name


def chord_scores(chroma_cells: np.ndarray, bass: np.ndarray) -> np.ndarray:
    """Template scores of each cell.

    Args:
        chroma_cells: Sounding time per pitch class, shape (W, 12).
        bass: Lowest sounding pitch class per cell, shape (W,), -1 for none.

    Returns:
        Shape (W, Q * 12); row ``q * 12 + root`` as in :data:`TEMPLATES`.
    """
    total = chroma_cells.sum(1, keepdims=True)
    w = np.divide(chroma_cells, total, out=np.zeros_like(chroma_cells), where=total > 0)
    inside = w @ TEMPLATES.T  # (W, T)
    missing = (w < MISSING_BELOW).astype(np.float64) @ TEMPLATES.T  # (W, T)
    bass_is_root = (bass[:, None] == _TEMPLATE_ROOTS[None, :]).astype(np.float64)
    return (
        inside
        - (1.0 - inside)
        - MISS_PENALTY * missing
        + BASS_BONUS * bass_is_root
        - _TEMPLATE_PRIOR[None, :]
    )


def recognize_chords(
    notes: np.ndarray,
    *,
    resolution: float = 1.0,
    attack_weight: float = 1.0,
    merge: bool = True,
    end: float | None = None,
) -> list[Chord]:
    """Chords per cell of ``resolution`` beats (1 = per beat; a half bar in 4/4 is 2).

    A cell's pitch-class weights are the sounding time in the cell plus ``attack_weight`` x the
    cell length for each note sounding at its start: what sounds on the beat is the harmony,
    what moves in between is more often a passing tone. The bass is the lowest note sounding at
    the start of the cell (the lowest in the cell if none sounds at its start).

    Args:
        notes: Note array; drums are ignored.
        resolution: Cell length in beats.
        attack_weight: Extra weight of the notes sounding at the start of a cell.
        merge: Join consecutive cells with the same root and quality (the bass of the first
            cell is kept), so the result reads as a progression.
        end: Last beat analysed; default the end of the last note.

    Returns:
        Chords in time order covering ``[0, end)``; silent cells are ``"N"`` chords.
    """
    notes = pitched(notes)
    if len(notes) == 0:
        return []
    if end is None:
        end = float(np.max(notes["onset"] + notes["duration"]))
    n_cells = max(int(np.ceil(end / resolution - 1e-9)), 1)
    edges = np.arange(n_cells + 1) * resolution
    starts = edges[:-1]
    cells = chroma(notes, edges)  # (W, 12)
    # pitch classes sounding just after each cell start: chroma over [t, t + eps)
    eps = min(1e-3, resolution / 4)
    at_start = chroma(notes, np.stack([starts, starts + eps], 1).reshape(-1))[::2] > 0  # (W, 12)
    weights = cells + attack_weight * resolution * at_start
    bass_pitch = sounding_extreme(notes, starts, starts + eps, highest=False)
    anywhere = sounding_extreme(notes, starts, edges[1:], highest=False)
    bass_pitch = np.where(bass_pitch >= 0, bass_pitch, anywhere)
    bass = np.where(bass_pitch >= 0, bass_pitch % 12, -1)
    scores = chord_scores(weights, bass)  # (W, T)
    best = scores.argmax(1)
    silent = cells.sum(1) <= 0
    chords = []
    for i in range(n_cells):
        if silent[i]:
            chords.append(Chord(float(edges[i]), float(edges[i + 1]), -1, "N", -1, float("nan")))
        else:
            q, root = divmod(int(best[i]), 12)
            chords.append(
                Chord(
                    float(edges[i]),
                    float(edges[i + 1]),
                    root,
                    QUALITY_NAMES[q],
                    int(bass[i]),
                    float(scores[i, best[i]]),
                )
            )
    return merge_chords(chords) if merge else chords


def merge_chords(chords: Sequence[Chord]) -> list[Chord]:
    """Join neighbours with the same root and quality (score: the mean, bass: the first)."""
    out: list[Chord] = []
    run: list[Chord] = []
    for c in [*chords, None]:
        if run and (c is None or (c.root, c.quality) != (run[0].root, run[0].quality)):
            first = run[0]
            score = float(np.mean([r.score for r in run])) if first.quality != "N" else first.score
            out.append(
                Chord(first.start, run[-1].end, first.root, first.quality, first.bass, score)
            )
            run = []
        if c is not None:
            run.append(c)
    return out


# --------------------------------------------------------------------------------------------
# Roman numerals
# --------------------------------------------------------------------------------------------

_MAJOR_DEGREES = ("I", "bII", "II", "bIII", "III", "IV", "#IV", "V", "bVI", "VI", "bVII", "VII")
_MINOR_DEGREES = ("I", "bII", "II", "III", "#III", "IV", "#IV", "V", "VI", "#VI", "VII", "#VII")
_LOWER = {"min", "dim", "min7", "hdim7", "dim7"}
_QUALITY_MARK = {
    "maj": "", "min": "", "dim": "o", "aug": "+", "sus4": "sus4", "sus2": "sus2",
    "7": "7", "maj7": "maj7", "min7": "7", "hdim7": "ø7", "dim7": "o7",
}  # fmt: skip
_TRIAD_FIGURES = {1: "6", 2: "64"}
_SEVENTH_FIGURES = {1: "65", 2: "43", 3: "42"}


def in_key(chord: Chord, key: Key) -> Chord:
    """``chord`` as read in ``key``: a diminished seventh chord that holds the key's leading
    tone has it as its root (the chord is symmetric, so the recognizer's root is only the bass
    or the first of four equal names: vii°7 in its inversions read as ii°7, iv°7 or vi°7);
    every other chord as it is."""
    lead = (key.tonic + 11) % 12
    if chord.quality == "dim7" and (lead - chord.root) % 3 == 0 and chord.root != lead:
        return Chord(chord.start, chord.end, lead, chord.quality, chord.bass, chord.score)
    return chord


def roman_numeral(chord: Chord, key: Key, *, inversion: bool = False) -> str:
    """Roman numeral of a chord in a key, e.g. ``"V7"``, ``"ii"``, ``"viio"``, ``"bVI"``.

    Case follows the quality (upper: major, augmented, dominant 7th, sus; lower: minor and
    diminished). In minor the raised leading-tone chords read ``"viio"``/``"viio7"`` as usual.

    Args:
        chord: The chord (``"N"`` gives ``"N"``).
        key: The key the numeral is relative to.
        inversion: Add the figured-bass inversion (``"6"``, ``"64"``, ``"65"``, ``"43"``,
            ``"42"``), read from the bass.

    Returns:
        The numeral.
    """
    if chord.quality == "N":
        return "N"
    chord = in_key(chord, key)
    degree = (chord.root - key.tonic) % 12
    base = (_MAJOR_DEGREES if key.mode == "major" else _MINOR_DEGREES)[degree]
    lower = chord.quality in _LOWER
    if key.mode == "minor" and degree == 11 and lower:
        base = "VII"  # the leading-tone chord: conventionally viio, not #viio
    accidental = base.rstrip("IV")
    numeral = accidental + (base[len(accidental) :].lower() if lower else base[len(accidental) :])
    mark = _QUALITY_MARK[chord.quality]
    if inversion and chord.bass >= 0 and chord.bass != chord.root:
        ivs = QUALITIES[chord.quality]
        bass_iv = (chord.bass - chord.root) % 12
        if bass_iv in ivs:
            pos = ivs.index(bass_iv)
            if len(ivs) == 4 and pos in _SEVENTH_FIGURES:
                return numeral + mark.replace("7", "") + _SEVENTH_FIGURES[pos]
            if pos in _TRIAD_FIGURES:
                return numeral + mark + _TRIAD_FIGURES[pos]
    return numeral + mark


def key_at(key: Key | Sequence[KeySegment], beat: float) -> Key:
    """The key at a beat: a fixed key, or the segment of a windowed analysis holding it."""
    if isinstance(key, Key):
        return key
    # segments are consecutive and sorted: the last one starting at or before the beat
    i = bisect.bisect_right([seg.start for seg in key], beat) - 1
    return key[max(i, 0)].key


# (degree above the tonic, quality) of the chords each mode holds (minor: natural and harmonic)
_DIATONIC = {
    "major": {(0, "maj"), (2, "min"), (4, "min"), (5, "maj"), (7, "maj"), (9, "min"),
              (11, "dim"), (0, "maj7"), (2, "min7"), (4, "min7"), (5, "maj7"), (7, "7"),
              (9, "min7"), (11, "hdim7")},
    "minor": {(0, "min"), (2, "dim"), (3, "maj"), (3, "aug"), (5, "min"), (7, "maj"),
              (7, "min"), (8, "maj"), (10, "maj"), (11, "dim"), (0, "min7"), (2, "hdim7"),
              (3, "maj7"), (5, "min7"), (7, "7"), (8, "maj7"), (10, "7"), (11, "dim7")},
}  # fmt: skip
_TRIAD_OF = {"maj": "maj", "7": "maj", "maj7": "maj", "min": "min", "min7": "min"}


def secondary_numeral(
    chord: Chord, target: Chord, key: Key, *, inversion: bool = False
) -> str | None:
    """``chord`` read as an applied chord of the ``target`` that follows it (``"V7/vi"``,
    ``"viio7/V"``, ``"V65/ii"``), or None: ``chord`` belongs to ``key`` as it is, or is no
    dominant (major triad, dominant seventh) a fifth above the target's root nor leading-tone
    chord (diminished, half-diminished, diminished seventh) a semitone below it, or the target
    is the tonic, silence or no major or minor chord."""
    if chord.quality == "N" or target.quality not in _TRIAD_OF:
        return None
    degree = (target.root - key.tonic) % 12
    if degree == 0 or (degree, _TRIAD_OF[target.quality]) not in _DIATONIC[key.mode]:
        return None
    own = in_key(chord, key)  # the key's own viio7 by its leading tone, whatever note named it
    if ((own.root - key.tonic) % 12, own.quality) in _DIATONIC[key.mode]:
        return None
    local = make_key(target.root, "major" if _TRIAD_OF[target.quality] == "maj" else "minor")
    dominant = chord.quality in _DOMINANT_QUALITIES and (chord.root - target.root) % 12 == 7
    leading = chord.quality in _LEADING_TONE_QUALITIES and (
        in_key(chord, local).root == (target.root - 1) % 12)  # fmt: skip
    if not (dominant or leading):
        return None
    of = roman_numeral(Chord(0.0, 0.0, target.root, _TRIAD_OF[target.quality], -1, 0.0), key)
    return roman_numeral(chord, local, inversion=inversion) + "/" + of


def progression(
    chords: Sequence[Chord], key: Key | Sequence[KeySegment], *, inversion: bool = False
) -> list[str]:
    """Roman numerals of the chords, silences and immediate repeats removed; a chromatic chord
    that resolves as an applied dominant or leading-tone chord of the next is named so
    (:func:`secondary_numeral`: ``III7 vi`` reads ``V7/vi vi``)."""
    sounding = [c for c in chords if c.quality != "N"]
    runs: list[tuple[Chord, str]] = []  # the first chord of each run of one numeral
    for c in sounding:
        rn = roman_numeral(c, key_at(key, c.start), inversion=inversion)
        if not runs or runs[-1][1] != rn:
            runs.append((c, rn))
    out = [rn for _, rn in runs]
    for i in range(len(runs) - 1):
        (c, _), (target, _) = runs[i], runs[i + 1]
        applied = secondary_numeral(c, target, key_at(key, c.start), inversion=inversion)
        if applied is not None:
            out[i] = applied
    return out


def ngram_counts(labels: Sequence[str], n: int) -> Counter:
    """Counts of each run of ``n`` consecutive labels (tuples as keys)."""
    return Counter(tuple(labels[i : i + n]) for i in range(len(labels) - n + 1))


def transition_matrix(
    labels: Sequence[str], states: Sequence[str] | None = None
) -> tuple[list[str], np.ndarray]:
    """First-order Markov transition matrix of a label sequence.

    Args:
        labels: The sequence (e.g. from :func:`progression`).
        states: State order; default: labels by descending frequency (ties by name).

    Returns:
        ``(states, P)`` with ``P[i, j]`` = P(next = states[j] | current = states[i]), shape
        (S, S); rows of states never followed by another are all zero.
    """
    if states is None:
        freq = Counter(labels)
        states = sorted(freq, key=lambda s: (-freq[s], s))
    states = list(states)
    index = {s: i for i, s in enumerate(states)}
    counts = np.zeros((len(states), len(states)))
    pairs = [
        (index[a], index[b]) for a, b in zip(labels[:-1], labels[1:]) if a in index and b in index
    ]
    if pairs:
        np.add.at(counts, tuple(np.array(pairs).T), 1.0)
    rows = counts.sum(1, keepdims=True)
    return states, np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)


# --------------------------------------------------------------------------------------------
# Cadences
# --------------------------------------------------------------------------------------------

CADENCE_KINDS = ("authentic", "half", "plagal", "deceptive")
_DOMINANT_QUALITIES = {"maj", "7"}
_LEADING_TONE_QUALITIES = {"dim", "dim7", "hdim7"}


@dataclass(frozen=True)
class Cadence:
    """A cadence arriving at ``beat``: kind, key, and the two Roman numerals."""

    beat: float
    kind: str
    key: str
    approach: str
    arrival: str


def classify_cadence(approach: Chord, arrival: Chord, key: Key) -> str | None:
    """The cadence kind of an approach -> arrival chord pair at a phrase end, or None.

    - authentic: V or V7 (or the leading-tone viio / viio7 / viiø7; a diminished seventh chord
      holding the leading tone is viio7 in any inversion, :func:`in_key`) -> I or i
    - plagal: IV or iv -> I or i
    - deceptive: V or V7 -> vi (major) / VI (minor)
    - half: the phrase ends on a major V (whatever comes before)
    """
    if "N" in (approach.quality, arrival.quality):
        return None
    approach = in_key(approach, key)
    a = (approach.root - key.tonic) % 12
    b = (arrival.root - key.tonic) % 12
    dominant = a == 7 and approach.quality in _DOMINANT_QUALITIES
    leading = a == 11 and approach.quality in _LEADING_TONE_QUALITIES
    tonic = b == 0 and arrival.quality in {"maj", "min"}
    if tonic and (dominant or leading):
        return "authentic"
    if tonic and a == 5 and approach.quality in {"maj", "min"}:
        return "plagal"
    submediant = (9, "min") if key.mode == "major" else (8, "maj")
    if dominant and (b, arrival.quality) == submediant:
        return "deceptive"
    if b == 7 and arrival.quality == "maj":
        return "half"
    return None


def detect_cadences(
    chords: Sequence[Chord],
    key: Key | Sequence[KeySegment],
    *,
    arrivals: Sequence[float] | None = None,
) -> list[Cadence]:
    """Cadences at phrase ends.

    Args:
        chords: Merged chords (:func:`recognize_chords`).
        key: A global key, or windowed key segments (each cadence is read in its local key).
        arrivals: Beats where phrases reach their final note (e.g.
            :func:`aurl.analysis.structure.phrase_boundaries`); the chord sounding there is
            the arrival chord and the chord before it the approach. Default: the last chord
            and every chord followed by silence.

    Returns:
        Cadences in time order (at most one per arrival chord).
    """
    sounding = [c for c in chords if c.quality != "N"]
    if len(sounding) < 2:
        return []
    if arrivals is None:  # the last chord before each silence, and the final chord
        picked, k = set(), -1
        for i, c in enumerate(chords):
            if c.quality == "N":
                continue
            k += 1
            if i + 1 == len(chords) or chords[i + 1].quality == "N":
                picked.add(k)
    else:
        starts = np.array([c.start for c in sounding])
        picked = {int(np.searchsorted(starts, t, side="right")) - 1 for t in arrivals}
    out = []
    for i in sorted(picked):
        if i < 1:
            continue
        arrival, approach = sounding[i], sounding[i - 1]
        local = key_at(key, arrival.start)
        kind = classify_cadence(approach, arrival, local)
        if kind:
            out.append(
                Cadence(
                    beat=arrival.start,
                    kind=kind,
                    key=local.name,
                    approach=roman_numeral(approach, local),
                    arrival=roman_numeral(arrival, local),
                )
            )
    return out


def arrival_cadences(
    notes: np.ndarray, arrivals: Sequence[float], key: Key | Sequence[KeySegment]
) -> list[bool]:
    """Whether each arrival (a beat where a phrase reaches its final note) arrives on a cadence:
    the chord sounding there (of :func:`recognize_chords` over ``notes``) and the one before it
    make one in ``key`` (:func:`detect_cadences`)."""
    chords = recognize_chords(notes)
    found = {c.beat for c in detect_cadences(chords, key, arrivals=arrivals)}
    starts = np.array([c.start for c in chords if c.quality != "N"])
    out = []
    for t in arrivals:  # the chord sounding at the arrival is the one detect_cadences judged
        i = int(np.searchsorted(starts, t, side="right")) - 1
        out.append(bool(i >= 0 and float(starts[i]) in found))
    return out
