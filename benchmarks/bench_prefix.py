"""Input work of a training batch with and without prefix checkpoints (issues 15 and 16).

A window's start state (musical time, grammar features) comes from its prefix; a batch's
prefixes are right-aligned to its longest. Side by side on the same augmented batches of a
cache, alternating which goes first: ``window_inputs`` with the whole prefix scanned from the
piece's start, and from :class:`aurl.data.window_state.PrefixCheckpoints` (the trainer's way).
CPU seconds of this process (``time.process_time``), so other load inflates them little.

Run (BENCHMARKS.md "Prefix checkpoints"):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_prefix.py --cache CACHE [--styles a,b]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from aurl.config import load_config
from aurl.data.cache import TokenCache
from aurl.data.dataset import build_loader
from aurl.data.grammar import Grammar
from aurl.data.window_state import TokenTable, window_inputs
from aurl.models import build_model


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cache", required=True)
    p.add_argument("--styles", help="comma-separated styles of a style cache (e.g. `all`)")
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=12)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    extra = [f"model.styles=[{args.styles}]"] if args.styles else []
    cfg = load_config(preset=args.preset, overrides=[f"data.cache={args.cache}",
                                                     f"data.batch_size={args.batch}", *extra])  # fmt: skip
    cache = TokenCache(args.cache)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    model.set_right_padding(True)
    grammar = Grammar(model.vocab, cfg.data.polyphony_cap)
    plain = TokenTable(cache, cache.split_indices("train"), "cpu")
    fast = TokenTable(cache, cache.split_indices("train"), "cpu")
    c0 = time.process_time()
    with torch.no_grad():
        fast.add_checkpoints(model)
    build = time.process_time() - c0
    print(f"{fast.checkpoints.total} checkpoints, built in {build:.1f} CPU s", flush=True)
    stream = iter(build_loader(cache, cfg.data, seed=0, augment=True))
    times: dict[str, list[float]] = {"whole prefix": [], "checkpoints": []}
    longest = []
    for i in range(args.batches):
        batch = next(stream)
        longest.append(int(batch["offset"].max()))
        order = [("whole prefix", plain), ("checkpoints", fast)]
        for name, table in order if i % 2 else order[::-1]:
            c0 = time.process_time()
            window_inputs(model, batch, table, grammar)
            times[name].append(time.process_time() - c0)
    print("batches' longest prefix:", longest)
    out = {"checkpoints": fast.checkpoints.total, "build_cpu_s": build}
    for name, v in times.items():
        out[name] = {"mean": float(np.mean(v)), "median": float(np.median(v)), "max": max(v)}
        print(f"{name}: inputs CPU s / batch mean {np.mean(v):.3f} median {np.median(v):.3f} "
              f"max {max(v):.2f}")  # fmt: skip
    return out


if __name__ == "__main__":
    main()
