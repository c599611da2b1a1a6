"""Export generated pieces: MIDI, MusicXML, piano-roll PNG and WAV.

Every writer takes a ``symusic.Score`` (what the tokenizer decodes to) and a path. Heavy
libraries load only when their format is asked for: music21 for MusicXML, matplotlib for PNG.
Files are written to a temporary name and renamed, so an interrupted run leaves no half file.

Output names are deterministic (:func:`output_paths`): the same command writes the same names,
and :func:`check_free` refuses to overwrite existing files unless ``force`` is set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from aurl.data.midi_io import MidiData
from aurl.data.midi_write import midi_bytes
from aurl.errors import AurlError, ConfigError
from aurl.fileio import atomic_write

FORMATS = ("mid", "musicxml", "png", "wav")
EXTENSIONS = {"mid": ".mid", "musicxml": ".musicxml", "png": ".png", "wav": ".wav"}
GRID_PER_BEAT = 4  # MusicXML grid: sixteenth notes


def parse_formats(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"mid,png"`` -> ``("mid", "png")``, checked against :data:`FORMATS`.

    Raises:
        ConfigError: an unknown format.
    """
    items = text.split(",") if isinstance(text, str) else list(text)
    formats = tuple(dict.fromkeys(f.strip().lower() for f in items if f.strip()))
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ConfigError(f"--format {','.join(items)}: choose from {','.join(FORMATS)}")
    return formats


def output_paths(
    out_dir: str | Path, count: int, formats: Sequence[str], *, stem: str = "sample"
) -> list[dict[str, Path]]:
    """Deterministic file names: ``{stem}_{i:03d}.{ext}`` for each piece and format."""
    out = Path(out_dir)
    return [
        {fmt: out / f"{stem}_{i:03d}{EXTENSIONS[fmt]}" for fmt in formats} for i in range(count)
    ]


def check_free(paths: Sequence[dict[str, Path]], *, force: bool) -> None:
    """Refuse to overwrite: raise unless no target exists or ``force`` is set.

    Raises:
        ConfigError: a target file exists (the message names it and says to pass --force).
    """
    if force:
        return
    existing = [p for piece in paths for p in piece.values() if p.exists()]
    if existing:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise ConfigError(
            f"{existing[0]}{more} already exist: choose another --out or pass --force to overwrite"
        )


def write_midi(score: Any, path: str | Path) -> Path:
    """Standard MIDI file with the score's tempo, velocities, pedal and programs.

    ``score``: a ``symusic.Score``, or a :class:`~aurl.data.midi_io.MidiData` table (what the
    tokenizer decodes to), written by :mod:`aurl.data.midi_write` without importing symusic."""
    if isinstance(score, MidiData):
        data = midi_bytes(score)
        return atomic_write(path, lambda p: p.write_bytes(data))
    return atomic_write(path, lambda p: score.dump_midi(str(p)))


def as_score(score: Any) -> Any:
    """``score`` as a ``symusic.Score`` (a :class:`~aurl.data.midi_io.MidiData` converted)."""
    return score.to_score() if isinstance(score, MidiData) else score


def score_to_music21(score: Any, *, grid: int = GRID_PER_BEAT) -> Any:
    """A music21 score of ``score``: one part per track, onsets and durations quantized to a
    grid of ``1/grid`` beat, simultaneous notes of equal length merged into chords.

    The beat is the score's quarter note (its ticks per quarter, written from the TEMPO tokens),
    and the first tempo becomes a metronome mark, so the notation follows the generated tempo.
    The score's time and key signatures go into every part (music21 bars the parts by them;
    without one, 4/4), and pitches are spelled in the key in force (:func:`spelling`: Ab, not
    G#, in F minor).
    """
    import symusic
    from music21 import chord, instrument, key, meter, note, stream, tempo

    if score.ttype != symusic.TimeUnit.tick:
        score = score.to("tick")
    tpq = float(score.tpq)
    signatures = [(t.time / tpq, f"{t.numerator}/{t.denominator}") for t in score.time_signatures
                  if 0 < t.numerator <= 64 and t.denominator in (1, 2, 4, 8, 16, 32, 64)]  # fmt: skip
    keys = [(k.time / tpq, int(k.key)) for k in score.key_signatures if -7 <= k.key <= 7]
    out = stream.Score()
    for track in score.tracks:
        arr = track.notes.numpy()
        if len(arr["time"]) == 0:
            continue
        onset = np.round(arr["time"] / tpq * grid) / grid
        duration = np.maximum(np.round(arr["duration"] / tpq * grid) / grid, 1.0 / grid)
        part = stream.Part()
        part.partName = track.name or None
        drum = track.is_drum
        part.insert(0, instrument.UnpitchedPercussion() if drum else
                    instrument.instrumentFromMidiProgram(int(track.program)))  # fmt: skip
        for at, ratio in signatures:
            part.insert(at, meter.TimeSignature(ratio))
        for at, sharps in () if drum else keys:
            part.insert(at, key.KeySignature(sharps))
        groups: dict[tuple[float, float], list[int]] = {}
        for i in np.lexsort((arr["pitch"], onset)):
            groups.setdefault((float(onset[i]), float(duration[i])), []).append(int(i))
        for (start, length), members in groups.items():
            pitches = sorted({int(arr["pitch"][i]) for i in members})
            element = (
                note.Note(pitches[0], quarterLength=length)
                if len(pitches) == 1
                else chord.Chord(pitches, quarterLength=length)
            )
            element.volume.velocity = int(arr["velocity"][members[0]])
            if keys and not drum:  # spelled in the key in force at the onset
                _, sharps = next((k for k in reversed(keys) if k[0] <= start), keys[0])
                names = spelling(sharps)
                for p in element.pitches:
                    _respell(p, names)
            part.insert(start, element)
        out.insert(0, part)
    qpm = float(score.tempos[0].qpm) if len(score.tempos) else math.nan
    if len(out.parts) and math.isfinite(qpm):  # a Set Tempo of 0 us per beat reads as inf
        out.parts[0].insert(0, tempo.MetronomeMark(number=max(1, round(qpm))))
    return out


_LETTERS = "CDEFGAB"
_NATURAL = (0, 2, 4, 5, 7, 9, 11)  # the letters' pitch classes
_FIFTHS = "FCGDAEB"  # the letters along the line of fifths (F = -1, C = 0, G = 1, ...)


def spelling(sharps: int) -> dict[int, tuple[str, int]]:
    """Pitch class -> (letter, alteration) under a key signature of ``sharps`` (negative:
    flats): each pitch class gets the name nearest, on the line of fifths, to the middle of
    the key's scale with its relative minor's raised sixth and seventh (``sharps + 3.5``). The
    key's own notes keep their names, a minor's raised notes are sharpened (D minor's C#, not
    Db), and so is a chromatic note that leads to a degree of the key (F major's B of V/V, G
    minor's C#; a file's signature seldom says its mode); a flattened seventh stays flat (C
    major's Bb)."""
    out = {}
    for pc in range(12):
        base = (7 * pc) % 12  # a position of this pitch class; the others are 12 apart
        pos = min((base + 12 * k for k in range(-2, 2)), key=lambda x: abs(x - (sharps + 3.5)))
        out[pc] = (_FIFTHS[(pos + 1) % 7], (pos + 1) // 7)
    return out


def _respell(p: Any, names: dict[int, tuple[str, int]]) -> None:
    """Spell the music21 pitch ``p`` as ``names`` says for its pitch class, sounding the same."""
    from music21 import pitch

    midi = p.midi
    letter, alter = names[midi % 12]
    p.step = letter
    p.accidental = pitch.Accidental(alter) if alter else None
    p.octave = (midi - alter - _NATURAL[_LETTERS.index(letter)]) // 12 - 1


def write_musicxml(score: Any, path: str | Path) -> Path:
    """MusicXML through music21 (quantized, see :func:`score_to_music21`)."""
    m21 = score_to_music21(score)
    return atomic_write(path, lambda p: m21.write("musicxml", fp=str(p)))


def write_piano_roll(notes: np.ndarray, path: str | Path, *, title: str = "") -> Path:
    """Piano-roll PNG of a note array: time in seconds across, pitch up, one colour per program.

    Args:
        notes: Note array (:data:`aurl.data.notes.NOTE_DTYPE`).
        path: Target ``.png``.
        title: Optional plot title.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.collections import PolyCollection
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    if len(notes):
        x0, w = notes["onset_s"], np.maximum(notes["duration_s"], 1e-3)
        y0 = notes["pitch"].astype(np.float64) - 0.4
        # One rectangle per note, (N, 4 corners, xy), drawn as a single collection (fast).
        verts = np.stack(
            [
                np.stack([x0, y0], -1),
                np.stack([x0 + w, y0], -1),
                np.stack([x0 + w, y0 + 0.8], -1),
                np.stack([x0, y0 + 0.8], -1),
            ],
            axis=1,
        )
        colours = matplotlib.colormaps["tab20"](notes["program"] % 20)
        ax.add_collection(PolyCollection(verts, facecolors=colours, edgecolors="none"))
        ax.set_xlim(0, float((x0 + w).max()) * 1.01)
        ax.set_ylim(int(notes["pitch"].min()) - 2, int(notes["pitch"].max()) + 2)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("MIDI pitch")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return atomic_write(path, lambda p: fig.savefig(str(p), format="png"))


def write_wav(
    score: Any, path: str | Path, soundfont: str | Path, sample_rate: int = 44100
) -> Path:
    """Render the score with symusic's synthesizer and a SoundFont (.sf2 / .sf3) to 16-bit WAV.

    Raises:
        ConfigError: the SoundFont file does not exist.
    """
    import symusic

    soundfont = Path(soundfont)
    if not soundfont.is_file():
        raise ConfigError(f"--soundfont {soundfont} does not exist: give an .sf2 or .sf3 file")
    synth = symusic.Synthesizer(sf_path=str(soundfont), sample_rate=sample_rate)
    try:
        audio = np.asfortranarray(synth.render(score, stereo=True), dtype=np.float32)
    except TypeError as e:  # symusic 0.6.0 wheels fail to hand the buffer to numpy 2.x
        raise AurlError(
            f"WAV rendering failed inside symusic's synthesizer ({str(e).splitlines()[0]}): "
            "write MIDI and render it with fluidsynth, or install a symusic build that works"
        ) from None
    return atomic_write(path, lambda p: symusic.dump_wav(str(p), audio, sample_rate, True))


def export_piece(
    score: Any,
    notes: np.ndarray,
    paths: dict[str, Path],
    *,
    soundfont: str | Path | None = None,
    title: str = "",
) -> list[Path]:
    """Write one piece in every format of ``paths``; returns the paths written, in order.

    ``score``: a ``symusic.Score`` or a :class:`~aurl.data.midi_io.MidiData` table; a table
    becomes a score only for the formats that need one (MusicXML, WAV), so MIDI and PNG alone
    never import symusic.

    WAV: through ``soundfont`` (symusic's SoundFont synthesizer) where one is given, else the
    built-in synthesizer (:mod:`aurl.generation.synth`).
    """
    written = []
    for fmt, path in paths.items():
        if fmt == "mid":
            written.append(write_midi(score, path))
        elif fmt == "musicxml":
            written.append(write_musicxml(as_score(score), path))
        elif fmt == "png":
            written.append(write_piano_roll(notes, path, title=title))
        elif fmt == "wav":
            if soundfont is None:  # the built-in synthesizer: no SoundFont, no symusic
                from aurl.generation import synth

                written.append(synth.write_wav(notes, path))
            else:
                written.append(write_wav(as_score(score), path, soundfont))
    return written


# --------------------------------------------------------------------------------------------
# Voices on tracks (SATB)
# --------------------------------------------------------------------------------------------


def notes_track(name: str, notes: np.ndarray, tpq: int, *, program: int = 0) -> Any:
    """A symusic track named ``name`` holding a note array (beats -> ticks at ``tpq``);
    ``program`` 128 (:data:`aurl.data.notes.DRUM_PROGRAM`) makes it a drum track."""
    import symusic

    drum = program == 128
    track = symusic.Track(name=name, program=0 if drum else program, is_drum=drum, ttype="tick")
    onset = np.round(notes["onset"] * tpq).astype(np.int64)
    end = np.round((notes["onset"] + notes["duration"]) * tpq).astype(np.int64)
    for t, e, p, v in zip(onset.tolist(), end.tolist(), notes["pitch"].tolist(),
                          notes["velocity"].tolist()):  # fmt: skip
        track.notes.append(symusic.Note(t, max(e - t, 1), int(p), int(v)))
    track.notes.sort()
    return track


def score_like(like: Any, tracks: Sequence[Any]) -> Any:
    """A tick score with ``like``'s resolution, tempos, time and key signatures and ``tracks``."""
    import symusic

    if like.ttype != symusic.TimeUnit.tick:
        like = like.to("tick")
    out = symusic.Score(like.tpq)
    out.tempos = like.tempos.copy()
    out.time_signatures = like.time_signatures.copy()
    out.key_signatures = like.key_signatures.copy()
    for track in tracks:
        out.tracks.append(track)
    return out


def voice_score(score: Any, n: int) -> Any:
    """``score`` with its pitched notes split into ``n`` voices on ``n`` tracks named by
    :func:`aurl.generation.voices.voice_names` (Soprano, Alto, Tenor, Bass for 4), by
    :func:`aurl.generation.voices.assign_voices`; drum tracks are kept as they are."""
    import symusic

    from aurl.data.notes import notes_from_score, pitched
    from aurl.generation.voices import assign_voices, voice_names

    if score.ttype != symusic.TimeUnit.tick:
        score = score.to("tick")
    notes = pitched(notes_from_score(score))
    voice = assign_voices(notes, n)
    program = int(notes["program"][0]) if len(notes) else 0
    tracks = [
        notes_track(name, notes[voice == v], score.tpq, program=program)
        for v, name in enumerate(voice_names(n))
    ]
    tracks += [t.copy() for t in score.tracks if t.is_drum]
    return score_like(score, tracks)


def signed(data: MidiData, meter: str = "", notes: np.ndarray | None = None) -> str:
    """Write into a decoded table what generation knows of its piece, at tick 0: the meter asked
    (``generation.meter``, e.g. ``3/4``; none: no time signature, 4/4 implied) and the key its
    notes are in (:func:`aurl.analysis.keys.estimate_key`; ``notes``: the table's, when the
    caller has them), so a notation program bars and spells it (:func:`score_to_music21` too).
    Returns the key's name, "no key" where the notes hold none (no key signature then)."""
    from aurl.analysis.keys import estimate_key
    from aurl.data.tokenizer import data_to_notes
    from aurl.errors import DataError

    data.time_signatures = [(0, *map(int, meter.split("/")))] if meter else []
    try:
        key = estimate_key(data_to_notes(data) if notes is None else notes)
    except DataError:
        data.key_signatures = []
        return "no key"
    data.key_signatures = [(0, key.sharps, int(key.mode == "minor"))]
    return key.name


def voice_data(data: MidiData, n: int) -> MidiData:
    """:func:`voice_score` on a :class:`~aurl.data.midi_io.MidiData` table (what the tokenizer
    decodes to), without symusic: the same split and the same tracks, so ``aurl generate``
    writes voices as MIDI without importing it (~0.1 s of a cold start). Pedal events are
    dropped, as :func:`voice_score` drops them."""
    import dataclasses

    from aurl.generation.voices import assign_voices, voice_names

    drum_track = np.array([d for _, _, d in data.tracks] + [False], dtype=bool)[data.track]
    pitched = np.flatnonzero(~drum_track)
    notes = np.zeros(len(pitched), dtype=[("onset", "f8"), ("duration", "f8"), ("pitch", "i8")])
    notes["onset"], notes["duration"] = data.time[pitched] / data.tpq, data.duration[pitched] / data.tpq
    notes["pitch"] = data.pitch[pitched]
    voice = assign_voices(notes, n)
    first = pitched[np.lexsort((data.pitch[pitched], data.time[pitched]))[:1]]
    program = data.tracks[int(data.track[first[0]])][1] if len(first) else 0
    drums = [i for i, (_, _, d) in enumerate(data.tracks) if d]
    track = np.empty(len(data.time), dtype=np.int64)
    track[pitched] = voice
    for k, i in enumerate(drums):  # drum tracks kept as they are, after the voices
        track[data.track == i] = n + k
    tracks = [(name, program, False) for name in voice_names(n)] + [data.tracks[i] for i in drums]
    empty = np.zeros(0, np.int64)
    return dataclasses.replace(
        data, track=track, tracks=tracks, pedal_time=empty, pedal_track=empty,
        pedal_on=np.zeros(0, bool),
    )  # fmt: skip
