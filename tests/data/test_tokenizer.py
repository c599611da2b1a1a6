"""Tokenizer: exact hand-computed sequences, round trips on every fixture, robust decoding,
and property tests (hypothesis) that random valid scores round-trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import symusic
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aurl.config import DataConfig, VocabConfig
from aurl.data import Tokenizer, Vocab, read_midi
from aurl.data.midi_io import read_midi_data
from aurl.data.notes import NOTE_DTYPE, notes_from_score
from aurl.errors import MidiReadError

FIXTURES = Path(__file__).parents[1] / "fixtures"
ALL_FILES = sorted((FIXTURES / "midi").glob("*.mid")) + sorted((FIXTURES / "edge").glob("*.mid"))
NAMES = Vocab().names()
ID = {name: i for i, name in enumerate(NAMES)}


def ids_of(text: str) -> list[int]:
    return [ID[name] for name in text.split()]


def names_of(ids) -> str:
    return " ".join(NAMES[i] for i in ids)


def make_score(notes, tpq: int = 480, qpm: float = 120.0) -> symusic.Score:
    """notes: (time, duration, pitch, velocity, program) in ticks; one track per program."""
    score = symusic.Score(tpq)
    score.tempos.append(symusic.Tempo(0, qpm))
    for program in sorted({n[4] for n in notes}):
        track = symusic.Track("", program, False)
        for t, d, p, v, prog in notes:
            if prog == program:
                track.notes.append(symusic.Note(t, d, p, v))
        score.tracks.append(track)
    return score


# -- exact sequences ---------------------------------------------------------------------------


def test_two_notes_exact_ids():
    score = make_score([(0, 480, 60, 80, 0), (240, 480, 64, 100, 0)])
    got = Tokenizer().encode_score(score)
    # tempo 120 -> bin 18 (geometric 60..200 in 32 bins); velocity 80 -> bin (79*32)//127 = 19
    assert names_of(got) == (
        "START TEMPO_18 INSTRUMENT_0 VELOCITY_19 NOTE_ON_60 TIME_SHIFT_16 VELOCITY_24 "
        "NOTE_ON_64 TIME_SHIFT_16 NOTE_OFF_60 TIME_SHIFT_16 NOTE_OFF_64 END"
    )
    assert got.dtype == np.int64


def test_canonical_order_across_families():
    ids = Tokenizer().encode_file(FIXTURES / "edge" / "multi_instrument.mid")
    # families ascending at each step (bass 4, strings 5, pipe 9), offs before ons, pitches
    # ascending, INSTRUMENT only on change, VELOCITY only when the bin changes
    assert names_of(ids) == (
        "START TEMPO_10 INSTRUMENT_4 VELOCITY_15 NOTE_ON_36 INSTRUMENT_5 VELOCITY_17 NOTE_ON_48 "
        "VELOCITY_22 NOTE_ON_72 INSTRUMENT_9 VELOCITY_24 NOTE_ON_72 TIME_SHIFT_16 "
        "INSTRUMENT_0 VELOCITY_15 NOTE_ON_60 TIME_SHIFT_16 INSTRUMENT_5 NOTE_OFF_72 VELOCITY_22 "
        "NOTE_ON_74 TIME_SHIFT_16 INSTRUMENT_0 NOTE_OFF_60 TIME_SHIFT_16 INSTRUMENT_4 NOTE_OFF_36 "
        "INSTRUMENT_5 NOTE_OFF_48 NOTE_OFF_74 INSTRUMENT_9 NOTE_OFF_72 END"
    )


def test_sustain_first_in_its_family_step():
    ids = Tokenizer().encode_file(FIXTURES / "edge" / "sustain.mid")
    assert names_of(ids) == (
        "START TEMPO_18 INSTRUMENT_0 VELOCITY_19 NOTE_ON_60 TIME_SHIFT_16 SUSTAIN_ON "
        "TIME_SHIFT_16 NOTE_OFF_60 NOTE_ON_62 TIME_SHIFT_32 NOTE_OFF_62 NOTE_ON_64 TIME_SHIFT_32 "
        "SUSTAIN_OFF NOTE_OFF_64 TIME_SHIFT_32 SUSTAIN_ON NOTE_ON_65 TIME_SHIFT_32 SUSTAIN_OFF "
        "NOTE_OFF_65 END"
    )
    score = Tokenizer().decode_to_score(ids)
    cc = score.tracks[0].controls.numpy()
    assert cc["time"].tolist() == [240, 1440, 1920, 2400] and set(cc["number"]) == {64}
    assert (cc["value"] >= 64).tolist() == [True, False, True, False]


def test_tempo_tokens_where_the_tempo_changes():
    ids = Tokenizer().encode_file(FIXTURES / "edge" / "tempo_changes.mid")
    v = Vocab()
    tempos = [(i, NAMES[t]) for i, t in enumerate(ids) if v.tempo <= t < v.instrument]
    want = [f"TEMPO_{int(v.tempo_bin(q))}" for q in (100, 140, 72)]
    assert [name for _, name in tempos] == want and tempos[0][0] == 1


def test_gap_over_512_steps_is_several_shifts():
    ids = Tokenizer().encode_file(FIXTURES / "edge" / "long_gap.mid")
    # 20 beats of silence after a 1-beat note: 640 steps = 512 + 128
    assert "NOTE_OFF_60 TIME_SHIFT_512 TIME_SHIFT_128 NOTE_ON_62" in names_of(ids)
    secs = Tokenizer(VocabConfig(time_unit="seconds")).encode_file(
        FIXTURES / "edge" / "long_gap.mid"
    )
    # 10 s at 15.625 ms a step = 640 steps as well (120 BPM)
    assert "NOTE_OFF_60 TIME_SHIFT_512 TIME_SHIFT_128 NOTE_ON_62" in names_of(secs)


def test_empty_score_is_start_tempo_end():
    assert names_of(Tokenizer().encode_score(symusic.Score(480))) == "START TEMPO_18 END"


def test_encode_score_equals_encode_file():
    tok = Tokenizer()
    for path in ALL_FILES:
        score, _ = read_midi(path)
        assert np.array_equal(tok.encode_score(score), tok.encode_file(path)), path.name


def test_polyphony_cap_drops_notes_and_counts_them():
    tok = Tokenizer(data_config=DataConfig(polyphony_cap=2))
    ids, report = tok.encode_file_with_report(FIXTURES / "edge" / "chords.mid")
    assert report.polyphony_dropped == 2 and report.notes == 4
    assert "NOTE_ON_67" not in names_of(ids) and "NOTE_ON_72" not in names_of(ids)


def test_token_limit_refuses_file():
    tok = Tokenizer(data_config=DataConfig(max_events_per_file=40))
    with pytest.raises(MidiReadError, match="max_events_per_file"):
        tok.encode_file(FIXTURES / "midi" / "bach_bwv66.6.mid")


# -- round trips -------------------------------------------------------------------------------


def sorted_notes(md):
    """(family, on_ticks, off_ticks, pitch, velocity) arrays sorted by family, pitch, onset."""
    fam = md.track_family()[md.track]
    order = np.lexsort((md.time, md.pitch, fam))
    off = md.time + md.duration
    return fam[order], md.time[order], off[order], md.pitch[order], md.velocity[order], order


def check_round_trip(path: Path, vocab_config: VocabConfig, data_config: DataConfig) -> float:
    """Asserts the issue's round-trip guarantee; returns the largest onset error in steps."""
    tok = Tokenizer(vocab_config, data_config)
    vocab = tok.vocab
    md, _ = read_midi_data(path, data_config, vocab_config)
    dec = tok.decode_to_data(tok.encode_file(path))
    f0, on0, off0, p0, v0, o0 = sorted_notes(md)
    f1, on1, off1, p1, v1, o1 = sorted_notes(dec)
    assert len(on0) == len(on1), "every note survives"
    assert np.array_equal(p0, p1) and np.array_equal(f0, f1), "same pitch and family"
    assert np.abs(vocab.velocity_bin(v0) - vocab.velocity_bin(v1)).max(initial=0) <= 1
    if vocab_config.time_unit == "beat":
        spb = vocab_config.steps_per_beat
        on_err = np.abs(on0 / md.tpq - on1 / dec.tpq) * spb
        off_err = np.abs(off0 / md.tpq - off1 / dec.tpq) * spb
        min_len = (off1 - on1) * spb == dec.tpq  # notes shorter than a step get one step
    else:
        step = vocab_config.step_seconds
        on_err = np.abs(md.seconds(on0) - dec.seconds(on1)) / step
        off_err = np.abs(md.seconds(off0) - dec.seconds(off1)) / step
        min_len = np.isclose(dec.seconds(off1) - dec.seconds(on1), step)
    assert on_err.max(initial=0) <= 0.5 + 1e-9
    assert off_err[~min_len].max(initial=0) <= 0.5 + 1e-9
    if vocab_config.time_unit == "beat":  # tempo within one bin where in range
        for t, q in zip(md.tempo_time, md.tempo_qpm):
            if vocab_config.tempo_min <= q <= vocab_config.tempo_max:
                at = np.searchsorted(dec.tempo_time, round(t / md.tpq * dec.tpq), "right") - 1
                assert abs(int(vocab.tempo_bin(dec.tempo_qpm[at])) - int(vocab.tempo_bin(q))) <= 1
    return float(on_err.max(initial=0))


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: p.name)
def test_round_trip_beat(path):
    check_round_trip(path, VocabConfig(), DataConfig(drums="keep"))


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: p.name)
def test_round_trip_seconds(path):
    check_round_trip(path, VocabConfig(time_unit="seconds"), DataConfig())


def test_score_derived_music_lands_exactly_on_the_beat_grid():
    for path in sorted((FIXTURES / "midi").glob("*.mid")):
        assert check_round_trip(path, VocabConfig(), DataConfig()) == 0.0


def test_drums_kept_come_back_as_a_drum_track():
    tok = Tokenizer(data_config=DataConfig(drums="keep"))
    score = tok.decode_to_score(tok.encode_file(FIXTURES / "edge" / "drums.mid"))
    assert sorted((t.is_drum, t.note_num()) for t in score.tracks) == [(False, 1), (True, 2)]


def test_decode_to_midi_writes_a_file_that_reads_back(tmp_path):
    tok = Tokenizer()
    ids = tok.encode_file(FIXTURES / "midi" / "mozart_k155_mvt1.mid")
    out = tok.decode_to_midi(ids, tmp_path / "sub" / "out.mid")
    assert np.array_equal(tok.encode_file(out), ids)


def test_decode_to_notes_matches_the_score():
    tok = Tokenizer()
    ids = tok.encode_file(FIXTURES / "edge" / "tempo_changes.mid")
    notes = tok.decode_to_notes(ids)
    assert notes.dtype == NOTE_DTYPE and len(notes) == 12
    assert notes["onset"].tolist() == list(range(12)) and set(notes["duration"]) == {1.0}
    # seconds through the decoded tempo map: beats 0-3 at bin(100), then bin(140), bin(72)
    bpm = Vocab().bin_tempo[Vocab().tempo_bin([100, 140, 72])]
    want = np.concatenate([np.arange(4) * 60 / bpm[0], 4 * 60 / bpm[0] + np.arange(4) * 60 / bpm[1],
                           4 * 60 / bpm[0] + 4 * 60 / bpm[1] + np.arange(4) * 60 / bpm[2]])  # fmt: skip
    assert np.allclose(notes["onset_s"], want)


# -- decoding never fails ----------------------------------------------------------------------


def test_decode_invalid_sequences():
    tok = Tokenizer()
    ids = ids_of(
        "START NOTE_OFF_61 INSTRUMENT_0 VELOCITY_19 NOTE_ON_60 TIME_SHIFT_8 NOTE_ON_60 "
        "TIME_SHIFT_8 NOTE_ON_64"
    ) + [UNKNOWN := 99999, -3, ID["UNK"]]
    notes = tok.decode_to_notes(np.array(ids + [ID["TIME_SHIFT_4"]]))
    # orphan NOTE_OFF dropped; re-struck 60 ends the first at step 8; 64 and the second 60 are
    # closed at the end of the ids (step 20)
    got = [(n["onset"] * 32, n["duration"] * 32, n["pitch"]) for n in notes]
    assert got == [(0, 8, 60), (8, 12, 60), (16, 4, 64)]
    assert tok.last_decode_unknown == 3 and Vocab().size < UNKNOWN


def test_decode_stops_at_end_and_closes_open_notes():
    tok = Tokenizer()
    ids = ids_of("START INSTRUMENT_0 VELOCITY_19 NOTE_ON_60 TIME_SHIFT_32 END NOTE_ON_62 PAD")
    notes = tok.decode_to_notes(np.array(ids))
    assert [(n["onset"], n["duration"], n["pitch"]) for n in notes] == [(0.0, 1.0, 60)]


def test_decode_empty_and_degenerate():
    tok = Tokenizer()
    for ids in ([], [ID["START"]], [ID["END"]], [ID["PAD"]] * 5, ids_of("NOTE_ON_60 END")):
        score = tok.decode_to_score(np.array(ids, dtype=np.int64))
        assert score.note_num() == (1 if len(ids) == 2 else 0)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(-10, 800), max_size=120))
def test_decoding_random_ids_never_fails(ids):
    tok = Tokenizer()
    notes = tok.decode_to_notes(np.array(ids, dtype=np.int64))
    assert (notes["duration"] > 0).all()
    assert ((notes["pitch"] >= 21) & (notes["pitch"] <= 108)).all()
    assert len(tok.decode_to_bytes(np.array(ids, dtype=np.int64))) > 0


# -- properties: random valid scores round-trip ------------------------------------------------

note_st = st.tuples(
    st.integers(0, 600),  # onset step
    st.integers(1, 80),  # duration steps
    st.integers(21, 108),  # pitch
    st.integers(1, 127),  # velocity
    st.sampled_from([0, 8, 24, 33, 40, 42, 56, 73, 81]),  # program
)


def without_collisions(notes):
    """Keep notes whose (family, pitch) never overlaps an earlier kept note (touching is fine)."""
    kept: dict[tuple[int, int], list[tuple[int, int]]] = {}
    out = []
    for on, dur, pitch, vel, prog in notes:
        spans = kept.setdefault((prog // 8, pitch), [])
        if all(on + dur <= a or on >= b for a, b in spans):
            spans.append((on, on + dur))
            out.append((on, dur, pitch, vel, prog))
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(note_st, min_size=1, max_size=40), st.floats(60, 200))
def test_random_grid_scores_round_trip_exactly(notes, qpm):
    notes = without_collisions(notes)
    tok = Tokenizer(data_config=DataConfig(polyphony_cap=128))
    score = make_score([(on * 15, d * 15, p, v, prog) for on, d, p, v, prog in notes], qpm=qpm)
    back = tok.decode_to_notes(tok.encode_score(score))
    want = sorted((on / 32, d / 32, p, int(tok.vocab.velocity_bin(v)), prog // 8)
                  for on, d, p, v, prog in notes)  # fmt: skip
    got = sorted((n["onset"], n["duration"], int(n["pitch"]), int(tok.vocab.velocity_bin(n["velocity"])),
                  int(n["program"]) // 8) for n in back)  # fmt: skip
    assert got == want


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.integers(0, 20000), st.integers(1, 3000)), min_size=1, max_size=30),
    st.integers(24, 1000),
    st.sampled_from(["beat", "seconds"]),
)
def test_random_off_grid_scores_within_half_a_step(spans, tpq, unit):
    # distinct pitches: no same-pitch collisions, so every note must survive
    notes = [(t, d, 21 + i * 3 % 88, 64, 0) for i, (t, d) in enumerate(spans)]
    notes = without_collisions(notes)
    vc = VocabConfig(time_unit=unit)
    tok = Tokenizer(vc, DataConfig(polyphony_cap=128))
    score = make_score(notes, tpq=tpq, qpm=97.0)
    back = tok.decode_to_notes(tok.encode_score(score))
    assert len(back) == len(notes)
    step_beats = 1 / 32 if unit == "beat" else vc.step_seconds
    key = "onset" if unit == "beat" else "onset_s"
    # the source onsets as symusic reads them (its seconds carry the file's integer-microsecond
    # tempo and float32 times: not ours to round-trip better than that)
    source = notes_from_score(score)
    for _, _, p, _, _ in notes:
        got = back[back["pitch"] == p]
        assert len(got) == 1
        start = source[source["pitch"] == p][key][0]
        assert abs(got[key][0] - start) <= step_beats / 2 + 1e-9


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.integers(0, 300), st.floats(60, 200)), min_size=1, max_size=6),
    st.lists(st.tuples(st.integers(0, 300), st.booleans()), max_size=10),
)
def test_random_tempo_maps_and_pedals_round_trip(tempos, pedals):
    tok = Tokenizer()
    v = tok.vocab
    score = make_score([(0, 15 * 320, 60, 80, 0)])  # one long note: the music spans the events
    score.tempos = symusic.Tempo.from_numpy(
        np.array([0] + [15 * s for s, _ in tempos], np.int32),
        np.array([500000] + [round(60e6 / q) for _, q in tempos], np.int32),
    )
    score.tracks[0].controls = symusic.ControlChange.from_numpy(
        np.array([15 * s for s, _ in pedals], np.int32), np.full(len(pedals), 64, np.uint8),
        np.array([127 if on else 0 for _, on in pedals], np.uint8),
    )  # fmt: skip
    back = tok.decode_to_score(tok.encode_score(score))
    # tempo: the bin in force at every step equals the original's (last event per tick wins)
    md_in, _ = read_midi_data_from_score(score)
    md_out, _ = read_midi_data_from_score(back)
    for step in range(0, 330, 5):
        want = tempo_at(md_in, step * 15)
        got = tempo_at(md_out, step * 15)
        assert int(v.tempo_bin(got)) == int(v.tempo_bin(want))
    # pedal: the state in force at every step equals the original's
    for step in range(0, 330, 3):
        assert pedal_at(md_out, step * 15) == pedal_at(md_in, step * 15)


def read_midi_data_from_score(score):
    from aurl.data.midi_io import RepairReport, _from_symusic, repair

    report = RepairReport()
    return repair(_from_symusic(score), report), report


def tempo_at(md, tick: int) -> float:
    if len(md.tempo_time) == 0 or md.tempo_time[0] > tick:
        return 120.0
    return float(md.tempo_qpm[np.searchsorted(md.tempo_time, tick, "right") - 1])


def pedal_at(md, tick: int) -> bool:
    o = np.argsort(md.pedal_time, kind="stable")
    t, on = md.pedal_time[o], md.pedal_on[o]
    i = np.searchsorted(t, tick, "right") - 1
    return bool(on[i]) if i >= 0 else False
