"""Hostile requests that once got a 500, a crash of the handler, or an error naming no field:
each now gets one 4xx whose JSON names the field (found by an adversarial sweep over the
endpoints; tests/serve/test_bad_input.py holds the earlier sweep)."""

from __future__ import annotations

import pytest

from tests.serve.conftest import make_client
from tests.serve.test_api import CHORALE, error_of


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny):
    with make_client(tmp_path_factory.mktemp("hostile"), {"tiny": tiny}) as c:
        yield c


@pytest.mark.parametrize("part", ["\u00b2", "\u00b9", "\u0661", "\uff11"])
def test_infill_part_of_digits_python_reads_but_int_refuses_is_422(client, part):
    # '²'.isdigit() is True and int('²') raises: the request was a 500
    r = client.post("/api/infill", files={"file": ("c.mid", CHORALE.read_bytes())},
                    data={"bars": "1-1", "part": part})  # fmt: skip
    assert "0:Soprano" in error_of(r, 422, field="part")


@pytest.mark.parametrize("name", ["\u65e5\u672c\u8a9e.mid", 'a"b\\c.mid', "\u00e9t\u00e9.mid"])
def test_musicxml_of_a_file_named_in_any_script_is_a_reply(client, name):
    # the upload's name went into the Content-Disposition header as it came: a header is
    # Latin-1, so a Japanese name was a 500
    from urllib.parse import unquote

    r = client.post("/api/musicxml", files={"file": (name, CHORALE.read_bytes())})
    assert r.status_code == 200, r.text
    disposition = r.headers["content-disposition"]
    assert disposition.isascii() and disposition.count('"') == 2
    if name.isascii():  # the client sends '"' as %22 (and the name comes back so)
        return
    stem = name.rsplit(".", 1)[0]
    assert unquote(disposition.split("filename*=UTF-8''")[1]) == f"{stem}.musicxml"


@pytest.mark.parametrize(
    "first",
    [b'{"max_tokens": 40}', b"\xff\xfe", "[" * 100_000 + "]" * 100_000, '{"seed": ' + "9" * 5000 + "}",
     "hello"],
    ids=["binary", "binary-not-utf8", "deep", "5000-digits", "not-json"],
)  # fmt: skip
def test_stream_first_message_that_json_loads_chokes_on_is_an_error_message(client, first):
    # a binary frame (KeyError 'text'), deep nesting (RecursionError) and a 5,000-digit number
    # (ValueError) raised out of the handler: the socket closed with no message saying why
    from starlette.websockets import WebSocketDisconnect

    with client.websocket_connect("/api/generate/stream") as ws:
        ws.send_bytes(first) if isinstance(first, bytes) else ws.send_text(first)
        m = ws.receive_json()
        if first == b'{"max_tokens": 40}':  # JSON in a binary frame reads as in a text one
            assert m["type"] in ("note", "done"), m
            return
        assert m["type"] == "error" and m["status"] == 422, m
        assert "not JSON" in m["error"], m
        with pytest.raises(WebSocketDisconnect) as e:
            ws.receive_json()
        assert e.value.code == 4422


JSON = {"content-type": "application/json"}


@pytest.mark.parametrize(
    "path, body, headers",
    [("/api/generate", b'{"key": "\xff\xfe"}', JSON),
     ("/api/generate", b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", JSON),
     ("/api/generate", b'{"seed": ' + b"9" * 5000 + b"}", JSON),
     ("/api/analyze", b"--x\r\n", {"content-type": "multipart/form-data"}),
     ("/api/analyze", b"garbage" * 10, {"content-type": "multipart/form-data; boundary=zzz"})],
    ids=["not-utf8", "deep", "5000-digits", "no-boundary", "bad-multipart"],
)  # fmt: skip
def test_bodies_starlette_cannot_parse_get_the_error_shape_naming_the_body(
    client, path, body, headers
):
    # these were 400 {"detail": "There was an error parsing the body"}: not the documented
    # {"error", "limit", "field"}, naming nothing
    msg = error_of(client.post(path, content=body, headers=headers), 400, field="body")
    assert "send" in msg


def test_unknown_paths_and_methods_get_the_error_shape(client):
    assert "/docs" in error_of(client.get("/api/nope"), 404)
    r = client.get("/api/generate")
    assert "/docs" in error_of(r, 405) and r.headers["allow"] == "POST"


@pytest.mark.parametrize(
    "body, headers",
    [(b"max_tokens=40", {"content-type": "application/x-www-form-urlencoded"}),
     (b"null", JSON), (b"[1]", JSON), (b"", JSON)],
)  # fmt: skip
def test_a_body_that_is_no_object_names_the_body(client, body, headers):
    error_of(client.post("/api/generate", content=body, headers=headers), 422, field="body")


def _midi(pitches: list[int], *, drums: bool = False) -> bytes:
    import symusic

    s, t = symusic.Score(480), symusic.Track(name="tune", is_drum=drums)
    for i, p in enumerate(pitches):
        t.notes.append(symusic.Note(i * 480, 480, p, 80))
    s.tracks.append(t)
    return s.dumps_midi()


@pytest.mark.parametrize(
    "data, words",
    [(_midi([]), "no notes"), (_midi([36, 38, 36, 42], drums=True), "drums only"),
     (_midi([30, 32, 34, 35]), "transpose")],
    ids=["no-notes", "drums", "too-low"],
)  # fmt: skip
def test_harmonize_names_the_file_for_a_melody_it_cannot_go_under(client, data, words):
    # accompany and infill named the file; harmonize's 422 named no field
    r = client.post("/api/harmonize", files={"file": ("m.mid", data)}, data={"particles": "1"})
    assert words in error_of(r, 422, field="file")


@pytest.mark.parametrize("key", ["H major", "\u00c9 major", "primer"])
def test_harmonize_names_the_key_it_cannot_read(client, key):
    r = client.post("/api/harmonize", files={"file": ("c.mid", CHORALE.read_bytes())},
                    data={"key": key})  # fmt: skip
    assert "unknown key" in error_of(r, 422, field="key")


def test_a_content_length_of_a_digit_int_refuses_is_413_not_a_500(client):
    # h11 refuses 'Content-Length: ²' before the app; the guard itself raised on it (int('²'))
    import asyncio

    sent = []
    scope = {"type": "http", "method": "POST", "path": "/api/generate", "raw_path": b"/api/generate",
             "query_string": b"", "http_version": "1.1", "scheme": "http", "root_path": "",
             "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 5),
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                         (b"content-length", b"\xb2")]}  # fmt: skip

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(client.app(scope, receive, send))
    assert sent[0]["status"] == 413
    assert b'"limit":"max_upload_bytes"' in sent[1]["body"]


@pytest.mark.parametrize("data", [b"A", b"MThd\x00\x00\x00\x06\x00\x01", b"\x00" * 64])
def test_a_primer_that_is_not_midi_names_the_primer(client, data):
    # it named "file", a field the JSON body of /api/generate does not have
    import base64

    r = client.post("/api/generate", json={"primer": base64.b64encode(data).decode()})
    assert "primer" in error_of(r, 422, field="primer")


def test_infill_of_the_drum_track_names_the_part(client):
    # `aurl infill --part kit` refuses a drum part; the server wrote new pitched notes onto the
    # drum track, which came back a piano track
    import symusic

    s = symusic.Score(480)
    kit, tune = symusic.Track(name="kit", is_drum=True), symusic.Track(name="tune")
    for i in range(4):
        kit.notes.append(symusic.Note(i * 480, 240, 36, 100))
        tune.notes.append(symusic.Note(i * 480, 480, 67 + i, 80))
    s.tracks.extend([kit, tune])
    files = {"file": ("d.mid", s.dumps_midi())}
    for part in ("kit", "0"):
        r = client.post("/api/infill", files=files, data={"bars": "1-1", "part": part})
        assert "1:tune" in error_of(r, 422, field="part")
    r = client.post("/api/infill", files=files, data={"bars": "1-1", "part": "tune"})
    assert r.status_code == 200, r.text
    assert [t.is_drum for t in symusic.Score.from_midi(r.content).tracks] == [True, False]


def _late_note(beat: int) -> bytes:
    import symusic

    s, t = symusic.Score(480), symusic.Track(name="late")
    t.notes.append(symusic.Note(beat * 480, 480, 67, 80))
    t.notes.append(symusic.Note(beat * 480 + 480, 480, 69, 80))
    s.tracks.append(t)
    return s.dumps_midi()


@pytest.mark.parametrize(
    "path, data",
    [("/api/harmonize", {"particles": "1"}), ("/api/accompany", {"particles": "1"}),
     ("/api/infill", {"bars": "1-1"})],
)  # fmt: skip
def test_a_piece_after_hours_of_silence_is_refused_naming_the_file(client, path, data):
    # a note at beat 500,000 was composed toward, token by token: the composing slot was held
    # until request_seconds (tens of seconds on the tiny model)
    r = client.post(path, files={"file": ("late.mid", _late_note(500_000))}, data=data)
    assert "beat 500001" in error_of(r, 422, field="file")
    # a lead-in under MAX_GAP_BEATS (4096) is music, composed as before
    r = client.post(path, files={"file": ("late.mid", _late_note(8))}, data=data)
    assert r.status_code == 200, r.text


def test_musicxml_of_a_file_with_a_tempo_of_zero_is_written(client):
    # a Set Tempo of 0 us per beat reads as an infinite BPM: the MusicXML writer raised
    # OverflowError (a 422 blaming a 'MIDI parser' crash) for a file every other endpoint reads
    import struct

    def track(body: bytes) -> bytes:
        body += b"\x00\xff\x2f\x00"
        return b"MTrk" + struct.pack(">I", len(body)) + body

    notes = b"".join(b"\x00\x90" + bytes([p, 80]) + b"\x83\x60\x80" + bytes([p, 0])
                     for p in (67, 69, 71))  # fmt: skip
    data = (b"MThd" + struct.pack(">IHHH", 6, 1, 2, 480) + track(b"\x00\xff\x51\x03\x00\x00\x00")
            + track(notes))  # fmt: skip
    assert client.post("/api/notes", files={"file": ("t.mid", data)}).status_code == 200
    r = client.post("/api/musicxml", files={"file": ("t.mid", data)})
    assert r.status_code == 200, r.text
    assert r.text.count("<note") == 3


@pytest.mark.parametrize(("body", "field"), [({"pitch_high": 10}, "pitch_high"),
                                             ({"pitch_low": 120}, "pitch_low"),
                                             ({"pitch_low": 70, "pitch_high": 60}, "pitch_low")])
def test_an_empty_pitch_range_names_the_bound_the_request_gave(client, body, field):
    # pitch_high under the default pitch_low (21) named pitch_low, which the request never sent
    r = client.post("/api/generate", json={"max_tokens": 40, **body})
    error_of(r, 422, field=field)


def test_musicxml_of_a_piece_after_hours_of_silence_is_refused_at_once(client):
    # music21 measured out the silence until the parse limit (30 s) ran out, then a 422
    # naming parse_seconds; now the reading refuses it, naming the note
    r = client.post("/api/musicxml", files={"file": ("late.mid", _late_note(500_000))})
    assert "beats of silence before the note at beat 500001" in error_of(r, 422, field="file")


def _notes(*notes: tuple[int, int]) -> bytes:
    import symusic

    s, t = symusic.Score(480), symusic.Track(name="odd")
    for beat, beats in notes:
        t.notes.append(symusic.Note(beat * 480, beats * 480, 67, 80))
    s.tracks.append(t)
    return s.dumps_midi()


@pytest.mark.parametrize(
    "notes, words",
    [(((0, 1), (1, 2000)), "the note at beat 2 lasts 2000 beats, more than 1024"),
     (((0, 1), (5000, 1)), "4999 beats of silence before the note at beat 5001, more than 4096")],
    ids=["long-note", "stray-note"],
)  # fmt: skip
@pytest.mark.parametrize("path, data", [("/api/harmonize", {"particles": "1"}),
                                        ("/api/infill", {"bars": "1-1"})])  # fmt: skip
def test_composing_refuses_what_the_reading_would_repair(client, path, data, notes, words):
    # the reading clips a note past 1,024 beats and drops notes after 4,096 beats of silence;
    # the endpoints composed around the repaired piece (200) where the commands refuse the file
    r = client.post(path, files={"file": ("odd.mid", _notes(*notes))}, data=data)
    assert words in error_of(r, 422, field="file")


@pytest.mark.parametrize("host", ["evil.example", "testserver", "127.0.0.1.evil.example:80", ""])
def test_a_host_that_is_no_loopback_name_gets_the_error_shape(client, host):
    # Starlette's host check answered 400 in plain text, and let 'testserver' in for the tests
    r = client.get("/api/health", headers={"host": host})
    assert "127.0.0.1, localhost and [::1] only" in error_of(r, 400, field="host")


@pytest.mark.parametrize("host", ["127.0.0.1:8000", "localhost", "LOCALHOST:1", "[::1]:8000"])
def test_loopback_hosts_are_served(client, host):
    assert client.get("/api/health", headers={"host": host}).status_code == 200


def test_a_file_only_the_repairing_reader_takes_is_still_composed(client):
    # SMPTE timing: the raw reader refuses it, read_midi repairs it; the raw read that looks
    # for absurd timing (and the meter) must not turn that repair into a 422
    from pathlib import Path

    smpte = Path(__file__).resolve().parents[1] / "fixtures" / "edge" / "smpte.mid"
    r = client.post("/api/harmonize", files={"file": ("smpte.mid", smpte.read_bytes())},
                    data={"particles": "1"})  # fmt: skip
    assert r.status_code == 200, r.text
