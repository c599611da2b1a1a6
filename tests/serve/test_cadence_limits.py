"""``cadence`` on ``POST /api/generate`` honours the request time limit and the client's leaving
in its ending search too (session 8): the redrawn endings go through the hook the plain decode
goes through. Before, a request past its limit during the ending search ran the search to its
end (200), and a client that left there did not stop it.

Each test lets the plain piece decode, then acts at the engine's first call with the ending
search's batch of ``endings - 1`` rows (a forward hook on the model's token embedding; no other
phase of mode ``ending`` decodes that many rows): it lets the time limit pass there, or closes
the client's socket there, and counts the engine's calls of that batch."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx
import pytest

from aurl.generation.cadence import CADENCE_MODES
from tests.serve.conftest import make_client
from tests.serve.test_api import error_of

ROWS = CADENCE_MODES["ending"].endings - 1  # the ending search's batch


@contextlib.contextmanager
def at_ending_batch(model, action):
    """Run ``action()`` at the model's first decoding call of ``ROWS`` rows; yields the list of
    every call's batch size."""
    rows: list[int] = []

    def hook(module, args, out):
        rows.append(int(args[0].shape[0]))
        if rows[-1] == ROWS and rows.count(ROWS) == 1:
            action()

    handle = model.embed.register_forward_hook(hook)
    try:
        yield rows
    finally:
        handle.remove()


def test_a_cadence_request_past_its_time_limit_during_the_endings_is_408(tmp_path, tiny):
    limit = 1.0  # the tiny model's plain 6-second piece decodes in a few hundredths of it
    t0 = []

    def wait_out_the_limit():  # as a slow engine would, until well past the request's limit
        time.sleep(max(0.0, t0[0] + limit - time.monotonic()) + 0.5)

    with make_client(tmp_path, {"tiny": tiny}, limits={"request_seconds": limit}) as c:
        with at_ending_batch(tiny, wait_out_the_limit) as rows:
            t0.append(time.monotonic())
            r = c.post("/api/generate", json={"seconds": 6, "seed": 1, "cadence": "ending"})
        assert "request_seconds" in error_of(r, 408, limit="request_seconds")
        assert rows.count(ROWS) == 1  # stopped at the first redrawn token: the prefill alone
        assert c.get("/api/health").json()["details"][0]["composing"] == 0


@pytest.fixture(scope="module")
def shipped():
    import torch

    from aurl.cli.generate import SHIPPED, load_model

    if not (SHIPPED / "config.json").is_file():
        pytest.skip("no shipped model")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as `aurl serve` runs
    yield load_model(None, "cpu")
    torch.set_num_threads(threads)


@contextlib.contextmanager
def serving(app):
    """``app`` on a real socket (uvicorn in a thread); yields its port."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(300):
        if server.started:
            break
        time.sleep(0.02)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_client_gone_during_the_endings_stops_them(tmp_path, shipped):
    """The shipped model's 8-second piece of seed 22 ends on no cadence, and so do its first
    rounds of redrawn endings: the search decodes 164 steps of 7 rows (~3 s of CPU; of seeds
    0-23 only 0, 17 and 22 search that long with the annealed model, most 40-60 steps). The client
    closes its socket at the first of them; the server sees it within 0.25 s and the work
    stops at the next token."""
    from aurl.config import GenerationConfig
    from aurl.generation.cadence import generate_with_cadence
    from aurl.serve.app import Settings, create_app
    from aurl.serve.engine import Limits

    body = {"seconds": 8, "seed": 22, "cadence": "ending"}
    config = GenerationConfig(seconds=8, max_tokens=Limits().max_tokens, seed=22)
    with at_ending_batch(shipped, lambda: None) as rows:  # the whole search, for comparison
        generate_with_cadence(shipped, config, options=CADENCE_MODES["ending"])
    whole = rows.count(ROWS)
    assert whole > 60, whole  # long enough that stopping early shows

    app = create_app({"chorales": shipped}, Settings(db=tmp_path / "listen.sqlite"))
    srv = app.state.servers["chorales"]
    request = httpx.Request("POST", "http://127.0.0.1/api/generate", json=body)
    with serving(app) as port, socket.create_connection(("127.0.0.1", port)) as sock:
        head = "".join(f"{k}: {v}\r\n" for k, v in request.headers.items())
        closed = threading.Event()

        def close():
            sock.shutdown(socket.SHUT_RDWR)
            closed.set()

        with at_ending_batch(shipped, close) as rows:
            sock.sendall(f"POST /api/generate HTTP/1.1\r\n{head}\r\n".encode() + request.read())
            t0 = time.monotonic()
            while not (closed.is_set() and srv.composing == 0) and time.monotonic() - t0 < 120:
                time.sleep(0.05)
            assert closed.is_set() and srv.composing == 0
            after = rows.count(ROWS)
    assert 1 <= after < whole / 2, (after, whole)
