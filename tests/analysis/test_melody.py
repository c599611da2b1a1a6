"""Melody extraction, contour, intervals and motifs on hand-built melodies."""

from __future__ import annotations

import math

import numpy as np

from aurl.analysis.melody import (
    find_motifs,
    interval_histogram,
    melody_stats,
    parsons_code,
    skyline,
    sounding_extreme,
)
from aurl.data.notes import DRUM_PROGRAM, make_notes

# C D E C | F G E D | G A B G | C' B A G : the motif C-D-E-C comes back a fifth higher at beat 8
MOTIF_MELODY = make_notes(
    np.arange(16.0), 1.0, [60, 62, 64, 60, 65, 67, 64, 62, 67, 69, 71, 67, 72, 71, 69, 67]
)


def test_transposed_motif_is_found():
    motifs = find_motifs(MOTIF_MELODY)
    best = motifs[0]
    # C D E C F and G A B G C: the 5-note pattern (+2 +2 -4 +5) at notes 0 and 8, a fifth apart
    assert best.intervals == (2, 2, -4, 5)
    assert best.starts == (0, 8) and best.onsets == (0.0, 8.0)
    assert best.transpositions == (0, 7)
    # its pieces (+2 +2 -4, ...) occur nowhere else, so they are not listed separately
    assert all(m.count > 2 or len(m.intervals) == 4 for m in motifs)


def test_no_motif_in_a_scale_without_repeats():
    assert find_motifs(make_notes(np.arange(6.0), 1.0, [60, 62, 65, 70, 71, 79])) == []
    assert find_motifs(make_notes(np.arange(8.0), 1.0, [60] * 8)) == []  # repeated notes only


def test_interval_histogram_and_stats():
    hist = interval_histogram(MOTIF_MELODY)
    assert hist[2] == 5 and hist[-2] == 3 and hist[5] == 3 and hist[-4] == 2 and hist[-1] == 1
    assert sum(hist.values()) == 15
    stats = melody_stats(MOTIF_MELODY)
    assert (stats.lowest, stats.highest, stats.range) == (60, 72, 12)
    assert (stats.steps, stats.leaps, stats.repeats) == (9, 6, 0)
    assert stats.step_leap_ratio == 1.5
    assert stats.mean_abs_interval == (5 * 2 + 3 * 2 + 1 + 3 * 5 + 2 * 4 + 1 * 3) / 15
    assert math.isnan(melody_stats(make_notes([0.0], [1.0], [60])).step_leap_ratio)


def test_parsons_code():
    assert parsons_code(make_notes(np.arange(5.0), 1.0, [60, 62, 62, 59, 64])) == "*URDU"
    assert parsons_code(make_notes([], [], [])) == ""


def test_skyline_keeps_the_top_voice():
    # soprano E5 held two beats while the alto moves C5 -> D5; bass below; a drum on top
    notes = make_notes(
        [0, 0, 0, 1, 2, 2, 0],
        [2, 1, 2, 1, 1, 1, 4],
        [76, 72, 48, 74, 77, 50, 90],
        program=[0, 0, 0, 0, 0, 0, DRUM_PROGRAM],
    )
    mel = skyline(notes)
    assert mel["pitch"].tolist() == [76, 77]
    assert mel["duration"].tolist() == [2.0, 1.0]
    plain = skyline(notes, drop_covered=False)  # classic skyline: the alto's D5 gets in
    assert plain["pitch"].tolist() == [76, 74, 77]
    assert plain["duration"].tolist() == [1.0, 1.0, 1.0]


def test_sounding_extreme_equals_brute_force():
    rng = np.random.default_rng(0)
    n = 60
    notes = make_notes(
        rng.integers(0, 40, n) / 2, rng.integers(1, 8, n) / 2, rng.integers(40, 80, n)
    )
    start = rng.uniform(0, 24, 50)
    end = start + rng.uniform(0.01, 3, 50)
    ends = notes["onset"] + notes["duration"]
    overlap = (notes["onset"][None, :] < end[:, None]) & (ends[None, :] > start[:, None])
    pitch = notes["pitch"][None, :].astype(int)
    expect_hi = np.where(overlap.any(1), np.where(overlap, pitch, -1).max(1), -1)
    expect_lo = np.where(overlap.any(1), np.where(overlap, pitch, 999).min(1), -1)
    np.testing.assert_array_equal(sounding_extreme(notes, start, end, highest=True), expect_hi)
    np.testing.assert_array_equal(sounding_extreme(notes, start, end, highest=False), expect_lo)
