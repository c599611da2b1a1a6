"""MIDI <-> token ids, vectorized over whole note arrays (numpy; no Python loop per note).

Canonical event order (docs/design.md). Time advances only with TIME_SHIFT tokens; a gap longer
than ``max_shift_steps`` is several shifts (full ones first, then the remainder). At each time
step the events come in this order:

1. TEMPO, when the tempo bin changes (always one right after START);
2. for each instrument family with events at this step, in ascending family order:
   INSTRUMENT (only when it differs from the current family), at most one SUSTAIN_OFF/ON change,
   NOTE_OFFs by ascending pitch, then NOTE_ONs by ascending pitch, each NOTE_ON preceded by
   VELOCITY when its bin differs from the last VELOCITY emitted;
3. END after the last event (it closes every sounding note); PAD only after END.

So a piece reads ``START TEMPO [INSTRUMENT] [SUSTAIN] NOTE_OFF* (VELOCITY? NOTE_ON)* TIME_SHIFT+
...  END``. A NOTE_OFF closes that pitch in the current family. The first INSTRUMENT and the first
VELOCITY are always written.

Time unit (``vocab.time_unit``): ``beat`` -- one step is 1/``steps_per_beat`` of a quarter note,
read from the file's ticks (score-derived music lands on the grid); decoding writes 480 ticks per
quarter and the TEMPO events. ``seconds`` -- one step is ``step_seconds`` whatever the tempo;
TEMPO tokens are still written (they describe the music) but decoding writes 120 BPM, where a
15.625 ms step is exactly 1/32 beat.

Instruments: the family is the General MIDI program // 8; tracks of one family share its notes.
Kept drums (``data.drums = "keep"``) use family 14 ("percussive": the vocabulary has no 17th
family) and decode as a drum track; decoded tracks get the family's first program.

Encoding rounds onsets and offsets to the nearest step (so each lands within half a step), gives
every note at least one step, and within one family keeps the longest of same-pitch notes at
one step and cuts a note at the next onset of its pitch (the tokens cannot hold two). A NOTE_ON that would take the sounding notes over
``data.polyphony_cap`` is dropped (counted in the report), so every encoded file obeys the
grammar (:mod:`aurl.data.grammar`).

Decoding never fails: ids outside the vocabulary, UNK and stray START/PAD are skipped and counted
(``Tokenizer.last_decode_unknown``); a NOTE_OFF with no sounding note is dropped; a NOTE_ON on a
sounding pitch ends the earlier note there; notes still sounding at END (or at the end of the ids)
are closed there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aurl.config import DataConfig, VocabConfig
from aurl.data.midi_io import (
    DRUM_FAMILY,
    MidiData,
    RepairReport,
    _from_symusic,
    read_midi_data,
    repair,
)
from aurl.data.notes import DRUM_PROGRAM, NOTE_DTYPE
from aurl.data.vocab import END, START, Kind, Vocab
from aurl.errors import MidiReadError
from aurl.fileio import atomic_write

DECODE_TPQ = 480

# Kind values as plain ints: comparing an array with an IntEnum member is much slower
_K_NOTE_ON, _K_NOTE_OFF, _K_TIME_SHIFT = int(Kind.NOTE_ON), int(Kind.NOTE_OFF), int(Kind.TIME_SHIFT)
_K_VELOCITY, _K_TEMPO, _K_INSTRUMENT = int(Kind.VELOCITY), int(Kind.TEMPO), int(Kind.INSTRUMENT)
_K_SUSTAIN_ON, _K_SUSTAIN_OFF, _K_UNK = int(Kind.SUSTAIN_ON), int(Kind.SUSTAIN_OFF), int(Kind.UNK)

# event categories, in their order within one family at one step
_TEMPO, _SUSTAIN, _OFF, _ON = 0, 1, 2, 3


@dataclass
class Decoded:
    """A token sequence read back as events on the step grid."""

    on: np.ndarray  # (N,) int64 onset step
    off: np.ndarray  # (N,) int64 offset step
    pitch: np.ndarray  # (N,) int64
    velocity_bin: np.ndarray  # (N,) int64
    family: np.ndarray  # (N,) int64
    tempo_step: np.ndarray
    tempo_bin: np.ndarray
    pedal_step: np.ndarray
    pedal_family: np.ndarray
    pedal_on: np.ndarray
    unknown: int  # ids skipped: outside the vocabulary, UNK, START/PAD in the middle


def _round_div(a: np.ndarray, b: int) -> np.ndarray:
    """Integer a / b rounded half up, exactly (ticks -> steps)."""
    return (2 * a + b) // (2 * b)


def _last_of_run(keys: np.ndarray) -> np.ndarray:
    """Mask of the last element of each run of equal consecutive keys."""
    out = np.ones(len(keys), bool)
    np.not_equal(keys[1:], keys[:-1], out=out[:-1])
    return out


def _first_of_run(keys: np.ndarray) -> np.ndarray:
    """Mask of the first element of each run of equal consecutive keys."""
    out = np.ones(len(keys), bool)
    np.not_equal(keys[1:], keys[:-1], out=out[1:])
    return out


class Tokenizer:
    """Encode MIDI files and Scores to ids and decode ids back (see the module docstring).

    Args:
        vocab_config: the vocabulary (default: the design's 774 ids, ``beat`` time unit).
        data_config: repair policy, size limits and ``polyphony_cap``.
    """

    def __init__(
        self, vocab_config: VocabConfig | None = None, data_config: DataConfig | None = None
    ) -> None:
        self.vocab = Vocab(vocab_config)
        self.vocab_config = self.vocab.config
        self.data_config = data_config or DataConfig()
        self.last_decode_unknown = 0
        # hot lookup tables, as plain arrays
        self._kind = self.vocab.kind.astype(np.int8)
        self._bin_velocity = self.vocab.bin_velocity.astype(np.int64)
        self._value = self.vocab.value.astype(np.int64)

    def __repr__(self) -> str:
        return f"Tokenizer({self.vocab!r})"

    # -------------------------------------------------------------------------------------------
    # Encoding
    # -------------------------------------------------------------------------------------------

    def encode_file(self, path: str | Path) -> np.ndarray:
        """Read, repair and encode a MIDI file: (n,) int64 ids, START ... END.

        Raises:
            MidiReadError: the file cannot be read or would make too many tokens.
        """
        return self.encode_file_with_report(path)[0]

    def encode_file_with_report(self, path: str | Path) -> tuple[np.ndarray, RepairReport]:
        """:meth:`encode_file` plus the file's :class:`RepairReport`."""
        md, report = read_midi_data(path, self.data_config, self.vocab_config, overlaps=False)
        return self.encode_data(md, report), report

    def encode_score(self, score, report: RepairReport | None = None) -> np.ndarray:
        """Encode a ``symusic.Score`` (any time unit); it is repaired like a file first."""
        import symusic

        if score.ttype != symusic.TimeUnit.tick:
            score = score.to("tick")
        report = report if report is not None else RepairReport(path="<score>")
        md = _from_symusic(score)
        md.name = report.path
        # same-pitch overlaps are resolved once, on the grid (grid_notes), where they count
        md = repair(md, report, self.data_config, self.vocab_config, overlaps=False)
        return self.encode_data(md, report)

    def encode_data(self, md: MidiData, report: RepairReport | None = None) -> np.ndarray:
        """Encode a repaired :class:`MidiData` table (the vectorized core)."""
        vc, v = self.vocab_config, self.vocab
        fam, on, off, pitch, vel = self.grid_notes(md, report)
        n = len(on)
        # tempo: the bin in effect at step 0 (MIDI's 120 BPM if none at tick 0), then changes
        t_time, t_qpm = md.tempo_time, md.tempo_qpm
        if len(t_time) == 0 or t_time[0] > 0:
            t_time, t_qpm = np.concatenate(([0], t_time)), np.concatenate(([120.0], t_qpm))
        t_step = self._steps(md, t_time)
        if len(t_step) > 1:
            keep = _last_of_run(t_step)  # the last tempo at each step wins
            t_step, t_bin = t_step[keep], v.tempo_bin(t_qpm[keep])
            change = _first_of_run(t_bin)
            t_step, t_bin = t_step[change], t_bin[change]
        else:
            t_bin = v.tempo_bin(t_qpm)
        # sustain: the last state per (family, step), written where it changes (off at first)
        if len(md.pedal_time):
            p_fam = md.track_family(vc.num_instruments)[md.pedal_track]
            p_step = self._steps(md, md.pedal_time)
            o = np.lexsort((md.pedal_time, p_step, p_fam))
            p_fam, p_step, p_on = p_fam[o], p_step[o], md.pedal_on[o]
            keep = _last_of_run((p_fam << 40) + p_step)
            p_fam, p_step, p_on = p_fam[keep], p_step[keep], p_on[keep]
            prev_on = np.zeros(len(p_on), bool)
            prev_on[1:] = p_on[:-1] & (p_fam[1:] == p_fam[:-1])
            change = p_on != prev_on
            p_fam, p_step, p_on = p_fam[change], p_step[change], p_on[change]
            p_tok = np.where(p_on, v.sustain_on, v.sustain_off)
        else:
            p_fam = p_step = p_tok = np.zeros(0, np.int64)

        nt, npd = len(t_step), len(p_step)
        step = np.concatenate((t_step, p_step, off, on))
        efam = np.concatenate((np.full(nt, -1), p_fam, fam, fam))
        cat = np.repeat(np.array([_TEMPO, _SUSTAIN, _OFF, _ON]), (nt, npd, n, n))
        tok = np.concatenate((v.tempo + t_bin, p_tok, v.note_off - vc.pitch_min + pitch,
                              v.note_on - vc.pitch_min + pitch))  # fmt: skip
        vbin = np.concatenate((np.full(nt + npd + n, -1), (vel - 1) * vc.velocity_bins // 127))
        # one int64 sort key per event: step, family, category, pitch (unique by now)
        sub = np.concatenate((np.zeros(nt + npd, np.int64), pitch, pitch))
        order = np.argsort((((step << 5) + efam + 1) << 9) + (cat << 7) + sub)
        step, efam, cat, tok, vbin = step[order], efam[order], cat[order], tok[order], vbin[order]

        first = self._first_over_cap(cat) if n > self.data_config.polyphony_cap else -1
        if first >= 0:
            dropped = self._cap_polyphony(order, cat, n, nt + npd, first)
            if report is not None:
                report.polyphony_dropped += int(dropped.sum())
                report.notes -= int(dropped.sum())
            keep_ev = np.ones(len(order), bool)
            keep_ev[nt + npd :] = ~np.concatenate((dropped, dropped))
            keep_ev = keep_ev[order]
            step, efam, cat, tok, vbin = (a[keep_ev] for a in (step, efam, cat, tok, vbin))
        return self._assemble(step, efam, cat, tok, vbin, md.name)

    def grid_notes(
        self, md: MidiData, report: RepairReport | None = None
    ) -> tuple[np.ndarray, ...]:
        """Notes on the step grid: (family, on, off, pitch, velocity).

        Sorted by (family, pitch, onset). Same-pitch notes of one family that collide on the
        grid are resolved as the tick-level repair does (equal onsets: the longest kept; else
        the earlier note cut at the later onset) and counted in ``report.duplicates`` and
        ``report.overlaps``.

        Raises:
            MidiReadError: the notes reach so far that the shifts alone would pass
                ``data.max_events_per_file`` tokens.
        """
        vc = self.vocab_config
        fam = md.track_family(vc.num_instruments)[md.track]
        on = self._steps(md, md.time)
        off = np.maximum(self._steps(md, md.time + md.duration), on + 1)
        pitch, vel = md.pitch, md.velocity
        n = len(on)
        if n and int(off.max()) // vc.max_shift_steps > self.data_config.max_events_per_file:
            raise MidiReadError(
                f"{md.name}: lasts {int(off.max())} steps, which would make more than "
                f"data.max_events_per_file={self.data_config.max_events_per_file} tokens"
            )
        if n < 2:
            return fam, on, off, pitch, vel
        base = ((fam << 7) + pitch) << 40  # steps < 2**40: bounded by the check above
        key = base + on
        o = np.argsort(key)
        ks = key[o]
        dup = np.zeros(n, bool)
        np.equal(ks[1:], ks[:-1], out=dup[1:])
        n_dup = int(dup.sum())
        if n_dup:  # equal onsets: order the longest first, then drop the others
            o = np.lexsort((-md.duration, -off, key))
            ks = key[o]
            dup[1:] = ks[1:] == ks[:-1]
            o = o[~dup]
        fam, on, off, pitch, vel, kb = fam[o], on[o], off[o], pitch[o], vel[o], base[o]
        cut = np.zeros(len(o), bool)
        cut[:-1] = (kb[1:] == kb[:-1]) & (off[:-1] > on[1:])
        n_cut = int(cut.sum())
        if n_cut:
            off[:-1] = np.where(cut[:-1], on[1:], off[:-1])
        if report is not None and (n_dup or n_cut):
            report.duplicates += n_dup
            report.overlaps += n_cut
            report.notes -= n_dup
        return fam, on, off, pitch, vel

    def _steps(self, md: MidiData, ticks: np.ndarray) -> np.ndarray:
        vc = self.vocab_config
        if vc.time_unit == "beat":
            return _round_div(np.asarray(ticks, np.int64) * vc.steps_per_beat, md.tpq)
        return np.floor(md.seconds(ticks) / vc.step_seconds + 0.5).astype(np.int64)

    def _first_over_cap(self, cat: np.ndarray) -> int:
        """Index of the first NOTE_ON (in token order) that takes the sounding count over the
        cap, or -1."""
        delta = (cat == _ON).view(np.int8) - (cat == _OFF).view(np.int8)
        count = np.cumsum(delta, dtype=np.int32)
        over = np.flatnonzero(count > self.data_config.polyphony_cap)
        return int(over[0]) if len(over) else -1

    def _cap_polyphony(
        self, order: np.ndarray, cat: np.ndarray, n: int, base: int, first: int
    ) -> np.ndarray:
        """Drop NOTE_ONs over the cap, in token order, from the first one over it on (a Python
        loop over the rest of the events: only files denser than the cap pay for it)."""
        cap = self.data_config.polyphony_cap
        dropped = [False] * n
        count = cap  # the count just before event ``first``, which would take it over
        ons, offs = _ON, _OFF
        for j, c in zip(order[first:].tolist(), cat[first:].tolist()):
            if c == ons:
                if count >= cap:
                    dropped[j - base - n] = True
                else:
                    count += 1
            elif c == offs and not dropped[j - base]:
                count -= 1
        return np.array(dropped, dtype=bool)

    def _assemble(self, step, efam, cat, tok, vbin, name: str) -> np.ndarray:
        """Sorted events -> ids: shifts, INSTRUMENT and VELOCITY tokens inserted (vectorized)."""
        v, max_shift = self.vocab, self.vocab_config.max_shift_steps
        m = len(step)
        delta = step.copy()
        delta[1:] -= step[:-1]
        nshift = -(-delta // max_shift)  # ceil
        # INSTRUMENT before the first event of a family run (tempo events do not count)
        is_fam = cat != _TEMPO
        fam_ev = efam[is_fam]
        new_fam = np.zeros(m, bool)
        new_fam[is_fam] = _first_of_run(fam_ev)
        # VELOCITY before a NOTE_ON whose bin differs from the previous NOTE_ON's
        is_on = cat == _ON
        on_bins = vbin[is_on]
        new_vel = np.zeros(m, bool)
        new_vel[is_on] = _first_of_run(on_bins)
        length = nshift + new_fam + new_vel + 1
        total = int(length.sum()) + 2
        if total > self.data_config.max_events_per_file:
            raise MidiReadError(
                f"{name}: would make {total} tokens, over data.max_events_per_file="
                f"{self.data_config.max_events_per_file}; raise it to encode this file"
            )
        ids = np.empty(total, np.int64)
        ids[0], ids[-1] = START, END
        start = 1 + np.cumsum(length) - length  # where each event's block begins
        # shifts: full ones, then the remainder
        ns = int(nshift.sum())
        if ns and int(nshift.max()) == 1:  # the common case: every gap fits one shift
            has = nshift == 1
            ids[start[has]] = v.time_shift - 1 + delta[has]
        elif ns:
            owner = np.repeat(np.arange(m), nshift)
            j = np.arange(ns) - np.repeat(np.cumsum(nshift) - nshift, nshift)
            last = j == nshift[owner] - 1
            size = np.where(last, delta[owner] - max_shift * (nshift[owner] - 1), max_shift)
            ids[start[owner] + j] = v.time_shift - 1 + size
        pos = start + nshift
        ids[pos[new_fam]] = v.instrument + efam[new_fam]
        pos = pos + new_fam
        ids[pos[new_vel]] = v.velocity + vbin[new_vel]
        ids[pos + new_vel] = tok
        return ids

    # -------------------------------------------------------------------------------------------
    # Decoding
    # -------------------------------------------------------------------------------------------

    def decode_events(self, ids: np.ndarray) -> Decoded:
        """Ids -> events on the grid (never raises; see the module docstring for the rules)."""
        v = self.vocab
        ids = np.asarray(ids).ravel().astype(np.int64, copy=False)
        ends = np.flatnonzero(ids == END)
        if len(ends):
            ids = ids[: ends[0]]
        lead = int(len(ids) > 0 and ids[0] == START)
        ids = ids[lead:]
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= v.size):
            inside = (ids >= 0) & (ids < v.size)
            k = np.where(inside, self._kind[np.where(inside, ids, 0)], _K_UNK)
        else:
            k = self._kind[ids]
        meaningful = k >= _K_NOTE_ON  # START, END, PAD and UNK are the kinds below
        unknown = len(ids) - int(np.count_nonzero(meaningful))
        if unknown:
            ids, k = ids[meaningful], k[meaningful]
        val = self._value[ids]
        shift = np.where(k == _K_TIME_SHIFT, val, 0)
        after = np.cumsum(shift)
        step = after - shift
        end_step = int(after[-1]) if len(after) else 0
        # forward fill: the family / velocity bin in force at each token (run index by cumsum)
        is_fam, is_vel = k == _K_INSTRUMENT, k == _K_VELOCITY
        fam = np.concatenate(([0], val[is_fam]))[np.cumsum(is_fam)]
        vel = np.concatenate(([int(v.velocity_bin(64))], val[is_vel]))[np.cumsum(is_vel)]

        # pair NOTE_ON/NOTE_OFF per (family, pitch) in token order: sort by (key, position)
        note_at = np.flatnonzero((k == _K_NOTE_ON) | (k == _K_NOTE_OFF))
        key = ((fam[note_at] << 7) + val[note_at]) << 32  # positions < 2**32
        o = np.argsort(key + note_at)
        key_s, pos = key[o], note_at[o]
        is_on = k[pos] == _K_NOTE_ON
        nxt_same = ~_last_of_run(key_s)
        nxt_pos = np.roll(pos, -1)
        on_at = np.flatnonzero(is_on)
        start = step[pos[on_at]]
        closed = nxt_same[on_at]
        stop = np.where(closed, step[nxt_pos[on_at]], end_step)
        retrig = closed & is_on[np.minimum(on_at + 1, len(is_on) - 1)]
        keep = ~(retrig & (stop == start))  # re-struck at once: the first strike is nothing
        stop = np.maximum(stop, start + 1)
        p = pos[on_at][keep]
        start, stop = start[keep], stop[keep]
        order = np.argsort((start << 11) + (fam[p] << 7) + val[p])  # by onset, family, pitch
        p = p[order]
        t_sel = k == _K_TEMPO
        s_sel = (k == _K_SUSTAIN_ON) | (k == _K_SUSTAIN_OFF)
        return Decoded(
            on=start[order], off=stop[order], pitch=val[p], velocity_bin=vel[p],
            family=fam[p], tempo_step=step[t_sel], tempo_bin=val[t_sel],
            pedal_step=step[s_sel], pedal_family=fam[s_sel], pedal_on=k[s_sel] == _K_SUSTAIN_ON,
            unknown=unknown,
        )  # fmt: skip

    def decode_to_data(self, ids: np.ndarray) -> MidiData:
        """Ids -> a :class:`MidiData` table at 480 ticks per quarter (one track per family)."""
        vc, v = self.vocab_config, self.vocab
        d = self.decode_events(ids)
        self.last_decode_unknown = d.unknown
        if vc.time_unit == "beat":
            ticks_per_step = DECODE_TPQ / vc.steps_per_beat
            keep = _last_of_run(d.tempo_step)
            t_time = np.round(d.tempo_step[keep] * ticks_per_step).astype(np.int64)
            t_qpm = v.bin_tempo[d.tempo_bin[keep]]
        else:  # 120 BPM: a quarter is 0.5 s
            ticks_per_step = vc.step_seconds * 2 * DECODE_TPQ
            t_time, t_qpm = np.zeros(1, np.int64), np.array([120.0])
        n_fam = max(vc.num_instruments, 1)
        present = np.bincount(d.family, minlength=n_fam) + np.bincount(
            d.pedal_family, minlength=n_fam
        )
        fams = np.flatnonzero(present)
        track_of = np.zeros(n_fam, np.int64)
        track_of[fams] = np.arange(len(fams))
        drums = self.data_config.drums == "keep"
        tracks = [
            ("drums" if drums and f == DRUM_FAMILY else "", int(v.family_program(f)),
             bool(drums and f == DRUM_FAMILY))
            for f in fams.tolist()
        ]  # fmt: skip

        def ticks(steps: np.ndarray) -> np.ndarray:
            if float(ticks_per_step).is_integer():  # the default grid: exact integer ticks
                return steps * int(ticks_per_step)
            return np.round(steps * ticks_per_step).astype(np.int64)

        on, off = ticks(d.on), ticks(d.off)
        return MidiData(
            tpq=DECODE_TPQ, time=on, duration=np.maximum(off - on, 1), pitch=d.pitch,
            velocity=self._bin_velocity[d.velocity_bin], track=track_of[d.family],
            tracks=tracks, tempo_time=t_time, tempo_qpm=t_qpm, pedal_time=ticks(d.pedal_step),
            pedal_track=track_of[d.pedal_family], pedal_on=d.pedal_on,
        )  # fmt: skip

    def decode_to_score(self, ids: np.ndarray):
        """Ids -> ``symusic.Score`` in ticks (480 per quarter). Never raises on bad ids."""
        return self.decode_to_data(ids).to_score()

    def decode_to_midi(self, ids: np.ndarray, path: str | Path) -> Path:
        """Ids -> a MIDI file at ``path``, written atomically (parent folders created)."""
        score = self.decode_to_score(ids)
        return atomic_write(path, lambda tmp: score.dump_midi(str(tmp)))

    def decode_to_bytes(self, ids: np.ndarray) -> bytes:
        """Ids -> the bytes of a MIDI file."""
        return self.decode_to_score(ids).dumps_midi()

    def decode_to_notes(self, ids: np.ndarray) -> np.ndarray:
        """Ids -> a note array (:data:`aurl.data.notes.NOTE_DTYPE`), sorted by (onset, pitch)."""
        return data_to_notes(self.decode_to_data(ids))


def data_to_notes(md: MidiData) -> np.ndarray:
    """A :class:`MidiData` table as a note array (beats and seconds; drums get program 128)."""
    out = np.zeros(len(md.time), dtype=NOTE_DTYPE)
    out["onset"] = md.time / md.tpq
    out["duration"] = md.duration / md.tpq
    start = md.seconds(md.time)
    out["onset_s"] = start
    out["duration_s"] = md.seconds(md.time + md.duration) - start
    out["pitch"] = md.pitch
    out["velocity"] = md.velocity
    programs = np.array([DRUM_PROGRAM if d else p for _, p, d in md.tracks] or [0], np.int64)
    out["program"] = programs[md.track] if len(md.time) else 0
    return np.sort(out, order=["onset", "pitch"])


__all__ = ["Decoded", "Tokenizer", "data_to_notes"]
