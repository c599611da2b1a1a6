"""A small built-in synthesizer: ``--format wav`` without a SoundFont.

Every pitched note is a sum of sine partials (an organ-like tone, which suits chorales) under an
attack / decay / release envelope, its loudness from its velocity; drum notes (program 128) are
short decaying noise bursts. The mix is scaled to a fixed peak and written as 16-bit mono PCM
with the standard library's :mod:`wave`: nothing to download, no native code, no symusic. With
``--soundfont FILE`` the piece goes through symusic's SoundFont synthesizer instead
(:func:`aurl.generation.export.write_wav`).
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

from aurl.data.notes import DRUM_PROGRAM
from aurl.fileio import atomic_write

# Hz: every fundamental, and the partials under 11 kHz (higher ones are left out)
SAMPLE_RATE = 22050
# relative amplitudes of the partials 1, 2, 3, ...: a soft organ flue pipe
PARTIALS = (1.0, 0.45, 0.22, 0.12, 0.06)
ATTACK_S, RELEASE_S, DECAY_S = 0.012, 0.08, 2.5  # envelope: rise, fall after the end, sag
DRUM_S = 0.12  # a drum hit's length
PEAK = 0.89  # the loudest sample of the mix, of full scale (-1 dBFS)


def frequency(pitch: np.ndarray | int) -> np.ndarray:
    """Equal-tempered frequency in Hz of MIDI pitches (A4 = 69 = 440 Hz)."""
    return 440.0 * 2.0 ** ((np.asarray(pitch, dtype=np.float64) - 69.0) / 12.0)


def render(notes: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The mono mix of a note array (:data:`aurl.data.notes.NOTE_DTYPE`: ``onset_s``,
    ``duration_s``, ``pitch``, ``velocity``, ``program``) as float32 samples in [-PEAK, PEAK];
    it lasts until the last note's release ends (empty for no notes)."""
    if len(notes) == 0:
        return np.zeros(0, dtype=np.float32)
    onset = np.maximum(notes["onset_s"].astype(np.float64), 0.0)
    duration = np.maximum(notes["duration_s"].astype(np.float64), 0.0)
    drum = notes["program"] == DRUM_PROGRAM
    end = np.where(drum, onset + DRUM_S, onset + duration + RELEASE_S)
    out = np.zeros(int(np.ceil(end.max() * sample_rate)) + 1, dtype=np.float64)
    noise = np.random.default_rng(0)  # the same file for the same notes
    for i in range(len(notes)):
        start = int(round(onset[i] * sample_rate))
        gain = (int(notes["velocity"][i]) / 127.0) ** 1.5
        if drum[i]:
            t = np.arange(int(DRUM_S * sample_rate)) / sample_rate
            tone = noise.standard_normal(len(t)) * np.exp(-t / (DRUM_S / 5))
        else:
            t = np.arange(int((duration[i] + RELEASE_S) * sample_rate)) / sample_rate
            f = frequency(int(notes["pitch"][i]))
            tone = np.zeros(len(t))
            for k, a in enumerate(PARTIALS, start=1):
                if k * f < sample_rate / 2:  # no partial above Nyquist (it would alias)
                    tone += a * np.sin(2 * np.pi * k * f * t)
            envelope = np.minimum(t / ATTACK_S, 1.0) * np.exp(-t / DECAY_S)
            released = t > duration[i]
            envelope[released] *= np.exp(-(t[released] - duration[i]) / (RELEASE_S / 5))
            tone *= envelope
        piece = out[start : start + len(tone)]
        piece += gain * tone[: len(piece)]
    peak = float(np.abs(out).max())
    if peak > 0:
        out *= PEAK / peak
    return out.astype(np.float32)


def write_wav(notes: np.ndarray, path: str | Path, sample_rate: int = SAMPLE_RATE) -> Path:
    """Render ``notes`` (:func:`render`) into a 16-bit mono WAV file, written atomically."""
    pcm = np.round(render(notes, sample_rate) * 32767).astype("<i2").tobytes()

    def write(tmp: Path) -> None:
        with wave.open(str(tmp), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(sample_rate)
            w.writeframes(pcm)

    return atomic_write(path, write)
