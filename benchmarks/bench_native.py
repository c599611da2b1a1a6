"""The native engine's decode step against the memory-bandwidth bound and against onnxruntime,
side by side in one run (issue 17's "CPU decoding at the hardware's limit").

Model: the ``full`` preset's shape (26M parameters) with seeded random weights (``--shape full``,
what the issue's ~1,000 tokens/s is about) or the shipped model (``--shape shipped``). Engines:
Aurl's C step (``--engine native``) with int8 and fp32 weights, onnxruntime's int8, int4 and fp32
graphs of the same weights (``--engine onnx``; one intra-op thread, as the engine builds its
session). For each number of cached tokens (``--cached``, default 16, 512 and 960: the start, the
middle and the end of a 1024-token piece), every engine's state is filled with the same random
ids, then each round times ``--steps`` one-token steps of every engine in a rotating order, in
CPU time (``process_time``: what other jobs on the shared cores inflate least); the table keeps
each engine's best round. One thread's read bandwidth is measured in the same rounds (the sum
of a 100 MB int64 array, CPU time, best of the run): the bound of a step is the bytes it must
read (its weights as stored, plus every layer's keys and values of the cached tokens) over
that rate (the native int8 engine keeps its cache in half floats: half the bytes of the
others'). Reported per engine and length: ms per step, tokens/s, MB read, the GB/s that makes,
and the fraction of the bound; the CPU (model and instruction sets) in every row, the load
average before and after.

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_native.py [--shape full|shipped]
      [--rounds 7] [--steps 32] [--cached 16,512,960]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_onnx  # noqa: E402  (exports, bytes per token, load average)

ENGINES = ("native-int8", "native-fp32", "onnx-int4", "onnx-int8", "onnx-fp32")
CAPACITY = 1040


def engine_of(name: str, folder: Path):
    from aurl.engines.native_engine import NativeEngine
    from aurl.engines.onnx_engine import OnnxEngine

    kind, weights = name.split("-")
    if kind == "native":
        return NativeEngine(folder / "model", weights=weights)
    return OnnxEngine(folder / weights, threads=1)


def weight_bytes(name: str, engine, folder: Path) -> int:
    """Bytes of weights one step reads: the native engine's arrays the C step streams (blocks,
    norms, head; not the embedding tables it looks rows up in), or the graph's constants."""
    if name.startswith("native"):
        c = engine.config
        D, F, V = c.d_model, c.ff_mult * c.d_model, engine.vocab.size
        per = 1 if engine.weights == "int8" else 4
        mats = c.n_layers * (3 * D * D + D * D + 2 * D * F) + V * D
        rows = c.n_layers * (3 * D + D + F + D) + V  # one scale and (but the head) one bias each
        return mats * per + rows * (8 if per == 1 else 4) + (4 * c.n_layers + 2) * D * 4
    return bench_onnx.bytes_per_token(folder / name.split("-")[1] / "decoder.onnx")


def read_rate(buf: np.ndarray) -> float:
    """GB/s of one sum of ``buf`` (int64), CPU time."""
    t = time.process_time()
    buf.sum()
    return buf.nbytes / max(time.process_time() - t, 1e-9) / 1e9


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=["full", "shipped"], default="full")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--cached", default="16,512,960")
    args = ap.parse_args(argv)
    from aurl.engines.cpu import cpu_summary
    from aurl.engines.native_engine import kernels

    cpu, load = cpu_summary(), bench_onnx.loadavg()
    cached = [int(x) for x in args.cached.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        bench_onnx.prepare(args.shape, folder, int4=True)
        engines = {n: engine_of(n, folder) for n in ENGINES}
        c = engines["native-int8"].config
        # bytes of keys and values per cached token: half floats in the native int8 engine
        kv_per_token = {
            n: 2 * c.n_layers * c.d_model * np.dtype(getattr(e, "kv_dtype", np.float32)).itemsize
            for n, e in engines.items()
        }  # fmt: skip
        wbytes = {n: weight_bytes(n, e, folder) for n, e in engines.items()}
        rng = np.random.default_rng(0)
        ids = rng.integers(4, 700, (1, max(cached) + args.steps * (args.rounds + 1) + 1))
        buf = np.ones(100_000_000 // 8, dtype=np.int64)
        buf.sum()
        best = {(n, k): float("inf") for n in ENGINES for k in cached}
        rate = 0.0
        for k in cached:
            states = {}
            for n, e in engines.items():
                states[n] = e.init_state(1, capacity=CAPACITY)
                e.step(ids[:, :k], states[n])
            for r in range(args.rounds):
                order = ENGINES[r % len(ENGINES) :] + ENGINES[: r % len(ENGINES)]
                for n in order:
                    e, s = engines[n], states[n]
                    s.pos = k  # the same cached length every round (the cache rows stay filled)
                    if hasattr(s, "inputs") and n.startswith("native"):
                        s.inputs = None
                    t = time.process_time()
                    for j in range(args.steps):
                        e.step(ids[:, k + j : k + j + 1], s)
                    best[n, k] = min(best[n, k], (time.process_time() - t) / args.steps)
                rate = max(rate, read_rate(buf))
    print(f"decode step, {args.shape} shape ({c.d_model} wide, {c.n_layers} layers), batch 1, one "
          f"thread, {args.steps} steps x {args.rounds} rounds (best), CPU time; native kernels: "
          f"{kernels()}; load average before/after: {load} / {bench_onnx.loadavg()}")  # fmt: skip
    print(
        f"one thread's read bandwidth (sum of 100 MB, CPU time, best of the run): {rate:.1f} GB/s"
    )
    print("| engine | cached | ms / step | tokens/s | MB read (weights + KV) | GB/s | of the bound "
          "| CPU |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for k in cached:
        for n in ENGINES:
            t = best[n, k]
            kv = kv_per_token[n] * (k + 1)
            mb = (wbytes[n] + kv) / 1e6
            bound = mb / 1e3 / rate  # seconds
            print(f"| {n} | {k} | {t * 1e3:.3f} | {1 / t:.0f} | {wbytes[n] / 1e6:.1f} + "
                  f"{kv / 1e6:.1f} | {mb / 1e3 / t:.1f} | {bound / t:.0%} | "
                  f"{cpu} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
