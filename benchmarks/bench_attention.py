"""Full vs windowed attention at long lengths: forward + backward of one attention layer.

One :class:`aurl.models.layers.Attention` at the ``small`` preset's width (d_model 256, 4 heads,
rotary), batch 1, ``T`` = 2k, 8k and 32k tokens, forward then backward of ``y.square().mean()``.
Variants, side by side at each length:

- ``full``: causal SDPA without a mask (``attention=full`` without padding; PyTorch's fused
  CPU kernel);
- ``dense-window``: SDPA with the dense T x T windowed mask, which is what ``local`` did
  before block-local attention (and what ``full`` does when the trainer passes a padding mask);
- ``local``: block-local attention (:func:`aurl.models.layers.local_attention`), window 256;
- ``hierarchical``: the same plus 64 global tokens and summaries of 64-token segments.

Each measurement runs in a fresh subprocess with its address space capped (``--mem-gib``) and a
wall-clock limit (``--timeout``): a run that hits either is reported as such, which is the
result for that length. Times are seconds per forward + backward (the best of ``--repeat``
after one untimed warm-up below 32k); memory is the peak RSS growth over the process's RSS
once the inputs exist.

Run:  .venv/bin/python benchmarks/bench_attention.py [--lengths 2048,8192,32768]
      [--threads 2] [--timeout 120] [--mem-gib 8] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

VARIANTS = ("full", "dense-window", "local", "hierarchical")
D_MODEL, HEADS, WINDOW, GLOBALS, SUMMARY = 256, 4, 256, 64, 64


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child(variant: str, T: int, threads: int, repeat: int) -> dict:
    """One measurement (runs inside the capped subprocess)."""
    import torch

    from aurl.models.layers import Attention, Rotary, Sparse, attention_mask_for

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    attn = Attention(D_MODEL, HEADS)
    cos, sin = Rotary(D_MODEL // HEADS, T).tables(0, T)
    x = torch.randn(1, T, D_MODEL, requires_grad=True)
    if variant == "full":
        mask = None
    elif variant == "dense-window":
        pos = torch.arange(T)
        mask = attention_mask_for(pos, pos, WINDOW, 0)[None, None]  # (1, 1, T, T)
    elif variant == "local":
        mask = Sparse(WINDOW)
    else:
        mask = Sparse(WINDOW, GLOBALS, SUMMARY)
    base = _rss_mb()

    def run() -> float:
        t0 = time.perf_counter()
        attn(x, cos, sin, mask, None).square().mean().backward()
        return time.perf_counter() - t0

    if T < 32768:
        run()
    best = min(run() for _ in range(repeat))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": best, "peak_mb": peak - base}


def measure(variant: str, T: int, args: argparse.Namespace) -> dict:
    cap = int(args.mem_gib * 2**30)
    code = (
        "import json, resource, sys\n"
        f"resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap}))\n"
        "sys.path.insert(0, 'benchmarks')\n"
        "import bench_attention as b\n"
        f"print(json.dumps(b.child({variant!r}, {T}, {args.threads}, {args.repeat})))\n"
    )
    try:
        p = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=args.timeout
        )
    except subprocess.TimeoutExpired:
        return {"result": f"over {args.timeout:.0f} s"}
    if p.returncode != 0:
        oom = "alloc" in p.stderr.lower() or "memory" in p.stderr.lower()
        last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"rc {p.returncode}"
        return {"result": f"out of memory (cap {args.mem_gib:g} GiB)" if oom else last}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="2048,8192,32768")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--mem-gib", type=float, default=8.0)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    rows = []
    for T in (int(n) for n in args.lengths.split(",")):
        for variant in args.variants.split(","):
            r = measure(variant, T, args)
            rows.append({"variant": variant, "tokens": T, **r})
            print(json.dumps(rows[-1]), flush=True)
    print("\n| tokens | variant | s per fwd+bwd | peak RSS growth (MB) |\n|---|---|---|---|")
    for r in rows:
        if "seconds" in r:
            print(f"| {r['tokens']} | {r['variant']} | {r['seconds']:.3f} | {r['peak_mb']:.0f} |")
        else:
            print(f"| {r['tokens']} | {r['variant']} | {r['result']} | |")


if __name__ == "__main__":
    main()
