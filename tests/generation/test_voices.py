"""SATB voice assignment and four-track export, on the bundled chorales."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import symusic

from aurl.data.notes import make_notes, notes_from_score
from aurl.generation.export import score_to_music21, voice_score
from aurl.generation.voices import SATB, assign_voices

CHORALES = Path(__file__).resolve().parents[2] / "src/aurl/data/bundled/bach-chorales"
THREE = ("bach_bwv10.7.mid", "bach_bwv117.4.mid", "bach_bwv153.5.mid")


def _voices(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """All notes of a four-track chorale and the track (0 = Soprano) of each."""
    score = symusic.Score(str(path))
    parts = []
    for i, track in enumerate(score.tracks):
        one = symusic.Score(score.tpq)
        one.tracks.append(track.copy())
        notes = notes_from_score(one)
        parts.append((notes, np.full(len(notes), i)))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


@pytest.mark.parametrize("name", THREE)
def test_assignment_recovers_bach_voices(name: str) -> None:
    notes, truth = _voices(CHORALES / name)
    assert (assign_voices(notes, 4) == truth).mean() >= 0.9
    # another input order gives the same voices (up to identical unison notes, which any
    # order may swap): the assignment reads pitches and times, not positions
    order = np.random.default_rng(0).permutation(len(notes))
    shuffled = np.empty(len(notes), dtype=np.int64)
    shuffled[order] = assign_voices(notes[order], 4)
    key = np.stack([notes["onset"], notes["duration"], notes["pitch"]], 1)
    _, ident = np.unique(key, axis=0, return_inverse=True)
    for group in np.unique(ident):
        same = ident == group
        assert sorted(shuffled[same]) == sorted(assign_voices(notes, 4)[same])


def test_held_note_keeps_its_voice() -> None:
    # a whole-note C5 in the soprano over moving lower voices; the lower voices cross the
    # old alto pitch, but the held note stays Soprano
    notes = make_notes(
        onset=[0, 0, 0, 0, 1, 1, 1],
        duration=[4, 1, 1, 1, 1, 1, 1],
        pitch=[72, 64, 55, 48, 67, 59, 43],
    )
    voice = assign_voices(notes, 4)
    by_pitch = dict(zip(notes["pitch"].tolist(), voice.tolist()))
    assert by_pitch == {72: 0, 64: 1, 55: 2, 48: 3, 67: 1, 59: 2, 43: 3}


def test_fewer_notes_take_the_nearest_voices() -> None:
    # four voices, then only two notes: a high one continues the soprano, a low one the bass
    notes = make_notes(onset=[0, 0, 0, 0, 1, 1], duration=1, pitch=[72, 65, 57, 48, 71, 47])
    voice = assign_voices(notes, 4)
    second = notes["onset"] == 1  # make_notes sorts by (onset, pitch): 47 then 71
    assert voice[second].tolist() == [3, 0]


def test_voice_score_writes_four_named_tracks_and_musicxml_parts(tmp_path: Path) -> None:
    score = symusic.Score(str(CHORALES / THREE[0]))
    merged = symusic.Score(score.tpq)  # the four voices on one track, as a decoded piece
    merged.tempos = score.tempos.copy()
    one = symusic.Track(name="all", program=0)
    for track in score.tracks:
        for n in track.notes:
            one.notes.append(n)
    one.notes.sort()
    merged.tracks.append(one)
    split = voice_score(merged, 4)
    assert [t.name for t in split.tracks] == list(SATB)
    assert sum(len(t.notes) for t in split.tracks) == len(one.notes)
    means = [np.mean([n.pitch for n in t.notes]) for t in split.tracks]
    assert means == sorted(means, reverse=True)
    m21 = score_to_music21(split)
    assert [p.partName for p in m21.parts] == list(SATB)


@pytest.mark.parametrize("name", THREE)
@pytest.mark.parametrize("n", [4, 3])
def test_voice_data_splits_a_table_as_voice_score_splits_its_score(name: str, n: int) -> None:
    """``aurl generate`` writes voices from the decoded table (:func:`voice_data`, no symusic):
    the same tracks, names, programs and notes as :func:`voice_score` of its score, drums kept
    after the voices. The chorale's notes on one track, as a decoded piece holds them, with a
    drum track (a NOTE_ON of family 14 decodes to one) and a second program beside them."""
    from aurl.data.midi_io import MidiData
    from aurl.data.midi_write import midi_bytes
    from aurl.generation.export import voice_data

    notes = notes_from_score(symusic.Score(str(CHORALES / name)))
    k = len(notes)
    tpq = 480
    drum = np.arange(0, 8 * tpq, tpq)
    data = MidiData(
        tpq=tpq, time=np.concatenate([np.round(notes["onset"] * tpq).astype(np.int64), drum]),
        duration=np.concatenate([np.round(notes["duration"] * tpq).astype(np.int64),
                                 np.full(len(drum), 60)]),
        pitch=np.concatenate([notes["pitch"], np.full(len(drum), 36)]).astype(np.int64),
        velocity=np.full(k + len(drum), 90, dtype=np.int64),
        track=np.concatenate([np.arange(k) % 2, np.full(len(drum), 2)]).astype(np.int64),
        tracks=[("organ", 19, False), ("strings", 48, False), ("drums", 0, True)],
        tempo_time=np.zeros(1, np.int64), tempo_qpm=np.array([84.0]),
    )  # fmt: skip
    want = voice_score(data.to_score(), n)
    got = symusic.Score.from_midi(midi_bytes(voice_data(data, n)))

    def tracks(score) -> list:  # a chord's notes in either order (3 voices: a voice holds two)
        return [(t.name, t.program, t.is_drum, sorted(zip(*(t.notes.numpy()[f].tolist()
                 for f in ("time", "duration", "pitch", "velocity"))))) for t in score.tracks]  # fmt: skip

    assert [t[0] for t in tracks(got)][:n] == list(SATB if n == 4 else ("Soprano", "Alto", "Bass"))
    assert tracks(got) == tracks(want)
    assert [t.mspq for t in got.tempos] == [t.mspq for t in want.tempos]
