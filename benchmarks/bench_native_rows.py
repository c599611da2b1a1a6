"""The native engine's int8 decode step over batch rows: the AVX2 kernels against the
AVX512-VNNI int8 products, side by side in one process.

Rows are what SMC particles (``aurl harmonize --particles``), the cadence search of ``aurl
generate --seconds`` (4 particles per piece, every piece in one batch) and the server's
composers decode. The AVX2 kernel streams each weight row against every batch row in turn; the
VNNI one reads a weight row once for four batch rows, 64 products per instruction. Both give the
same integer sums, so the same logits bit for bit (``tests/engines/test_native_engine.py``).

A prefill (``engine.step`` of many tokens: a primer, a redrawn ending's prefix) is one C call
per 64 tokens of every row, their products batched as rows are: the second table times a
``--prefill``-token prefill of 1 and 3 rows that way against one C step per token on the same
input embeddings (how ``step`` fed a prefill before), both on the best kernels.

For each batch size (``--rows``) and cached length (``--cached``) a state of random ids is
filled once, then each round times ``--steps`` one-token steps on each kernel set, in turn (the
order alternates), in CPU time (``process_time``); the table keeps each one's best round and
the ratio of the bests. Model: the shipped one (``--shape shipped``, 3.4M parameters, what the
commands run by default) or the ``full`` preset's shape with seeded random weights (26M).

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_native_rows.py [--shape shipped|full]
      [--rows 1,2,4,8,16] [--cached 16,512] [--rounds 7] [--steps 32] [--prefill 500]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_onnx  # noqa: E402  (the full shape's folder, load average)

KERNELS = ("avx2", "avx512vnni")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=["shipped", "full"], default="shipped")
    ap.add_argument("--rows", default="1,2,4,8,16")
    ap.add_argument("--cached", default="16,512")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=500)
    args = ap.parse_args(argv)
    from aurl.engines import native_engine as native
    from aurl.engines.cpu import cpu_summary
    from aurl.shipped import shipped_model

    if native.set_kernels("avx512vnni") != "avx512vnni":
        print("this CPU has no AVX512-VNNI: nothing to compare")
        return 1
    cpu, load = cpu_summary(), bench_onnx.loadavg()
    rows = [int(x) for x in args.rows.split(",")]
    cached = [int(x) for x in args.cached.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        if args.shape == "full":
            bench_onnx.torch_model("full").save_pretrained(Path(tmp) / "model")
            folder = Path(tmp) / "model"
        else:
            folder = shipped_model()
        engine = native.NativeEngine(folder)
        c = engine.config
        capacity = max(cached) + args.steps + 8
        rng = np.random.default_rng(0)
        best = {}
        for B in rows:
            for k in cached:
                ids = rng.integers(4, 700, (B, k + args.steps))
                state = engine.init_state(B, capacity=capacity)
                engine.step(ids[:, :k], state)
                t_best = dict.fromkeys(KERNELS, float("inf"))
                for r in range(args.rounds):
                    for name in KERNELS if r % 2 == 0 else KERNELS[::-1]:
                        native.set_kernels(name)
                        state.pos = k  # the same cached length every round
                        t = time.process_time()
                        for j in range(args.steps):
                            engine.step(ids[:, k + j : k + j + 1], state)
                        t_best[name] = min(t_best[name], (time.process_time() - t) / args.steps)
                best[B, k] = t_best
        native.set_kernels("avx512vnni")
        pre = {}
        for B in (1, 3):
            ids = rng.integers(4, 700, (B, args.prefill))
            t_best = {"prefill": float("inf"), "steps": float("inf")}
            for r in range(args.rounds):
                for way in ("prefill", "steps") if r % 2 == 0 else ("steps", "prefill"):
                    state = engine.init_state(B, capacity=args.prefill + 8)
                    t = time.process_time()
                    if way == "prefill":
                        engine.step(ids, state)
                    else:  # the inputs the prefill embeds, one C step per token
                        feed, state.features = engine.features(ids, state.features)
                        x = engine.embed_inputs(feed, state.style)
                        for j in range(args.prefill):
                            xj = np.ascontiguousarray(x[:, j])
                            engine._run(xj.ctypes.data, B, state)
                    t_best[way] = min(t_best[way], time.process_time() - t)
            pre[B] = t_best
    print(f"native int8 decode step, {args.shape} shape ({c.d_model} wide, {c.n_layers} layers), "
          f"one thread, {args.steps} steps x {args.rounds} rounds (best), CPU time, kernels "
          f"alternated; {cpu}; load average before/after: {load} / {bench_onnx.loadavg()}")  # fmt: skip
    print("| rows | cached | AVX2 ms / step | VNNI ms / step | VNNI speed-up | VNNI tokens/s |")
    print("|---|---|---|---|---|---|")
    for (B, k), t in best.items():
        a, v = t["avx2"], t["avx512vnni"]
        print(f"| {B} | {k} | {a * 1e3:.3f} | {v * 1e3:.3f} | {a / v:.2f}x | {B / v:.0f} |")
    print(f"\nprefill of {args.prefill} tokens from an empty state, best of {args.rounds}, CPU "
          "time, the two ways alternated")  # fmt: skip
    print("| rows | one C step per token (s) | prefill calls (s) | speed-up |")
    print("|---|---|---|---|")
    for B, t in pre.items():
        print(f"| {B} | {t['steps']:.3f} | {t['prefill']:.3f} | {t['steps'] / t['prefill']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
