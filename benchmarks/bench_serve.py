"""Load test of `aurl serve` on loopback (bounded in count and time).

Starts `aurl serve --port 0` (the shipped model) in a subprocess and drives it with WebSocket
clients (`/api/generate/stream`), each request a fixed length (``--tokens``, with min_tokens
just below it, so every request does the same work):

1. one client, requests one after another: the baseline tokens/s;
2. 8 clients at once: aggregate tokens/s, as a ratio to (1) (goal >= 4x), and the server's
   CPU time per token in (1) and (2) (wall-clock rates on a shared machine are noise; CPU per
   token much less so);
3. 16 clients x 10 requests: errors (goal 0), p50 / p99 request latency, aggregate tokens/s,
   server RSS before and after, and after 16 x 3 more (no growth once warm);
4. time to first note of a lone request (goal 0.5 s on 2 cores): the server's very first
   request (the server warms up before it prints its address), and 5 more;
5. a client that disconnects mid-stream frees its slot (the server reports 0 active rows);
6. the batcher alone, in this process, on one thread: CPU time of a decode step with 1 row
   and with 8 rows, alternated round by round so both see the same machine (the ratio of
   tokens per CPU second is what batching buys, whatever the load), split into the model's
   step and the host work around it (masks, sampling, bookkeeping); then the same with rows
   joining and leaving as the server drives it (1 client vs 8, 2 requests each of 96 tokens).

    python benchmarks/bench_serve.py [--tokens 96] [--requests 10] [--threads 1]
    python benchmarks/bench_serve.py --batcher-only   # phase 6 alone (~30 s)
    python benchmarks/bench_serve.py --compare OLD/src src --rounds 3   # phases 1-2, A/B

Numbers go to BENCHMARKS.md with the command that made them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import websockets

REPO = Path(__file__).resolve().parents[1]


def start_server(
    threads: int, db: Path, src: Path = REPO / "src", extra: tuple[str, ...] = ()
) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, "-m", "aurl", "serve", "--port", "0", "--db", str(db),
           "--threads", str(threads), "--max-queue", "256", *extra]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)  # fmt: skip
    line = proc.stdout.readline()
    m = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
    if not m:
        proc.kill()
        raise SystemExit(f"aurl serve did not start: {line}")
    url = m.group(1)
    for _ in range(300):
        try:
            httpx.get(url + "/api/health", timeout=2)
            return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit("aurl serve never answered")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[int, float]:
    """User + system CPU seconds of each thread of a process so far, by thread id."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def decode_cpu(pid: int, before: dict[int, float]) -> float:
    """CPU seconds of the server's decode thread since ``before`` (``thread_cpu``): its
    busiest thread but the event loop's (the main thread)."""
    now = thread_cpu(pid)
    return max((now[t] - before.get(t, 0.0) for t in now if t != pid), default=0.0)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def request(url: str, tokens: int, seed: int) -> dict:
    """One streamed request: latency, time to first note, tokens, or the error."""
    t0 = time.perf_counter()
    first = None
    opts = {"max_tokens": tokens, "min_tokens": tokens - 8, "seed": seed}
    try:
        async with websockets.connect(url.replace("http", "ws") + "/api/generate/stream",
                                      max_size=2**24) as ws:  # fmt: skip
            await ws.send(json.dumps(opts))
            async for text in ws:
                m = json.loads(text)
                if m["type"] == "note" and first is None:
                    first = time.perf_counter() - t0
                elif m["type"] == "done":
                    return {"latency": time.perf_counter() - t0, "first": first,
                            "tokens": m["tokens"]}  # fmt: skip
                elif m["type"] == "error":
                    return {"error": m["error"]}
    except (OSError, websockets.WebSocketException) as e:
        return {"error": repr(e)}
    return {"error": "closed without done"}


async def clients(url: str, n: int, per_client: int, tokens: int) -> tuple[list[dict], float]:
    async def client(c: int) -> list[dict]:
        return [await request(url, tokens, seed=1000 * c + i) for i in range(per_client)]

    t0 = time.perf_counter()
    results = await asyncio.gather(*(client(c) for c in range(n)))
    return [r for rs in results for r in rs], time.perf_counter() - t0


def summary(results: list[dict], wall: float) -> dict:
    ok = [r for r in results if "error" not in r]
    lat = sorted(r["latency"] for r in ok)
    tokens = sum(r["tokens"] for r in ok)
    pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")  # noqa: E731
    return {"requests": len(results), "errors": len(results) - len(ok), "tokens": tokens,
            "tok_s": tokens / wall, "p50": pick(0.5), "p99": pick(0.99), "wall": wall}  # fmt: skip


async def leave_mid_stream(url: str) -> bool:
    """A client leaves after 3 notes of a long request; True once the server shows no rows."""
    async with websockets.connect(url.replace("http", "ws") + "/api/generate/stream") as ws:
        await ws.send(json.dumps({"max_tokens": 4000, "min_tokens": 3900}))
        for _ in range(3):
            await ws.recv()
    async with httpx.AsyncClient() as http:
        for _ in range(100):
            h = (await http.get(url + "/api/health")).json()["details"][0]
            if h["active"] == 0 and h["waiting"] == 0:
                return True
            await asyncio.sleep(0.1)
    return False


def batcher_steps(rows: int, steps: int, model, prepack: bool = True) -> tuple[float, float]:
    """Thread CPU ms per decode step of a batcher holding ``rows`` rows, and of its model
    calls alone (every row decodes to the same length: min_tokens holds END off)."""
    from aurl.config import GenerationConfig
    from aurl.generation.batching import ContinuousBatcher

    b = ContinuousBatcher(model, slots=16, prepack=prepack)
    for i in range(rows):
        b.add(GenerationConfig(max_tokens=steps + 40, min_tokens=steps + 20, seed=i))
    for _ in range(8):  # admit, and past the first tokens
        b.step()
    spent = [0.0]
    real_step = model.step

    def timed(*a, **k):
        t0 = time.thread_time()
        try:
            return real_step(*a, **k)
        finally:
            spent[0] += time.thread_time() - t0

    model.step = timed
    try:
        t0 = time.thread_time()
        for _ in range(steps):
            assert len(b.step()) == rows
        total = time.thread_time() - t0
    finally:
        del model.step
    return 1e3 * total / steps, 1e3 * spent[0] / steps


def batcher_churn(model, clients: int, per_client: int, tokens: int, prepack: bool = True) -> float:
    """Thread CPU ms per token of ``clients`` that each send ``per_client`` requests of
    ``tokens`` tokens one after another, straight to a batcher as the server drives it (rows
    join and leave all the time; fold_starts as in the server)."""
    from aurl.config import GenerationConfig
    from aurl.generation.batching import ContinuousBatcher

    b = ContinuousBatcher(model, slots=16, fold_starts=True, prepack=prepack)
    left, seeds = dict.fromkeys(range(clients), per_client), iter(range(10**6))

    def add(client: int) -> None:
        left[client] -= 1
        cfg = GenerationConfig(max_tokens=tokens, min_tokens=tokens - 8, seed=next(seeds))
        b.add(cfg, tag=client)

    b.add(GenerationConfig(max_tokens=16, seed=0))  # warm: the slot buffers are allocated
    while b.busy:
        b.step()
    for c in range(clients):
        add(c)
    produced, t0 = 0, time.thread_time()
    while b.busy:
        for row in b.step():
            produced += 1
            if row.finished and left[row.tag] > 0:
                add(row.tag)
    return 1e3 * (time.thread_time() - t0) / produced


def batcher_ratio(rounds: int = 4, steps: int = 60, wide: int = 8) -> None:
    """Phase 6: batch ``wide`` against batch 1, alternated; prints the medians and the ratio."""
    import torch

    from aurl.cli.generate import load_model

    torch.set_num_threads(1)
    model = load_model(None, "cpu")
    one, many, plain = [], [], []
    for _ in range(rounds):
        one.append(batcher_steps(1, steps, model))
        many.append(batcher_steps(wide, steps, model))
        plain.append(batcher_steps(wide, steps, model, prepack=False))
    med = lambda xs, i: statistics.median(x[i] for x in xs)  # noqa: E731
    s1, m1, s8, m8 = med(one, 0), med(one, 1), med(many, 0), med(many, 1)
    print(f"batcher, thread CPU per step (median of {rounds} rounds x {steps} steps): "
          f"1 row {s1:.2f} ms (model {m1:.2f}, host {s1 - m1:.2f}); {wide} rows {s8:.2f} ms "
          f"(model {m8:.2f}, host {s8 - m8:.2f}, {(s8 - m8) / wide:.3f} per row)")  # fmt: skip
    print(f"batcher tokens per CPU second, {wide} rows / 1 row: {wide * s1 / s8:.2f}x "
          f"(a {wide}-row step costs {s8 / s1:.2f} one-row steps); load "
          f"{os.getloadavg()[0]:.1f}")  # fmt: skip
    p8 = med(plain, 0)
    print(f"  the same {wide} rows without prepacked Linear weights: {p8:.2f} ms a step (model "
          f"{med(plain, 1):.2f}): {wide * s1 / p8:.2f}x; prepacked saves {1 - s8 / p8:.1%}")  # fmt: skip
    one, many, plain = [], [], []
    for _ in range(3):
        one.append(batcher_churn(model, 1, 2, 96))
        many.append(batcher_churn(model, wide, 2, 96))
        plain.append(batcher_churn(model, wide, 2, 96, prepack=False))
    c1, c8, p8 = statistics.median(one), statistics.median(many), statistics.median(plain)
    print(f"batcher with rows joining and leaving (96-token requests, 2 per client), thread CPU "
          f"per token: 1 client {c1:.2f} ms, {wide} clients {c8:.2f} ms: {c1 / c8:.2f}x "
          f"(without prepacked weights {p8:.2f} ms: {c1 / p8:.2f}x); load "
          f"{os.getloadavg()[0]:.1f}")  # fmt: skip
    print(
        f"prepacked Linear weights, {wide} clients joining and leaving: logits equal to the "
        f"plain batcher's at every step, ids equal: {prepack_exact(model, wide)}"
    )


def prepack_exact(model, clients: int, per_client: int = 2, tokens: int = 96) -> bool:
    """Two batchers, with and without prepacked Linear weights, driven alike (rows joining
    and leaving as the server drives them): True when every step's logits are equal bit for
    bit and every request's ids too."""
    import torch

    from aurl.config import GenerationConfig
    from aurl.generation.batching import ContinuousBatcher

    lanes = [ContinuousBatcher(model, slots=16, fold_starts=True, prepack=p) for p in (True, False)]
    left, seeds, rows = dict.fromkeys(range(clients), per_client), iter(range(10**6)), [[], []]

    def add(client: int) -> None:
        left[client] -= 1
        cfg = GenerationConfig(max_tokens=tokens, min_tokens=tokens - 8, seed=next(seeds))
        for lane, b in zip(rows, lanes):
            lane.append(b.add(cfg, tag=client))

    for c in range(clients):
        add(c)
    while lanes[0].busy:
        stepped = [b.step() for b in lanes]
        if [r.tag for r in stepped[0]] != [r.tag for r in stepped[1]]:
            return False
        if lanes[0].rows and not torch.equal(lanes[0].logits, lanes[1].logits):
            return False
        for row in stepped[0]:
            if row.finished and left[row.tag] > 0:
                add(row.tag)
    return [r.ids for r in rows[0]] == [r.ids for r in rows[1]]


def ratio_rounds(url: str, pid: int, tokens: int, rounds: int) -> list[tuple[float, float]]:
    """Phases 1 and 2 ``rounds`` times, alternated: per round (aggregate tokens/s of 8 clients
    / of 1 client, server CPU per token of 1 client / of 8, 1-client tokens/s, 8-client
    tokens/s, decode-thread CPU per token of 1 client / of 8, and those two in ms)."""
    out = []
    for _ in range(rounds):
        c0, t0 = cpu_seconds(pid), thread_cpu(pid)
        s1 = summary(*asyncio.run(clients(url, 1, 4, tokens)))
        c1, d1, t1 = cpu_seconds(pid), decode_cpu(pid, t0), thread_cpu(pid)
        s8 = summary(*asyncio.run(clients(url, 8, 2, tokens)))
        c8, d8 = cpu_seconds(pid), decode_cpu(pid, t1)
        assert s1["errors"] == s8["errors"] == 0, (s1, s8)
        cpu1, cpu8 = (c1 - c0) / s1["tokens"], (c8 - c1) / s8["tokens"]
        dec1, dec8 = d1 / s1["tokens"], d8 / s8["tokens"]
        out.append((s8["tok_s"] / s1["tok_s"], cpu1 / cpu8, s1["tok_s"], s8["tok_s"], dec1 / dec8,
                    1e3 * dec1, 1e3 * dec8))  # fmt: skip
    return out


def compare(sources: list[Path], tokens: int, rounds: int, threads: int) -> None:
    """``--compare``: one server per source tree at a time, alternated round by round, phases
    1-2 only: the 8/1 ratios of each, and each one's 1-client and 8-client tokens/s."""
    results: dict[Path, list] = {src: [] for src in sources}
    for _ in range(rounds):
        for src in sources:
            db = Path("/tmp") / f"bench_serve_{os.getpid()}.sqlite"
            proc, url = start_server(threads, db, src)
            try:
                asyncio.run(request(url, 32, seed=0))
                results[src] += ratio_rounds(url, proc.pid, tokens, 1)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
                db.unlink(missing_ok=True)
    med = statistics.median
    print(f"phases 1-2, {rounds} rounds alternated, medians; load {os.getloadavg()[0]:.1f}")
    print("| source | 8 clients / 1 (tokens/s) | server CPU per token 1 / 8 | decode thread CPU"
          " per token 1 / 8 (ms) | 1 client tokens/s | 8 clients tokens/s |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for src, rs in results.items():
        print(f"| {src} | {med(r[0] for r in rs):.2f}x | {med(r[1] for r in rs):.2f}x | "
              f"{med(r[4] for r in rs):.2f}x ({med(r[5] for r in rs):.3f} / "
              f"{med(r[6] for r in rs):.3f}) | {med(r[2] for r in rs):.0f} | "
              f"{med(r[3] for r in rs):.0f} |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--compare", nargs="+", metavar="SRC", type=Path,
        help="phases 1-2 only, for each source tree (e.g. src of two checkouts), alternated",
    )  # fmt: skip
    ap.add_argument("--rounds", type=int, default=3, help="rounds of --compare")
    ap.add_argument("--ratio-rounds", type=int, default=7,
                    help="more alternated rounds of phases 1-2 for the 8/1 ratio's median "
                         "(0: none)")  # fmt: skip
    ap.add_argument("--tokens", type=int, default=96, help="tokens per request")
    ap.add_argument("--requests", type=int, default=10, help="requests per client (phase 3)")
    ap.add_argument("--threads", type=int, default=1, help="server torch threads")
    ap.add_argument("--batcher-only", action="store_true", help="phase 6 alone")
    args = ap.parse_args()
    if args.compare:
        compare(args.compare, args.tokens, args.rounds, args.threads)
        return
    if args.batcher_only:
        batcher_ratio()
        return
    db = Path("/tmp") / f"bench_serve_{os.getpid()}.sqlite"
    proc, url = start_server(args.threads, db)
    try:
        cold = asyncio.run(request(url, 32, seed=0))["first"]  # the server's first request
        cpu0 = cpu_seconds(proc.pid)
        one, wall1 = asyncio.run(clients(url, 1, 4, args.tokens))
        s1 = summary(one, wall1)
        cpu1 = cpu_seconds(proc.pid)
        eight, wall8 = asyncio.run(clients(url, 8, 2, args.tokens))
        s8 = summary(eight, wall8)
        cpu8 = cpu_seconds(proc.pid)
        s1["cpu_ms"] = 1e3 * (cpu1 - cpu0) / max(s1["tokens"], 1)
        s8["cpu_ms"] = 1e3 * (cpu8 - cpu1) / max(s8["tokens"], 1)
        rss0 = rss_mb(proc.pid)
        sixteen, wall16 = asyncio.run(clients(url, 16, args.requests, args.tokens))
        s16 = summary(sixteen, wall16)
        rss1 = rss_mb(proc.pid)
        again, wall_again = asyncio.run(clients(url, 16, 3, args.tokens))  # the same load again
        s_again = summary(again, wall_again)
        rss2 = rss_mb(proc.pid)
        firsts = [asyncio.run(request(url, 32, seed=i))["first"] for i in range(5)]
        freed = asyncio.run(leave_mid_stream(url))
        # phases 1-2 again, alternated: one 1-client phase lasts ~1.5 s, and its rate alone
        # moved the ratio by +-0.3x between runs on an idle machine
        again_ratios = ratio_rounds(url, proc.pid, args.tokens, args.ratio_rounds)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        db.unlink(missing_ok=True)
    print(f"load: {os.getloadavg()[0]:.1f} (1-min average), {os.cpu_count()} cores")
    rows = (("1 client", s1), ("8 clients", s8), (f"16 clients x{args.requests}", s16),
            ("16 clients x3", s_again))  # fmt: skip
    for name, s in rows:
        print(f"{name:>15}: {s['requests']} requests, {s['errors']} errors, "
              f"{s['tok_s']:.0f} tokens/s, latency p50 {s['p50']:.2f} s p99 {s['p99']:.2f} s")  # fmt: skip
    print(f"aggregate tokens/s, 8 clients / 1 client: {s8['tok_s'] / s1['tok_s']:.2f}x")
    print(f"server CPU per token (all its threads): 1 client {s1['cpu_ms']:.2f} ms, 8 clients "
          f"{s8['cpu_ms']:.2f} ms: {s1['cpu_ms'] / s8['cpu_ms']:.2f}x the tokens per CPU "
          "second (robust to load, unlike the wall-clock ratio)")  # fmt: skip
    if again_ratios:
        wall, cpu = sorted(r[0] for r in again_ratios), sorted(r[1] for r in again_ratios)
        print(f"8 clients / 1 client over {len(wall)} more alternated rounds: aggregate tokens/s "
              f"median {statistics.median(wall):.2f}x ({wall[0]:.2f}-{wall[-1]:.2f}), server CPU "
              f"per token median {statistics.median(cpu):.2f}x ({cpu[0]:.2f}-{cpu[-1]:.2f})")  # fmt: skip
    print(f"aggregate tokens/s, 16 clients / 1 client: {s16['tok_s'] / s1['tok_s']:.2f}x")
    print(f"server RSS before / after the 16-client phase / after 48 more requests: "
          f"{rss0:.0f} / {rss1:.0f} / {rss2:.0f} MB")  # fmt: skip
    print(
        f"time to first note (lone request): first request to the new server {cold:.3f} s; "
        f"then median of 5 {statistics.median(firsts):.3f} s, worst {max(firsts):.3f} s"
    )
    print(f"a client leaving mid-stream freed its slot: {freed}")
    batcher_ratio()


if __name__ == "__main__":
    main()
