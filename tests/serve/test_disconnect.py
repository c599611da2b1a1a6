"""A generate, harmonize or infill client that goes away stops the work and frees its slot,
against a real `aurl serve` (the shipped model) over a real socket that the client closes.

(Before the server's guard became a plain ASGI middleware, Starlette's BaseHTTPMiddleware hid
the disconnect from the handlers: this test failed, the work ran on to its end.)"""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from tests.serve.test_api import CHORALE, _excerpt


def composing(url: str, what: str = "composing") -> int:
    return httpx.get(url + "/api/health", timeout=10).json()["details"][0][what]


def wait_for(url: str, value: int, seconds: float, what: str = "composing") -> float:
    """Seconds until /api/health shows ``value`` for ``what`` (fails after ``seconds``)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        if composing(url, what) == value:
            return time.monotonic() - t0
        time.sleep(0.1)
    raise AssertionError(f"{what} never reached {value} within {seconds} s")


def raw_request(path: str, port: int, data: dict) -> bytes:
    """The bytes of a POST: JSON for generate, else a multipart upload of the whole chorale
    (a long piece of work)."""
    if path == "/api/generate":
        req = httpx.Request("POST", f"http://127.0.0.1:{port}{path}", json=data)
    else:
        req = httpx.Request("POST", f"http://127.0.0.1:{port}{path}", data=data,
                            files={"file": ("bwv66.mid", CHORALE.read_bytes())})  # fmt: skip
    body = req.read()
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in req.headers.items() if k.lower() != "host"
    )
    return head.encode() + b"\r\n" + body


@pytest.mark.parametrize(
    "path, data, what",
    [("/api/generate", {"max_tokens": 4000, "min_tokens": 3900}, "active"),
     ("/api/harmonize", {"particles": "16"}, "composing"),
     ("/api/infill", {"bars": "1-9", "particles": "16"}, "composing")],
    ids=["generate", "harmonize", "infill"],
)  # fmt: skip
def test_a_client_that_goes_away_stops_the_work(live_server, path, data, what):
    url = live_server.url
    wait_for(url, 0, 60, what)  # nothing left over from an earlier test
    with socket.create_connection(("127.0.0.1", live_server.port)) as sock:
        sock.sendall(raw_request(path, live_server.port, data))
        wait_for(url, 1, 60, what)  # at work (16 rows over the whole chorale: minutes)
        time.sleep(0.5)
    # the socket is closed: the work stops at its next token, and the slot is free
    assert wait_for(url, 0, 5, what) < 5
    if what == "composing":  # the one composing slot serves the next request
        r = httpx.post(url + "/api/harmonize", files={"file": ("c.mid", _excerpt(
            "bach_bwv117.4.mid", 4, tracks=1))}, data={"particles": "1"}, timeout=120)  # fmt: skip
        assert r.status_code == 200 and r.headers["content-type"] == "audio/midi"
