"""The SMF pre-pass on hand-built files: each repair counted exactly, each refusal named, and
the clean fixtures passed through untouched (the fast path)."""

from __future__ import annotations

from pathlib import Path

import pytest
import symusic

from aurl.data.smf import PADDING, check_smf, walk_track
from aurl.errors import MidiReadError

FIXTURES = sorted((Path(__file__).parents[1] / "fixtures" / "midi").glob("*.mid"))
EOT = b"\x00\xff\x2f\x00"
NOTE = b"\x00\x90\x3c\x40" + b"\x60\x80\x3c\x00"  # C4 on, a beat (96 ticks) later off
NOTE2 = b"\x00\x90\x40\x40" + b"\x60\x40\x00"  # E4 on; off as running status, velocity 0


def chunk(cid: bytes, body: bytes, length: int | None = None) -> bytes:
    return cid + (len(body) if length is None else length).to_bytes(4, "big") + body


def smf(*chunks: bytes, ntracks: int | None = None, division: bytes = b"\x00\x60") -> bytes:
    n = sum(c[:4] == b"MTrk" for c in chunks) if ntracks is None else ntracks
    return b"MThd\x00\x00\x00\x06\x00\x01" + n.to_bytes(2, "big") + division + b"".join(chunks)


def notes(data: bytes) -> list[tuple[int, int, int]]:
    score = symusic.Score.from_midi(data)
    return sorted((n.time, n.duration, n.pitch) for t in score.tracks for n in t.notes)


CLEAN = smf(chunk(b"MTrk", NOTE + EOT), chunk(b"MTrk", NOTE2 + EOT))


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
def test_clean_files_pass_untouched(path):
    data = path.read_bytes()
    out, rep = check_smf(data)
    assert out == data + PADDING and rep.items() == []


def test_clean_hand_built_file():
    out, rep = check_smf(CLEAN)
    assert out == CLEAN + PADDING and rep.items() == []
    assert notes(out) == [(0, 96, 60), (0, 96, 64)]


def test_truncated_track_keeps_its_complete_events():
    data = CLEAN[: len(CLEAN) - len(EOT) - 2]  # cut inside the E4 note-off of track 2
    out, rep = check_smf(data)
    assert rep.items() == [("truncated_tracks", 1)]
    assert out.endswith(EOT + PADDING)
    # the E4 on survives without its off: symusic drops an unterminated note
    assert notes(out) == [(0, 96, 60)]


def test_cut_at_a_chunk_boundary_rewrites_the_track_count():
    first = smf(chunk(b"MTrk", NOTE + EOT), ntracks=2)  # track 2 missing entirely
    out, rep = check_smf(first)
    assert rep.items() == [("header_fixed", 1)]
    assert out[10:12] == b"\x00\x01" and notes(out) == [(0, 96, 60)]


def test_length_lying_short_clips_then_resynchronizes():
    body = NOTE + EOT
    data = smf(chunk(b"MTrk", body, length=5), chunk(b"MTrk", NOTE2 + EOT))
    out, rep = check_smf(data)
    assert rep.truncated_tracks == 1 and rep.junk_bytes == len(body) - 5
    assert out.count(b"MTrk") == 2 and notes(out) == [(0, 96, 64)]  # C4's off was cut


def test_length_lying_long_inside_the_file_is_overlong():
    second = chunk(b"MTrk", NOTE2 + EOT)
    data = smf(chunk(b"MTrk", NOTE + EOT, length=len(NOTE + EOT) + len(second)), second)
    out, rep = check_smf(data)
    assert rep.items() == [("overlong_tracks", 1)]
    assert notes(out) == [(0, 96, 60), (0, 96, 64)]


def test_length_past_the_end_of_the_file():
    data = smf(chunk(b"MTrk", NOTE + EOT, length=2**31))
    out, rep = check_smf(data)
    assert rep.items() == [("overlong_tracks", 1)] and notes(out) == [(0, 96, 60)]
    out, rep = check_smf(data[:-3])  # and cut inside the End of Track
    assert rep.items() == [("truncated_tracks", 1)] and notes(out) == [(0, 96, 60)]


def test_junk_tail_and_foreign_chunks_dropped():
    data = smf(chunk(b"MTrk", NOTE + EOT), chunk(b"XFIH", b"abcd"), chunk(b"MTrk", NOTE2 + EOT))
    out, rep = check_smf(data + b"\x13\x37" * 50)
    assert rep.items() == [("dropped_chunks", 1), ("junk_bytes", 100)]
    assert out == CLEAN + PADDING


def test_missing_end_of_track_added():
    out, rep = check_smf(smf(chunk(b"MTrk", NOTE)))
    assert rep.items() == [("end_of_track_added", 1)] and notes(out) == [(0, 96, 60)]


def test_header_longer_than_6_rewritten():
    data = b"MThd\x00\x00\x00\x08\x00\x01\x00\x01\x00\x60\xaa\xbb" + chunk(b"MTrk", NOTE + EOT)
    out, rep = check_smf(data)
    assert rep.items() == [("header_fixed", 1)] and out[4:8] == b"\x00\x00\x00\x06"
    assert notes(out) == [(0, 96, 60)]


def test_over_long_delta_time_ends_a_walked_track():
    """(Only a chunk that looks wrong is walked: this one lacks its End of Track.)"""
    data = smf(chunk(b"MTrk", NOTE + b"\xff\xff\xff\xff\x7f\x90\x3e\x40"))
    out, rep = check_smf(data)
    assert rep.truncated_tracks == 1 and notes(out) == [(0, 96, 60)]


@pytest.mark.parametrize(
    "data, reason",
    [
        (smf(chunk(b"MTrk", b"\x00\x3c\x40" + EOT)), "starts with running status"),
        (smf(chunk(b"MTrk", NOTE + EOT), division=b"\x00\x00"), "division of 0"),
        (smf(chunk(b"MTrk", NOTE + EOT), division=b"\xe5\x04"), "SMPTE division of 27 fps"),
        (smf(chunk(b"MTrk", NOTE + EOT), division=b"\xe8\x00"), "x 0 ticks"),
        (CLEAN[:13], "no complete 'MThd'"),
        (b"MThd\x00\x00\x00\x04" + CLEAN[8:], "damaged MIDI header"),
        (CLEAN[:14] + b"\x00" * 40, "no complete track chunk"),
    ],
    ids=["running-status", "division-0", "smpte-27", "smpte-0", "short", "hlen-4", "no-track"],
)
def test_refusals_name_the_reason(data, reason):
    with pytest.raises(MidiReadError, match=reason) as err:
        check_smf(data, "bad.mid")
    assert str(err.value).startswith("bad.mid: ")


def test_valid_smpte_and_empty_files_pass():
    smpte = smf(chunk(b"MTrk", NOTE + EOT), division=b"\xe7\x28")  # 25 fps x 40
    assert check_smf(smpte) == (smpte + PADDING, check_smf(smpte)[1])
    assert check_smf(smpte)[1].items() == []
    empty = smf(ntracks=0)
    assert check_smf(empty)[0] == empty + PADDING


@pytest.mark.parametrize(
    "body, stop, closed, problem",
    [
        (NOTE + EOT, len(NOTE + EOT), True, ""),
        (NOTE + b"\x00\xf3\x01", len(NOTE), False, "status byte 0xF3"),
        (NOTE + b"\x00\x90\x3c\xc0", len(NOTE), False, "data byte over 0x7F"),
        (NOTE + b"\x00\xff\x51\x03\x00\x00\x00", len(NOTE), False, "tempo"),
        (NOTE + b"\x00\xff\x01\x10ab", len(NOTE), False, "meta event cut off"),
        (NOTE + b"\x00\xf0\x03\x7e\x7f\xf7" + EOT, len(NOTE) + 6 + 4, True, ""),
        (b"\x00\xff\x03\x01x\x00\x3c\x40", 5, False, "running status without a status byte"),
    ],
    ids=["clean", "system-common", "data-byte", "tempo-zero", "meta-cut", "sysex", "rs-after-meta"],
)
def test_walk_track_stops_at_the_first_broken_event(body, stop, closed, problem):
    assert walk_track(body, 0, len(body)) == (stop, closed, walk_track(body, 0, len(body))[2])
    assert problem in walk_track(body, 0, len(body))[2]
