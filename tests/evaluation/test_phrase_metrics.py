"""Phrase and cadence metrics against values computed by hand on a tiny chorale-like piece."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from aurl.data.notes import empty_notes, make_notes, notes_from_file
from aurl.evaluation import phrases as P
from aurl.evaluation.report import evaluate_sets, write_report

FIXTURES = Path(__file__).parents[1] / "fixtures" / "midi"

# Four-voice chords in C major, one beat each (bass, tenor, alto, soprano).
CHORDS = {
    "C": [48, 64, 67, 72],
    "F": [53, 65, 69, 72],
    "G": [43, 62, 67, 71],
    "Am": [45, 64, 69, 72],
}


def _piece(seq: list[tuple[float, str]]) -> np.ndarray:
    onset = [t for t, c in seq for _ in CHORDS[c]]
    pitch = [p for _, c in seq for p in CHORDS[c]]
    return make_notes(onset=onset, duration=1.0, pitch=pitch)


# Phrase 1, beats 0-4: C F G C (V -> I, an authentic cadence at its arrival, beat 3); a rest of
# one beat (>= the median inter-onset interval, 1) closes it. Phrase 2, beats 5-9: C G F Am
# (IV -> vi: no cadence). The soprano's 8 notes, 4 per phrase.
OPEN_END = _piece([(0, "C"), (1, "F"), (2, "G"), (3, "C"), (5, "C"), (6, "G"), (7, "F"), (8, "Am")])
# The same first phrase; the second ends C F G C: authentic again.
CLOSED_END = _piece(
    [(0, "C"), (1, "F"), (2, "G"), (3, "C"), (5, "C"), (6, "F"), (7, "G"), (8, "C")]
)


def test_phrase_metrics_by_hand():
    a = P.analyze_phrases(OPEN_END)
    assert [(ph.start, ph.end) for ph in a.phrases] == [(0.0, 4.0), (5.0, 9.0)]
    assert [(c.beat, c.kind) for c in a.cadences] == [(3.0, "authentic")]
    assert P.cadences_per_phrase(a) == 1 / 2  # 1 cadence, 2 phrases
    assert P.cadences_per_beat(a) == 1 / 9  # 1 cadence over beats 0..9
    assert P.ends_on_cadence(a) == 0.0  # the last phrase ends IV -> vi
    assert P.phrase_length_mean(a) == 4.0  # (4 + 4) / 2
    b = P.analyze_phrases(CLOSED_END)
    assert P.cadences_per_phrase(b) == 1.0  # 2 / 2
    assert P.cadences_per_beat(b) == 2 / 9
    assert P.ends_on_cadence(b) == 1.0


def test_phrase_length_histogram_by_hand():
    # bins [0,2) [2,4) [4,6) [6,8) [8,12) [12,16) [16,inf): 1.5 | 4, 5 | 8 | 20
    got = P.phrase_length_histogram(np.array([1.5, 4.0, 5.0, 8.0, 20.0]))
    np.testing.assert_array_equal(got, [0.2, 0.0, 0.4, 0.0, 0.2, 0.0, 0.2])
    assert np.isnan(P.phrase_length_histogram(np.zeros(0))).all()


def test_undefined_is_nan():
    for notes in (empty_notes(), make_notes(onset=[0], duration=1.0, pitch=[60])):
        a = P.analyze_phrases(notes)
        for name, fn in P.PHRASE_METRICS.items():
            if name != "phrases":
                assert math.isnan(fn(a)), name


def test_a_real_chorale_ends_on_a_cadence():
    # BWV 66.6 ends IV -> I (plagal) in F# minor's Picardy major; read from the MIDI file
    a = P.analyze_phrases(notes_from_file(FIXTURES / "bach_bwv66.6.mid"))
    assert P.ends_on_cadence(a) == 1.0
    assert a.cadences[-1].kind == "plagal"
    assert 0 < P.cadences_per_beat(a) < 1


def test_the_evaluation_report_compares_phrases(tmp_path):
    generated = [OPEN_END, OPEN_END, empty_notes()]
    reference = [CLOSED_END, OPEN_END]
    results, gen, ref = evaluate_sets(generated, reference)
    ph = results["phrases"]
    assert ph["generated"]["ends_on_cadence"] == {"mean": 0.0, "std": 0.0, "defined": 2}
    assert ph["reference"]["ends_on_cadence"]["mean"] == 0.5  # one of two closes
    assert ph["reference"]["cadences_per_beat"]["mean"] == (2 / 9 + 1 / 9) / 2
    assert ph["generated"]["phrase_length_histogram"][2] == 1.0  # every phrase 4 beats long
    report = write_report(tmp_path, results).read_text()
    assert "## Phrases and cadences" in report
    assert "| ends_on_cadence | 0.000 ± 0.000 | 0.500 ± 0.500 | 2 / 2 |" in report


def test_phrases_at_known_ends_by_hand():
    # OPEN_END with its phrase ends given (fermata-like): arrivals at beats 3 and 8
    a = P.analyze_phrases_at(OPEN_END, np.array([[3.0, 4.0], [8.0, 9.0]]))
    assert [(ph.start, ph.end, ph.arrival, ph.notes) for ph in a.phrases] == [
        (0.0, 4.0, 3.0, 4),
        (4.0, 9.0, 8.0, 4),
    ]
    assert [(c.beat, c.kind) for c in a.cadences] == [(3.0, "authentic")]
    assert P.ends_on_cadence(a) == 0.0
    # one phrase end only, at beat 2 (on G, after F): a half cadence, and it is the last one
    b = P.analyze_phrases_at(CLOSED_END, np.array([[2.0, 3.0]]))
    assert [(c.beat, c.kind) for c in b.cadences] == [(2.0, "half")]
    assert P.ends_on_cadence(b) == 1.0
    assert P.analyze_phrases_at(CLOSED_END, np.zeros((0, 2))).phrases == []


def test_phrase_end_matches_by_hand():
    a = P.analyze_phrases(OPEN_END)  # skyline arrivals at beats 3 and 8
    # known ends at 3 (matched exactly), 7.6 (0.4 from 8: matched), 20 (nothing near)
    known = np.array([[3.0, 4.0], [7.6, 8.0], [20.0, 21.0]])
    assert P.phrase_end_matches(a.phrases, known, tolerance=0.5) == (2, 2, 3)
    assert P.phrase_end_matches(a.phrases, known, tolerance=0.25) == (1, 2, 3)
    # one detected arrival matches one known end only
    assert P.phrase_end_matches(a.phrases, np.array([[2.9, 3.0], [3.1, 4.0]])) == (1, 2, 2)
