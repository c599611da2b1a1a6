"""Training throughput: ``aurl train`` against a bare model step, the loader alone, and DDP.

All on the bundled Bach chorales (prepared into a temporary cache), one preset, side by side:

- bare: ``compute_losses`` + backward + AdamW on batches already in memory (what the model
  benchmark measures): tokens/s.
- trainer: :func:`aurl.training.trainer.train` for the same steps (loader, grammar masks from
  each window's prefix, clipping, schedule, logging; validation and checkpoints excluded from
  its tok/s): tokens/s and its ratio to bare.
- loader: the data layer's loader alone, and with the trainer's grammar masks: tokens/s and
  their ratio to the trainer's consumption (the issue asks >= 20x).
- ddp: ``torchrun --nproc_per_node 2`` (gloo, 1 thread each) against one process with 2
  threads and ``grad_accum=2`` (the same global batch): seconds per step and the overhead.

Run:  .venv/bin/python benchmarks/bench_train.py [--preset tiny|small] [--steps 10]
      [--skip-ddp]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHORALES = ROOT / "src" / "aurl" / "data" / "bundled" / "bach-chorales"


def config(preset: str, cache: Path, steps: int, *extra: str):
    from aurl.config import load_config

    return load_config(
        preset=preset,
        overrides=[
            f"data.cache={cache}", f"training.max_steps={steps}", "training.eval_every=100000",
            "training.save_every=100000", "training.sample_every=0", "training.log_every=1",
            "training.warmup_steps=1", *extra,
        ],
    )  # fmt: skip


def bare(cfg, steps: int) -> float:
    """Tokens/s of the model step alone on pre-built batches."""
    import torch

    from aurl.data.dataset import build_loader
    from aurl.models import build_model
    from aurl.models.losses import compute_losses

    loader = iter(build_loader(cfg.data.cache, cfg.data, seed=0, augment=False))
    batches = [next(loader) for _ in range(steps + 1)]
    torch.manual_seed(0)
    model = build_model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.training.lr)
    tokens, t0 = 0, 0.0
    for i, b in enumerate(batches):
        if i == 1:  # the first step warms up allocators and kernels
            t0 = time.perf_counter()
        loss = compute_losses(model, b, cfg.loss, step=i)["total"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(b["attention_mask"].sum()) if i else 0
    return tokens / (time.perf_counter() - t0)


def trainer(cfg, out: Path) -> float:
    """Tokens/s the trainer logged (mean over steps after the first)."""
    from aurl.training.trainer import train

    train(cfg, out, echo=lambda line: None)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tok_per_s"] for r in recs if r["kind"] == "train"][1:]
    # the harmonic mean = total tokens / total time over equal-token steps
    return len(tps) / sum(1 / t for t in tps)


def loader_alone(cfg, batches: int) -> tuple[float, float]:
    """Tokens/s of the loader, and of the loader plus the trainer's grammar masks."""
    from aurl.data.cache import TokenCache
    from aurl.data.dataset import build_loader
    from aurl.data.grammar import Grammar
    from aurl.data.vocab import Vocab
    from aurl.training.trainer import grammar_masks

    cache = TokenCache(cfg.data.cache)
    grammar = Grammar(Vocab(cfg.vocab), cfg.data.polyphony_cap)
    out = []
    for with_masks in (False, True):
        it = iter(build_loader(cache, cfg.data, seed=1, augment=True))
        next(it)
        tokens, t0 = 0, time.perf_counter()
        for _ in range(batches):
            b = next(it)
            if with_masks:
                grammar_masks(grammar, b, cache)
            tokens += int(b["attention_mask"].sum())
        out.append(tokens / (time.perf_counter() - t0))
    return out[0], out[1]


def step_seconds(run: Path) -> float:
    """Mean seconds per optimizer step after the first, from the run's metrics."""
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if r["kind"] == "train"][1:]
    return sum(r["step_s"] for r in train_recs) / len(train_recs)


def ddp(cfg_path: Path, ref_cfg, tmp: Path) -> tuple[float, float]:
    """Seconds per step: 2-process DDP, and 1 process with grad_accum=2 (per global batch)."""
    import torch

    from aurl.training.trainer import train

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "aurl", "train", "--config", str(cfg_path), "--out", str(tmp / "ddp")]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    wall_ddp = time.perf_counter() - t0
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    train(ref_cfg, tmp / "ref", echo=lambda line: None)
    wall_ref = time.perf_counter() - t0
    torch.set_num_threads(threads)
    return step_seconds(tmp / "ddp"), step_seconds(tmp / "ref"), wall_ddp, wall_ref


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--skip-ddp", action="store_true")
    args = ap.parse_args(argv)

    from aurl.data.cache import prepare

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cache = tmp / "cache"
        prepare(CHORALES, cache, workers=1)
        cfg = config(args.preset, cache, args.steps, "data.augment.transpose_prob=0",
                     "data.augment.velocity_prob=0")  # fmt: skip
        b = bare(cfg, args.steps)
        t = trainer(cfg, tmp / "run")
        lo, lo_masks = loader_alone(cfg, 4 * args.steps)
        print(f"preset {args.preset}, batch {cfg.data.batch_size} x window {cfg.data.window}, "
              f"{args.steps} steps, {os.cpu_count()} CPUs")  # fmt: skip
        print(f"bare model step   {b:10.0f} tok/s")
        print(f"aurl train        {t:10.0f} tok/s   {t / b:.2f}x bare")
        print(f"loader alone      {lo:10.0f} tok/s   {lo / t:.1f}x what training consumes")
        print(f"loader + masks    {lo_masks:10.0f} tok/s   {lo_masks / t:.1f}x")
        if not args.skip_ddp:
            ddp_cfg = config(args.preset, cache, args.steps)
            cfg_path = tmp / "ddp.yaml"
            cfg_path.write_text(ddp_cfg.to_yaml())
            ref = config(args.preset, cache, args.steps, "training.grad_accum=2")
            s_ddp, s_ref, w_ddp, w_ref = ddp(cfg_path, ref, tmp)
            print(f"ddp 2 x gloo      {s_ddp:10.3f} s/step  (1 process, grad_accum 2: {s_ref:.3f}"
                  f" s/step; DDP/1-process {s_ddp / s_ref:.2f}x; wall incl. start-up "
                  f"{w_ddp:.1f} s vs {w_ref:.1f} s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
