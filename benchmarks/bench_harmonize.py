"""Harmonizing a 16-bar melody: forcing on the torch engine, forcing and forcing + SMC (8 rows)
on the onnx engine (the same weights, exported once to the cache), and the plain torch sampler
generating the same number of tokens, side by side in one process.

The melody: the first 16 bars (64 beats) of the soprano of a held-out chorale (bwv117.4).
Times are the process's CPU time (all threads; a shared machine disturbs it far less than wall
time), median of the rounds; ratios are taken per round. Wall time of the onnx forcing run and
the load average before and after are printed too: on idle cores the one-thread onnx run's wall
time is its CPU time. ``--threads`` sets torch's and onnxruntime's threads.

Run:  .venv/bin/python benchmarks/bench_harmonize.py [--threads 1] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CHORALE = ROOT / "src/aurl/data/bundled/bach-chorales/bach_bwv117.4.mid"


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split(" ")[0]
    except OSError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-smc", action="store_true", help="skip the 8-particle run")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from aurl.cli.generate import SHIPPED, load_model
    from aurl.config import GenerationConfig
    from aurl.engines.onnx_engine import OnnxEngine
    from aurl.engines.shipped import ensure_shipped_onnx
    from aurl.evaluation.tasks import chorale_voices
    from aurl.generation.compose import ComposeOptions, harmonize
    from aurl.generation.generate import generate

    model = load_model(None, "cpu")
    onnx = OnnxEngine(ensure_shipped_onnx(SHIPPED), threads=args.threads)
    melody = chorale_voices(CHORALE)[0]
    melody = melody[melody["onset"] < 64]
    rows: dict[str, list[float]] = {}
    print(f"load average before: {loadavg()}", flush=True)

    def timed(name: str, fn, *a, **kw) -> object:
        c0, w0 = time.process_time(), time.perf_counter()
        out = fn(*a, **kw)
        rows.setdefault(name, []).append(time.process_time() - c0)
        rows.setdefault(f"wall_{name}", []).append(time.perf_counter() - w0)
        return out

    for r in range(args.rounds):
        opts = ComposeOptions(particles=1, seed=r)
        (one,) = timed("onnx_forcing", harmonize, onnx, melody, options=opts)
        timed("torch_forcing", harmonize, model, melody, options=opts)
        if not args.no_smc:
            smc = ComposeOptions(particles=8, seed=r)
            timed("onnx_smc8", harmonize, onnx, melody, options=smc)
        tokens = int(one.stats["tokens"])
        cfg = GenerationConfig(max_tokens=tokens, min_tokens=tokens - 8, seed=r)
        timed("torch_plain", generate, model, cfg, num_samples=1)
        line = {k: round(v[-1], 2) for k, v in rows.items()}
        print(f"round {r}: tokens {tokens}, cpu/wall s {line}", flush=True)
    out = {k: float(np.median(v)) for k, v in rows.items()}
    for k in [k for k in rows if not k.startswith("wall_") and k != "torch_plain"]:
        ratio = np.array(rows[k]) / np.array(rows["torch_plain"])
        out[f"ratio_{k}_vs_torch_plain"] = float(np.median(ratio))
    out["load_after"] = loadavg()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
