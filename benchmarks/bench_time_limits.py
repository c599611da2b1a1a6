"""How late a request past the server's time limit is answered: ``POST /api/harmonize`` and
``/api/infill`` with a melody of ``--notes`` notes (10,000 by default: ~125,000 tokens, tens of
minutes of work), and ``POST /api/generate`` with ``cadence`` ("thorough": a phrase search and
16 endings of a 60-second piece), on a server whose ``request_seconds`` is ``--limit``.

The app runs in this process (FastAPI's TestClient, one torch thread as ``aurl serve`` runs) on
the tiny random model (dim 32, 2 layers) and on the shipped default model. Reported per request:
the status (408 expected), the wall seconds from sending to the answer and how far past the
limit that is (the overshoot: what the request took beyond its limit), and this process's CPU
seconds. Wall time is what the limit promises, so it is what is measured; read the overshoot
against the load average printed first.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/bench_time_limits.py [--limit 5]
        [--notes 10000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path


def melody(n: int) -> bytes:
    import symusic

    score = symusic.Score(480)
    track = symusic.Track("melody", 0, False)
    for i in range(n):
        track.notes.append(symusic.Note(i * 480, 480, (60, 62, 64, 65, 67, 65, 64, 62)[i % 8], 80))
    score.tracks.append(track)
    return score.dumps_midi()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=float, default=5.0, help="request_seconds")
    ap.add_argument("--notes", type=int, default=10_000, help="melody notes")
    ap.add_argument("--rounds", type=int, default=3, help="requests of each kind")
    args = ap.parse_args()

    import os

    import torch
    from fastapi.testclient import TestClient

    from aurl.cli.generate import load_model
    from aurl.config import ModelConfig, VocabConfig
    from aurl.models import MusicTransformerVAEGAN
    from aurl.serve.app import Settings, create_app
    from aurl.serve.engine import Limits

    torch.set_num_threads(1)
    print(f"load average {os.getloadavg()[0]:.2f}; request_seconds {args.limit:g}")
    torch.manual_seed(0)
    tiny = MusicTransformerVAEGAN(
        dataclasses.replace(ModelConfig(), d_model=32, n_layers=2, n_heads=2, dropout=0.0,
                            max_seq_len=256), VocabConfig(),
    ).eval()  # fmt: skip
    data = melody(args.notes)
    bars = f"2-{args.notes // 4 - 1}"
    requests = {
        "harmonize": ("/api/harmonize", {"files": {"file": ("m.mid", data)},
                                         "data": {"particles": "1"}}),
        "infill": ("/api/infill", {"files": {"file": ("m.mid", data)},
                                   "data": {"bars": bars, "particles": "1"}}),
        "generate cadence": ("/api/generate", {"json": {"seconds": 60, "cadence": "thorough"}}),
    }  # fmt: skip
    print("| model | request | status | wall s (median) | past the limit s (max) | CPU s |")
    print("|---|---|---|---|---|---|")
    for name, model in (("tiny", tiny), ("chorales", load_model(None, "cpu"))):
        settings = Settings(limits=Limits(request_seconds=args.limit),
                            db=Path(tempfile.mkdtemp()) / "listen.sqlite")  # fmt: skip
        with TestClient(create_app({name: model}, settings), base_url="http://127.0.0.1") as c:
            for what, (path, kw) in requests.items():
                walls, cpus, codes = [], [], set()
                for _ in range(args.rounds):
                    t, cpu = time.monotonic(), time.process_time()
                    r = c.post(path, **kw)
                    walls.append(time.monotonic() - t)
                    cpus.append(time.process_time() - cpu)
                    codes.add(r.status_code)
                over = max(w - args.limit for w in walls)
                print(f"| {name} | {what} | {'/'.join(map(str, sorted(codes)))} | "
                      f"{statistics.median(walls):.2f} | {over:+.2f} | "
                      f"{statistics.median(cpus):.2f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
