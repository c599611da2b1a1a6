"""What ``cadence`` costs a server request: ``POST /api/generate`` with ``seconds`` and
``cadence: "phrases"`` (the CLI's default search, run outside the shared batch) against the
same request with ``cadence: "off"`` (the server's default: one row of the batch).

The app runs in this process on the shipped default model with one torch thread, as ``aurl
serve`` does (FastAPI's TestClient; no sockets). For each seed ``0 .. N-1`` both requests run
back to back, their order alternating with the seed so load drifts hit both alike. Measured per
request: CPU seconds of this process (``time.process_time``: the decode thread, the worker
thread and the event loop together; wall-clock time on a shared machine is noise), wall
seconds, and how the piece ends (:func:`aurl.generation.cadence.ending_score`: 2 authentic or
plagal, 1 half or deceptive, 0 none, the analysis ``aurl evaluate`` uses). Reported: the median
per-seed CPU ratio with its range, the mean CPU and wall seconds, and the pieces ending on a
cadence.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/bench_serve_cadence.py [--pieces 8]
        [--seconds 30] [--mode phrases]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pieces", type=int, default=8, help="seeds 0 .. N-1")
    ap.add_argument("--seconds", type=float, default=30.0, help="length of each piece")
    ap.add_argument("--mode", default="phrases", choices=("phrases", "thorough", "ending"))
    args = ap.parse_args()

    import symusic
    import torch
    from fastapi.testclient import TestClient

    from aurl.cli.generate import load_model
    from aurl.data.notes import notes_from_score
    from aurl.generation.cadence import ending_score
    from aurl.serve.app import Settings, create_app

    torch.set_num_threads(1)
    model = load_model(None, "cpu")
    rows: dict[str, list[tuple[float, float, int]]] = {"off": [], args.mode: []}
    with tempfile.TemporaryDirectory() as tmp:
        app = create_app({"default": model}, Settings(db=Path(tmp) / "listen.sqlite"))
        with TestClient(app, base_url="http://127.0.0.1") as client:
            for seed in range(args.pieces):
                order = ["off", args.mode] if seed % 2 == 0 else [args.mode, "off"]
                for mode in order:
                    body = {"seconds": args.seconds, "seed": seed, "cadence": mode}
                    c0, w0 = time.process_time(), time.perf_counter()
                    r = client.post("/api/generate", json=body)
                    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
                    assert r.status_code == 200, r.text
                    end = ending_score(notes_from_score(symusic.Score.from_midi(r.content)))
                    rows[mode].append((cpu, wall, end))
                    print(f"seed {seed} cadence {mode} cpu {cpu:.2f} s wall {wall:.2f} s "
                          f"ending {end}", flush=True)  # fmt: skip
    ratios = [s[0] / o[0] for s, o in zip(rows[args.mode], rows["off"])]
    print(f"load average at the end: {Path('/proc/loadavg').read_text().strip()}")
    print("| cadence | CPU s / request | wall s / request | ends on a cadence (any / "
          "authentic or plagal) |")  # fmt: skip
    print("|---|---|---|---|")
    for mode, got in rows.items():
        cpu = statistics.mean(g[0] for g in got)
        wall = statistics.mean(g[1] for g in got)
        any_ = sum(g[2] > 0 for g in got)
        full = sum(g[2] == 2 for g in got)
        print(f"| {mode} | {cpu:.2f} | {wall:.2f} | {any_}/{len(got)} / {full}/{len(got)} |")
    print(
        f"CPU ratio {args.mode} / off per seed: median {statistics.median(ratios):.2f} "
        f"(range {min(ratios):.2f}-{max(ratios):.2f}, n = {len(ratios)})"
    )


if __name__ == "__main__":
    main()
