"""Reading MIDI files: parse with symusic, validate and repair, count every repair.

``read_midi(path, data_config) -> (symusic.Score, RepairReport)`` is the public entry point. The
work happens on :class:`MidiData`, a flat table of every note of the file (numpy columns, one row
per note, all tracks together), so each repair is a handful of vectorized numpy operations,
never a Python loop per note. The tokenizer encodes straight from that table
(:func:`read_midi_data`) and skips building a Score it would only take apart again.

Repairs, in order (each counted in :class:`RepairReport`):

1. drum tracks dropped (``data.drums = "drop"``) or kept as family 14 (``"keep"``);
2. velocity-0 notes dropped (symusic already reads a velocity-0 NOTE_ON as a NOTE_OFF, as the MIDI
   standard says; this catches the rest);
3. absurd ticks: negative times, notes after a silence of more than ``MAX_GAP_BEATS`` (a stray
   event far beyond the music), durations over ``MAX_DURATION_BEATS`` (clipped);
4. zero/negative durations set to one grid step;
5. pitches outside the vocabulary's range folded by octaves or dropped (``data.out_of_range``);
6. same-pitch notes within one instrument family (the tokens cannot tell them apart): duplicates
   at one onset (e.g. two voices in unison) dropped but the longest, overlapping notes cut at
   the later onset;
7. tracks left without notes removed.

Files of type 0 (one track: split by channel), 1 and 2 (independent sequences, overlaid as
symusic, mido and pretty_midi read them) are accepted. SMPTE time division is converted to ticks
per quarter at 120 BPM (the file's seconds are kept).
A file over ``data.max_file_bytes``, or with more than ``data.max_events_per_file`` notes, is
refused with :class:`MidiReadError` before any large allocation; so is anything unparseable.
"""

from __future__ import annotations

import dataclasses
import io
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aurl.config import DataConfig, VocabConfig
from aurl.data.smf import check_smf
from aurl.errors import MidiReadError

MAX_GAP_BEATS = 4096  # ~34 min of silence at 120 BPM: anything after that is a stray event
MAX_DURATION_BEATS = 1024  # ~8.5 min at 120 BPM: longer notes are clipped to this


def absurd_timing(onsets: np.ndarray, durations: np.ndarray) -> str | None:
    """Why notes at ``onsets`` lasting ``durations`` (beats, from the piece's start) cannot be
    kept as they are, or None: a note longer than :data:`MAX_DURATION_BEATS`, or a silence of
    more than :data:`MAX_GAP_BEATS` before a note (the first one's from beat 0 included). The
    reading repairs such ticks; a caller that must keep the given notes as they are (the
    composing commands and the server) refuses them instead, since composing walks the
    silence and the held note token by token (a two-note file once ran toward a million
    tokens after announcing ~25)."""
    onsets, durations = np.asarray(onsets, float), np.asarray(durations, float)
    if len(onsets) == 0:
        return None
    longest = int(np.argmax(durations))
    if durations[longest] > MAX_DURATION_BEATS:
        return (f"the note at beat {onsets[longest] + 1:g} lasts {durations[longest]:g} beats, "
                f"more than {MAX_DURATION_BEATS} (~8.5 min at 120 BPM): shorten it")  # fmt: skip
    order = np.argsort(onsets, kind="stable")
    t = onsets[order]
    reach = np.maximum.accumulate(t + np.maximum(durations[order], 0.0))  # the music so far
    gaps = t - np.concatenate([[0.0], reach[:-1]])  # silence before each note
    i = int(np.argmax(gaps))
    if gaps[i] > MAX_GAP_BEATS:
        return (f"{gaps[i]:g} beats of silence before the note at beat {t[i] + 1:g}, more than "
                f"{MAX_GAP_BEATS} (~34 min at 120 BPM; a stray note far past the music?): "
                "remove the silence or the notes after it")  # fmt: skip
    return None
DRUM_FAMILY = 14  # kept drums share GM family 14 ("percussive"): the vocabulary has 16 families
MIN_TPQ = 1
FALLBACK_MAX_BYTES = 8 * 1024 * 1024  # the mido fallback is a Python loop: bound its time
# symusic's own sanitizer on: measured on the fuzz corpus (docs/design.md, "Hostile input"),
# the mode in which no checked mutant crashed a process; the repairs stay ours (smf, repair)
SANITIZE_DATA = True


def absurd_score_timing(score: Any) -> str | None:
    """:func:`absurd_timing` of the notes of a ``symusic`` score (any time unit: read in
    ticks), or None."""
    score = score.to("tick")
    notes = [t.notes.numpy() for t in score.tracks if len(t.notes)]
    if not notes:
        return None
    tpq = score.ticks_per_quarter
    time = np.concatenate([n["time"] for n in notes]).astype(np.int64)
    duration = np.concatenate([n["duration"] for n in notes]).astype(np.int64)
    return absurd_timing(time / tpq, duration / tpq)


@dataclass
class RepairReport:
    """What was wrong with one file and what was done about it (counts of notes or tracks)."""

    path: str = ""
    format: int = -1  # MIDI file type 0, 1 or 2 (-1: unknown)
    reader: str = "symusic"  # or "mido" when symusic rejected the file
    smpte: int = 0  # 1 when the file used SMPTE time division
    drum_tracks: int = 0  # drum tracks dropped
    velocity_zero: int = 0
    absurd_ticks: int = 0
    zero_duration: int = 0
    out_of_range_folded: int = 0
    out_of_range_dropped: int = 0
    duplicates: int = 0  # same family, pitch and onset (e.g. two voices in unison): one kept
    overlaps: int = 0  # same family and pitch, overlapping: the earlier note cut
    empty_tracks: int = 0
    polyphony_dropped: int = 0  # NOTE_ONs over data.polyphony_cap (counted by the tokenizer)
    # the container, repaired by the pre-pass (aurl.data.smf.SmfRepairs) before any native parse
    truncated_tracks: int = 0
    end_of_track_added: int = 0
    overlong_tracks: int = 0
    dropped_chunks: int = 0
    junk_bytes: int = 0
    header_fixed: int = 0
    notes: int = 0  # notes kept

    COUNTS = (
        "smpte", "drum_tracks", "velocity_zero", "absurd_ticks", "zero_duration",
        "out_of_range_folded", "out_of_range_dropped", "duplicates", "overlaps", "empty_tracks",
        "polyphony_dropped", "truncated_tracks", "end_of_track_added", "overlong_tracks",
        "dropped_chunks", "junk_bytes", "header_fixed",
    )  # fmt: skip

    @property
    def repairs(self) -> dict[str, int]:
        """The non-zero repair counts, by name."""
        out = {k: int(getattr(self, k)) for k in self.COUNTS if getattr(self, k)}
        if self.reader != "symusic":
            out["fallback_reader"] = 1
        return out

    @property
    def repaired(self) -> bool:
        return bool(self.repairs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class MidiData:
    """Every note of a file as flat numpy columns (ticks), plus tempo and sustain-pedal events.

    ``track`` indexes ``tracks`` (name, program, is_drum); ``family`` is the GM family the
    tokenizer uses (program // 8, or ``DRUM_FAMILY`` for kept drums).
    """

    tpq: int
    time: np.ndarray  # (N,) int64 onset ticks
    duration: np.ndarray  # (N,) int64 ticks
    pitch: np.ndarray  # (N,) int64
    velocity: np.ndarray  # (N,) int64 1..127
    track: np.ndarray  # (N,) int64
    tracks: list[tuple[str, int, bool]] = field(default_factory=list)
    tempo_time: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    tempo_qpm: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    pedal_time: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    pedal_track: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    pedal_on: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    name: str = "<score>"  # the file, for error messages
    # written, not read (what generation knows of its piece: the meter asked, the key found):
    # (tick, numerator, denominator) and (tick, sharps (negative: flats), minor 0 / 1)
    time_signatures: list[tuple[int, int, int]] = field(default_factory=list)
    key_signatures: list[tuple[int, int, int]] = field(default_factory=list)

    def track_family(self, num_instruments: int = 16) -> np.ndarray:
        """(n_tracks,) family of each track."""
        fam = [DRUM_FAMILY if drum else program // 8 for _, program, drum in self.tracks]
        return np.minimum(np.array(fam, dtype=np.int64), num_instruments - 1)

    def select(self, keep: np.ndarray) -> None:
        for name in ("time", "duration", "pitch", "velocity", "track"):
            setattr(self, name, getattr(self, name)[keep])

    def seconds(self, ticks: np.ndarray) -> np.ndarray:
        """Ticks -> seconds through the tempo map (120 BPM before the first tempo event)."""
        return ticks_to_seconds(ticks, self.tempo_time, self.tempo_qpm, self.tpq)

    def to_score(self):
        """The table as a ``symusic.Score`` in ticks (one symusic track per kept track)."""
        import symusic

        score = symusic.Score(self.tpq)
        if len(self.tempo_time):
            mspq = np.round(60e6 / self.tempo_qpm).astype(np.int32)
            score.tempos = symusic.Tempo.from_numpy(self.tempo_time.astype(np.int32), mspq)
        for tick, numerator, denominator in self.time_signatures:
            score.time_signatures.append(symusic.TimeSignature(tick, numerator, denominator))
        for tick, sharps, minor in self.key_signatures:
            score.key_signatures.append(symusic.KeySignature(tick, sharps, minor))
        # group by track keeping (time, pitch) order within each: a stable 16-bit radix sort
        order = np.argsort((self.time << 7) + self.pitch)  # by time, then pitch
        order = order[np.argsort(self.track[order].astype(np.int16), kind="stable")]
        bounds = np.searchsorted(self.track[order], np.arange(len(self.tracks) + 1))
        for i, (name, program, drum) in enumerate(self.tracks):
            sel = order[bounds[i] : bounds[i + 1]]
            track = symusic.Track(name, program, drum)
            track.notes = symusic.Note.from_numpy(
                self.time[sel].astype(np.int32), self.duration[sel].astype(np.int32),
                self.pitch[sel].astype(np.int8), self.velocity[sel].astype(np.int8),
            )  # fmt: skip
            ped = self.pedal_track == i
            if ped.any():
                track.controls = symusic.ControlChange.from_numpy(
                    self.pedal_time[ped].astype(np.int32), np.full(int(ped.sum()), 64, np.uint8),
                    np.where(self.pedal_on[ped], 127, 0).astype(np.uint8),
                )  # fmt: skip
            score.tracks.append(track)
        return score


def ticks_to_seconds(
    ticks: np.ndarray, tempo_time: np.ndarray, tempo_qpm: np.ndarray, tpq: int
) -> np.ndarray:
    """Vectorized tempo-map conversion: piecewise linear between tempo changes."""
    ticks = np.asarray(ticks, dtype=np.float64)
    if len(tempo_time) == 0 or tempo_time[0] > 0:  # MIDI's default tempo until the first event
        tempo_time = np.concatenate([[0], tempo_time])
        tempo_qpm = np.concatenate([[120.0], tempo_qpm])
    sec_per_tick = 60.0 / (np.asarray(tempo_qpm, dtype=np.float64) * tpq)
    starts = np.concatenate([[0.0], np.cumsum(np.diff(tempo_time) * sec_per_tick[:-1])])
    i = np.clip(np.searchsorted(tempo_time, ticks, side="right") - 1, 0, None)
    return starts[i] + (ticks - tempo_time[i]) * sec_per_tick[i]


# ------------------------------------------------------------------------------------------------
# Parsing
# ------------------------------------------------------------------------------------------------


def _load_bytes(path: Path, cfg: DataConfig) -> bytes:
    try:  # stat before open: opening a FIFO or a device could block forever
        st = os.stat(path)
    except FileNotFoundError:
        raise MidiReadError(f"{path}: no such file") from None
    except OSError as e:
        raise MidiReadError(f"{path}: cannot read ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        what = "a folder" if stat.S_ISDIR(st.st_mode) else "a device, pipe or socket"
        raise MidiReadError(f"{path}: not a file ({what}): give a MIDI file")
    if st.st_size == 0:
        raise MidiReadError(f"{path}: empty file (zero bytes)")
    if st.st_size > cfg.max_file_bytes:
        raise MidiReadError(
            f"{path}: {st.st_size} bytes is over data.max_file_bytes={cfg.max_file_bytes}; "
            "raise it to read this file"
        )
    try:
        with open(path, "rb") as f:
            data = f.read(cfg.max_file_bytes + 1)
    except OSError as e:
        raise MidiReadError(f"{path}: cannot read ({e.strerror})") from None
    if data[:4] == b"RIFF" and b"MThd" in data[:64]:  # RMID: a standard MIDI file inside RIFF
        data = data[data.index(b"MThd") :]
    if data[:4] != b"MThd":
        raise MidiReadError(f"{path}: not a MIDI file (no 'MThd' header)")
    if len(data) < 14:
        raise MidiReadError(f"{path}: truncated MIDI header ({len(data)} bytes)")
    return data


def _smpte_patch(data: bytes) -> tuple[bytes, int]:
    """SMPTE division -> a ticks-per-quarter header; returns (bytes, ticks per second or 0)."""
    if not data[12] & 0x80:
        return data, 0
    fps = 256 - data[12]  # the high byte is minus the frame rate (24, 25, 29 = 29.97, 30)
    fps = 30 if fps == 29 else fps
    tps = max(1, fps * data[13])
    patched = bytearray(data)
    patched[12:14] = min(tps, 0x7FFF).to_bytes(2, "big")
    return bytes(patched), tps


def _from_symusic(score) -> MidiData:
    tracks, arrays, pedals = [], [], []
    for i, tr in enumerate(score.tracks):
        tracks.append((tr.name, int(tr.program), bool(tr.is_drum)))
        arrays.append(tr.notes.numpy())
        if len(tr.controls):
            c = tr.controls.numpy()
            sel = c["number"] == 64
            if sel.any():
                pedals.append((c["time"][sel], np.full(int(sel.sum()), i), c["value"][sel] >= 64))

    def column(name: str) -> np.ndarray:
        if not arrays:
            return np.zeros(0, np.int64)
        return np.concatenate([a[name] for a in arrays]).astype(np.int64)

    t = score.tempos.numpy()
    md = MidiData(
        tpq=max(MIN_TPQ, int(score.tpq)), time=column("time"), duration=column("duration"),
        # int8 pitch/velocity from symusic: a byte over 127 wraps negative, so keep 7 bits
        pitch=column("pitch") & 0x7F, velocity=column("velocity") & 0x7F,
        track=np.repeat(np.arange(len(arrays)), [len(a["time"]) for a in arrays]),
        tracks=tracks, tempo_time=t["time"].astype(np.int64),
        tempo_qpm=60e6 / np.maximum(t["mspq"].astype(np.float64), 1.0),
    )  # fmt: skip
    if pedals:
        md.pedal_time = np.concatenate([p[0] for p in pedals]).astype(np.int64)
        md.pedal_track = np.concatenate([p[1] for p in pedals]).astype(np.int64)
        md.pedal_on = np.concatenate([p[2] for p in pedals])
    return md


def _from_mido(data: bytes) -> tuple[MidiData, int]:
    """The tolerant fallback: mido with clipping; a Python loop, used only for rejected files."""
    import mido

    mf = mido.MidiFile(file=io.BytesIO(data), clip=True)
    time, dur, pitch, vel, trk, tracks = [], [], [], [], [], []
    tempo_time, tempo_qpm, ped_t, ped_k, ped_on = [], [], [], [], []
    for mtrack in mf.tracks:
        now, programs, open_notes = 0, {}, {}
        index: dict[int, int] = {}  # channel -> track index of this MIDI track

        def track_of(ch: int, index=index, programs=programs, name=mtrack.name) -> int:
            if ch not in index:
                index[ch] = len(tracks)
                tracks.append((name, programs.get(ch, 0), ch == 9))
            return index[ch]

        for msg in mtrack:
            now += msg.time
            if msg.type == "set_tempo":
                tempo_time.append(now)
                tempo_qpm.append(60e6 / max(msg.tempo, 1))
            elif msg.type == "program_change":
                programs[msg.channel] = msg.program
                if msg.channel in index:
                    name, _, drum = tracks[index[msg.channel]]
                    tracks[index[msg.channel]] = (name, msg.program, drum)
            elif msg.type == "control_change" and msg.control == 64:
                ped_t.append(now)
                ped_k.append(track_of(msg.channel))
                ped_on.append(msg.value >= 64)
            elif msg.type in ("note_on", "note_off"):
                key = (msg.channel, msg.note)
                if msg.type == "note_on" and msg.velocity > 0:
                    open_notes.setdefault(key, []).append((now, msg.velocity))
                elif open_notes.get(key):
                    start, v = open_notes[key].pop(0)
                    time.append(start)
                    dur.append(now - start)
                    pitch.append(msg.note)
                    vel.append(v)
                    trk.append(track_of(msg.channel))
    md = MidiData(
        tpq=max(MIN_TPQ, int(mf.ticks_per_beat)),
        time=np.asarray(time, np.int64), duration=np.asarray(dur, np.int64),
        pitch=np.asarray(pitch, np.int64), velocity=np.asarray(vel, np.int64),
        track=np.asarray(trk, np.int64), tracks=tracks,
        tempo_time=np.asarray(tempo_time, np.int64), tempo_qpm=np.asarray(tempo_qpm, np.float64),
        pedal_time=np.asarray(ped_t, np.int64), pedal_track=np.asarray(ped_k, np.int64),
        pedal_on=np.asarray(ped_on, bool),
    )  # fmt: skip
    return md, int(mf.type)


def checked_bytes(path: str | Path, data_config: DataConfig | None = None):
    """The file's bytes after the container pre-pass (:func:`aurl.data.smf.check_smf`): what
    every native parser is given. Returns ``(bytes, SmfRepairs)``; raises MidiReadError."""
    path = Path(path)
    return check_smf(_load_bytes(path, data_config or DataConfig()), str(path))


def read_score(path: str | Path, data_config: DataConfig | None = None):
    """The file as symusic reads it, unrepaired (tracks, tempos, time and key signatures as
    written), from the checked bytes of :func:`checked_bytes` only: the one way to a raw
    ``symusic.Score`` of a file from outside. Raises MidiReadError (symusic's own complaint
    included)."""
    import symusic

    data, _ = checked_bytes(path, data_config)
    try:
        return symusic.Score.from_midi(data, sanitize_data=SANITIZE_DATA)
    except Exception as e:  # noqa: BLE001 - symusic raises several types
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MidiReadError(f"{path}: damaged MIDI file ({first})") from None


def parse_midi(
    path: str | Path, data_config: DataConfig | None = None
) -> tuple[MidiData, RepairReport]:
    """Parse a file into a :class:`MidiData` table (no repair yet); refuse what is too big.

    The bytes pass :func:`aurl.data.smf.check_smf` first (container repaired or refused), so
    symusic never sees a chunk that runs past the buffer."""
    import symusic

    cfg = data_config or DataConfig()
    path = Path(path)
    data = _load_bytes(path, cfg)
    report = RepairReport(path=str(path), format=int.from_bytes(data[8:10], "big"))
    data, smf = check_smf(data, str(path))
    for k, v in smf.items():
        setattr(report, k, v)
    data, tps = _smpte_patch(data)
    try:
        md = _from_symusic(symusic.Score.from_midi(data, sanitize_data=SANITIZE_DATA))
    except Exception as first:  # symusic rejects it: try the tolerant reader before giving up
        reason = str(first).replace("MiniMidi: ", "").replace(": iostream error", "")
        if len(data) > FALLBACK_MAX_BYTES:
            raise MidiReadError(f"{path}: damaged MIDI file ({reason})") from None
        try:
            md, _ = _from_mido(data)
        except Exception:
            raise MidiReadError(f"{path}: damaged MIDI file ({reason})") from None
        report.reader = "mido"
    if tps:  # one tick = 1/tps s; at 120 BPM with tpq=tps that needs every time doubled
        report.smpte = 1
        md.tpq = tps
        md.time *= 2
        md.duration *= 2
        md.pedal_time *= 2
        md.tempo_time, md.tempo_qpm = np.zeros(1, np.int64), np.array([120.0])
    if len(md.time) > cfg.max_events_per_file:
        raise MidiReadError(
            f"{path}: {len(md.time)} notes is over data.max_events_per_file="
            f"{cfg.max_events_per_file}; raise it to read this file"
        )
    return md, report


# ------------------------------------------------------------------------------------------------
# Repair
# ------------------------------------------------------------------------------------------------


def fold_pitch(pitch: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Move pitches outside ``[lo, hi]`` into it by whole octaves (may still miss a narrow range)."""
    up = np.where(pitch < lo, -((pitch - lo) // 12), 0)  # octaves up: ceil((lo - p) / 12)
    down = np.where(pitch > hi, -((hi - pitch) // 12), 0)  # octaves down: ceil((p - hi) / 12)
    return pitch + 12 * (up - down)


def repair(
    md: MidiData,
    report: RepairReport,
    data_config: DataConfig | None = None,
    vocab_config: VocabConfig | None = None,
    *,
    overlaps: bool = True,
) -> MidiData:
    """Validate and repair ``md`` in place (vectorized); counts go to ``report``.

    ``overlaps=False`` leaves same-pitch overlaps to the tokenizer, which resolves them on its
    grid (the same rule, after rounding) and counts them there.
    """
    cfg = data_config or DataConfig()
    vc = vocab_config or VocabConfig()
    drum_tracks = np.array([d for _, _, d in md.tracks], dtype=bool)
    # 1. drums
    if cfg.drums == "drop" and drum_tracks.any():
        report.drum_tracks += int(drum_tracks.sum())
        md.select(~drum_tracks[md.track])
    if len(md.time):
        _repair_notes(md, report, cfg, vc)
    # 6. same-pitch overlaps within one family
    if overlaps:
        dups, cuts = resolve_overlaps(md, md.track_family(vc.num_instruments)[md.track])
        report.duplicates += dups
        report.overlaps += cuts
    # 7. tracks without notes
    used = np.bincount(md.track, minlength=len(md.tracks)) > 0
    if not used.all():  # (also after dropping drum tracks)
        empty_non_drum = ~used & ~(drum_tracks & (cfg.drums == "drop"))
        report.empty_tracks += int(empty_non_drum.sum())
        remap = np.cumsum(used) - 1
        md.track = remap[md.track]
        keep_ped = used[md.pedal_track] if len(md.pedal_track) else np.zeros(0, bool)
        md.pedal_time, md.pedal_on = md.pedal_time[keep_ped], md.pedal_on[keep_ped]
        md.pedal_track = remap[md.pedal_track[keep_ped]]
        md.tracks = [t for t, u in zip(md.tracks, used) if u]
    # tempo: drop impossible events, keep the last one at each tick
    ok = np.isfinite(md.tempo_qpm) & (md.tempo_qpm > 0) & (md.tempo_time >= 0)
    if not ok.all():
        md.tempo_time, md.tempo_qpm = md.tempo_time[ok], md.tempo_qpm[ok]
    if len(md.tempo_time) > 1:
        o = np.argsort(md.tempo_time, kind="stable")
        tt, tq = md.tempo_time[o], md.tempo_qpm[o]
        last = np.append(tt[1:] != tt[:-1], True)
        md.tempo_time, md.tempo_qpm = tt[last], tq[last]
    report.notes = len(md.time)
    return md


def _repair_notes(md: MidiData, report: RepairReport, cfg: DataConfig, vc: VocabConfig) -> None:
    """Repairs 2-5 on a non-empty table; a few reductions first decide which can be needed."""
    t_min, t_max = int(md.time.min()), int(md.time.max())
    d_min, d_max = int(md.duration.min()), int(md.duration.max())
    # 2. velocity 0 (a silent note is no note); velocities are 1..127 from here on
    if int(md.velocity.min()) <= 0:
        silent = md.velocity <= 0
        report.velocity_zero += int(silent.sum())
        md.select(~silent)
    # 3. absurd ticks: negative, far beyond the music (a silence longer than MAX_GAP_BEATS,
    # which needs the notes to span at least that long), or endless notes
    max_gap = MAX_GAP_BEATS * md.tpq
    if t_min < 0 or t_max - t_min > max_gap:
        bad = md.time < 0
        order = np.argsort(md.time, kind="stable")
        t = md.time[order]
        reach = np.maximum.accumulate(t + np.maximum(md.duration[order], 0))
        gap = np.zeros(len(t), dtype=bool)
        gap[1:] = t[1:] - reach[:-1] > max_gap
        stray = np.zeros(len(t), dtype=bool)
        stray[order] = np.logical_or.accumulate(gap)  # everything after the first huge silence
        bad |= stray
        if bad.any():
            report.absurd_ticks += int(bad.sum())
            md.select(~bad)
    if d_max > MAX_DURATION_BEATS * md.tpq:
        report.absurd_ticks += int((md.duration > MAX_DURATION_BEATS * md.tpq).sum())
        md.duration = np.minimum(md.duration, MAX_DURATION_BEATS * md.tpq)
    # 4. zero / negative durations -> one grid step
    if d_min <= 0:
        short = md.duration <= 0
        report.zero_duration += int(short.sum())
        md.duration = np.where(short, max(1, round(md.tpq / vc.steps_per_beat)), md.duration)
    # 5. pitch range
    if len(md.pitch) and (md.pitch.min() < vc.pitch_min or md.pitch.max() > vc.pitch_max):
        out = (md.pitch < vc.pitch_min) | (md.pitch > vc.pitch_max)
        if cfg.out_of_range == "fold":
            md.pitch = np.where(out, fold_pitch(md.pitch, vc.pitch_min, vc.pitch_max), md.pitch)
        still = (md.pitch < vc.pitch_min) | (md.pitch > vc.pitch_max)
        report.out_of_range_dropped += int(still.sum())
        report.out_of_range_folded += int((out & ~still).sum())
        md.select(~still)


def resolve_overlaps(md: MidiData, family: np.ndarray) -> tuple[int, int]:
    """Cut same-pitch notes of one family so they never overlap.

    Returns (duplicates dropped, notes cut)."""
    n = len(md.time)
    if n < 2:
        return 0, 0
    key = family * 128 + md.pitch
    order = np.lexsort((-md.duration, md.time, key))  # by key, onset, longest first
    k, t, d = key[order], md.time[order], md.duration[order]
    same = np.zeros(n, dtype=bool)
    same[1:] = k[1:] == k[:-1]
    dup = same & np.append(False, t[1:] == t[:-1])  # same onset as the previous: drop
    if dup.any():
        order, k, t, d = order[~dup], k[~dup], t[~dup], d[~dup]
        same = np.append(False, k[1:] == k[:-1])
    # each note's end may not pass the next onset of the same key
    nxt_same = np.append(same[1:], False)
    nxt_t = np.append(t[1:], 0)
    cut = nxt_same & (t + d > nxt_t)
    n_dup, n_cut = int(dup.sum()), int(cut.sum())
    if n_dup or n_cut:
        d = np.where(cut, nxt_t - t, d)
        md.select(np.sort(order))
        new_d = np.empty(n, dtype=np.int64)
        new_d[order] = d
        md.duration = new_d[np.sort(order)]
    return n_dup, n_cut


def read_midi_data(
    path: str | Path,
    data_config: DataConfig | None = None,
    vocab_config: VocabConfig | None = None,
    *,
    overlaps: bool = True,
) -> tuple[MidiData, RepairReport]:
    """Parse and repair ``path`` into a :class:`MidiData` table (the tokenizer's fast path)."""
    md, report = parse_midi(path, data_config)
    md.name = str(path)
    return repair(md, report, data_config, vocab_config, overlaps=overlaps), report


def read_midi(
    path: str | Path,
    data_config: DataConfig | None = None,
    vocab_config: VocabConfig | None = None,
):
    """Read, validate and repair a MIDI file.

    Args:
        path: a Standard MIDI File (type 0, 1 or 2; RIFF-wrapped RMID also read).
        data_config: repair policy and size limits (``out_of_range``, ``drums``,
            ``max_events_per_file``, ``max_file_bytes``).
        vocab_config: the pitch range and grid the repairs target (default vocabulary).

    Returns:
        ``(score, report)``: a ``symusic.Score`` in ticks and the :class:`RepairReport`.

    Raises:
        MidiReadError: missing, empty, damaged or not MIDI, or over the size limits.
    """
    md, report = read_midi_data(path, data_config, vocab_config)
    return md.to_score(), report
