"""Composing around given notes with the shipped model: harmonize, infill, accompany, the
CLI's checks, and ``aurl generate --seconds`` lasting the time asked. Short excerpts (a few
bars of three bundled chorales) keep each decode to about a hundred tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import symusic

from aurl.cli import main
from aurl.cli.generate import SHIPPED
from aurl.data.notes import make_notes, notes_from_score
from aurl.errors import ConstraintError
from aurl.generation.compose import (
    ComposeOptions,
    accompany,
    harmonize,
    infill,
    infill_regenerated,
    make_plan,
    melody_kept,
    melody_line,
    score_plan,
)
from aurl.generation.voices import SATB

pytestmark = pytest.mark.skipif(not (SHIPPED / "config.json").is_file(), reason="no model")
CHORALES = Path(__file__).resolve().parents[2] / "src/aurl/data/bundled/bach-chorales"
FIXTURES = Path(__file__).parents[1] / "fixtures"


@pytest.fixture(scope="module")
def model():
    from aurl.cli.generate import load_model

    return load_model(None, "cpu")


def _tracks(name: str, beats: float) -> list[np.ndarray]:
    """The four voices of a bundled chorale, cut to its first ``beats`` beats."""
    score = symusic.Score(str(CHORALES / name))
    out = []
    for track in score.tracks:
        one = symusic.Score(score.tpq)
        one.tracks.append(track.copy())
        notes = notes_from_score(one)
        notes = notes[notes["onset"] < beats]
        notes["duration"] = np.minimum(notes["duration"], beats - notes["onset"])
        out.append(notes)
    return out


def _track_notes(score, name: str) -> np.ndarray:
    one = symusic.Score(score.tpq)
    one.tracks.append(next(t for t in score.tracks if t.name == name).copy())
    return notes_from_score(one)


def test_harmonize_keeps_the_melody_and_writes_three_voices_under_it(model) -> None:
    melody = _tracks("bach_bwv117.4.mid", 8)[0]
    (c,) = harmonize(model, melody, options=ComposeOptions(particles=1, seed=1))
    assert [t.name for t in c.score.tracks] == list(SATB)
    assert melody_kept(_track_notes(c.score, "Soprano"), melody) == 1.0
    assert len(c.notes) >= 6
    end = float((melody["onset"] + melody["duration"]).max())
    assert float((c.notes["onset"] + c.notes["duration"]).max()) == pytest.approx(end)
    for n in c.notes:  # every new note starts below the melody note sounding then
        on = melody[(melody["onset"] <= n["onset"]) & (melody["onset"] + melody["duration"] >
                                                       n["onset"])]  # fmt: skip
        if len(on):
            assert n["pitch"] < on["pitch"].max()
    # never more than three new voices at once
    t = np.unique(c.notes["onset"])
    sounding = ((c.notes["onset"][None] <= t[:, None]) &
                (c.notes["onset"][None] + c.notes["duration"][None] > t[:, None])).sum(1)  # fmt: skip
    assert sounding.max() <= 3
    assert c.stats["fallbacks"] == 0


def test_same_seed_same_notes_and_particles_resample(model) -> None:
    melody = _tracks("bach_bwv153.5.mid", 6)[0]
    opts = ComposeOptions(particles=4, seed=3, resample_every=4)
    a, b = harmonize(model, melody, options=opts)[0], harmonize(model, melody, options=opts)[0]
    assert np.array_equal(a.notes, b.notes)
    assert a.stats["resamples"] > 0
    assert melody_kept(_track_notes(a.score, "Soprano"), melody) == 1.0


def test_plan_admits_bach_and_conditioning_lowers_his_bits(model) -> None:
    from aurl.data.tokenizer import Tokenizer
    from aurl.evaluation.tasks import _encode_notes

    voices = _tracks("bach_bwv117.4.mid", 12)
    line = melody_line(voices[0])
    plan = make_plan(line, model.vocab, ceiling=True, max_free=3)
    bach = np.sort(np.concatenate(voices), order=["onset", "pitch"])
    ids = _encode_notes(bach, Tokenizer(model.vocab_config), CHORALES / "bach_bwv117.4.mid")
    result = score_plan(model, plan, ids)
    assert result.outside == 0  # Bach's own lower voices obey every forcing rule
    assert result.free_notes == sum(len(v) for v in voices[1:])
    assert result.conditional_bits_per_note < result.unconditional_bits_per_note


def test_infill_keeps_everything_outside_the_span(model) -> None:
    voices = _tracks("bach_bwv10.7.mid", 12)
    notes = np.sort(np.concatenate(voices), order=["onset", "pitch"])
    span = (4.0, 8.0)
    (c,) = infill(model, notes, span, options=ComposeOptions(particles=1, seed=0))
    regen = infill_regenerated(notes, span)
    assert regen.sum() > 0 and (~regen).sum() > 0
    assert len(c.notes) > 0
    assert (c.notes["onset"] >= 4.0).all() and (c.notes["onset"] < 8.0).all()
    assert (c.notes["onset"] + c.notes["duration"] <= 8.0 + 1e-9).all()


def test_infill_one_part_and_accompany(model) -> None:
    voices = _tracks("bach_bwv153.5.mid", 8)
    notes = np.concatenate(voices)
    part = np.concatenate([np.full(len(v), i == 1) for i, v in enumerate(voices)])  # Alto
    order = np.lexsort((notes["pitch"], notes["onset"]))
    notes, part = notes[order], part[order]
    (c,) = infill(model, notes, (2.0, 6.0), part, options=ComposeOptions(particles=1, seed=0))
    # one voice at a time (the alto's own polyphony), inside the span
    t = np.unique(c.notes["onset"])
    sounding = ((c.notes["onset"][None] <= t[:, None]) &
                (c.notes["onset"][None] + c.notes["duration"][None] > t[:, None])).sum(1)  # fmt: skip
    assert len(c.notes) > 0 and sounding.max() == 1
    assert ((c.notes["onset"] >= 2.0) & (c.notes["onset"] < 6.0)).all()
    alto = voices[1]
    (a,) = accompany(model, alto, part_name="Alto", options=ComposeOptions(particles=1))
    assert melody_kept(_track_notes(a.score, "Alto"), alto) == 1.0
    assert len(a.score.tracks) == 4


@pytest.mark.parametrize(
    "notes, words",
    [
        (make_notes([], [], []), "no notes"),
        (make_notes([0, 1, 2], 1, [36, 38, 42], program=128), "drums only"),
        (make_notes([0, 0, 0, 1, 1, 1], 1, [60, 64, 67, 62, 65, 69]), "chords at 100%"),
        (make_notes([0, 1, 2], 1, [40, 43, 45]), "three voices need it within"),
    ],
    ids=["empty", "drums", "chords", "too low"],
)
def test_bad_melodies_fail_with_one_line(notes, words) -> None:
    with pytest.raises(ConstraintError, match=words):
        melody_line(notes)


def _write_melody(path: Path, beats: float = 8) -> Path:
    score = symusic.Score(str(CHORALES / "bach_bwv117.4.mid"))
    out = symusic.Score(score.tpq)
    out.tempos, out.time_signatures = score.tempos.copy(), score.time_signatures.copy()
    out.key_signatures = score.key_signatures.copy()
    track = score.tracks[0].copy()
    track.notes = track.notes.filter(lambda n: n.time < beats * score.tpq)
    out.tracks.append(track)
    out.dump_midi(str(path))
    return path


def test_cli_harmonize_writes_satb_midi_and_musicxml(tmp_path: Path, capsys) -> None:
    melody = _write_melody(tmp_path / "tune.mid")
    out = tmp_path / "out"
    rc = main(["harmonize", str(melody), "--out", str(out), "--particles", "2",
               "--format", "mid,musicxml"])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "given notes kept 100%" in printed
    mid = symusic.Score(str(out / "tune_harmonized_seed0_000.mid"))
    original = symusic.Score(str(melody))
    assert [t.name for t in mid.tracks] == list(SATB)
    assert mid.time_signatures[0].numerator == original.time_signatures[0].numerator
    assert len(mid.key_signatures) == len(original.key_signatures)
    from music21 import converter

    parsed = converter.parse(str(out / "tune_harmonized_seed0_000.musicxml"), forceSource=True)
    assert [p.partName for p in parsed.parts] == list(SATB)


@pytest.mark.parametrize(
    "args, words",
    [
        (["infill", "{piece}", "--bars", "4-2"], "--bars 4-2"),
        (["infill", "{piece}", "--bars", "90-91"], "has bars 1-"),
        (["infill", "{piece}", "--bars", "1-2", "--part", "Lute"], "no such track"),
        (["infill", "{drums}", "--span", "0-1", "--part", "1"], "is a drum track"),
        (["harmonize", "{chords}"], "chords at"),
        (["harmonize", "{piece}", "--voices", "7"], "--voices 7"),
    ],
    ids=["reversed", "outside", "no part", "drum part", "chords", "voices"],
)
def test_cli_bad_input_one_line_nothing_written(tmp_path: Path, capsys, args, words) -> None:
    chords = tmp_path / "chords.mid"
    s = symusic.Score(480)
    t = symusic.Track(name="piano")
    for beat in range(4):
        for p in (60, 64, 67):
            t.notes.append(symusic.Note(beat * 480, 480, p, 80))
    s.tracks.append(t)
    s.dump_midi(str(chords))
    piece = CHORALES / "bach_bwv117.4.mid"
    out = tmp_path / "out"
    drums = FIXTURES / "edge" / "drums.mid"
    argv = [a.format(piece=piece, chords=chords, drums=drums) for a in args] + ["--out", str(out)]
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("part", [["--part", "0"], []], ids=["part", "all parts"])
def test_cli_infill_beside_a_drum_track_keeps_the_drums(tmp_path: Path, part) -> None:
    # --part is a mask over all the notes, drums included; infill composes pitched notes only
    out = tmp_path / "out"
    rc = main(["infill", str(FIXTURES / "edge" / "drums.mid"), "--span", "0-1", *part,
               "--out", str(out)])  # fmt: skip
    assert rc == 0
    before = symusic.Score(str(FIXTURES / "edge" / "drums.mid"))
    after = symusic.Score(str(out / "drums_infilled_seed0_000.mid"))
    drums = [t for t in after.tracks if t.is_drum]
    assert len(drums) == 1  # kept note for note, still a drum track
    assert [(n.time, n.pitch) for n in drums[0].notes] == [
        (n.time, n.pitch) for n in next(t for t in before.tracks if t.is_drum).notes
    ]


def test_generate_seconds_lasts_that_long(model) -> None:
    from aurl.config import GenerationConfig
    from aurl.data.tokenizer import Tokenizer
    from aurl.generation.generate import generate

    cfg = GenerationConfig(seconds=6.0, max_tokens=100_000, seed=0)
    tokenizer = Tokenizer(model.vocab_config)
    for piece in generate(model, cfg, num_samples=3):
        notes = tokenizer.decode_to_notes(piece.ids)
        length = float((notes["onset_s"] + notes["duration_s"]).max())
        beat = float(notes["duration_s"][0] / notes["duration"][0])  # seconds per beat
        assert 6.0 - beat - 1e-6 <= length <= 6.0 + 1e-6


def test_plan_mask_forces_the_melody_and_keeps_new_notes_under_it() -> None:
    from aurl.data.vocab import Vocab
    from aurl.generation.compose import plan_allows

    vocab = Vocab()
    melody = make_notes([0, 4], [4, 2], [67, 69])  # G4 held for a bar, then A4
    plan = make_plan(melody, vocab, ceiling=True, max_free=3)
    vel = vocab.velocity + 22
    first = plan_allows(vocab, plan, [])
    assert first[vel] and not first[vocab.shift_id(1)]  # a note must come: velocity first
    after_vel = plan_allows(vocab, plan, [vel])
    assert after_vel[vocab.note_on_id(67)]
    assert after_vel[vocab.note_on_id(60)] and not after_vel[vocab.note_on_id(70)]
    # inside the held G4 (beat 1): new notes only below it; no shift past beat 4 (step 128)
    held = plan_allows(vocab, plan, [vel, vocab.note_on_id(67), vocab.shift_id(32)])
    on = np.flatnonzero(held[vocab.note_on : vocab.note_off]) + vocab.config.pitch_min
    assert len(on) and on.max() < 67
    assert not held[vocab.time_shift : vocab.velocity].any()  # after a short shift: an event
    moved = plan_allows(vocab, plan, [vel, vocab.note_on_id(67), vocab.shift_id(32),
                                      vocab.note_on_id(60)])  # fmt: skip
    shifts = np.flatnonzero(moved[vocab.time_shift : vocab.velocity]) + 1
    assert shifts.max() == 96
    # at beat 4 the G4 must end before anything else, then the A4 must start
    at4 = plan_allows(vocab, plan, [vel, vocab.note_on_id(67), vocab.shift_id(128)])
    assert np.flatnonzero(at4).tolist() == [vocab.note_off_id(67)]


def test_a_seconds_time_model_cannot_compose() -> None:
    from aurl.config import VocabConfig
    from aurl.data.vocab import Vocab

    vocab = Vocab(VocabConfig(time_unit="seconds"))
    with pytest.raises(ConstraintError, match="counts time in seconds"):
        make_plan(make_notes([0, 1], 1, [67, 69]), vocab)


def test_max_polyphony_hand_computed() -> None:
    from aurl.generation.compose import max_polyphony

    # C4 over two beats; E4 ends at beat 1 where G4 starts: two at once, never three
    assert max_polyphony(make_notes([0, 0, 1], [2, 1, 1], [60, 64, 67])) == 2
    assert max_polyphony(make_notes([], [], [])) == 0


def test_cli_generate_voices_writes_satb_tracks(tmp_path: Path) -> None:
    out = tmp_path / "pieces"
    assert main(["generate", "--max-tokens", "64", "--voices", "4", "--out", str(out)]) == 0
    score = symusic.Score(str(out / "sample_seed0_000.mid"))
    assert [t.name for t in score.tracks] == list(SATB)
    assert sum(len(t.notes) for t in score.tracks) > 0


def test_plan_mask_closes_new_notes_at_the_end_of_the_span() -> None:
    from aurl.data.vocab import Vocab
    from aurl.generation.compose import plan_allows

    vocab = Vocab()
    given = make_notes([0, 2], [2, 1], [72, 74])  # C5 for two beats, then D5 at beat 2
    plan = make_plan(given, vocab, free_span=(0.0, 2.0), max_free=2)
    vel = vocab.velocity + 22
    start = [vel, vocab.note_on_id(60), vocab.note_on_id(72)]  # a new C4 under the C5
    inside = plan_allows(vocab, plan, start)
    shifts = np.flatnonzero(inside[vocab.time_shift : vocab.velocity]) + 1
    assert shifts.max() == 64  # no shift past the end of the span (beat 2)
    at_end = [*start, vocab.shift_id(64)]
    # the new C4 must close there, first (ascending offs), before the given C5 ends
    assert np.flatnonzero(plan_allows(vocab, plan, at_end)).tolist() == [vocab.note_off_id(60)]
    closed = [*at_end, vocab.note_off_id(60), vocab.note_off_id(72), vocab.note_on_id(74)]
    after = plan_allows(vocab, plan, closed)
    assert np.flatnonzero(after).tolist() == [vocab.shift_id(32)]  # outside: exactly the gap


def test_time_map_bars_and_seconds_hand_computed() -> None:
    from aurl.errors import ConfigError
    from aurl.generation.compose import TimeMap

    # 3/4 for two bars, then 4/4; 60 BPM for four beats, then 120
    tm = TimeMap(signatures=((0.0, 3, 4), (6.0, 4, 4)), tempos=((0.0, 60.0), (4.0, 120.0)))
    assert tm.bar_starts(10) == [0.0, 3.0, 6.0, 10.0, 14.0]
    assert tm.seconds_to_beats(2.0) == 2.0 and tm.seconds_to_beats(5.0) == 6.0
    assert tm.bar_span(2, 3, 9.5) == (3.0, 10.0)  # a piece ending in bar 3 has bars 1-3
    with pytest.raises(ConfigError, match="bars 4-4: the piece has bars 1-3"):
        tm.bar_span(4, 4, 9.5)
    with pytest.raises(ConfigError, match="--bars 3-2"):
        tm.bar_span(3, 2, 9.5, field="--bars")
    assert tm.seconds_span(2.0, 5.0, 7.0) == (2.0, 6.0)
    with pytest.raises(ConfigError, match="span 8-9"):
        tm.seconds_span(8.0, 9.0, 7.0)
    assert TimeMap.of_score(tm.like_score()) == tm
    assert TimeMap.from_json(tm.to_json()) == tm and tm.first_qpm == 60.0


def test_cli_infill_of_every_note_says_so(tmp_path: Path, capsys) -> None:
    """A one-bar melody whose bar 1 is regenerated whole has no given notes: the summary says
    so (it printed "given notes kept nan%")."""
    piece = tmp_path / "one_bar.mid"
    s = symusic.Score(480)
    s.time_signatures.append(symusic.TimeSignature(0, 4, 4))
    t = symusic.Track(name="soprano")
    for beat, p in enumerate((67, 69, 71, 72)):
        t.notes.append(symusic.Note(beat * 480, 480, p, 80))
    s.tracks.append(t)
    s.dump_midi(str(piece))
    assert main(["infill", str(piece), "--bars", "1-1", "--out", str(tmp_path / "out")]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "no given notes (the span held every note)" in line and "nan" not in line, line


def test_a_shift_skips_an_edge_of_the_span_where_nothing_could_follow() -> None:
    """An empty free span (the first bar of a piece whose first note is at beat 4): a short
    shift landing on the span's end, where no given note starts or ends and no new note is left
    to close, could be followed only by another short shift, which the grammar forbids. Such a
    row had nothing allowed (the NaN weights of `aurl infill --bars 1-1` on a piece starting
    late or in 7/8); the shift now reaches past that step to the next event."""
    from aurl.data.vocab import Vocab
    from aurl.generation.compose import plan_allows

    vocab = Vocab()
    plan = make_plan(make_notes([4], [1], [72]), vocab, free_span=(0.0, 2.0), max_free=2)
    shifts = np.flatnonzero(plan_allows(vocab, plan, [])[vocab.time_shift : vocab.velocity]) + 1
    assert shifts.tolist() == [*range(1, 64), 128]  # not 64: the idle end of the span (beat 2)
    after = plan_allows(vocab, plan, [vocab.shift_id(128)])
    assert after[vocab.velocity : vocab.sustain_on].all()  # the given C5's velocity, then its on
    # a new note sounding at the span's end must close there: that step is not idle
    start = [vocab.velocity + 22, vocab.note_on_id(60)]
    shifts = np.flatnonzero(plan_allows(vocab, plan, start)[vocab.time_shift : vocab.velocity])
    assert (shifts + 1).tolist() == list(range(1, 65))


def test_infill_of_an_empty_first_bar_never_leaves_a_row_without_a_token() -> None:
    """The tiny model infills bar 1 of a melody starting at beat 8,000, 6 seeds, 2 particles:
    no row ever had an empty mask (``fallbacks`` counts them) and no weight is NaN (seed 0
    warned of a NaN before the fix)."""
    import warnings

    import torch

    from aurl.config import load_config
    from aurl.models import build_model

    torch.manual_seed(0)
    tiny = build_model(load_config(preset="tiny")).eval()
    notes = make_notes(8000 + 0.5 * np.arange(8), [0.5] * 8, [60, 62, 64, 65, 67, 65, 64, 62])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for seed in range(6):
            options = ComposeOptions(particles=2, seed=seed)
            out = infill(tiny, notes, (0.0, 4.0), options=options)
            assert out[0].stats["fallbacks"] == 0 and np.isfinite(out[0].stats["log_weight"])


def test_infill_of_one_voice_among_twenty_never_leaves_a_row_without_a_token() -> None:
    """Twenty voices held in block chords, one of them infilled in its second bar: the
    grammar's cap on sounding notes makes room for the 19 given ones and the model's (it was 16,
    so every row's mask emptied: ``fallbacks``, a NaN weight and a RuntimeWarning)."""
    import warnings

    import torch

    from aurl.config import load_config
    from aurl.models import build_model

    torch.manual_seed(0)
    tiny = build_model(load_config(preset="tiny")).eval()
    onsets = np.repeat(np.arange(8.0), 20)
    pitches = np.tile(np.arange(20) * 2 + 40, 8)
    notes = make_notes(onsets, [1.0] * len(onsets), pitches)
    part = pitches == pitches.max()  # the top voice
    assert make_plan(notes, tiny.vocab, max_free=1).polyphony_cap == 21
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        (c,) = infill(tiny, notes, (4.0, 8.0), part, options=ComposeOptions(particles=1))
    assert c.stats["fallbacks"] == 0 and np.isfinite(c.stats["log_weight"])
    assert len(c.notes) >= 1


def test_given_notes_past_the_model_pitches_are_refused_before_decoding() -> None:
    """A given note the vocabulary has no id for is refused by the plan, naming the pitches
    and the model's range (it ran composing into "did not end within N tokens")."""
    from aurl.data.vocab import Vocab

    with pytest.raises(ConstraintError, match=r"the given part spans MIDI pitches 12\.\.60, the model's are 21\.\.108"):
        make_plan(make_notes([0, 1], 1, [12, 60]), Vocab())
