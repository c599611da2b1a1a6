"""MusicTransformerVAEGAN against Hugging Face's GPT2LMHeadModel of the same shape, side by side.

Both models: the ``full`` preset's shape (hidden 512, 8 layers, 8 heads, 4x feed-forward,
vocab 774, context 2048, dropout 0.1), ours in ``transformer`` mode with its musical-time and
grammar features on. Every measurement runs in a fresh subprocess (so peak RSS belongs to one
model), alternating baseline and ours, on the same tokenized Bach chorales:

- train: AdamW steps at seq 512 x batch 8 (ours through ``compute_losses``; HF with
  ``labels=``); tokens/s over the timed steps, and the peak RSS growth over the process's RSS
  once the model, optimizer and data exist.
- generate: batch 1, KV cache, 1024 new tokens, greedy (ours: ``init_state`` + ``step``;
  HF: ``generate``); tokens/s. ``--variants int8,bf16`` also times ours with weight-only int8
  (``aurl.models.quantize.quantize_int8``: int8 weights, bf16 activations and cache) or with
  bf16 weights and cache.

Run:  .venv/bin/python benchmarks/bench_model.py [--threads 2] [--steps 2] [--rounds 1]
      [--tokens 1024] [--only train|generate] [--variants int8,bf16]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHORALES = ROOT / "src" / "aurl" / "data" / "bundled" / "bach-chorales"
SEQ, BATCH = 512, 8


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def chorale_batch():
    """(BATCH, SEQ) ids: the bundled chorales tokenized, concatenated, cut into windows
    (or the ids saved in the file named by ``AURL_BENCH_IDS``)."""
    import os

    import numpy as np
    import torch

    if os.environ.get("AURL_BENCH_IDS"):
        return torch.as_tensor(np.load(os.environ["AURL_BENCH_IDS"])).view(BATCH, SEQ)

    from aurl.data.tokenizer import Tokenizer

    tok, parts, n = Tokenizer(), [], 0
    for path in sorted(CHORALES.glob("*.mid")):
        ids = tok.encode_file(path)
        parts.append(ids)
        n += len(ids)
        if n >= SEQ * BATCH:
            break
    return torch.as_tensor(np.concatenate(parts)[: SEQ * BATCH]).view(BATCH, SEQ)


def build(impl: str):
    import torch

    from aurl.config import load_config

    cfg = load_config(preset="full", overrides=["model.mode=transformer"])
    m = cfg.model
    torch.manual_seed(0)
    if impl == "hf":
        from transformers import GPT2Config, GPT2LMHeadModel

        hf = GPT2Config(
            vocab_size=774, n_positions=m.max_seq_len, n_embd=m.d_model, n_layer=m.n_layers,
            n_head=m.n_heads, n_inner=m.ff_mult * m.d_model, bos_token_id=0, eos_token_id=1,
            pad_token_id=2, resid_pdrop=m.dropout, embd_pdrop=m.dropout, attn_pdrop=m.dropout,
        )  # fmt: skip
        return GPT2LMHeadModel(hf), cfg
    from aurl.models import build_model

    return build_model(cfg), cfg


def worker_train(impl: str, steps: int) -> dict:
    import torch

    model, cfg = build(impl)
    model.train()
    ids = chorale_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if impl == "hf":

        def loss_fn():
            return model(input_ids=ids, labels=ids).loss
    else:
        from aurl.models.losses import compute_losses

        def loss_fn():
            return compute_losses(model, ids, cfg.loss, step=0)["total"]

    base = rss_mb()
    times = []
    for i in range(steps + 1):  # the first step allocates optimizer state: not timed
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t0)
    return {
        "tokens_per_s": SEQ * BATCH / (sum(times) / len(times)),
        "peak_growth_mb": peak_rss_mb() - base,
        "params": sum(p.numel() for p in model.parameters()),
        "loss": float(loss),
    }


def worker_generate(impl: str, tokens: int, variant: str) -> dict:
    import torch

    model, _ = build(impl)
    model.eval()
    if variant == "bf16":
        model = model.to(torch.bfloat16)
    elif variant == "int8":
        from aurl.models.quantize import quantize_int8

        model = quantize_int8(model)
    start = torch.zeros(1, 1, dtype=torch.long)  # START
    with torch.inference_mode():
        # warm-up (first-call allocations, kernel choice, compilation), same cache size
        t_warm = time.perf_counter()
        run_generate(model, impl, start, 8, tokens + 1)
        t_warm = time.perf_counter() - t_warm
        t0 = time.perf_counter()
        n = run_generate(model, impl, start, tokens, tokens + 1)
        dt = time.perf_counter() - t0
    return {"tokens_per_s": n / dt, "warmup_s": t_warm}


def run_generate(model, impl: str, start, tokens: int, capacity: int) -> int:
    """Generate ``tokens`` greedy tokens after ``start``; returns how many came."""
    import torch

    if impl == "hf":
        out = model.generate(
            input_ids=start, attention_mask=torch.ones_like(start), max_new_tokens=tokens,
            min_new_tokens=tokens, do_sample=False, use_cache=True, pad_token_id=2,
        )  # fmt: skip
        return out.shape[1] - 1
    state = model.init_state(1, capacity=capacity)
    tok = start
    for _ in range(tokens):
        tok = model.step(tok, state)[:, -1].argmax(-1, keepdim=True)
    return state.pos


def run_worker(kind: str, impl: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--impl", impl, "--threads",
           str(args.threads), "--steps", str(args.steps), "--tokens", str(args.tokens)]  # fmt: skip
    if impl.startswith("aurl-"):
        cmd[cmd.index("--impl") + 1] = "aurl"
        cmd += ["--variant", impl.split("-", 1)[1]]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        tail = out.stderr.strip().splitlines()[-1:] or ["(no output)"]
        print(f"{kind} {impl} failed: {tail[0]}", flush=True)
        return {}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2, help="timed training steps per run")
    ap.add_argument("--tokens", type=int, default=1024, help="new tokens to generate")
    ap.add_argument("--rounds", type=int, default=1, help="alternating baseline/ours rounds")
    ap.add_argument("--only", choices=["train", "generate"], default=None)
    ap.add_argument(
        "--variants",
        default="int8",
        help="also generate with: int8 (quantize_int8: int8 weights, bf16 activations), "
        "bf16 (weights and cache); comma-separated, '' for none",
    )
    ap.add_argument("--variant", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--worker", choices=["train", "generate"], help=argparse.SUPPRESS)
    ap.add_argument("--impl", choices=["hf", "aurl"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    if args.worker:
        if args.worker == "train":
            res = worker_train(args.impl, args.steps)
        else:
            res = worker_generate(args.impl, args.tokens, args.variant)
        print(json.dumps(res))
        return 0

    from aurl.engines.cpu import cpu_summary

    cpu = cpu_summary()  # every row says which CPU it ran on (issue 17)
    print(f"CPU: {cpu}; --threads {args.threads}", flush=True)
    kinds = [args.only] if args.only else ["train", "generate"]
    for kind in kinds:
        variants = [v for v in args.variants.split(",") if v] if kind == "generate" else []
        impls = ["hf", "aurl"] + [f"aurl-{v}" for v in variants]
        best: dict[str, dict] = {}
        for r in range(args.rounds):
            for impl in impls:
                res = run_worker(kind, impl, args)
                if not res:
                    continue
                line = " ".join(f"{k} {v:.4g}" for k, v in res.items())
                print(f"{kind} round {r} {impl}: {line}", flush=True)
                if impl not in best or res["tokens_per_s"] > best[impl]["tokens_per_s"]:
                    best[impl] = res
        hf = best.get("hf")
        for impl in impls[1:]:
            ours = best.get(impl)
            if hf is None or ours is None:
                continue
            msg = f"{kind} {impl}/hf tokens/s ratio {ours['tokens_per_s'] / hf['tokens_per_s']:.2f}"
            if kind == "train":
                msg += f" peak-memory ratio {ours['peak_growth_mb'] / hf['peak_growth_mb']:.2f}"
            print(f"{msg} ({cpu})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
