"""Write a :class:`~aurl.data.midi_io.MidiData` table as a Standard MIDI File, without symusic.

Why: importing symusic costs ~0.17 s on a cold start (its package pulls a SoundFont
downloader: urllib, http, ssl), a sixth of the second ``aurl generate --engine onnx`` has.
This writer is numpy plus a few hundred bytes of Python per track, and writes what
``MidiData.to_score().dump_midi()`` writes as far as any reader can tell: the same notes (pitch,
start, end, velocity) on tracks of the same name, program and drum flag, the same tempo map and
the same sustain-pedal events (``tests/data/test_midi_write.py`` reads both files back).

Layout (SMF format 1, the table's ticks per quarter):

- track 1, the conductor: every time signature, key signature and tempo as a meta event, in
  that order within a tick (omitted when there are none);
- then one track per table track, in order: its name (when not empty), a Program Change at
  tick 0, the pedal's Control Change 64 (127 down, 0 up), NOTE_OFF (velocity 64) and NOTE_ON
  events; at one tick: pedal first, then offs, then ons (a re-struck pitch ends before it
  starts again), notes in (onset, pitch) order within each;
- channels as symusic assigns them: drums on 9, the i-th track on ``i % 15``, skipping 9;
- running status, End of Track right after the last event.
"""

from __future__ import annotations

import numpy as np

from aurl.data.midi_io import MidiData

# within one tick: pedal, then NOTE_OFF, then NOTE_ON (a re-struck pitch ends first)
_PEDAL, _OFF, _ON = 0, 1, 2


def _vlq(value: int) -> bytes:
    """A variable-length quantity (MIDI delta times and lengths)."""
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    return bytes(reversed(out))


def _chunk(body: bytes) -> bytes:
    return b"MTrk" + len(body).to_bytes(4, "big") + body


def _events(ticks: np.ndarray, messages: list[bytes]) -> bytes:
    """Delta-timed events (``ticks`` sorted, one message each) with running status, closed by
    End of Track."""
    out, status, last = bytearray(), -1, 0
    for tick, msg in zip(ticks.tolist(), messages):
        out += _vlq(tick - last)
        last = tick
        if msg[0] < 0xF0 and msg[0] == status:
            out += msg[1:]  # running status: the status byte is the previous one
        else:
            out += msg
            status = msg[0] if msg[0] < 0xF0 else -1  # meta events cancel running status
    return bytes(out + b"\x00\xff\x2f\x00")


def _time_signature(numerator: int, denominator: int) -> bytes:
    """A Time Signature meta event: the denominator as a power of two, 24 clocks a click,
    8 thirty-seconds a quarter."""
    return bytes((0xFF, 0x58, 4, numerator, max(denominator, 1).bit_length() - 1, 24, 8))


def channel_of(index: int, drum: bool) -> int:
    """The MIDI channel of the ``index``-th track: 9 for drums, else ``index % 15`` skipping 9."""
    if drum:
        return 9
    ch = index % 15
    return ch + (ch >= 9)


def midi_bytes(md: MidiData) -> bytes:
    """The bytes of a Standard MIDI File holding ``md`` (see the module docstring)."""
    chunks = []
    mspq = np.round(60e6 / np.asarray(md.tempo_qpm, np.float64)).astype(np.int64)
    conductor = [  # (tick, order within the tick, message)
        *((t, 0, _time_signature(n, d)) for t, n, d in md.time_signatures),
        *((t, 1, bytes((0xFF, 0x59, 2, sharps & 0xFF, minor))) for t, sharps, minor in md.key_signatures),
        *((t, 2, b"\xff\x51\x03" + m.to_bytes(3, "big"))
          for t, m in zip(np.asarray(md.tempo_time).tolist(), mspq.tolist())),
    ]  # fmt: skip
    if conductor:
        conductor.sort(key=lambda e: e[:2])  # stable: tempos keep their order within a tick
        ticks = np.array([e[0] for e in conductor], dtype=np.int64)
        chunks.append(_chunk(_events(ticks, [e[2] for e in conductor])))
    # notes by (onset, pitch), as MidiData.to_score orders them
    by_onset = np.lexsort((md.pitch, md.time))
    for i, (name, program, drum) in enumerate(md.tracks):
        ch = channel_of(i, drum)
        head = [b"\xff\x03" + _vlq(len(name.encode())) + name.encode()] if name else []
        head.append(bytes((0xC0 | ch, program & 0x7F)))
        sel = by_onset[md.track[by_onset] == i]
        ped = np.flatnonzero(md.pedal_track == i)
        n, p = len(sel), len(ped)
        # one row per event: (tick, kind, sequence) sorted; the sequence keeps note order
        tick = np.concatenate([md.pedal_time[ped], md.time[sel] + md.duration[sel], md.time[sel]])
        kind = np.repeat([_PEDAL, _OFF, _ON], [p, n, n])
        seq = np.concatenate([np.arange(p), np.arange(n), np.arange(n)])
        order = np.lexsort((seq, kind, tick))
        pitch = md.pitch[sel].tolist()
        velocity = md.velocity[sel].tolist()
        pedal = np.where(md.pedal_on[ped], 127, 0).tolist()
        msgs = []
        for k, s in zip(kind[order].tolist(), seq[order].tolist()):
            if k == _ON:
                msgs.append(bytes((0x90 | ch, pitch[s], velocity[s])))
            elif k == _OFF:
                msgs.append(bytes((0x80 | ch, pitch[s], 64)))
            else:
                msgs.append(bytes((0xB0 | ch, 64, pedal[s])))
        ticks = np.concatenate([np.zeros(len(head), np.int64), tick[order]]).astype(np.int64)
        chunks.append(_chunk(_events(ticks, head + msgs)))
    header = b"MThd" + (6).to_bytes(4, "big") + (1).to_bytes(2, "big")
    header += len(chunks).to_bytes(2, "big") + int(md.tpq).to_bytes(2, "big")
    return header + b"".join(chunks)


__all__ = ["channel_of", "midi_bytes"]
