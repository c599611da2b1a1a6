"""The Standard MIDI File layout checked in pure Python before any native parser sees the bytes.

symusic's C++ reader trusts the container: a track chunk cut short, a chunk length that lies,
a track count larger than the chunks present or a junk tail make it read (and on some runs
write) outside its buffer, and one bad file takes the whole process down. :func:`check_smf`
rebuilds what it hands on so that none of that can happen:

- the header is exactly ``MThd``, length 6, format 0/1/2 (another number is read as 1), a track count equal to the track chunks
  that follow, and a sane division (ticks per quarter > 0, or SMPTE 24/25/29.97/30 fps with
  ticks per frame > 0);
- only ``MTrk`` chunks follow, each wholly inside the bytes, each ending with End of Track;
  other chunks (``XFIH``, ...) and junk between or after chunks are dropped and counted;
- a chunk that looks wrong (runs past the end of the file, does not end with End of Track, or
  starts with running status) has its events walked: it is clipped to the complete events it
  holds (a truncated or overlong chunk) and closed with an End of Track;
- 16 zero bytes follow the last chunk, so that a parser's few bytes of read-ahead (a delta
  time and a status byte past a chunk's end) stay inside the buffer.

Speed: chunk headers are always walked (a few per file); events only in a chunk that looks
wrong (most files: none), so the pass costs a few microseconds on a clean file.

What cannot be repaired is refused with :class:`MidiReadError` naming the reason: a damaged
header, an unknown format, a division of zero, no complete track, or a track whose first event
has no status byte (its events cannot be framed).

The event walk is strict where the SMF specification is (data bytes below 0x80, no running
status after a meta or sysex event, delta times of at most 4 bytes, a tempo of 3 bytes that is
not zero): the first event that breaks a rule ends the track, as a truncation would.
"""

from __future__ import annotations

from dataclasses import dataclass

from aurl.errors import MidiReadError

END_OF_TRACK = b"\xff\x2f\x00"
PADDING = b"\x00" * 16  # after the last chunk: a native parser's read-ahead stays in bounds
SMPTE_FPS = (24, 25, 29, 30)  # 29 = 29.97 drop-frame
# channel message length (status byte included) by high nibble
_CHANNEL_LEN = {0x8: 3, 0x9: 3, 0xA: 3, 0xB: 3, 0xC: 2, 0xD: 2, 0xE: 3}


@dataclass
class SmfRepairs:
    """What :func:`check_smf` changed in the container (counts)."""

    truncated_tracks: int = 0  # track chunks clipped to the complete events they hold (and closed)
    end_of_track_added: int = 0  # whole tracks closed with the End of Track they lacked
    overlong_tracks: int = 0  # chunk lengths past the End of Track (the rest re-read as chunks)
    dropped_chunks: int = 0  # non-track chunks (or junk) between and after the tracks
    junk_bytes: int = 0  # bytes outside any chunk (a junk tail, a length that lied)
    header_fixed: int = 0  # header length or track count rewritten to match the chunks

    def items(self) -> list[tuple[str, int]]:
        return [(k, v) for k, v in vars(self).items() if v]


def _vlq(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """A variable-length quantity at ``pos``: (value, next pos); next pos -1 when incomplete
    or longer than 4 bytes (the SMF maximum)."""
    value = 0
    for _ in range(4):
        if pos >= end:
            return 0, -1
        b = data[pos]
        pos += 1
        value = (value << 7) | (b & 0x7F)
        if b < 0x80:
            return value, pos
    return 0, -1


def walk_track(data: bytes, start: int, end: int) -> tuple[int, bool, str]:
    """Walk the events of a track body ``data[start:end]``.

    Returns:
        ``(stop, closed, problem)``: ``stop`` is the end of the last complete, well-formed
        event (the End of Track included when ``closed``); ``problem`` says why the walk stopped
        early ("" when it reached an End of Track).
    """
    pos, status, stop = start, 0, start
    while pos < end:
        _, pos = _vlq(data, pos, end)
        if pos < 0:
            return stop, False, "delta time cut off or over 4 bytes"
        if pos >= end:
            return stop, False, "event cut off"
        b = data[pos]
        if b == 0xFF:  # meta: type, length, data
            if pos + 2 > end:
                return stop, False, "meta event cut off"
            kind = data[pos + 1]
            length, body = _vlq(data, pos + 2, end)
            if body < 0 or body + length > end:
                return stop, False, "meta event cut off"
            if kind == 0x51 and (length != 3 or data[body : body + 3] == b"\0\0\0"):
                return stop, False, "tempo event not 3 bytes or zero"
            pos, status = body + length, 0
            if kind == 0x2F:
                return pos, True, ""
        elif b in (0xF0, 0xF7):  # sysex: length, data
            length, body = _vlq(data, pos + 1, end)
            if body < 0 or body + length > end:
                return stop, False, "sysex event cut off"
            pos, status = body + length, 0
        elif b >= 0xF0:
            return stop, False, f"status byte 0x{b:02X} is not allowed in a file"
        else:  # channel message, or running status
            if b >= 0x80:
                status, first = b, pos + 1
            elif status:
                first = pos
            else:
                return stop, False, "running status without a status byte"
            n = _CHANNEL_LEN[status >> 4] - 1
            if first + n > end:
                return stop, False, "event cut off"
            if any(x >= 0x80 for x in data[first : first + n]):
                return stop, False, "data byte over 0x7F"
            pos = first + n
        stop = pos
    return stop, False, "no End of Track"


def _starts_with_status(data: bytes, start: int, end: int) -> bool:
    _, pos = _vlq(data, start, end)
    return 0 <= pos < end and data[pos] >= 0x80


def check_smf(
    data: bytes, name: str = "<bytes>", *, walk_all: bool = False
) -> tuple[bytes, SmfRepairs]:
    """Check and repair the SMF container of ``data``; return bytes safe for a native parser.

    Args:
        data: the whole file, starting with ``MThd`` (RIFF already unwrapped).
        name: the file, for error messages.
        walk_all: walk the events of every track, not only of those that look wrong (done
            by itself when the tracks found are not the header's count: a length that lies
            long can swallow the next chunk and still end with an End of Track).

    Returns:
        ``(bytes, repairs)``: the checked file (the input plus padding when nothing was wrong)
        and what was changed.

    Raises:
        MidiReadError: the header is damaged, the format or division is impossible, no
            complete track is left, or a track starts with running status.
    """
    n = len(data)
    if n < 14 or data[:4] != b"MThd":
        raise MidiReadError(f"{name}: not a MIDI file (no complete 'MThd' header)")
    hlen = int.from_bytes(data[4:8], "big")
    fmt = int.from_bytes(data[8:10], "big")
    ntracks = int.from_bytes(data[10:12], "big")
    if hlen < 6 or 8 + hlen > n:
        raise MidiReadError(f"{name}: damaged MIDI header (length {hlen}, expected 6)")
    if data[12] & 0x80:
        fps, per_frame = 256 - data[12], data[13]
        if fps not in SMPTE_FPS or per_frame == 0:
            raise MidiReadError(
                f"{name}: SMPTE division of {fps} fps x {per_frame} ticks is impossible "
                "(damaged header)"
            )
    elif int.from_bytes(data[12:14], "big") == 0:
        raise MidiReadError(f"{name}: division of 0 ticks per quarter (damaged header)")

    rep = SmfRepairs(header_fixed=int(hlen != 6 or fmt > 2))  # an unknown format read as 1
    fmt = 1 if fmt > 2 else fmt
    pieces: list[bytes | tuple[int, int]] = []  # clean chunks as (start, end), rebuilt as bytes
    pos = 8 + hlen
    while pos + 8 <= n:
        cid = data[pos : pos + 4]
        length = int.from_bytes(data[pos + 4 : pos + 8], "big")
        body, declared_end = pos + 8, pos + 8 + length
        if cid == b"MTrk":
            end = min(declared_end, n)
            if (
                not walk_all
                and declared_end <= n
                and length >= 4
                and data[end - 3 : end] == END_OF_TRACK
                and _starts_with_status(data, body, end)
            ):
                pieces.append((pos, declared_end))  # the fast path: events not walked
                pos = declared_end
                continue
            stop, closed, problem = walk_track(data, body, end)
            if problem == "running status without a status byte" and stop == body:
                raise MidiReadError(
                    f"{name}: track {len(pieces) + 1} starts with running status (no status "
                    "byte): its events cannot be framed"
                )
            if not closed and (problem != "no End of Track" or declared_end > n):
                rep.truncated_tracks += 1  # cut short: by the end of the file, a lying length,
            elif not closed:  # or a broken event; else whole but never closed
                rep.end_of_track_added += 1
            track = data[body:stop] + (b"" if closed else b"\x00" + END_OF_TRACK)
            pieces.append(b"MTrk" + len(track).to_bytes(4, "big") + track)
            if closed and stop < declared_end:  # overlong: the length ran past End of Track
                rep.overlong_tracks += 1
            pos = stop if closed else end
            continue
        if cid.isalpha() and declared_end <= n:  # another chunk type: not ours, dropped
            rep.dropped_chunks += 1
            pos = declared_end
            continue
        nxt = data.find(b"MTrk", pos + 1)  # junk: resynchronize on the next track chunk
        stop_at = n if nxt < 0 else nxt
        rep.junk_bytes += stop_at - pos
        pos = stop_at
    rep.junk_bytes += n - pos if pos < n else 0
    if not pieces and ntracks == 0 and not rep.items():
        return data + PADDING, rep  # a valid file without tracks (an empty piece)
    if not pieces:
        raise MidiReadError(f"{name}: no complete track chunk ('MTrk') in the file")
    if len(pieces) != ntracks:
        if not walk_all:
            return check_smf(data, name, walk_all=True)
        rep.header_fixed = 1
    if not rep.items():
        return data + PADDING, rep
    header = (
        b"MThd\0\0\0\x06" + fmt.to_bytes(2, "big") + len(pieces).to_bytes(2, "big") + data[12:14]
    )
    body = b"".join(data[p[0] : p[1]] if isinstance(p, tuple) else p for p in pieces)
    return header + body + PADDING, rep
