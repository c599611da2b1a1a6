"""The event vocabulary: id layout, value tables and bin conversions.

Default layout (774 ids; counts and order fixed by the design, parameters from VocabConfig)::

    0-3      START END PAD UNK
    4-91     NOTE_ON   pitch 21..108
    92-179   NOTE_OFF  pitch 21..108
    180-691  TIME_SHIFT 1..512 steps (1/32 beat, or 15.625 ms in `seconds` mode)
    692-723  VELOCITY bin (1..127 in 32 equal bins)
    724-725  SUSTAIN_ON SUSTAIN_OFF (CC64)
    726-757  TEMPO bin (60..200 BPM, geometric spacing)
    758-773  INSTRUMENT: General MIDI family (program // 8); following notes belong to it

Every table here is a numpy array indexed by id, so the tokenizer, the grammar and the model can
look ids up vectorized (``vocab.kind[ids]``, ``vocab.value[ids]``).
"""

from __future__ import annotations

from enum import IntEnum
from functools import cached_property

import numpy as np

from aurl.config import VocabConfig


class Kind(IntEnum):
    """What a token id means; ``Vocab.kind[id]`` gives one of these."""

    START = 0
    END = 1
    PAD = 2
    UNK = 3
    NOTE_ON = 4
    NOTE_OFF = 5
    TIME_SHIFT = 6
    VELOCITY = 7
    SUSTAIN_ON = 8
    SUSTAIN_OFF = 9
    TEMPO = 10
    INSTRUMENT = 11


START, END, PAD, UNK = 0, 1, 2, 3
# fill-in-the-middle sentinels, after the 774 music ids (only models with ``model.fim`` have
# them; aurl.data.fim): EOM is predicted, SUF PRE MID are placed
FIM_EOM, FIM_SUF, FIM_PRE, FIM_MID = 774, 775, 776, 777
FIM_SENTINELS = 4
# anticipation controls (only models with ``model.anticipation``; aurl.data.anticipation): the
# melody's NOTE_ONs copied ahead of their time, one id per pitch from here on (inputs only)
ANTICIPATION_BASE = FIM_EOM + FIM_SENTINELS

GM_FAMILIES = (
    "piano", "chromatic_percussion", "organ", "guitar", "bass", "strings", "ensemble", "brass",
    "reed", "pipe", "synth_lead", "synth_pad", "synth_effects", "ethnic", "percussive",
    "sound_effects",
)  # fmt: skip


class Vocab:
    """Id layout and conversions for one :class:`VocabConfig`."""

    def __init__(self, config: VocabConfig | None = None) -> None:
        self.config = config = config or VocabConfig()
        self.n_pitches = config.pitch_max - config.pitch_min + 1
        self.note_on = 4
        self.note_off = self.note_on + self.n_pitches
        self.time_shift = self.note_off + self.n_pitches  # id of a shift of 1 step
        self.velocity = self.time_shift + config.max_shift_steps
        self.sustain_on = self.velocity + config.velocity_bins
        self.sustain_off = self.sustain_on + 1
        self.tempo = self.sustain_off + 1
        self.instrument = self.tempo + config.tempo_bins
        self.size = self.instrument + config.num_instruments

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"Vocab(size={self.size}, time_unit={self.config.time_unit!r})"

    # -- tables indexed by id ----------------------------------------------------------------

    @cached_property
    def kind(self) -> np.ndarray:
        """(size,) uint8: the :class:`Kind` of each id."""
        k = np.full(self.size, Kind.UNK, dtype=np.uint8)
        k[[START, END, PAD, UNK]] = [Kind.START, Kind.END, Kind.PAD, Kind.UNK]
        k[self.note_on : self.note_off] = Kind.NOTE_ON
        k[self.note_off : self.time_shift] = Kind.NOTE_OFF
        k[self.time_shift : self.velocity] = Kind.TIME_SHIFT
        k[self.velocity : self.sustain_on] = Kind.VELOCITY
        k[self.sustain_on] = Kind.SUSTAIN_ON
        k[self.sustain_off] = Kind.SUSTAIN_OFF
        k[self.tempo : self.instrument] = Kind.TEMPO
        k[self.instrument : self.size] = Kind.INSTRUMENT
        return k

    @cached_property
    def value(self) -> np.ndarray:
        """(size,) int32: pitch for notes, steps for shifts, bin for velocity/tempo, family for
        instruments, 0 otherwise."""
        v = np.zeros(self.size, dtype=np.int32)
        pitches = np.arange(self.config.pitch_min, self.config.pitch_max + 1)
        v[self.note_on : self.note_off] = pitches
        v[self.note_off : self.time_shift] = pitches
        v[self.time_shift : self.velocity] = np.arange(1, self.config.max_shift_steps + 1)
        v[self.velocity : self.sustain_on] = np.arange(self.config.velocity_bins)
        v[self.tempo : self.instrument] = np.arange(self.config.tempo_bins)
        v[self.instrument : self.size] = np.arange(self.config.num_instruments)
        return v

    def names(self) -> list[str]:
        """Readable name of every id, e.g. ``NOTE_ON_60``, ``TIME_SHIFT_32``, ``TEMPO_12``."""
        out = []
        for kind, value in zip(self.kind, self.value):
            k = Kind(int(kind))
            has_value = k not in (Kind.START, Kind.END, Kind.PAD, Kind.UNK, Kind.SUSTAIN_ON,
                                  Kind.SUSTAIN_OFF)  # fmt: skip
            out.append(f"{k.name}_{int(value)}" if has_value else k.name)
        return out

    # -- ids from values (vectorized) ----------------------------------------------------------

    def note_on_id(self, pitch: np.ndarray | int) -> np.ndarray | int:
        return self.note_on + (np.asarray(pitch) - self.config.pitch_min)

    def note_off_id(self, pitch: np.ndarray | int) -> np.ndarray | int:
        return self.note_off + (np.asarray(pitch) - self.config.pitch_min)

    def shift_id(self, steps: np.ndarray | int) -> np.ndarray | int:
        """Id of a shift of ``steps`` (1..max_shift_steps)."""
        return self.time_shift - 1 + np.asarray(steps)

    # -- bins -----------------------------------------------------------------------------------

    def velocity_bin(self, velocity: np.ndarray | int) -> np.ndarray:
        """MIDI velocity 1..127 -> bin 0..velocity_bins-1 (equal-width bins)."""
        v = np.clip(np.asarray(velocity, dtype=np.int64), 1, 127)
        return np.minimum((v - 1) * self.config.velocity_bins // 127, self.config.velocity_bins - 1)

    @cached_property
    def bin_velocity(self) -> np.ndarray:
        """(velocity_bins,) int: the velocity each bin decodes to (middle of the bin)."""
        n = self.config.velocity_bins
        lo = 1 + np.ceil(np.arange(n) * 127 / n)
        hi = 1 + np.ceil((np.arange(n) + 1) * 127 / n) - 1
        return np.clip(np.round((lo + hi) / 2), 1, 127).astype(np.int32)

    @cached_property
    def bin_tempo(self) -> np.ndarray:
        """(tempo_bins,) float: the BPM each tempo bin decodes to (geometric spacing)."""
        c = self.config
        if c.tempo_bins == 1:
            return np.array([np.sqrt(c.tempo_min * c.tempo_max)])
        return np.geomspace(c.tempo_min, c.tempo_max, c.tempo_bins)

    @cached_property
    def _tempo_edges(self) -> np.ndarray:
        """(tempo_bins - 1,) log-BPM midpoints between neighbouring tempo bins."""
        log_t = np.log(self.bin_tempo)
        return (log_t[1:] + log_t[:-1]) / 2

    def tempo_bin(self, qpm: np.ndarray | float) -> np.ndarray:
        """Beats per minute -> nearest tempo bin (in log space); out of range -> end bins.

        The one tempo quantizer (the tokenizer's too): a searchsorted on the log-midpoints.
        """
        q = np.clip(np.asarray(qpm, dtype=np.float64), self.config.tempo_min, self.config.tempo_max)
        return np.searchsorted(self._tempo_edges, np.log(q))

    @staticmethod
    def program_family(program: np.ndarray | int) -> np.ndarray:
        """General MIDI program 0..127 -> family 0..15."""
        return np.asarray(program) // 8

    @staticmethod
    def family_program(family: np.ndarray | int) -> np.ndarray:
        """Family -> the first program of that family (e.g. strings -> 40, violin)."""
        return np.asarray(family) * 8

    # -- time -----------------------------------------------------------------------------------

    def seconds_per_step(self, qpm: float = 120.0) -> float:
        """Length of one TIME_SHIFT step in seconds (at ``qpm`` in beat mode)."""
        if self.config.time_unit == "seconds":
            return self.config.step_seconds
        return 60.0 / qpm / self.config.steps_per_beat
