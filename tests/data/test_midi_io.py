"""Reading and repair: hand-built edge cases with exact expectations, damaged files, limits."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import symusic

from aurl.config import DataConfig
from aurl.data import read_midi
from aurl.data.midi_io import fold_pitch, read_midi_data, ticks_to_seconds
from aurl.errors import MidiReadError

FIXTURES = Path(__file__).parents[1] / "fixtures"
EDGE = FIXTURES / "edge"
CORPUS = sorted((FIXTURES / "midi").glob("*.mid"))


def notes_of(score: symusic.Score) -> list[tuple[int, int, int, int, int]]:
    """(time, duration, pitch, velocity, program) of every note, sorted."""
    out = []
    for tr in score.tracks:
        out += [(n.time, n.duration, n.pitch, n.velocity, tr.program) for n in tr.notes]
    return sorted(out)


def test_clean_file_reads_unchanged():
    score, report = read_midi(EDGE / "chords.mid")
    q = 480
    assert notes_of(score) == [
        (0, q, 60, 60, 0), (0, q, 64, 80, 0), (0, q, 67, 100, 0),
        (q, 2 * q, 65, 60, 0), (q, 2 * q, 69, 80, 0), (q, 2 * q, 72, 100, 0),
    ]  # fmt: skip
    assert not report.repaired and report.notes == 6 and report.format == 1


def test_overlapping_same_pitch_cut_and_duplicates_dropped():
    score, report = read_midi(EDGE / "overlap_same_pitch.mid")
    q = 480
    # 60: the first is cut at the second's onset; 64: two at beat 0, the longer one kept
    assert notes_of(score) == [(0, q, 60, 70, 0), (0, 3 * q, 64, 110, 0), (q, 2 * q, 60, 90, 0)]
    assert report.overlaps == 1 and report.duplicates == 1


def test_out_of_range_fold_and_drop():
    score, report = read_midi(EDGE / "out_of_range.mid")
    assert [n[2] for n in notes_of(score)] == [24, 27, 103, 103, 60]
    assert report.out_of_range_folded == 4 and report.out_of_range_dropped == 0
    score, report = read_midi(EDGE / "out_of_range.mid", DataConfig(out_of_range="drop"))
    assert [n[2] for n in notes_of(score)] == [60]
    assert report.out_of_range_dropped == 4


def test_fold_pitch_by_octaves():
    p = np.array([0, 12, 20, 21, 108, 109, 120, 127])
    assert fold_pitch(p, 21, 108).tolist() == [24, 24, 32, 21, 108, 97, 108, 103]


def test_drums_dropped_or_kept():
    score, report = read_midi(EDGE / "drums.mid")
    assert len(score.tracks) == 1 and not score.tracks[0].is_drum
    assert report.drum_tracks == 1
    score, report = read_midi(EDGE / "drums.mid", DataConfig(drums="keep"))
    assert [t.is_drum for t in score.tracks] == [False, True]
    assert report.drum_tracks == 0 and report.notes == 3


def test_velocity_zero_note_ons_end_notes_and_zero_length_gets_one_step():
    score, report = read_midi(EDGE / "velocity_zero.mid")
    # velocity-0 NOTE_ONs are NOTE_OFFs; the note on and off at one tick lasts a grid step
    assert notes_of(score) == [(0, 480, 60, 80, 0), (480, 15, 62, 80, 0), (960, 480, 64, 80, 0)]
    assert report.zero_duration == 1


def test_empty_track_removed():
    score, report = read_midi(EDGE / "empty_track.mid")
    assert [t.program for t in score.tracks] == [0, 73]
    assert report.empty_tracks == 1


def test_type0_split_by_channel():
    score, report = read_midi(EDGE / "type0.mid")
    assert report.format == 0
    assert sorted(t.program for t in score.tracks) == [0, 48]


def test_smpte_division_keeps_seconds():
    score, report = read_midi(EDGE / "smpte.mid")
    assert report.smpte == 1
    # 1000 ticks per second become 1000 ticks per quarter at 120 BPM, times doubled
    seconds = score.to("second")
    got = sorted((round(n.time, 6), round(n.duration, 6)) for n in seconds.tracks[0].notes)
    assert got == [(0.0, 0.5), (1.0, 0.25)]


def test_absurd_ticks_stray_note_dropped_and_endless_note_clipped():
    score, report = read_midi(EDGE / "absurd_ticks.mid")
    assert notes_of(score) == [(0, 480, 60, 80, 0), (480, 1024 * 480, 62, 80, 0)]
    assert report.absurd_ticks == 2


def test_tempo_changes_kept_and_seconds_through_the_map():
    score, _ = read_midi(EDGE / "tempo_changes.mid")
    assert [round(t.qpm, 3) for t in score.tempos] == [100.0, 140.0, 72.0]
    md, _ = read_midi_data(EDGE / "tempo_changes.mid")
    beats = np.array([0, 4, 8, 9])
    want = [0.0, 4 * 0.6, 4 * 0.6 + 4 * 60 / 140, 4 * 0.6 + 4 * 60 / 140 + 60 / 72]
    assert np.allclose(md.seconds(beats * 480), want)
    # before any tempo event MIDI's default 120 BPM holds
    assert np.allclose(ticks_to_seconds(np.array([480]), np.array([960]), np.array([60.0]), 480),
                       [0.5])  # fmt: skip


def test_sustain_pedal_read():
    md, _ = read_midi_data(EDGE / "sustain.mid")
    assert md.pedal_time.tolist() == [240, 1440, 1920, 2400]
    assert md.pedal_on.tolist() == [True, False, True, False]


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.name)
def test_real_files_read(path):
    score, report = read_midi(path)
    assert report.notes == score.note_num() > 100
    assert report.reader == "symusic"


# -- damaged files and limits ------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda: np.random.default_rng(0).bytes(400), "not a MIDI file"),
        (lambda: b"MThd" + np.random.default_rng(1).bytes(400), "damaged"),
        (lambda: b"", "empty file"),
        (lambda: b"title: not a MIDI file\n" * 5, "not a MIDI file"),
        (lambda: b"MThd\x00\x00", "truncated"),
    ],
    ids=["random", "random-after-header", "zero-length", "text", "short-header"],
)
def test_damaged_files_raise_midi_read_error_naming_path(tmp_path, make, reason):
    path = tmp_path / "bad.mid"
    path.write_bytes(make())
    with pytest.raises(MidiReadError) as err:
        read_midi(path)
    assert str(path) in str(err.value) and reason in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(MidiReadError, match="no such file"):
        read_midi(tmp_path / "missing.mid")
    with pytest.raises(MidiReadError, match="not a file"):
        read_midi(tmp_path)


def test_size_limits_refuse_before_work(tmp_path):
    with pytest.raises(MidiReadError, match="max_file_bytes"):
        read_midi(CORPUS[0], DataConfig(max_file_bytes=100))
    with pytest.raises(MidiReadError, match="max_events_per_file"):
        read_midi(CORPUS[0], DataConfig(max_events_per_file=50))


def test_huge_declared_event_count_is_refused_fast(tmp_path):
    """A small file whose notes would expand past the limit is refused, not processed."""
    import mido

    mf = mido.MidiFile(ticks_per_beat=480)
    tr = mido.MidiTrack()
    for _ in range(3000):
        tr.append(mido.Message("note_on", note=60, velocity=80, time=0))
        tr.append(mido.Message("note_off", note=60, velocity=0, time=1))
    mf.tracks.append(tr)
    path = tmp_path / "dense.mid"
    mf.save(path)
    with pytest.raises(MidiReadError, match="3000 notes"):
        read_midi(path, DataConfig(max_events_per_file=1000))


def test_truncated_file_keeps_its_complete_events(tmp_path):
    """Cut inside the second track: its complete events are kept, the cut one and the rest go."""
    whole, _ = read_midi(EDGE / "multi_instrument.mid")
    path = tmp_path / "cut.mid"
    path.write_bytes((EDGE / "multi_instrument.mid").read_bytes()[:60])
    score, report = read_midi(path)
    assert report.truncated_tracks == 1 and report.header_fixed == 1  # 1 of 2 tracks left
    assert report.reader == "symusic" and 0 < report.notes < whole.note_num()
    assert set(notes_of(score)) < set(notes_of(whole))


def test_unknown_format_number_read_as_type_1(tmp_path):
    """A header with format 3: symusic refuses it as is, the pre-pass rewrites it as type 1."""
    data = bytearray((EDGE / "chords.mid").read_bytes())
    data[8:10] = (3).to_bytes(2, "big")
    path = tmp_path / "format3.mid"
    path.write_bytes(bytes(data))
    with pytest.raises(RuntimeError):
        symusic.Score(str(path))
    score, report = read_midi(path)
    assert report.reader == "symusic" and report.repairs == {"header_fixed": 1}
    assert notes_of(score) == notes_of(read_midi(EDGE / "chords.mid")[0])


def test_report_lists_only_nonzero_repairs():
    _, report = read_midi(EDGE / "overlap_same_pitch.mid")
    assert report.repairs == {"duplicates": 1, "overlaps": 1}
    assert report.to_dict()["path"].endswith("overlap_same_pitch.mid")


def test_written_score_reads_back(tmp_path):
    score, _ = read_midi(EDGE / "multi_instrument.mid")
    out = tmp_path / "again.mid"
    score.dump_midi(str(out))
    again, report = read_midi(out)
    assert notes_of(again) == notes_of(score) and not report.repaired
    assert os.path.getsize(out) > 0


def test_fuzzed_files_read_or_raise_midi_read_error(tmp_path):
    """Random byte damage never escapes as anything but MidiReadError, and never hangs."""
    from aurl.data import Tokenizer

    tok = Tokenizer()
    rng = np.random.default_rng(0)
    bases = [(EDGE / "multi_instrument.mid").read_bytes(), CORPUS[0].read_bytes()]
    outcomes = {"ok": 0, "error": 0}
    path = tmp_path / "fuzzed.mid"
    for i in range(200):
        data = bytearray(bases[i % 2])
        for pos in rng.integers(0, len(data), rng.integers(1, 8)):
            data[pos] = rng.integers(0, 256)
        if i % 5 == 0:
            data = data[: rng.integers(0, len(data))]
        path.write_bytes(bytes(data))
        try:
            tok.decode_to_bytes(tok.encode_file(path))
            outcomes["ok"] += 1
        except MidiReadError:
            outcomes["error"] += 1
    assert outcomes["ok"] > 20 and outcomes["error"] > 20


def test_type2_tracks_read_like_type1(tmp_path):
    """Type 2 (independent sequences) is read as symusic, mido and pretty_midi do: overlaid."""
    import mido

    mf = mido.MidiFile(type=2, ticks_per_beat=480)
    for pitch in (60, 64):
        tr = mido.MidiTrack()
        tr.append(mido.Message("note_on", note=pitch, velocity=80, time=0))
        tr.append(mido.Message("note_off", note=pitch, velocity=0, time=480))
        mf.tracks.append(tr)
    mf.save(tmp_path / "type2.mid")
    score, report = read_midi(tmp_path / "type2.mid")
    assert report.format == 2 and notes_of(score) == [(0, 480, 60, 80, 0), (0, 480, 64, 80, 0)]


def test_read_score_sees_only_checked_bytes(tmp_path):
    """The raw-Score reader (meters, tune groups, composing inputs) goes through the pre-pass:
    a cut file keeps its complete events, a junk tail is dropped, refusals are MidiReadError."""
    from aurl.data.midi_io import read_score

    raw = (EDGE / "multi_instrument.mid").read_bytes()
    cut = tmp_path / "cut.mid"
    cut.write_bytes(raw[:60] + np.random.default_rng(3).bytes(3000))  # cut + junk tail
    whole, _ = read_midi(EDGE / "multi_instrument.mid")
    got = read_score(cut)
    assert 0 < got.note_num() < whole.note_num()
    bad = tmp_path / "division0.mid"
    bad.write_bytes(raw[:12] + b"\x00\x00" + raw[14:])  # division 0: refused by the pre-pass
    with pytest.raises(MidiReadError, match="division") as err:
        read_score(bad)
    assert str(bad) in str(err.value)
