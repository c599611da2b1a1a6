"""The HTTP API in-process: what it returns, and that every limit and bad input is a clear 4xx.

Each bad-input case asserts the status, the JSON error body and which field or limit it names;
none may be a 5xx. The app runs a random tiny model (its pieces still obey the grammar).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import symusic

from tests.serve.conftest import make_client

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "midi"
CHORALE = FIXTURES / "bach_bwv66.6.mid"


def error_of(r, status: int, *, limit: str | None = None, field: str | None = None) -> str:
    """Check a JSON error reply and return its message."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "limit", "field"} and body["error"]
    if limit is not None:
        assert body["limit"] == limit, body
    if field is not None:
        assert body["field"] == field, body
    return body["error"]


def midi_notes(data: bytes) -> int:
    score = symusic.Score.from_midi(data)
    return sum(len(t.notes) for t in score.tracks)


# -- what works -----------------------------------------------------------------------------------


def test_health_names_models_and_vocabulary(client):
    h = client.get("/api/health").json()
    assert h["status"] == "ok" and h["models"] == ["tiny"] and h["vocab_size"] == 774
    assert h["details"][0]["active"] == 0 and h["limits"]["max_upload_bytes"] == 1_000_000


def _as_written(tiny, ids, voices: int = 0, meter: str = "") -> bytes:
    """What ``aurl generate [--voices N]`` writes for ``ids`` (the voices split through symusic,
    ``voice_score``): the piece's key and the meter asked as signatures."""
    from aurl.data.tokenizer import Tokenizer
    from aurl.generation.export import signed, voice_score

    data = Tokenizer(tiny.vocab_config).decode_to_data(ids)
    signed(data, meter)
    score = data.to_score()
    return (voice_score(score, voices) if voices else score).dumps_midi()


def test_generate_returns_a_midi_file_with_the_cli_defaults(client, tiny, same_midi):
    from aurl.config import GenerationConfig
    from aurl.generation.generate import generate

    r = client.post("/api/generate", json={"max_tokens": 120, "seed": 5})
    assert r.status_code == 200 and r.headers["content-type"] == "audio/midi"
    # one request alone decodes what `aurl generate` decodes with the same options and seed,
    # and writes it as the command does: the key found in the file
    piece = generate(tiny, GenerationConfig(max_tokens=120, seed=5))[0]
    same_midi(r.content, _as_written(tiny, piece.ids))
    assert len(symusic.Score.from_midi(r.content).key_signatures) == 1
    assert int(r.headers["x-aurl-tokens"]) == len(piece.generated)
    assert midi_notes(r.content) > 0


def test_generate_with_voice_leading_decodes_what_the_library_does(client, tiny, same_midi):
    from aurl.config import GenerationConfig
    from aurl.generation.generate import generate

    body = {"max_tokens": 300, "seed": 2, "voice_leading": True, "voices": 4, "spacing": 0.9,
            "ranges": 0.9}
    r = client.post("/api/generate", json=body)
    assert r.status_code == 200, r.text
    config = GenerationConfig(max_tokens=300, seed=2, voice_leading=True, voices=4, spacing=0.9,
                              ranges=0.9)  # fmt: skip
    piece = generate(tiny, config)[0]
    same_midi(r.content, _as_written(tiny, piece.ids, 4))
    # the random model plays too few notes to move in parallels: the options reach the config
    from aurl.serve.app import GenerateOptions, Limits, _generation_config

    srv = client.app.state.servers["tiny"]
    got = _generation_config(GenerateOptions(**body), srv, Limits(), None)
    assert (got.voice_leading, got.voices, got.spacing, got.ranges) == (True, 4, 0.9, 0.9)
    error_of(client.post("/api/generate", json={**body, "voice_leading": 1}), 422,
             field="voice_leading")  # fmt: skip


def test_generate_in_voices_replies_with_their_tracks(client, tiny, same_midi):
    from aurl.config import GenerationConfig
    from aurl.generation.generate import generate

    body = {"max_tokens": 200, "seed": 5, "voices": 4}
    r = client.post("/api/generate", json=body)
    assert r.status_code == 200, r.text
    piece = generate(tiny, GenerationConfig(max_tokens=200, seed=5, voices=4))[0]
    same_midi(r.content, _as_written(tiny, piece.ids, 4))  # `aurl generate --voices 4`'s split
    names = [t.name for t in symusic.Score.from_midi(r.content).tracks]
    assert names == ["Soprano", "Alto", "Tenor", "Bass"]
    with client.websocket_connect("/api/generate/stream") as ws:  # the stream's file too
        ws.send_text(json.dumps(body))
        while (m := ws.receive_json())["type"] != "done":
            pass
    assert base64.b64decode(m["midi"]) == r.content


def test_an_empty_body_object_uses_the_defaults(client):
    r = client.post("/api/generate", json={"max_tokens": 16})
    assert r.status_code == 200
    # the defaults (seed 0) again: the same piece
    assert client.post("/api/generate", json={"max_tokens": 16, "seed": 0}).content == r.content


def test_primer_is_continued(client):
    primer = base64.b64encode(CHORALE.read_bytes()).decode()
    r = client.post("/api/generate", json={"max_tokens": 40, "primer": primer, "primer_seconds": 3})
    assert r.status_code == 200, r.text
    score = symusic.Score.from_midi(r.content)
    first = {n.pitch for t in score.tracks for n in t.notes if n.time == 0}
    bach = symusic.Score(str(CHORALE))
    bach_first = {n.pitch for t in bach.tracks for n in t.notes if n.time == 0}
    assert first == bach_first  # the piece opens with the primer's first chord (unisons merge)


def test_stream_sends_each_note_then_done_with_the_same_notes_as_the_midi(client):
    with client.websocket_connect("/api/generate/stream") as ws:
        ws.send_text(json.dumps({"max_tokens": 150, "seed": 2}))
        notes, done = [], None
        while done is None:
            m = ws.receive_json()
            if m["type"] == "note":
                assert set(m) == {"type", "pitch", "start", "end", "velocity"}
                notes.append(m)
            else:
                done = m
    assert done["type"] == "done" and done["notes"] == len(notes) > 0
    score = symusic.Score.from_midi(base64.b64decode(done["midi"])).to("second")
    midi = sorted((n.pitch, n.time, n.end, n.velocity) for t in score.tracks for n in t.notes)
    streamed = sorted((n["pitch"], n["start"], n["end"], n["velocity"]) for n in notes)
    assert len(streamed) == len(midi)
    got, want = np.array(streamed), np.array(midi)
    assert (got[:, [0, 3]] == want[:, [0, 3]]).all()
    # symusic's seconds are float32: 1 ms is far below a time step (15.6 ms at 120 BPM)
    np.testing.assert_allclose(got[:, 1:3], want[:, 1:3], atol=1e-3)


def test_analyze_returns_the_analysis_json(client):
    r = client.post("/api/analyze", files={"file": ("bwv66.mid", CHORALE.read_bytes())})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ok" and body["name"] == "bwv66.mid"
    assert body["key"]["name"] == "F# minor"  # BWV 66.6 is in F# minor
    assert body["notes"] > 100 and body["cadences"]
    # its tracks are voices: `aurl analyze`'s part writing comes too (the same counts)
    from aurl.analysis import part_writing as pw
    from aurl.analysis.report import voice_tracks
    from aurl.data.midi_io import read_midi
    from aurl.generation.compose import track_notes

    voices = voice_tracks(track_notes(read_midi(CHORALE)[0]))
    assert body["voice_leading"]["voices"] == ["Soprano", "Alto", "Tenor", "Bass"]
    want = pw.faults([n for _, n in voices], [name for name, _ in voices])["counts"]
    assert body["voice_leading"]["counts"] == want and want["moves"] > 200  # 214


def test_notes_endpoint_gives_seconds(client):
    r = client.post("/api/notes", files={"file": ("c.mid", CHORALE.read_bytes())})
    from aurl.config import DataConfig
    from aurl.data.midi_io import read_midi
    from aurl.data.notes import notes_from_score

    rows = r.json()["notes"]
    want = notes_from_score(read_midi(CHORALE, DataConfig(drums="keep"))[0])  # as read in-process
    assert [p for p, _, _, _ in rows] == want["pitch"].tolist()
    np.testing.assert_allclose([s for _, s, _, _ in rows], want["onset_s"], atol=1e-4)
    assert max(e for _, _, e, _ in rows) == pytest.approx(22.5, abs=0.05)
    assert r.json()["tracks"] == ["Soprano", "Alto", "Tenor", "Bass"]  # what `part` names


BUNDLED = Path(__file__).resolve().parents[2] / "src/aurl/data/bundled/bach-chorales"


def _excerpt(name: str, beats: float, tracks: int | None = None) -> bytes:
    """The first ``beats`` beats of a bundled chorale (its first ``tracks`` tracks), as MIDI."""
    score = symusic.Score(str(BUNDLED / name))
    out = symusic.Score(score.tpq)
    out.tempos, out.time_signatures = score.tempos.copy(), score.time_signatures.copy()
    for track in list(score.tracks)[:tracks]:
        track = track.copy()
        track.notes = track.notes.filter(lambda n: n.time < beats * score.tpq)
        out.tracks.append(track)
    return out.dumps_midi()


def _by_track(data: bytes) -> dict[str, np.ndarray]:
    """(pitch, onset, duration) rows in beats of each named track of a MIDI file."""
    from aurl.data.notes import notes_from_score

    score = symusic.Score.from_midi(data)
    out = {}
    for track in score.tracks:
        one = symusic.Score(score.tpq)
        one.tracks.append(track.copy())
        n = np.sort(notes_from_score(one), order=["onset", "pitch"])
        out[track.name] = np.stack([n["pitch"], n["onset"], n["duration"]], 1).astype(float)
    return out


def test_harmonize_keeps_the_melody_on_the_soprano_track(client):
    melody = _excerpt("bach_bwv117.4.mid", 8, tracks=1)  # two bars of the soprano
    r = client.post("/api/harmonize", files={"file": ("tune.mid", melody)},
                    data={"particles": "1", "seed": "3"})  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "audio/midi"
    got, given = _by_track(r.content), _by_track(melody)
    assert list(got) == ["Soprano", "Alto", "Tenor", "Bass"]
    (want,) = given.values()
    assert len(want) >= 6
    np.testing.assert_array_equal(got["Soprano"], want)
    assert sum(len(v) for k, v in got.items() if k != "Soprano") > 0
    three = client.post("/api/harmonize", files={"file": ("tune.mid", melody)},
                        data={"particles": "1", "voices": "3"})  # fmt: skip
    assert list(_by_track(three.content)) == ["Soprano", "Alto", "Bass"]


def test_composing_endpoints_count_in_the_pieces_meter(client, monkeypatch):
    """A 3/4 chorale is composed in 3/4 (the endpoints passed no meter: every piece was 4/4)."""
    from aurl.generation import compose

    seen = []
    for name in ("harmonize", "infill"):
        real = getattr(compose, name)

        def spy(*args, _real=real, **kwargs):
            seen.append(kwargs.get("meter"))
            return _real(*args, **kwargs)

        monkeypatch.setattr(compose, name, spy)
    waltz = _excerpt("bach_bwv342.mid", 9)  # three bars of 3/4
    r = client.post("/api/harmonize", files={"file": ("w.mid", _excerpt("bach_bwv342.mid", 9, 1))},
                    data={"particles": "1"})  # fmt: skip
    assert r.status_code == 200, r.text
    r = client.post("/api/infill", files={"file": ("w.mid", waltz)}, data={"bars": "2-2"})
    assert r.status_code == 200, r.text
    assert seen == [(3, 4), (3, 4)]


def test_infill_of_one_bar_keeps_everything_outside_it(client):
    piece = _excerpt("bach_bwv117.4.mid", 12)  # three bars of 4/4, four voices
    r = client.post("/api/infill", files={"file": ("c.mid", piece)},
                    data={"bars": "2-2", "particles": "1"})  # fmt: skip
    assert r.status_code == 200, r.text
    got, given = _by_track(r.content), _by_track(piece)
    assert list(got) == list(given) and len(given) == 4
    new, old_inside, got_inside = 0, set(), set()
    for name, want in given.items():
        old_inside |= {(name, *row) for row in want[(want[:, 1] >= 4) & (want[:, 1] < 8)]}
        inside = (got[name][:, 1] >= 4) & (got[name][:, 1] < 8)
        np.testing.assert_array_equal(
            got[name][~inside], want[(want[:, 1] < 4) | (want[:, 1] >= 8)]
        )
        assert (got[name][inside, 1] + got[name][inside, 2] <= 8 + 1e-9).all()
        new += int(inside.sum())
        got_inside |= {(name, *row) for row in got[name][inside]}
    assert new > 0 and old_inside  # bar 2 was written again ...
    assert not old_inside <= got_inside  # ... in place of Bach's notes, not beside them


def _chords_midi() -> bytes:
    s, t = symusic.Score(480), symusic.Track(name="piano")
    for beat in range(4):
        for p in (60, 64, 67):
            t.notes.append(symusic.Note(beat * 480, 480, p, 80))
    s.tracks.append(t)
    return s.dumps_midi()


def _drums_midi() -> bytes:
    s, t = symusic.Score(480), symusic.Track(name="kit", program=0, is_drum=True)
    for beat in range(8):
        t.notes.append(symusic.Note(beat * 480, 240, 36 + beat % 3, 100))
    s.tracks.append(t)
    return s.dumps_midi()


@pytest.mark.parametrize(
    "data, words", [(_chords_midi(), "chords at"), (_drums_midi(), "drums only")],
    ids=["chords", "drums"],
)  # fmt: skip
def test_harmonize_refuses_a_melody_it_cannot_keep(client, data, words):
    r = client.post("/api/harmonize", files={"file": ("bad.mid", data)}, data={"particles": "1"})
    assert words in error_of(r, 422)
    if words == "drums only":
        r = client.post("/api/infill", files={"file": ("bad.mid", data)}, data={"bars": "1-1"})
        assert "drums only" in error_of(r, 422, field="file")


def test_harmonize_voices_are_two_to_four(client):
    files = {"file": ("c.mid", CHORALE.read_bytes())}
    for voices in ("1", "5", "8"):
        error_of(client.post("/api/harmonize", files=files, data={"voices": voices}), 422,
                 field="voices")  # fmt: skip


@pytest.mark.parametrize(
    "data, field, words",
    [({"bars": "9-3"}, "bars", "bars 9-3: c.mid has bars 1-3"),
     ({"bars": "4-5"}, "bars", "has bars 1-3"),
     ({"span": "30-31"}, "span", "before the end (6.0 s)"),
     ({"span": "3-2"}, "span", "S < T")],
    ids=["reversed", "outside", "span outside", "span reversed"],
)  # fmt: skip
def test_infill_span_outside_the_piece_or_reversed_names_the_field(client, data, field, words):
    piece = _excerpt("bach_bwv117.4.mid", 12)
    r = client.post("/api/infill", files={"file": ("c.mid", piece)}, data=data)
    assert words in error_of(r, 422, field=field)
    assert client.get("/api/health").status_code == 200


# -- bad input: one clear 4xx each ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"temperature": -1}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 7}, "top_p"),
        ({"seed": 10**30}, "seed"),
        ({"max_tokens": 10**20}, "max_tokens"),
        ({"max_tokens": 3}, "max_tokens"),
        ({"top_k": 10**9}, "top_k"),
        ({"pitch_low": 500}, "pitch_low"),
        ({"tempo_range": [1, 2, 3]}, "tempo_range"),
        ({"colour": "blue"}, "colour"),
        ({"seconds": -5}, "seconds"),
        ({"key": "x" * 100}, "key"),
    ],
)
def test_out_of_range_or_unknown_fields_are_rejected_not_clamped(client, body, field):
    msg = error_of(client.post("/api/generate", json=body), 422, field=field)
    assert field in msg


def test_values_the_library_rejects_are_422_with_its_message(client):
    assert "key" in error_of(client.post("/api/generate", json={"key": "H major"}), 422)
    msg = error_of(client.post("/api/generate", json={"pitch_low": 90, "pitch_high": 30}), 422)
    assert "empty" in msg
    msg = error_of(client.post("/api/generate", json={"model": "nope"}), 422)
    assert "tiny" in msg  # lists the models served
    msg = error_of(client.post("/api/generate", json={"max_tokens": 50, "seconds": 3}), 422)
    assert "not both" in msg
    assert error_of(client.post("/api/generate", json={"key": "primer"}), 422)


def test_a_body_that_is_not_json_or_not_an_object(client):
    r = client.post(
        "/api/generate", content=b"{not json", headers={"content-type": "application/json"}
    )
    error_of(r, 422)
    error_of(client.post("/api/generate", json=[1, 2]), 422)
    for text in (b'{"temperature": NaN}', b'{"top_p": Infinity}'):
        r = client.post("/api/generate", content=text, headers={"content-type": "application/json"})
        error_of(r, 422)


def test_primer_that_is_not_base64_or_not_midi(client):
    assert "base64" in error_of(client.post("/api/generate", json={"primer": "@@@"}), 422)
    junk = base64.b64encode(b"RIFF not a midi file at all").decode()
    msg = error_of(client.post("/api/generate", json={"primer": junk}), 422, field="primer")
    assert "primer" in msg and "MIDI" in msg


@pytest.mark.parametrize(
    "data",
    [
        b"hello, not MIDI",
        b"MThd\x00\x00\x00\x06\x00\x01",
        b"\x00" * 5000,
    ],
    ids=["text", "header-only", "zeros"],
)
def test_uploads_that_are_not_midi(client, data):
    r = client.post("/api/analyze", files={"file": ("bad.mid", data)})
    assert r.status_code == 422 and r.json()["field"] == "file", r.text
    assert "bad.mid" in r.json()["error"]
    assert client.get("/api/health").status_code == 200


def test_a_truncated_upload_is_read_up_to_where_it_breaks(client):
    """The SMF pre-pass (aurl.data.smf) clips a truncated track to its complete events."""
    whole = client.post("/api/notes", files={"file": ("c.mid", CHORALE.read_bytes())})
    r = client.post("/api/notes", files={"file": ("cut.mid", CHORALE.read_bytes()[:300])})
    assert r.status_code == 200, r.text
    got, full = r.json()["notes"], whole.json()["notes"]
    assert 0 < len(got) < len(full)
    assert client.get("/api/health").status_code == 200


def test_upload_fields_missing_or_wrong(client):
    error_of(client.post("/api/analyze", data={"beats_per_bar": "3"}), 422, field="file")
    r = client.post("/api/analyze", files={"file": ("c.mid", CHORALE.read_bytes())},
                    data={"beats_per_bar": "-2"})  # fmt: skip
    error_of(r, 422, field="beats_per_bar")
    files = {"file": ("c.mid", CHORALE.read_bytes())}
    for bars in ("3-1", "0-2", "x", "1-99999999"):
        r = client.post("/api/infill", files=files, data={"bars": bars})
        assert r.status_code == 422, (bars, r.text)
    error_of(client.post("/api/infill", files=files), 422, field="bars")


def test_listening_answers_for_unknown_or_answered_trials(client):
    r = client.post("/api/listen/answer", json={"trial": "nope", "choice": "A"})
    error_of(r, 404, field="trial")
    error_of(client.post("/api/listen/answer", json={"trial": "x", "choice": "C"}), 422)


# -- limits ----------------------------------------------------------------------------------------


def test_limits_on_tokens_and_seconds_name_the_limit(tmp_path, tiny):
    with make_client(tmp_path, {"tiny": tiny}, limits={"max_tokens": 64, "max_seconds": 5}) as c:
        error_of(c.post("/api/generate", json={"max_tokens": 65}), 422, limit="max_tokens")
        error_of(c.post("/api/generate", json={"seconds": 6}), 422, limit="max_seconds")
        assert c.post("/api/generate", json={"max_tokens": 64}).status_code == 200


def test_upload_size_limit(tmp_path, tiny):
    data = CHORALE.read_bytes()
    with make_client(tmp_path, {"tiny": tiny}, limits={"max_upload_bytes": len(data) - 1}) as c:
        msg = error_of(c.post("/api/analyze", files={"file": ("c.mid", data)}), 413,
                       limit="max_upload_bytes")  # fmt: skip
        assert "c.mid" in msg
        # far over: refused from the Content-Length, before the body is read
        big = {"file": ("big.mid", b"MThd" + b"\0" * 300_000)}
        error_of(c.post("/api/analyze", files=big), 413, limit="max_upload_bytes")
        primer = base64.b64encode(data).decode()
        error_of(c.post("/api/generate", json={"primer": primer}), 413, limit="max_upload_bytes")
    with make_client(tmp_path, {"tiny": tiny}, limits={"max_upload_bytes": len(data)}) as c:
        assert c.post("/api/analyze", files={"file": ("c.mid", data)}).status_code == 200


def test_queue_limit_is_429_and_frees_when_the_stream_closes(tmp_path, tiny):
    with make_client(tmp_path, {"tiny": tiny}, limits={"slots": 1, "max_queue": 0}) as c:
        with c.websocket_connect("/api/generate/stream") as ws:
            ws.send_text(json.dumps({"max_tokens": 4000, "min_tokens": 3900}))
            assert ws.receive_json()["type"] == "note"  # decoding: the one slot is taken
            r = c.post("/api/generate", json={"max_tokens": 16})
            assert "busy" in error_of(r, 429, limit="max_queue")
        # the client closed the socket: its row leaves the batch and the slot frees
        for _ in range(100):
            r = c.post("/api/generate", json={"max_tokens": 16})
            if r.status_code == 200:
                break
        assert r.status_code == 200


def test_request_time_limit_is_408(tmp_path, tiny):
    with make_client(tmp_path, {"tiny": tiny}, limits={"request_seconds": 0.2}) as c:
        r = c.post("/api/generate", json={"max_tokens": 4096, "min_tokens": 4000})
        assert "request_seconds" in error_of(r, 408, limit="request_seconds")
        with c.websocket_connect("/api/generate/stream") as ws:
            ws.send_text(json.dumps({"max_tokens": 4096, "min_tokens": 4000}))
            while (m := ws.receive_json())["type"] == "note":
                pass
            assert m == {"type": "error", "error": m["error"], "limit": "request_seconds",
                         "status": 408}  # fmt: skip
        assert c.get("/api/health").json()["details"][0]["active"] == 0


def test_stream_bad_options_get_an_error_message_and_a_4xxx_close(client):
    from starlette.websockets import WebSocketDisconnect

    for first, limit in [("not json", None), (json.dumps({"top_p": 9}), None)]:
        with client.websocket_connect("/api/generate/stream") as ws:
            ws.send_text(first)
            m = ws.receive_json()
            assert m["type"] == "error" and m["status"] == 422 and m["limit"] == limit
            with pytest.raises(WebSocketDisconnect) as e:
                ws.receive_json()
            assert e.value.code == 4422


def test_parse_crash_and_timeout_fail_the_request_not_the_server(tmp_path, tiny):
    files = {"file": ("c.mid", CHORALE.read_bytes())}
    # 40 MB of address space: the parsing process dies while loading numpy
    with make_client(tmp_path, {"tiny": tiny}, limits={"parse_memory_mb": 40}) as c:
        msg = error_of(c.post("/api/analyze", files=files), 422, field="file")
        assert "parser stopped" in msg
        assert c.post("/api/generate", json={"max_tokens": 16}).status_code == 200
    with make_client(tmp_path, {"tiny": tiny}, limits={"parse_seconds": 0.01}) as c:
        error_of(c.post("/api/analyze", files=files), 422, limit="parse_seconds")
        assert c.post("/api/generate", json={"max_tokens": 16}).status_code == 200


# -- security --------------------------------------------------------------------------------------


def test_token_is_required_when_set(tmp_path, tiny):
    with make_client(tmp_path, {"tiny": tiny}, token="s3cret") as c:
        error_of(c.get("/api/health"), 401, limit="token")
        error_of(c.get("/api/health", headers={"authorization": "Bearer wrong"}), 401)
        assert c.get("/api/health", headers={"authorization": "Bearer s3cret"}).status_code == 200
        page = c.get("/")
        assert page.status_code == 401 and "token" in page.text  # the sign-in form
        assert c.post("/login", data={"token": "wrong"}).status_code == 401
        r = c.post("/login", data={"token": "s3cret"}, follow_redirects=False)
        assert r.status_code == 303 and "aurl_token" in r.headers["set-cookie"]
        assert c.get("/api/health").status_code == 200  # the cookie now signs requests


def test_loopback_server_refuses_foreign_host_headers(client):
    assert client.get("/api/health", headers={"host": "evil.example"}).status_code == 400
    assert client.get("/api/health", headers={"host": "localhost:8000"}).status_code == 200


def test_pages_and_assets_point_nowhere_off_the_host(client):
    from aurl.serve.app import STATIC

    pages = ["/", "/listen", "/listen/results", "/docs"]
    texts = [client.get(p).text for p in pages]
    texts += [p.read_text() for p in STATIC.iterdir()]
    assert len(texts) >= 8
    refs = []
    for text in texts:
        refs += [m for m in __import__("re").findall(
            r"""(?:src|href|action)\s*=\s*["']([^"']+)|url\(\s*["']?([^)"']+)|import\s+[^;]*?from\s+["']([^"']+)|import\(\s*["']([^"']+)""",
            text) for m in m if m]  # fmt: skip
    assert refs, "the pattern found nothing: it is broken"
    off_host = [r for r in refs if r.startswith(("http:", "https:", "//")) or "://" in r]
    assert off_host == []
    assert all(r.startswith(("/", "#")) for r in refs), refs


def test_openapi_documents_the_schemas(client):
    spec = client.get("/openapi.json").json()
    assert {"/api/generate", "/api/analyze", "/api/harmonize", "/api/infill",
            "/api/health"} <= set(spec["paths"])  # fmt: skip
    props = spec["components"]["schemas"]["GenerateOptions"]["properties"]
    assert {"temperature", "top_k", "top_p", "key", "tempo", "seed", "primer"} <= set(props)
    docs = client.get("/docs")
    assert docs.status_code == 200 and "temperature" in docs.text and "/api/infill" in docs.text
    assert np.isfinite(props["top_p"]["maximum"])


def test_a_style_models_requests_name_a_style(tmp_path, tiny, same_midi):
    """`style` picks one of the model's styles (listed in /api/health): the reply is what
    `aurl generate --style` decodes with the same seed; a name the model lacks, or any name on a
    model without styles, is a 422 naming the field."""
    import dataclasses

    import torch

    from aurl.config import GenerationConfig
    from aurl.data.tokenizer import Tokenizer
    from aurl.generation.generate import generate
    from aurl.models import MusicTransformerVAEGAN

    torch.manual_seed(0)
    config = dataclasses.replace(tiny.config, styles=("chorale", "folk"), style_dropout=0.0)
    styled = MusicTransformerVAEGAN(config, tiny.vocab_config).eval()
    with torch.no_grad():
        styled.style.table.weight.normal_(0.0, 1.0)
    with make_client(tmp_path, {"styled": styled, "tiny": tiny}) as client:
        details = client.get("/api/health").json()["details"]
        assert [d["styles"] for d in details] == [["chorale", "folk"], []]
        replies = {}
        for style in ("chorale", "folk"):
            r = client.post("/api/generate", json={"max_tokens": 60, "seed": 5, "style": style})
            assert r.status_code == 200, r.text
            want = generate(styled, GenerationConfig(max_tokens=60, seed=5, style=style))[0]
            same_midi(r.content, _as_written(styled, want.ids))
            replies[style] = r.content
        assert replies["chorale"] != replies["folk"]
        r = client.post("/api/generate", json={"max_tokens": 16, "style": "jazz"})
        assert "this model knows chorale, folk" in error_of(r, 422, field="style")
        r = client.post("/api/generate", json={"max_tokens": 16, "style": "folk", "model": "tiny"})
        assert "trained without styles" in error_of(r, 422, field="style")


def test_the_server_harmonizes_as_the_cli_does_by_default(tmp_path):
    """With the composer `aurl serve` builds (the native engine of the model folder, as the
    composing commands' `--engine auto`), /api/harmonize answers with the voices
    `aurl harmonize` writes for the same file and seed."""
    native = pytest.importorskip("aurl.engines.native_engine")
    from aurl.cli import main
    from aurl.cli.generate import SHIPPED, load_model

    composer = native.native_where_it_runs(SHIPPED)
    if composer is None:
        pytest.skip("no compiled native step on this installation")
    melody = tmp_path / "tune.mid"
    melody.write_bytes(_excerpt("bach_bwv121.6.mid", 16, tracks=1))
    assert main(["harmonize", str(melody), "--out", str(tmp_path / "cli"), "--seed", "5"]) == 0
    (written,) = (tmp_path / "cli").glob("*.mid")
    models = {"chorales": load_model(None, "cpu")}
    with make_client(tmp_path, models, composers={"chorales": composer}) as c:
        r = c.post("/api/harmonize", files={"file": ("tune.mid", melody.read_bytes())},
                   data={"seed": "5"})  # fmt: skip
    assert r.status_code == 200, r.text
    got, cli = _by_track(r.content), _by_track(written.read_bytes())
    assert list(got) == list(cli) == ["Soprano", "Alto", "Tenor", "Bass"]
    for name in got:
        np.testing.assert_array_equal(got[name], cli[name])


def test_the_server_accompanies_as_the_cli_does(tmp_path):
    """/api/accompany (the composer `aurl serve` builds, as for harmonizing) answers with the
    voices `aurl accompany` writes for the same part and seed: the part kept note for note on
    its own track, the others around it."""
    native = pytest.importorskip("aurl.engines.native_engine")
    from aurl.cli import main
    from aurl.cli.generate import SHIPPED, load_model

    composer = native.native_where_it_runs(SHIPPED)
    if composer is None:
        pytest.skip("no compiled native step on this installation")
    score = symusic.Score.from_midi(_excerpt("bach_bwv121.6.mid", 16))
    alto = symusic.Score(score.tpq)
    alto.tempos, alto.time_signatures = score.tempos, score.time_signatures
    alto.tracks.append(score.tracks[1].copy())  # the Alto alone
    part = tmp_path / "alto.mid"
    part.write_bytes(alto.dumps_midi())
    assert main(["accompany", str(part), "--out", str(tmp_path / "cli"), "--seed", "5"]) == 0
    (written,) = (tmp_path / "cli").glob("*.mid")
    models = {"chorales": load_model(None, "cpu")}
    with make_client(tmp_path, models, composers={"chorales": composer}) as c:
        r = c.post("/api/accompany", files={"file": ("alto.mid", part.read_bytes())},
                   data={"seed": "5"})  # fmt: skip
        three = c.post("/api/accompany", files={"file": ("alto.mid", part.read_bytes())},
                       data={"seed": "5", "voices": "3", "format": "musicxml"})  # fmt: skip
        drums = c.post("/api/accompany", files={"file": ("d.mid", _drums_midi())})
    assert r.status_code == 200, r.text
    got, cli = _by_track(r.content), _by_track(written.read_bytes())
    assert sorted(got) == sorted(cli) and len(got) == 4 and "Alto" in got
    for name in got:
        np.testing.assert_array_equal(got[name], cli[name])
    np.testing.assert_array_equal(got["Alto"], _by_track(alto.dumps_midi())["Alto"])
    assert three.status_code == 200 and "musicxml" in three.headers["content-type"]
    assert "drums only" in error_of(drums, 422, field="file")
