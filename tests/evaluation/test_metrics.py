"""Each metric against a value computed by hand on a tiny piece (see the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aurl.analysis.keys import parse_key
from aurl.data.notes import DRUM_PROGRAM, empty_notes, make_notes, notes_from_file
from aurl.evaluation import metrics as m

# Sorted: (0, 60, d1) (0, 64, d2) (1, 62, d1) (2, 60, d1) (2, 67, d1) (3, 72, d1); ends at beat 4.
PIECE = make_notes(
    onset=[0, 0, 1, 2, 2, 3],
    duration=[1, 2, 1, 1, 1, 1],
    pitch=[60, 64, 62, 60, 67, 72],
    velocity=[60, 80, 100, 60, 80, 100],
)
# Onsets 0, 0.5, 2, 4, 5 (eighth notes): used for rhythm metrics.
RHYTHM = make_notes(onset=[0, 0.5, 2, 4, 5], duration=0.5, pitch=[60, 62, 64, 65, 67])


def test_pitch_counts_and_range() -> None:
    assert m.pitch_range(PIECE) == 12  # 72 - 60
    assert m.pitches_used(PIECE) == 5  # 60 62 64 67 72
    assert m.pitch_classes_used(PIECE) == 4  # C D E G


def test_drums_are_left_out_of_pitch_metrics() -> None:
    drum = make_notes(onset=[0], duration=[1], pitch=[36], program=DRUM_PROGRAM)
    with_drum = np.sort(np.concatenate([PIECE, drum]), order=["onset", "pitch"])
    assert m.pitch_range(with_drum) == 12
    assert m.note_density(with_drum) == pytest.approx(7 / 4)  # time metrics keep drums


def test_pitch_entropy() -> None:
    # counts 60:2, others 1 each of 6 -> -(1/3 log2 1/3) - 4 (1/6 log2 1/6)
    expected = (1 / 3) * math.log2(3) + (4 / 6) * math.log2(6)
    assert m.pitch_entropy(PIECE) == pytest.approx(expected)
    assert expected == pytest.approx(2.2516291673878226)


def test_pitch_class_entropy_and_histogram() -> None:
    # classes: C 3 (60, 60, 72), D 1, E 1, G 1 -> p = 1/2, 1/6, 1/6, 1/6
    assert m.pitch_class_entropy(PIECE) == pytest.approx(0.5 + 0.5 * math.log2(6))
    hist = m.pitch_class_histogram(PIECE)
    expected = np.zeros(12)
    expected[[0, 2, 4, 7]] = [1 / 2, 1 / 6, 1 / 6, 1 / 6]
    np.testing.assert_allclose(hist, expected)


def test_pitch_class_entropy_is_log2_12_for_chromatic_scale() -> None:
    chromatic = make_notes(onset=np.arange(12), duration=1, pitch=np.arange(60, 72))
    assert m.pitch_class_entropy(chromatic) == pytest.approx(math.log2(12))


def test_pitch_in_scale_rate_and_scale_consistency() -> None:
    # D major holds D E G of the six notes (C C C D E G): 3 / 6.
    assert m.pitch_in_scale_rate(PIECE, "D major") == pytest.approx(0.5)
    assert m.pitch_in_scale_rate(PIECE, parse_key("C major")) == 1.0
    # A natural minor = C major's classes; C minor holds C C C D G of six.
    assert m.pitch_in_scale_rate(PIECE, "A minor") == 1.0
    assert m.pitch_in_scale_rate(PIECE, "C minor") == pytest.approx(5 / 6)
    # no key given: the key finder's key (C major here)
    assert m.pitch_in_scale_rate(PIECE) == 1.0
    one_class = make_notes(onset=[0, 1], duration=1, pitch=[60, 72])
    assert math.isnan(m.pitch_in_scale_rate(one_class))  # no key can be found
    assert m.scale_consistency(PIECE) == 1.0
    # C C# D E: no diatonic scale holds three chromatic neighbours, best is 3 of 4.
    cluster = make_notes(onset=[0, 1, 2, 3], duration=1, pitch=[60, 61, 62, 64])
    assert m.scale_consistency(cluster) == pytest.approx(0.75)


def test_polyphony_and_rate() -> None:
    # sounding pitches per beat: {60,64} {64,62} {60,67} {72} -> 2 2 2 1
    assert m.polyphony(PIECE) == pytest.approx(7 / 4)
    assert m.polyphony(PIECE, resolution=1) == pytest.approx(7 / 4)
    assert m.polyphony_rate(PIECE) == pytest.approx(3 / 4)
    assert m.polyphony_rate(PIECE, threshold=3) == 0.0


def test_polyphony_counts_only_busy_steps() -> None:
    # two beats of a dyad, a two-beat rest, one beat of a single note
    gap = make_notes(onset=[0, 0, 4], duration=[2, 2, 1], pitch=[60, 64, 67])
    assert m.polyphony(gap) == pytest.approx(5 / 3)
    assert m.polyphony_rate(gap) == pytest.approx(2 / 5)


def test_empty_beat_rate() -> None:
    assert m.empty_beat_rate(PIECE) == 0.0
    # [0, 1) fills beat 0; [3, 4.5) fills beats 3 and 4; beats 1 and 2 of 5 are empty.
    gap = make_notes(onset=[0, 3], duration=[1, 1.5], pitch=[60, 62])
    assert m.empty_beat_rate(gap) == pytest.approx(2 / 5)


def test_groove_consistency() -> None:
    # 2-beat measures at 2 steps per beat: onset steps 0 1 | 4 | 8 10 (end step 11, 3 measures)
    # patterns 1100 | 1000 | 1010 -> Hamming 1 + 1 over 4 * 2 positions.
    assert m.groove_consistency(RHYTHM, beats_per_measure=2, resolution=2) == pytest.approx(0.75)
    # PIECE in 2-beat measures: onsets on both beats of both measures -> identical patterns.
    assert m.groove_consistency(PIECE, beats_per_measure=2) == 1.0
    assert math.isnan(m.groove_consistency(PIECE, beats_per_measure=4))  # a single measure


def test_density_and_ioi() -> None:
    assert m.note_density(PIECE) == pytest.approx(6 / 4)
    assert m.ioi_mean(PIECE) == 1.0  # distinct onsets 0 1 2 3
    assert m.ioi_mean(RHYTHM) == pytest.approx((0.5 + 1.5 + 2 + 1) / 4)
    hist = m.ioi_histogram(RHYTHM)  # eighth, dotted quarter, half, quarter
    expected = np.zeros(12)
    expected[[3, 6, 1, 2]] = 0.25
    np.testing.assert_allclose(hist, expected)


def test_note_length_histogram() -> None:
    expected = np.zeros(12)
    expected[2] = 5 / 6  # quarters
    expected[1] = 1 / 6  # one half note
    np.testing.assert_allclose(m.note_length_histogram(PIECE), expected)
    # 0.3 beats is nearest the eighth triplet (1/3), 0.45 nearest the eighth (0.5)
    odd = make_notes(onset=[0, 1], duration=[0.3, 0.45], pitch=[60, 62])
    assert m.note_length_histogram(odd)[[11, 3]].tolist() == [0.5, 0.5]


def test_pitch_class_transition_matrix() -> None:
    # onset groups {C, E} -> {D} -> {C, G} -> {C}: C>D E>D D>C D>G C>C G>C, 1/6 each
    pctm = m.pitch_class_transition_matrix(PIECE)
    expected = np.zeros((12, 12))
    for a, b in [(0, 2), (4, 2), (2, 0), (2, 7), (0, 0), (7, 0)]:
        expected[a, b] = 1 / 6
    np.testing.assert_allclose(pctm, expected)


def test_velocity() -> None:
    assert m.velocity_mean(PIECE) == 80.0
    # deviations -20 0 20 -20 0 20 -> variance 1600 / 6
    assert m.velocity_std(PIECE) == pytest.approx(math.sqrt(1600 / 6))


def test_repetition_rate() -> None:
    # C D E C D E C D, quarters: trigrams CDE* DEC ECD CDE DEC ECD; the first C has no previous
    # onset (gap 0), so 4 distinct of 6 -> 2 / 6 repeat.
    loop = make_notes(onset=np.arange(8), duration=1, pitch=[60, 62, 64] * 2 + [60, 62])
    assert m.repetition_rate(loop, n=3) == pytest.approx(2 / 6)
    scale = make_notes(onset=np.arange(8), duration=1, pitch=np.arange(60, 68))
    assert m.repetition_rate(scale, n=3) == 0.0
    assert math.isnan(m.repetition_rate(loop, n=9))


@pytest.mark.parametrize("name", sorted(m.SCALAR_METRICS))
def test_scalar_metrics_are_nan_without_notes(name: str) -> None:
    assert math.isnan(m.SCALAR_METRICS[name](empty_notes()))


@pytest.mark.parametrize("name", sorted(m.VECTOR_METRICS))
def test_vector_metrics_are_nan_without_notes(name: str) -> None:
    assert np.isnan(m.VECTOR_METRICS[name](empty_notes())).all()


def test_pianoroll_matches_note_by_note_reference(fixtures_dir) -> None:
    notes = notes_from_file(fixtures_dir / "midi" / "bach_bwv66.6.mid")
    roll = m.pianoroll(notes, resolution=8)
    ref = np.zeros_like(roll)
    for note in notes:  # the slow, obvious path
        s = max(int(np.round(note["onset"] * 8)), 0)
        e = max(int(np.round((note["onset"] + note["duration"]) * 8)), s + 1)
        ref[s:e, note["pitch"]] = True
    np.testing.assert_array_equal(roll, ref)


@pytest.mark.parametrize("name", ["bach_bwv66.6.mid", "haydn_op74no1_mvt2.mid"])
def test_polyphony_equals_the_dense_piano_roll_path(fixtures_dir, name: str) -> None:
    notes = notes_from_file(fixtures_dir / "midi" / name)
    roll = m.pianoroll(notes, resolution=24)
    per_step = roll.sum(axis=1)
    assert m.polyphony(notes) == pytest.approx(per_step.sum() / np.count_nonzero(per_step))
    for threshold in (1, 2, 3, 4):
        expected = np.count_nonzero(per_step >= threshold) / roll.shape[0]
        assert m.polyphony_rate(notes, threshold=threshold) == pytest.approx(expected)


def test_polyphony_of_a_very_long_piece_needs_little_memory() -> None:
    # ends after 10 million beats: a dense roll would need over 30 GB
    far = make_notes(onset=[0, 0, 1e7], duration=[1, 1, 1], pitch=[60, 64, 67])
    assert m.polyphony(far) == pytest.approx(3 / 2)  # two pitches for a beat, then one
    assert m.polyphony_rate(far) == pytest.approx(1 / (1e7 + 1))


def test_metrics_on_a_real_chorale_are_in_range(fixtures_dir) -> None:
    notes = notes_from_file(fixtures_dir / "midi" / "bach_bwv66.6.mid")
    values = m.scalar_metrics(notes)
    assert 3.5 <= values["polyphony"] <= 4.0  # four voices, nearly always sounding
    assert values["scale_consistency"] > 0.9
    assert 0.0 <= values["empty_beat_rate"] < 0.1


def test_tonal_pitch_class_histogram() -> None:
    # C C C D E G in D major: (pitch - 2) mod 12 -> C = 10 (three), D = 0, E = 2, G = 5
    expected = np.zeros(12)
    expected[[10, 0, 2, 5]] = [3 / 6, 1 / 6, 1 / 6, 1 / 6]
    np.testing.assert_allclose(m.tonal_pitch_class_histogram(PIECE, "D major"), expected)
    # no key given: the key finder's (C major) -> the absolute histogram
    np.testing.assert_allclose(m.tonal_pitch_class_histogram(PIECE), m.pitch_class_histogram(PIECE))
    # transposing a piece leaves it unchanged (its key moves with it)
    up = PIECE.copy()
    up["pitch"] += 5
    np.testing.assert_allclose(
        m.tonal_pitch_class_histogram(up), m.tonal_pitch_class_histogram(PIECE)
    )
    one_class = make_notes(onset=[0, 1], duration=1, pitch=[60, 72])
    assert np.isnan(m.tonal_pitch_class_histogram(one_class)).all()
