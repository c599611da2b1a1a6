"""The symusic-free MIDI writer writes what symusic writes for the same decoded table: real
files (chorales, quartets, drums, pedal, tempo changes) encoded and decoded, and edge cases."""

from __future__ import annotations

import numpy as np
import pytest

from aurl.config import DataConfig
from aurl.data.midi_io import MidiData
from aurl.data.midi_write import channel_of, midi_bytes
from aurl.data.tokenizer import Tokenizer

FILES = [
    "midi/bach_bwv66.6.mid", "midi/bach_bwv269.mid", "midi/haydn_op74no1_mvt2.mid",
    "midi/mozart_k155_mvt1.mid", "edge/drums.mid", "edge/sustain.mid", "edge/tempo_changes.mid",
    "edge/multi_instrument.mid", "edge/overlap_same_pitch.mid", "edge/chords.mid",
]  # fmt: skip


@pytest.mark.parametrize("name", FILES)
def test_decoded_files_equal_the_symusic_writer(name, fixtures_dir, same_midi) -> None:
    tokenizer = Tokenizer(data_config=DataConfig(drums="keep"))
    data = tokenizer.decode_to_data(tokenizer.encode_file(fixtures_dir / name))
    assert len(data.time) > 0
    same_midi(midi_bytes(data), data.to_score().dumps_midi())


def test_many_tracks_drums_pedal_and_tempi(same_midi) -> None:
    """18 tracks (channels wrap past 15, drums on 9), same-tick re-strikes, pedal at note
    times, three tempos and a note with a long name."""
    rng = np.random.default_rng(0)
    n = 300
    tracks = [(f"t{i}" * (40 if i == 1 else 1), (i * 7) % 128, i in (3, 12)) for i in range(18)]
    time = rng.integers(0, 12, n) * 240
    data = MidiData(
        tpq=480, time=time, duration=rng.integers(1, 4, n) * 240, pitch=rng.integers(30, 40, n),
        velocity=rng.integers(1, 128, n), track=rng.integers(0, 18, n), tracks=tracks,
        tempo_time=np.array([0, 960, 2400]), tempo_qpm=np.array([100.0, 61.5, 180.0]),
        pedal_time=np.array([0, 480, 960, 480]), pedal_track=np.array([0, 0, 2, 3]),
        pedal_on=np.array([True, False, True, True]),
    )  # fmt: skip
    # one note per (track, pitch, tick) at most: a MIDI file cannot hold two
    key = (data.track << 40) + (data.pitch << 32) + data.time
    _, first = np.unique(key, return_index=True)
    data.select(np.sort(first))
    data.duration = np.minimum(data.duration, 240)  # no overlap of one pitch in a track
    same_midi(midi_bytes(data), data.to_score().dumps_midi())


@pytest.mark.parametrize(
    "times, keys, tempos",
    [([(0, 3, 4)], [(0, -4, 0)], [0]), ([(0, 6, 8), (1920, 2, 2)], [(0, 3, 1), (960, -2, 1)], []),
     ([(0, 5, 16)], [], [0, 480]), ([], [(0, 7, 0), (480, -7, 1)], [480])],
)  # fmt: skip
def test_time_and_key_signatures_are_written(times, keys, tempos, same_midi) -> None:
    """What generation knows of its piece (the meter asked, the key found) is in the file:
    time and key signatures beside the tempos, as symusic writes them."""
    import symusic

    data = MidiData(
        tpq=480, time=np.array([0, 480]), duration=np.array([480, 480]), pitch=np.array([60, 64]),
        velocity=np.array([90, 90]), track=np.array([0, 0]), tracks=[("Soprano", 0, False)],
        tempo_time=np.array(tempos, np.int64), tempo_qpm=np.full(len(tempos), 90.0),
        time_signatures=times, key_signatures=keys,
    )  # fmt: skip
    ours = midi_bytes(data)
    same_midi(ours, data.to_score().dumps_midi())
    score = symusic.Score.from_midi(ours)
    assert [(t.time, t.numerator, t.denominator) for t in score.time_signatures] == times
    assert [(k.time, k.key, k.tonality) for k in score.key_signatures] == keys


def test_an_empty_table_is_a_valid_file() -> None:
    import symusic

    score = symusic.Score.from_midi(midi_bytes(MidiData(480, *(np.zeros(0, np.int64),) * 5)))
    assert score.tpq == 480 and len(score.tracks) == 0


def test_channels_skip_the_drum_channel() -> None:
    assert [channel_of(i, False) for i in range(17)] == [*range(9), *range(10, 16), 0, 1]
    assert channel_of(5, True) == 9
