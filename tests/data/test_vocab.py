import numpy as np

from aurl.config import VocabConfig
from aurl.data.vocab import Kind, Vocab


def test_default_layout_is_the_designs_774():
    v = Vocab()
    assert v.size == 774
    assert (v.note_on, v.note_off, v.time_shift, v.velocity) == (4, 92, 180, 692)
    assert (v.sustain_on, v.sustain_off, v.tempo, v.instrument) == (724, 725, 726, 758)
    counts = np.bincount(v.kind, minlength=len(Kind))
    assert counts[Kind.NOTE_ON] == counts[Kind.NOTE_OFF] == 88
    assert counts[Kind.TIME_SHIFT] == 512 and counts[Kind.INSTRUMENT] == 16
    assert v.value[v.note_on_id(60)] == 60 and v.value[v.shift_id(512)] == 512


def test_velocity_bins_round_trip_within_one_bin():
    v = Vocab()
    vel = np.arange(1, 128)
    bins = v.velocity_bin(vel)
    assert bins.min() == 0 and bins.max() == 31
    assert np.array_equal(v.velocity_bin(v.bin_velocity[bins]), bins)


def test_tempo_bins_cover_the_range():
    v = Vocab()
    assert v.bin_tempo[0] == 60 and round(v.bin_tempo[-1]) == 200
    assert v.tempo_bin(120.0) == np.abs(np.log(v.bin_tempo / 120)).argmin()
    assert v.tempo_bin(30.0) == 0 and v.tempo_bin(400.0) == 31


def test_configurable_sizes():
    v = Vocab(VocabConfig(max_shift_steps=100, velocity_bins=8))
    assert v.size == 774 - 412 - 24
    assert v.seconds_per_step(120.0) == 0.015625
