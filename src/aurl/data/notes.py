"""Note arrays: the one representation analysis and evaluation work on.

A note array is a numpy structured array of :data:`NOTE_DTYPE`, sorted by (onset, pitch)::

    onset, duration      float64, in quarter-note beats
    onset_s, duration_s  float64, in seconds (through the tempo map)
    pitch                int16, MIDI pitch 0..127
    velocity             int16, 1..127
    program              int16, General MIDI program 0..127; 128 for drums
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

NOTE_DTYPE = np.dtype(
    [
        ("onset", np.float64),
        ("duration", np.float64),
        ("onset_s", np.float64),
        ("duration_s", np.float64),
        ("pitch", np.int16),
        ("velocity", np.int16),
        ("program", np.int16),
    ]
)
DRUM_PROGRAM = 128


def pitched(notes: np.ndarray) -> np.ndarray:
    """The non-drum notes of a note array (drums carry no pitch in the musical sense)."""
    return notes[notes["program"] != DRUM_PROGRAM]


def empty_notes() -> np.ndarray:
    return np.zeros(0, dtype=NOTE_DTYPE)


def make_notes(
    onset: np.ndarray | list[float],
    duration: np.ndarray | list[float],
    pitch: np.ndarray | list[int],
    velocity: np.ndarray | list[int] | int = 80,
    program: np.ndarray | list[int] | int = 0,
    qpm: float = 120.0,
) -> np.ndarray:
    """A sorted note array from beat-based columns (seconds from a constant ``qpm``).

    Handy for hand-built examples in tests and analysis.
    """
    onset = np.asarray(onset, dtype=np.float64)
    n = onset.shape[0]
    notes = np.zeros(n, dtype=NOTE_DTYPE)
    notes["onset"] = onset
    notes["duration"] = np.broadcast_to(np.asarray(duration, dtype=np.float64), (n,))
    notes["onset_s"] = notes["onset"] * 60.0 / qpm
    notes["duration_s"] = notes["duration"] * 60.0 / qpm
    notes["pitch"] = np.broadcast_to(np.asarray(pitch), (n,))
    notes["velocity"] = np.broadcast_to(np.asarray(velocity), (n,))
    notes["program"] = np.broadcast_to(np.asarray(program), (n,))
    return np.sort(notes, order=["onset", "pitch"])


def notes_from_score(score) -> np.ndarray:  # score: symusic.Score (any time unit)
    """All notes of a symusic Score as one sorted note array (drums get program 128)."""
    import symusic

    if score.ttype != symusic.TimeUnit.tick:  # normalise: beats from ticks, seconds from tempo map
        score = score.to("tick")
    tpq = float(score.tpq)
    seconds = score.to("second")
    parts = []
    for track, track_s in zip(score.tracks, seconds.tracks):
        arr = track.notes.numpy()
        arr_s = track_s.notes.numpy()
        n = arr["time"].shape[0]
        if n == 0:
            continue
        part = np.zeros(n, dtype=NOTE_DTYPE)
        part["onset"] = arr["time"] / tpq
        part["duration"] = arr["duration"] / tpq
        part["onset_s"] = arr_s["time"]
        part["duration_s"] = arr_s["duration"]
        part["pitch"] = arr["pitch"]
        part["velocity"] = arr["velocity"]
        part["program"] = DRUM_PROGRAM if track.is_drum else track.program
        parts.append(part)
    if not parts:
        return empty_notes()
    return np.sort(np.concatenate(parts), order=["onset", "pitch"])


def notes_from_file(path: str | Path) -> np.ndarray:
    """Notes of a MIDI file (no repair; see ``aurl.data.midi_io`` for validated reading). The
    bytes pass the SMF pre-pass first (:func:`aurl.data.midi_io.checked_bytes`): never raw."""
    import symusic

    from aurl.data.midi_io import SANITIZE_DATA, checked_bytes

    data, _ = checked_bytes(path)
    return notes_from_score(symusic.Score.from_midi(data, sanitize_data=SANITIZE_DATA))
