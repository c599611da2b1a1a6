"""The built-in synthesizer (``--format wav`` without a SoundFont): each note sounds at its
pitch's frequency, from its onset for its duration plus the release, as loud as its velocity
asks; the file is 16-bit mono PCM; the commands write it with no SoundFont."""

from __future__ import annotations

import wave

import numpy as np

from aurl.cli import main
from aurl.data.notes import make_notes
from aurl.generation import synth

SR = synth.SAMPLE_RATE


def _notes(onsets, durations, pitches, velocities):
    """Notes in seconds (a quarter note a second)."""
    return make_notes(onsets, durations, pitches, velocities, qpm=60.0)


def _peaks_hz(x: np.ndarray, n: int = 1) -> list[float]:
    """The ``n`` strongest spectral peaks of ``x`` in Hz, ascending, each placed between its
    bins by a parabola through the log magnitudes (Hann window: a pure tone to ~0.1 Hz)."""
    mag = np.log(np.abs(np.fft.rfft(x * np.hanning(len(x)))) + 1e-12)
    local = np.flatnonzero((mag[1:-1] > mag[:-2]) & (mag[1:-1] >= mag[2:])) + 1
    top = local[np.argsort(mag[local])[-n:]]
    a, b, c = mag[top - 1], mag[top], mag[top + 1]
    return sorted(((top + 0.5 * (a - c) / (a - 2 * b + c)) * SR / len(x)).tolist())


def test_a_note_sounds_at_its_pitch_from_its_onset_for_its_length() -> None:
    x = synth.render(_notes([0.5], [1.0], [69], [100]))  # A4 from 0.5 s to 1.5 s
    assert len(x) == int(np.ceil((1.5 + synth.RELEASE_S) * SR)) + 1
    assert not x[: int(0.5 * SR)].any()  # silence before the onset
    (peak,) = _peaks_hz(x[int(0.75 * SR) : int(1.25 * SR)])  # 0.5 s: 2 Hz bins
    assert abs(peak - 440.0) < 0.3, peak
    assert abs(np.abs(x).max() - synth.PEAK) < 1e-6
    # the release: loud until the note's end, near silence well after it
    end = int(1.5 * SR)
    assert np.abs(x[end - 400 : end]).max() > 0.3
    assert np.abs(x[end + int(0.06 * SR) :]).max() < 0.02


def test_loudness_follows_velocity_and_notes_do_not_bleed() -> None:
    x = synth.render(_notes([0.0, 1.0], [0.5, 0.5], [60, 60], [40, 120]))
    first, second = x[int(0.1 * SR) : int(0.4 * SR)], x[int(1.1 * SR) : int(1.4 * SR)]
    ratio = np.sqrt((second**2).mean() / (first**2).mean())
    expected = (120 / 40) ** 1.5  # both 0.1-0.4 s into their note: the same envelope
    assert abs(ratio / expected - 1) < 0.01, ratio
    assert np.abs(x[int(0.7 * SR) : int(1.0 * SR)]).max() < 0.01  # the gap is silent


def test_a_chord_holds_each_of_its_pitches() -> None:
    x = synth.render(_notes([0, 0, 0], [1, 1, 1], [60, 64, 67], [90, 90, 90]))
    top3 = _peaks_hz(x[int(0.1 * SR) : int(0.9 * SR)], 3)
    assert np.allclose(top3, [261.626, 329.628, 391.995], atol=0.3), top3  # C4 E4 G4


def test_the_file_is_16_bit_mono_pcm_of_the_render(tmp_path) -> None:
    notes = _notes([0.0, 0.2], [0.3, 0.1], [72, 35], [80, 127])
    notes["program"][notes["pitch"] == 35] = 128  # a drum hit: noise, the same every time
    path = synth.write_wav(notes, tmp_path / "a.wav")
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, SR)
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    np.testing.assert_array_equal(pcm, np.round(synth.render(notes) * 32767).astype("<i2"))
    assert synth.render(notes[:0]).size == 0


def test_generate_and_harmonize_write_wav_without_a_soundfont(tmp_path, capsys) -> None:
    from aurl.cli.compose import read_score
    from aurl.data.notes import notes_from_score

    out = tmp_path / "g"
    assert main(["generate", "--seconds", "6", "--format", "mid,wav", "--out", str(out)]) == 0
    piece = notes_from_score(read_score(out / "sample_seed0_000.mid"))
    with wave.open(str(out / "sample_seed0_000.wav")) as w:
        seconds = w.getnframes() / w.getframerate()
    last = float((piece["onset_s"] + piece["duration_s"]).max())
    assert abs(seconds - (last + synth.RELEASE_S)) < 0.01, (seconds, last)
    melody = tmp_path / "m.mid"
    from aurl.generation.compose import parts_score
    from aurl.generation.export import write_midi

    write_midi(parts_score([("Melody", make_notes([0, 1, 2, 3], 1, [67, 69, 71, 72]))]), melody)
    assert main(["harmonize", str(melody), "--format", "wav", "--out", str(tmp_path / "h")]) == 0
    assert (tmp_path / "h" / "m_harmonized_seed0_000.wav").stat().st_size > 44
