"""``request_seconds`` bounds a whole request from its handler's start (session 8): the
upload's parsing (a child process, whose own ``parse_seconds`` clock came on top of the
request's), the wait for the composing slot, composing and a MusicXML reply. Before, only
composing and decoding counted, and the parse-only endpoints ignored the limit."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.serve.conftest import make_client
from tests.serve.test_api import CHORALE, error_of

BENCH = Path(__file__).parents[2] / "benchmarks" / "bench_time_limits.py"


def long_melody(n: int) -> bytes:
    """``n`` quarter notes up and down a fifth: the melody ``benchmarks/bench_time_limits.py``
    times (its ``melody``)."""
    spec = importlib.util.spec_from_file_location("bench_time_limits", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.melody(n)


@pytest.mark.parametrize("path", ["/api/analyze", "/api/notes", "/api/musicxml"])
def test_parsing_counts_against_the_request_time(tmp_path, tiny, path):
    # 20 ms: spent before the parsing child has imported its first module, whatever the load
    with make_client(tmp_path, {"tiny": tiny}, limits={"request_seconds": 0.02}) as c:
        r = c.post(path, files={"file": ("c.mid", CHORALE.read_bytes())})
        assert "request_seconds" in error_of(r, 408, limit="request_seconds")
    with make_client(tmp_path, {"tiny": tiny}) as c:  # the default limit: the file is fine
        assert c.post(path, files={"file": ("c.mid", CHORALE.read_bytes())}).status_code == 200


def test_a_10000_note_melody_is_stopped_at_the_time_limit(tmp_path, tiny):
    """~125,000 tokens to harmonize (minutes even for the tiny model): the request gets the
    time limit's 408 and the composing slot is free again after it."""
    data = long_melody(10_000)
    with make_client(tmp_path, {"tiny": tiny}, limits={"request_seconds": 2.0}) as c:
        for path, form in [("/api/harmonize", {"particles": "1"}),
                           ("/api/infill", {"bars": "2-2499", "particles": "1"})]:  # fmt: skip
            r = c.post(path, files={"file": ("m.mid", data)}, data=form)
            assert "request_seconds" in error_of(r, 408, limit="request_seconds"), path
            assert c.get("/api/health").json()["details"][0]["composing"] == 0
