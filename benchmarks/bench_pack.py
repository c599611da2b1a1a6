"""Packed training rows (``data.pack``, issue 16) against unpacked ones, on the CPU.

1. **Real-token share** of the rows over whole epochs of a cache, for each ``--shapes`` batch x
   window: unpacked rows (one window each, length-grouped) counted over ``batch x window`` (the
   ninth session's 32-37% at 2048) and over the batch's padded width (what the blocks run
   over); packed rows over ``batch x window``; and the tokens an epoch holds (packing drops
   what cannot fill a last batch).
2. **Training step cost per real token**, side by side: the trainer's step (window start
   states from the prefix checkpoints, grammar scan, masks, forward, grammar-masked loss,
   backward, AdamW) on unpacked and on packed batches of the same cache, alternating which
   goes first, in one process (and how real the packed batches' segment rows are: the
   scan, masks, head and loss run over them, padded to the batch's longest segment). CPU seconds of this process (``time.process_time``, one
   thread), so other load inflates them little. The CPU runs packed attention as SDPA under an
   explicit (rows, 1, W, W) block-diagonal mask, computing the whole W x W square of each row;
   on CUDA FlexAttention skips the blocks no segment reaches, so this is not the GPU's ratio.

Run (BENCHMARKS.md "Packed training rows"):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_pack.py --cache CACHE
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from aurl.config import load_config
from aurl.data.cache import TokenCache
from aurl.data.dataset import LengthGroupedBatchSampler, PackedBatchSampler, WindowDataset
from aurl.models import build_model
from aurl.training.trainer import make_optimizer


def shares(cache: TokenCache, batch: int, window: int, epochs: int) -> dict[str, float]:
    """Real-token shares over ``epochs`` epochs of the train split (module docstring, 1)."""
    ds = WindowDataset(cache, "train", window=window)
    lengths = ds.slot_lengths(window)
    real_u = width_u = rows_u = real_p = rows_p = 0
    for epoch in range(epochs):
        unpacked = LengthGroupedBatchSampler(ds, batch, seed=0)
        unpacked.set_epoch(epoch)
        for b in unpacked.epoch_batches():
            real_u += int(lengths[b].sum())
            width_u += len(b) * int(lengths[b].max())
            rows_u += len(b)
        packed = PackedBatchSampler(ds, batch, seed=0)
        packed.set_epoch(epoch)
        for b in packed.epoch_batches():
            real_p += int(lengths[[slot for slot, _ in b]].sum())
            rows_p += batch
    return {
        "unpacked_of_window": real_u / (rows_u * window),
        "unpacked_of_padded_width": real_u / width_u,
        "packed_of_window": real_p / (rows_p * window),
        "tokens_per_epoch_unpacked": real_u / epochs,
        "tokens_per_epoch_packed": real_p / epochs,
    }


def step_costs(cache_dir: str, preset: str, batch: int, window: int, steps: int) -> dict:
    """CPU seconds per 1,000 real tokens of the trainer's step, unpacked and packed, alternating
    (module docstring, 2)."""
    from aurl.data.dataset import build_loader
    from aurl.data.grammar import Grammar
    from aurl.data.window_state import TokenTable, window_inputs
    from aurl.models.layers import Packing
    from aurl.models.losses import compute_losses

    costs: dict[str, list[float]] = {"unpacked": [], "packed": []}
    fills: dict[str, list[float]] = {"unpacked": [], "packed": []}
    seg_fill: dict[str, list[float]] = {"unpacked": [], "packed": []}
    runs = {}
    for name, pack in (("unpacked", False), ("packed", True)):
        cfg = load_config(preset=preset, overrides=[
            f"data.cache={cache_dir}", f"data.window={window}", f"data.batch_size={batch}",
            f"data.pack={str(pack).lower()}", "model.dropout=0",
        ])  # fmt: skip
        torch.manual_seed(0)
        model = build_model(cfg)
        model.set_right_padding(True)
        cache = TokenCache(cache_dir)
        table = TokenTable(cache, cache.split_indices("train"), "cpu")
        with torch.no_grad():
            table.add_checkpoints(model)
        opt = make_optimizer(model, cfg)
        loader = iter(build_loader(cache, cfg.data, seed=0, vocab_config=cfg.vocab))
        runs[name] = (cfg, model, table, Grammar(model.vocab, cfg.data.polyphony_cap), opt, loader)

    def step(name: str) -> tuple[float, int, float]:
        cfg, model, table, grammar, opt, loader = runs[name]
        raw = next(loader)
        t0 = time.process_time()
        lengths = raw["attention_mask"].sum(1)
        start, allowed = window_inputs(model, raw, table, grammar)
        batch = {"ids": raw["ids"], "attention_mask": raw["attention_mask"],
                 "meter": raw["meter"], "start": start}  # fmt: skip
        positions = raw["ids"].numel()
        if "pack_row" in raw:
            width = int(raw["pack_width"])
            batch["pack"] = Packing.plan(raw["pack_row"], raw["pack_col"], lengths, rows=batch_n,
                                         width=width, seg_len=raw["ids"].shape[1])  # fmt: skip
            positions = batch_n * width
        loss = compute_losses(model, batch, cfg.loss, step=0, allowed=allowed)["total"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        real = int(lengths.sum())
        seg_fill[name].append(real / raw["ids"].numel())  # segment rows: padded to the longest
        return time.process_time() - t0, real, real / positions

    batch_n = batch
    for name in runs:  # a warm-up step each
        step(name)
    for i in range(steps):
        order = ("unpacked", "packed") if i % 2 == 0 else ("packed", "unpacked")
        for name in order:
            cpu_s, real, fill = step(name)
            costs[name].append(1000 * cpu_s / real)
            fills[name].append(fill)
    out = {name: {"cpu_s_per_1k_tokens": statistics.median(costs[name]),
                  "fill": statistics.mean(fills[name]),
                  "segment_rows_fill": statistics.mean(seg_fill[name])}
           for name in runs}  # fmt: skip
    ratios = [u / p for u, p in zip(costs["unpacked"], costs["packed"])]
    out["unpacked_over_packed"] = statistics.median(ratios)
    out["ratio_range"] = (min(ratios), max(ratios))
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cache", required=True)
    p.add_argument("--shapes", nargs="+", default=["32x1024", "32x2048"], help="BATCHxWINDOW")
    p.add_argument("--epochs", type=int, default=5, help="epochs counted for the shares")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--step-shapes", nargs="+", default=["8x1024", "8x2048"])
    p.add_argument("--steps", type=int, default=8, help="timed steps of each, alternating")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cache = TokenCache(args.cache)
    results: dict = {"shares": {}, "steps": {}}
    for shape in args.shapes:
        b, w = map(int, shape.split("x"))
        results["shares"][shape] = s = shares(cache, b, w, args.epochs)
        print(f"{shape}: real share unpacked {s['unpacked_of_window']:.3f} of batch x window, "
              f"{s['unpacked_of_padded_width']:.3f} of the padded batch; packed "
              f"{s['packed_of_window']:.3f}; tokens/epoch {s['tokens_per_epoch_unpacked']:,.0f} "
              f"unpacked, {s['tokens_per_epoch_packed']:,.0f} packed", flush=True)  # fmt: skip
    for shape in args.step_shapes:
        b, w = map(int, shape.split("x"))
        r = results["steps"][shape] = step_costs(args.cache, args.preset, b, w, args.steps)
        lo, hi = r["ratio_range"]
        print(f"{args.preset} {shape}: CPU s per 1k real tokens unpacked "
              f"{r['unpacked']['cpu_s_per_1k_tokens']:.3f} (fill {r['unpacked']['fill']:.3f}), "
              f"packed {r['packed']['cpu_s_per_1k_tokens']:.3f} (fill {r['packed']['fill']:.3f}); "
              f"unpacked / packed {r['unpacked_over_packed']:.2f} [{lo:.2f}-{hi:.2f}]; the "
              f"packed batches' segment rows {r['packed']['segment_rows_fill']:.3f} real",
              flush=True)  # fmt: skip
    return results


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
