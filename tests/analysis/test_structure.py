"""Self-similarity, segmentation, repeats, form labels and phrases on hand-built pieces."""

from __future__ import annotations

import numpy as np

from aurl.analysis.structure import (
    analyze_structure,
    bar_features,
    find_repeats,
    label_sections,
    novelty,
    phrase_boundaries,
    self_similarity,
)
from aurl.data.notes import make_notes

A_MELODY = [(0, 1, 72), (1, 1, 74), (2, 2, 76), (4, 1, 77), (5, 1, 76), (6, 1, 74), (7, 1, 72),
            (8, 2, 71), (10, 2, 74), (12, 4, 72)]  # fmt: skip
A_CHORDS = [[48, 52, 55], [53, 57, 60], [55, 59, 62], [48, 52, 55]]  # C F G C, a bar each
B_MELODY = [(0, .5, 81), (.5, .5, 79), (1, .5, 77), (1.5, .5, 76), (2, 1, 74), (3, 1, 76),
            (4, 3, 77), (7, 1, 69), (8, .5, 67), (8.5, .5, 69), (9, 1, 71), (10, 2, 74),
            (12, 2, 79), (14, 2, 67)]  # fmt: skip
B_CHORDS = [[45, 48, 52], [50, 53, 57], [52, 56, 59], [43, 47, 50]]  # Am Dm E G


def section(t0: float, melody, chords) -> list[np.ndarray]:
    parts = [make_notes([t0 + o for o, _, _ in melody], [d for _, d, _ in melody],
                        [p for _, _, p in melody])]  # fmt: skip
    parts += [make_notes([t0 + 4 * b] * 3, 4.0, c) for b, c in enumerate(chords)]
    return parts


def aaba() -> np.ndarray:
    """32-bar-song form in miniature: four 4-bar sections A A B A (16 bars of 4/4)."""
    plan = [(A_MELODY, A_CHORDS), (A_MELODY, A_CHORDS), (B_MELODY, B_CHORDS), (A_MELODY, A_CHORDS)]
    parts = [p for i, (m, c) in enumerate(plan) for p in section(16.0 * i, m, c)]
    return np.sort(np.concatenate(parts), order=["onset", "pitch"])


def test_aaba_form():
    s = analyze_structure(aaba())
    assert s.boundaries == [0, 4, 8, 12, 16]
    assert s.form == "A A B A"
    assert [(x.start, x.end) for x in s.sections] == [(0, 4), (4, 8), (8, 12), (12, 16)]
    # A comes back at bars 4 and 12 (from bar 0) and at 12 (from bar 4)
    assert {(r.first, r.second, r.length) for r in s.repeats} == {(0, 4, 4), (0, 12, 4), (4, 12, 4)}
    assert s.similarity.shape == (16, 16)


def test_varied_return_gets_a_prime():
    # A, B, then A with its last bar's melody and chord changed: A'
    varied = [(o, d, p) for o, d, p in A_MELODY if o < 12] + [(12, 2, 81), (14, 2, 79)]
    parts = section(0.0, A_MELODY, A_CHORDS) + section(16.0, B_MELODY, B_CHORDS)
    parts += section(32.0, varied, A_CHORDS[:3] + [[50, 53, 57]])
    s = analyze_structure(np.sort(np.concatenate(parts), order=["onset", "pitch"]))
    assert s.form == "A B A'"


def test_similarity_matrix_properties():
    sim = self_similarity(bar_features(aaba()))
    np.testing.assert_allclose(sim, sim.T)
    np.testing.assert_allclose(np.diag(sim), 1.0)
    assert sim[0, 4] == 1.0 and sim[1, 13] == 1.0  # identical bars
    assert sim[0, 8] < 0.5  # A's first bar against B's


def test_novelty_peaks_at_the_change():
    # two contrasting halves of 4 bars each: the one strong change is at bar line 4
    low = make_notes(np.arange(16.0), 1.0, [48, 52, 55, 52] * 4)
    high = make_notes(np.arange(16.0, 32.0), 0.5, [73, 78, 75, 80] * 4)
    nov = novelty(self_similarity(bar_features(np.concatenate([low, high]))), half_width=2)
    assert nov.shape == (9,) and int(np.argmax(nov)) == 4 and nov[4] == 1.0


def test_repeats_and_labels_on_a_hand_made_matrix():
    sim = np.eye(6)
    sim[0, 3] = sim[3, 0] = sim[1, 4] = sim[4, 1] = sim[2, 5] = sim[5, 2] = 0.95
    (rep,) = find_repeats(sim, threshold=0.9, min_bars=2)
    assert (rep.first, rep.second, rep.length) == (0, 3, 3)
    assert [s.label for s in label_sections(sim, [0, 3, 6])] == ["A", "A"]


def test_phrases_end_at_rests_and_long_notes():
    # 4 quarters + half note | rest | 3 quarters + whole note
    onsets = [0, 1, 2, 3, 4, 7, 8, 9, 10]
    durations = [1, 1, 1, 1, 2, 1, 1, 1, 4]
    phrases = phrase_boundaries(make_notes(onsets, durations, [60, 62, 64, 65, 67, 65, 64, 62, 60]))
    assert [(p.start, p.end, p.arrival, p.notes) for p in phrases] == [
        (0.0, 6.0, 4.0, 5),
        (7.0, 14.0, 10.0, 4),
    ]


def test_empty_piece():
    s = analyze_structure(make_notes([], [], []))
    assert s.sections == [] and s.form == ""
    assert phrase_boundaries(make_notes([], [], [])) == []


def test_phrase_cadences_reads_each_arrival_and_the_last() -> None:
    from aurl.analysis.structure import Phrase, phrase_cadences

    # one four-voice chord per beat in C major: C F G C | C G F Am
    chords = {"C": [48, 64, 67, 72], "F": [53, 65, 69, 72], "G": [43, 62, 67, 71],
              "Am": [45, 64, 69, 72]}  # fmt: skip
    names = ["C", "F", "G", "C", "C", "G", "F", "Am"]
    notes = make_notes(
        onset=[float(i) for i, c in enumerate(names) for _ in chords[c]],
        duration=1.0,
        pitch=[p for c in names for p in chords[c]],
    )
    first, second = Phrase(0.0, 4.0, 3.0, 4), Phrase(4.0, 8.0, 7.0, 4)
    cadences, last = phrase_cadences(notes, [first, second])
    assert [(c.beat, c.kind, c.approach, c.arrival) for c in cadences] == [
        (3.0, "authentic", "V", "I")
    ]
    assert last is None  # F -> Am closes nothing
    cadences, last = phrase_cadences(notes, [first])
    assert last is not None and (last.beat, last.kind) == (3.0, "authentic")
    assert phrase_cadences(notes, []) == ([], None)


def test_a_piece_past_the_bar_cap_is_read_in_groups_of_bars():
    """6,000 half-beat bars: the self-similarity is of 2,000 groups of three (1.5 beats), not
    a 6,000 x 6,000 matrix (a piece of 32,000 quarter-beat bars once asked 8 GB); a piece
    under the cap keeps its bars."""
    from aurl.analysis.structure import MAX_BARS, analyze_structure

    onsets = np.arange(0, 3000, 0.5)
    notes = make_notes(onsets, 0.5, 60 + np.arange(len(onsets)) % 16)
    s = analyze_structure(notes, beats_per_bar=0.5)
    assert s.beats_per_bar == 1.5 and s.similarity.shape == (2000, 2000) <= (MAX_BARS, MAX_BARS)
    short = analyze_structure(notes[:400], beats_per_bar=4.0)
    assert short.beats_per_bar == 4.0 and short.similarity.shape == (50, 50)
