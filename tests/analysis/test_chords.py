"""Chord recognition, Roman numerals, progression statistics and cadences on hand-built pieces."""

from __future__ import annotations

import numpy as np
import pytest

from aurl.analysis.chords import (
    QUALITIES,
    Chord,
    detect_cadences,
    ngram_counts,
    progression,
    recognize_chords,
    roman_numeral,
    transition_matrix,
)
from aurl.analysis.keys import KeySegment, estimate_key, parse_key
from aurl.data.notes import make_notes


def block_chords(voicings: list[list[int]], beats: float = 2.0) -> np.ndarray:
    """Each voicing held for ``beats``, one after the other."""
    parts = [make_notes([i * beats] * len(v), beats, v) for i, v in enumerate(voicings)]
    return np.sort(np.concatenate(parts), order=["onset", "pitch"])


C_MAJOR_I_IV_V_I = [[48, 64, 67, 72], [53, 65, 69, 72], [55, 62, 67, 71], [48, 64, 67, 72]]
BB_MAJOR_II_V_I = [[48, 58, 63, 67], [41, 57, 63, 67], [46, 57, 62, 65]]  # Cm7 F7 Bbmaj7


def test_i_iv_v_i_in_c():
    notes = block_chords(C_MAJOR_I_IV_V_I)
    key = estimate_key(notes)
    chords = recognize_chords(notes, resolution=2.0)
    assert key.name == "C major"
    assert [c.label for c in chords] == ["C", "F", "G", "C"]
    assert [(c.start, c.end) for c in chords] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert progression(chords, key) == ["I", "IV", "V", "I"]
    (cadence,) = detect_cadences(chords, key)
    assert (cadence.kind, cadence.approach, cadence.arrival, cadence.beat) == (
        "authentic", "V", "I", 6.0,
    )  # fmt: skip


def test_ii_v_i_in_b_flat():
    notes = block_chords(BB_MAJOR_II_V_I, beats=4.0)
    key = parse_key("Bb major")
    chords = recognize_chords(notes, resolution=2.0)  # half bars merge back into bars
    assert [c.label for c in chords] == ["Cm7", "F7", "Bbmaj7"]
    assert progression(chords, key) == ["ii7", "V7", "Imaj7"]
    assert estimate_key(notes).name == "Bb major"
    triads = block_chords([[48, 55, 63, 67], [41, 57, 60, 65], [46, 58, 62, 65]])
    assert progression(recognize_chords(triads, resolution=2.0), key) == ["ii", "V", "I"]


def test_applied_dominants_and_leading_tone_chords_are_named_by_their_target():
    """A chromatic chord resolving as the dominant (a fifth above) or leading-tone chord (a
    semitone below) of the next diatonic chord reads V7/vi, viio7/V..., not III7 or #ivo7;
    diatonic chords, and chords into the tonic or that do not resolve so, keep their numerals."""
    key = parse_key("C major")
    # C, E7, Am, F#dim7 over C (named by its bass), G, D7, G, C; then E7 into F (no resolution)
    voicings = [[48, 64, 67, 72], [52, 62, 68, 71], [45, 64, 69, 72], [48, 63, 66, 69],
                [43, 62, 67, 71], [50, 60, 66, 69], [43, 62, 67, 71], [48, 64, 67, 72],
                [52, 62, 68, 71], [53, 65, 69, 72]]  # fmt: skip
    chords = recognize_chords(block_chords(voicings), resolution=2.0)
    assert [c.label for c in chords] == ["C", "E7", "Am", "Cdim7", "G", "D7", "G", "C", "E7",
                                         "F"]  # fmt: skip
    assert progression(chords, key) == ["I", "V7/vi", "vi", "viio7/V", "V", "V7/V", "V", "I",
                                        "III7", "IV"]  # fmt: skip
    assert progression(chords, key, inversion=True)[1:4] == ["V7/vi", "vi", "viio43/V"]
    # in A minor the E major chord is the key's own V, and G#dim7 its own viio7
    minor = block_chords([[45, 64, 69, 72], [40, 62, 68, 71], [45, 64, 69, 72],
                          [44, 62, 65, 71], [45, 64, 69, 72]])  # fmt: skip
    assert progression(recognize_chords(minor, resolution=2.0), parse_key("A minor")) == [
        "i", "V7", "i", "viio7", "i"]  # fmt: skip


@pytest.mark.parametrize("quality", list(QUALITIES))
def test_every_template_is_recognised_in_root_position(quality):
    root = 2  # D
    pitches = [50 + i for i in QUALITIES[quality]]
    (chord,) = recognize_chords(make_notes([0.0] * len(pitches), 1.0, pitches))
    assert (chord.root, chord.quality, chord.bass) == (root, quality, root)


def test_passing_tone_does_not_make_a_seventh():
    # C major triad in four voices for a beat; the soprano passes through B for an eighth
    notes = make_notes([0, 0, 0, 0, 0.5], [1, 1, 1, 0.5, 0.5], [48, 55, 64, 72, 71])
    (chord,) = recognize_chords(notes)
    assert chord.label == "C"


def test_inversions_and_labels():
    notes = block_chords([[52, 60, 67], [55, 60, 64], [53, 59, 62, 67]], beats=1.0)  # C/E C/G G7/F
    chords = recognize_chords(notes, merge=False)  # C/E and C/G would merge into one C
    key = parse_key("C")
    assert [c.label for c in chords] == ["C/E", "C/G", "G7/F"]
    assert [roman_numeral(c, key, inversion=True) for c in chords] == ["I6", "I64", "V42"]


def test_a_diminished_seventh_with_the_leading_tone_is_viio7_in_every_inversion():
    """B D F Ab voiced from each of its notes: the recognizer's root follows the bass (the
    chord is symmetric), the numeral in C minor and C major is viio7 with the inversion's
    figure, and each resolves to the tonic as an authentic cadence. Eb Gb A C, which lacks the
    leading tone, keeps its own root."""
    voicings = [[47, 62, 65, 68], [50, 59, 65, 68], [53, 59, 62, 68], [44, 59, 62, 65]]
    for key in ("c", "C"):
        k = parse_key(key)
        tonic = [48, 63 if key == "c" else 64, 67, 72]
        numerals = []
        for v in voicings:
            chords = recognize_chords(block_chords([v, tonic], beats=1.0), merge=False)
            assert chords[0].quality == "dim7" and chords[0].root == v[0] % 12  # bass as root
            numerals.append(roman_numeral(chords[0], k, inversion=True))
            found = detect_cadences(chords, k, arrivals=[1.0])
            assert [(c.kind, c.approach) for c in found] == [("authentic", "viio7")]
        assert numerals == ["viio7", "viio65", "viio43", "viio42"]
    other = Chord(0.0, 1.0, 3, "dim7", 3, 1.0)  # Eb dim7: no B
    assert roman_numeral(other, parse_key("c")) == "iiio7"


@pytest.mark.parametrize(
    ("root", "quality", "key", "numeral"),
    [
        (11, "dim", "C", "viio"),
        (11, "dim7", "c", "viio7"),
        (11, "hdim7", "C", "viiø7"),
        (10, "maj", "c", "VII"),
        (8, "maj", "C", "bVI"),
        (1, "maj", "c", "bII"),
        (7, "7", "c", "V7"),
        (3, "aug", "c", "III+"),
        (2, "min7", "C", "ii7"),
    ],
)
def test_roman_numerals(root, quality, key, numeral):
    chord = Chord(0.0, 1.0, root, quality, root, 1.0)
    assert roman_numeral(chord, parse_key(key)) == numeral


def _chords(spec: list[tuple[int, str]]) -> list[Chord]:
    return [Chord(float(i), float(i + 1), r, q, r, 1.0) for i, (r, q) in enumerate(spec)]


@pytest.mark.parametrize(
    ("spec", "key", "kind", "arrival"),
    [
        ([(0, "maj"), (5, "maj"), (7, "maj")], "C", "half", "V"),
        ([(0, "maj"), (5, "maj"), (0, "maj")], "C", "plagal", "I"),
        ([(0, "maj"), (7, "7"), (9, "min")], "C", "deceptive", "vi"),
        ([(9, "min"), (4, "7"), (5, "maj")], "a", "deceptive", "VI"),
        ([(9, "min"), (8, "dim7"), (9, "min")], "a", "authentic", "i"),
        ([(9, "min"), (4, "maj"), (9, "maj")], "a", "authentic", "I"),  # Picardy third
        ([(0, "maj"), (2, "min"), (9, "min")], "C", None, None),
    ],
)
def test_cadence_kinds(spec, key, kind, arrival):
    found = detect_cadences(_chords(spec), parse_key(key))
    assert [(c.kind, c.arrival) for c in found] == ([(kind, arrival)] if kind else [])


def test_cadences_at_phrase_arrivals_in_local_keys():
    # C: I V | I   then G: IV V I (arrivals at beats 1 and 5)
    chords = _chords([(0, "maj"), (7, "maj"), (0, "maj"), (0, "maj"), (2, "maj"), (7, "maj")])
    chords = [chords[0], chords[1], chords[2], chords[4], chords[5]]  # drop the repeated I
    segments = [
        KeySegment(0.0, 3.0, parse_key("C")),
        KeySegment(3.0, 6.0, parse_key("G")),
    ]
    found = detect_cadences(chords, segments, arrivals=[1.0, 5.0])
    assert [(c.beat, c.kind, c.key, c.approach, c.arrival) for c in found] == [
        (1.0, "half", "C major", "I", "V"),
        (5.0, "authentic", "G major", "V", "I"),
    ]


def test_ngram_counts_and_transition_matrix():
    labels = ["I", "IV", "V", "I", "V", "I"]
    assert ngram_counts(labels, 2) == {
        ("I", "IV"): 1, ("IV", "V"): 1, ("V", "I"): 2, ("I", "V"): 1,
    }  # fmt: skip
    assert ngram_counts(labels, 3)[("V", "I", "V")] == 1
    states, matrix = transition_matrix(labels)
    assert states == ["I", "V", "IV"]  # by frequency
    np.testing.assert_allclose(matrix, [[0, 0.5, 0.5], [1, 0, 0], [0, 1, 0]])


def test_silence_and_empty_input():
    notes = block_chords(C_MAJOR_I_IV_V_I[:1], beats=1.0)
    later = make_notes([3.0, 3.0, 3.0], 1.0, [55, 59, 62])
    chords = recognize_chords(np.concatenate([notes, later]))
    assert [c.label for c in chords] == ["C", "N", "G"]
    assert recognize_chords(make_notes([], [], [])) == []
