"""``cadence`` on ``POST /api/generate``: a piece of ``seconds`` comes from ``aurl generate
--cadence``'s search (what the library's ``generate_with_cadence`` gives for the same options
and seed), outside the shared batch; the stream and a request without ``seconds`` refuse it in
one line naming the field."""

from __future__ import annotations

import json

import pytest

from tests.serve.test_api import _as_written, error_of


def test_cadence_phrases_is_the_clis_search(client, tiny, same_midi):
    from aurl.config import GenerationConfig
    from aurl.generation.cadence import CADENCE_MODES, generate_with_cadence
    from aurl.serve.engine import Limits

    body = {"seconds": 6, "seed": 3}
    searched = client.post("/api/generate", json={**body, "cadence": "phrases"})
    assert searched.status_code == 200 and searched.headers["content-type"] == "audio/midi"
    config = GenerationConfig(seconds=6, max_tokens=Limits().max_tokens, seed=3)
    (piece,) = generate_with_cadence(tiny, config, options=CADENCE_MODES["phrases"])
    same_midi(searched.content, _as_written(tiny, piece.ids))
    assert int(searched.headers["x-aurl-tokens"]) == len(piece.generated)
    plain = client.post("/api/generate", json=body)  # the server's default: 'off', the batch
    assert plain.status_code == 200 and plain.content != searched.content


def test_cadence_without_seconds_names_the_field(client):
    r = client.post("/api/generate", json={"max_tokens": 40, "cadence": "ending"})
    assert "give seconds" in error_of(r, 422, field="cadence")
    error_of(client.post("/api/generate", json={"seconds": 4, "cadence": "yes"}), 422,
             field="cadence")  # fmt: skip


def test_the_stream_refuses_cadence_in_one_message(client):
    from starlette.websockets import WebSocketDisconnect

    with client.websocket_connect("/api/generate/stream") as ws:
        ws.send_text(json.dumps({"seconds": 4, "cadence": "phrases"}))
        m = ws.receive_json()
        assert m["type"] == "error" and m["status"] == 422 and "POST /api/generate" in m["error"]
        with pytest.raises(WebSocketDisconnect) as e:
            ws.receive_json()
        assert e.value.code == 4422
