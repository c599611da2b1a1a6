"""Key names, scales and key finding on hand-built note arrays."""

from __future__ import annotations

import numpy as np
import pytest

from aurl.analysis.keys import (
    chroma,
    estimate_key,
    estimate_keys_windowed,
    key_scores,
    modulations,
    parse_key,
    pitch_class_histogram,
    scale_pitch_classes,
)
from aurl.data.notes import DRUM_PROGRAM, make_notes
from aurl.errors import ConfigError, DataError


@pytest.mark.parametrize(
    ("name", "tonic", "mode", "label"),
    [
        ("D minor", 2, "minor", "D minor"),
        ("Bb major", 10, "major", "Bb major"),
        ("f#", 6, "minor", "F# minor"),
        ("A", 9, "major", "A major"),
        ("Dm", 2, "minor", "D minor"),
        ("e-", 3, "minor", "Eb minor"),
        ("c# min", 1, "minor", "C# minor"),
        ("Gb major", 6, "major", "F# major"),
    ],
)
def test_parse_key(name, tonic, mode, label):
    key = parse_key(name)
    assert (key.tonic, key.mode, key.name) == (tonic, mode, label)


@pytest.mark.parametrize("bad", ["H dur", "", "C lydian-ish", "X minor", "12"])
def test_parse_key_rejects_unknown_names(bad):
    with pytest.raises(ConfigError, match="unknown key"):
        parse_key(bad)


def test_scale_pitch_classes():
    assert scale_pitch_classes("D minor").tolist() == [2, 4, 5, 7, 9, 10, 0]
    assert scale_pitch_classes(parse_key("Bb major")).tolist() == [10, 0, 2, 3, 5, 7, 9]
    assert scale_pitch_classes("a", minor="harmonic").tolist() == [9, 11, 0, 2, 4, 5, 8]


def test_key_signature_and_relative():
    assert parse_key("Bb major").sharps == -2
    assert parse_key("g").sharps == -2
    assert parse_key("E major").sharps == 4
    assert parse_key("g").relative.name == "Bb major"


def test_chroma_is_exact_overlap():
    notes = make_notes([0.0, 1.5, 0.0], [2.0, 1.0, 4.0], [60, 60, 64], program=[0, 0, DRUM_PROGRAM])
    out = chroma(notes, np.array([0.0, 1.0, 2.0, 3.0]))
    assert out.shape == (3, 12)
    np.testing.assert_allclose(out[:, 0], [1.0, 1.5, 0.5])
    assert out[:, 4].sum() == 0.0  # the drum note is not a pitch class


def test_key_scores_equal_numpy_pearson():
    hist = pitch_class_histogram(make_notes(np.arange(5), [1, 2, 1, 3, 1], [60, 62, 64, 65, 67]))
    from aurl.analysis.keys import PROFILES

    major = np.asarray(PROFILES["krumhansl"][0])
    expected = np.corrcoef(hist, np.roll(major, 7))[0, 1]  # G major: profile moved up 7
    assert key_scores(hist, "krumhansl")[7] == pytest.approx(expected)


def test_estimate_key_major_and_minor():
    c_scale = make_notes(np.arange(8), 1.0, [60, 62, 64, 65, 67, 69, 71, 72])
    assert estimate_key(c_scale).name == "C major"
    # d minor: i - iv6 - V - i with C# leading tone
    d_minor = make_notes(
        np.repeat(np.arange(4.0), 3), 1.0, [62, 65, 69, 62, 67, 70, 61, 64, 69, 62, 65, 69]
    )
    key = estimate_key(d_minor)
    assert key.name == "D minor" and 0 < key.confidence <= 1


def test_final_bass_settles_relative_keys():
    # A C-major-leaning tune whose last bass note decides between C major and A minor
    melody = make_notes(np.arange(12.0), 1.0, [60, 64, 67, 72, 71, 69, 67, 65, 64, 62, 60, 69])
    ending_on_a = np.concatenate([melody, make_notes([11.0], [1.0], [45])])
    ending_on_c = np.concatenate([melody, make_notes([11.0], [1.0], [48])])
    assert estimate_key(ending_on_a, final_bass_weight=0.0).name == "C major"
    assert estimate_key(ending_on_a).name == "A minor"
    assert estimate_key(ending_on_c).name == "C major"


@pytest.mark.parametrize(
    "notes",
    [
        make_notes([], [], []),
        make_notes([0.0], [1.0], [60]),
        make_notes([0.0, 1.0], 1.0, [36, 38], program=DRUM_PROGRAM),
    ],
    ids=["empty", "single-note", "drums-only"],
)
def test_estimate_key_without_evidence_raises(notes):
    with pytest.raises(DataError, match="cannot estimate a key"):
        estimate_key(notes)


def test_windowed_keys_find_the_modulation():
    c_major = [0, 2, 4, 5, 7, 9, 11]
    a_major = [9, 11, 13, 14, 16, 18, 20]
    first = make_notes(np.arange(32.0), 1.0, [60 + c_major[i % 7] for i in range(32)])
    second = make_notes(np.arange(32.0, 64.0), 1.0, [60 + a_major[i % 7] for i in range(32)])
    segments = estimate_keys_windowed(np.concatenate([first, second]), hop=4.0, window=8.0)
    assert [s.key.name for s in segments] == ["C major", "A major"]
    assert segments[0].start == 0.0 and segments[-1].end == 64.0
    assert 28.0 <= segments[1].start <= 32.0
    ((beat, old, new),) = modulations(segments)
    assert (old.name, new.name) == ("C major", "A major") and beat == segments[1].start


def test_chroma_equals_sampled_brute_force():
    rng = np.random.default_rng(1)
    n = 40
    notes = make_notes(
        rng.integers(0, 32, n) / 4, rng.integers(1, 12, n) / 4, rng.integers(48, 84, n)
    )
    edges = np.array([0.0, 0.8, 2.0, 3.3, 5.0, 8.0, 11.0])
    # sounding time per pitch class on a fine grid of midpoints (exact for quarter-beat notes
    # and edges on a 0.1 grid)
    grid = np.arange(0, 11.0, 0.05) + 0.025
    ends = notes["onset"] + notes["duration"]
    sounding = (notes["onset"][None, :] <= grid[:, None]) & (ends[None, :] > grid[:, None])
    expect = np.zeros((len(edges) - 1, 12))
    cell = np.searchsorted(edges, grid, side="right") - 1
    for i, pc in zip(*np.nonzero(sounding)):
        expect[cell[i], notes["pitch"][pc] % 12] += 0.05
    np.testing.assert_allclose(chroma(notes, edges), expect, atol=1e-9)
