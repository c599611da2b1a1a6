"""The server's /api/harmonize on the torch model against the native engine `aurl serve` now
composes with: a whole held-out chorale's soprano (bwv117.4), seeds 0-2 interleaved, forcing
and 8 particles, wall time of each request through an in-process TestClient (upload parsing in
the worker process included), one torch thread as `aurl serve` runs.

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_serve_compose.py
"""

import statistics
import tempfile
import time
from pathlib import Path

import symusic
import torch
from fastapi.testclient import TestClient

from aurl.cli.generate import SHIPPED, load_model
from aurl.engines.native_engine import native_where_it_runs
from aurl.serve.app import Settings, create_app

torch.set_num_threads(1)
src = symusic.Score(
    str(
        Path(__file__).resolve().parents[1]
        / "src/aurl/data/bundled/bach-chorales/bach_bwv117.4.mid"
    )
)
one = symusic.Score(src.tpq)
one.tempos = src.tempos.copy()
one.time_signatures = src.time_signatures.copy()
one.tracks.append(src.tracks[0].copy())
data = one.dumps_midi()
tmp = Path(tempfile.mkdtemp())
for particles in ("1", "8"):
    times = {"torch": [], "native": []}
    clients = {}
    for name, comp in (("torch", None), ("native", native_where_it_runs(SHIPPED))):
        app = create_app(
            {"chorales": load_model(None, "cpu")},
            Settings(db=tmp / f"{name}.sqlite"),
            {"chorales": comp} if comp else None,
        )
        clients[name] = TestClient(app, base_url="http://127.0.0.1").__enter__()
    for r in range(3):
        for name, c in clients.items():
            t0 = time.perf_counter()
            resp = c.post(
                "/api/harmonize",
                files={"file": ("t.mid", data)},
                data={"seed": str(r), "particles": particles},
            )
            assert resp.status_code == 200, resp.text
            times[name].append(time.perf_counter() - t0)
    for c in clients.values():
        c.__exit__(None, None, None)
    print(
        "particles",
        particles,
        {k: [round(x, 2) for x in v] for k, v in times.items()},
        "median ratio",
        round(statistics.median(times["torch"]) / statistics.median(times["native"]), 2),
        flush=True,
    )
