"""Harmonizing a 16-bar melody: forcing (1 row) and forcing + SMC (8 rows) against the plain
sampler generating the same number of tokens, side by side in one process.

The melody: the first 16 bars (64 beats) of the soprano of a held-out chorale (bwv117.4).
Times are the process's CPU time (all threads; a shared machine disturbs it far less than wall
time), median of the rounds; ratios are taken per round. ``--threads`` sets torch's threads.

Run:  .venv/bin/python benchmarks/bench_harmonize.py [--threads 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CHORALE = ROOT / "src/aurl/data/bundled/bach-chorales/bach_bwv117.4.mid"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from aurl.cli.generate import load_model
    from aurl.config import GenerationConfig
    from aurl.evaluation.tasks import chorale_voices
    from aurl.generation.compose import ComposeOptions, harmonize
    from aurl.generation.generate import generate

    model = load_model(None, "cpu")
    melody = chorale_voices(CHORALE)[0]
    melody = melody[melody["onset"] < 64]
    rows: dict[str, list[float]] = {"forcing": [], "smc8": [], "plain": [], "wall_smc8": []}
    ratios: dict[str, list[float]] = {"forcing": [], "smc8": []}
    for r in range(args.rounds):
        c0 = time.process_time()
        (one,) = harmonize(model, melody, options=ComposeOptions(particles=1, seed=r))
        c1 = time.process_time()
        w = time.perf_counter()
        (smc,) = harmonize(model, melody, options=ComposeOptions(particles=8, seed=r))
        rows["wall_smc8"].append(time.perf_counter() - w)
        c2 = time.process_time()
        tokens = int(one.stats["tokens"])
        cfg = GenerationConfig(max_tokens=tokens, min_tokens=tokens - 8, seed=r)
        generate(model, cfg, num_samples=1)
        c3 = time.process_time()
        rows["forcing"].append(c1 - c0)
        rows["smc8"].append(c2 - c1)
        rows["plain"].append(c3 - c2)
        ratios["forcing"].append((c1 - c0) / (c3 - c2))
        ratios["smc8"].append((c2 - c1) / (c3 - c2))
        print(f"round {r}: tokens {tokens} (smc {smc.stats['tokens']}), cpu s forcing "
              f"{c1 - c0:.2f} smc8 {c2 - c1:.2f} plain {c3 - c2:.2f}", flush=True)  # fmt: skip
    out = {k: float(np.median(v)) for k, v in rows.items()}
    out.update({f"ratio_{k}_vs_plain": float(np.median(v)) for k, v in ratios.items()})
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
