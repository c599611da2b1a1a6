"""The load test's smoke version against a real `aurl serve`: correctness only (benchmarks/
bench_serve.py measures speed). Concurrent streaming clients all finish with their notes equal
to their MIDI file, no request fails, and a client that leaves mid-stream frees its slot."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import httpx
import symusic


async def one_stream(url: str, options: dict) -> tuple[list[dict], dict]:
    import websockets

    notes = []
    async with websockets.connect(url.replace("http", "ws") + "/api/generate/stream") as ws:
        await ws.send(json.dumps(options))
        async for text in ws:
            m = json.loads(text)
            if m["type"] == "note":
                notes.append(m)
            else:
                return notes, m
    raise AssertionError("the stream closed without a done message")


async def leave_mid_stream(url: str) -> None:
    import websockets

    async with websockets.connect(url.replace("http", "ws") + "/api/generate/stream") as ws:
        await ws.send(json.dumps({"max_tokens": 4000, "min_tokens": 3900}))
        for _ in range(3):
            assert json.loads(await ws.recv())["type"] == "note"
    # closed here, long before its 4000 tokens


def test_concurrent_streams_all_finish_and_a_leaver_frees_its_slot(live_server):
    async def main():
        jobs = [one_stream(live_server.url, {"max_tokens": 120, "seed": s}) for s in range(4)]
        jobs.append(leave_mid_stream(live_server.url))
        return await asyncio.gather(*jobs)

    results = asyncio.run(main())
    for notes, done in results[:4]:
        assert done["type"] == "done", done
        score = symusic.Score.from_midi(base64.b64decode(done["midi"]))
        assert sum(len(t.notes) for t in score.tracks) == len(notes) == done["notes"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        model = httpx.get(live_server.url + "/api/health").json()["details"][0]
        if model["active"] == 0 and model["waiting"] == 0:
            break
        time.sleep(0.2)
    assert model["active"] == 0 and model["waiting"] == 0
