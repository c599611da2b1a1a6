"""Per-batch cost of a training batch's musical inputs, before and after they moved to the device.

A training batch needs, beside its ids: the state each window starts from (musical time and the
grammar features' state after the window's prefix, carried across augmentation), the window's
grammar features (sounding pitches, their ages, the family) and the grammar masks of the
masked loss. Side by side in one process, on the same augmented batches of the bundled
chorales (grouped split, train pieces):

- ``before``: the path the trainer had: prefixes copied row by row on the host, the grammar
  scan one pass per family that plays (it reads the batch's families on the host: a device
  synchronisation per scan on a GPU), three scans per batch (prefix, masks, and the forward's
  own scan for the features);
- ``after``: :func:`aurl.data.window_state.window_inputs`: prefixes gathered from a
  :class:`~aurl.data.window_state.TokenTable` on the device, one scan of the window for masks
  and features; the scan dense over every family x pitch slot off the CPU (no host sync),
  per family on the CPU;
- ``after-dense``: ``after`` with the dense scan forced (what a GPU runs, here timed on the
  CPU).

Each is timed alone (``inputs``) and as part of the whole optimizer step (inputs, forward,
backward, AdamW; bf16 autocast on CUDA, as the GPU run trains). CPU seconds (``time.process_time``) on the CPU, so other load on a shared
machine does not inflate them; wall seconds with a device synchronisation on CUDA. The order of
the variants rotates from batch to batch. Run with one thread for comparable CPU numbers:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_features.py --preset small \\
        --batches 20 --threads 1
    .venv/bin/python benchmarks/bench_features.py --preset tiny --batches 3 --smoke   # seconds
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from aurl.config import Config, load_config
from aurl.data.cache import TokenCache, prepare
from aurl.data.corpus import build_corpus
from aurl.data.dataset import build_loader
from aurl.data.grammar import Grammar
from aurl.data.window_state import TokenTable, window_inputs, window_start
from aurl.models import build_model
from aurl.models.losses import compute_losses

VARIANTS = ("before", "after", "after-dense")


def chorale_cache(work: Path, smoke: bool = False) -> Path:
    """The bundled chorales prepared into ``work/cache`` (grouped split); ``smoke``: 12 of them."""
    cache = work / ("cache-smoke" if smoke else "cache")
    if not (cache / "index.npz").is_file():
        corpus = work / ("corpus-smoke" if smoke else "corpus")
        build_corpus("bach-chorales", corpus)
        if smoke:  # keep a dozen pieces
            for path in sorted(corpus.rglob("*.mid"))[12:]:
                path.unlink()
        prepare(corpus, cache, workers=1)
    return cache


def _set_dense(model: torch.nn.Module, grammar: Grammar, dense: bool | None) -> None:
    grammar.dense = dense
    if model.grammar_features is not None:
        model.grammar_features.grammar.dense = dense


def inputs_before(model, batch: dict, cache: TokenCache, grammar: Grammar, device) -> tuple:
    """The trainer's old path: host prefixes, per-family scans; the forward scans the window
    itself (its features are computed here too, so that ``inputs`` counts every scan)."""
    _set_dense(model, grammar, False)
    start = window_start(model, batch, cache)
    ids = batch["ids"].to(device)
    masks = grammar.sequence_masks(ids, start.grammar[0])
    model.grammar_features.features(ids, start.grammar)  # what forward(start=...) scanned
    return start, masks


def inputs_after(model, batch: dict, table: TokenTable, grammar: Grammar, dense: bool | None):
    _set_dense(model, grammar, dense)
    return window_inputs(model, batch, table, grammar)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """(result, seconds): CPU seconds on the CPU, wall seconds after a sync on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize(device)
        return out, time.perf_counter() - t0
    c0 = time.process_time()
    out = fn()
    return out, time.process_time() - c0


def train_step(model, opt, config: Config, batch: dict, start, masks, device) -> None:
    """Forward, backward and the AdamW update of one batch with its inputs."""
    ctx = {"ids": batch["ids"].to(device), "start": start,
           "attention_mask": batch["attention_mask"].to(device),
           "meter": batch["meter"].to(device)}  # fmt: skip
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = compute_losses(model, ctx, config.loss, step=0, allowed=masks)["total"]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def measure(config: Config, cache_dir: Path, batches: int, device: torch.device) -> dict:
    """Median seconds per batch of each variant's inputs and whole step."""
    cache = TokenCache(cache_dir)
    torch.manual_seed(0)
    model = build_model(config).to(device).train()
    model.set_right_padding(True)  # as the trainer runs it
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    grammar = Grammar(model.vocab, config.data.polyphony_cap)
    table = TokenTable(cache, cache.split_indices("train"), device)
    stream = iter(build_loader(cache, config.data, seed=0, augment=True))
    drawn = [next(stream) for _ in range(batches + 1)]  # the first: warm-up, not counted
    times: dict[str, dict[str, list[float]]] = {v: {"inputs": [], "step": []} for v in VARIANTS}
    make = {
        "before": lambda b: inputs_before(model, b, cache, grammar, device),
        "after": lambda b: inputs_after(model, b, table, grammar, None),
        "after-dense": lambda b: inputs_after(model, b, table, grammar, True),
    }
    for i, batch in enumerate(drawn):
        order = VARIANTS[i % 3 :] + VARIANTS[: i % 3]
        for variant in order:
            (start, masks), t_in = timed(partial(make[variant], batch), device)
            if variant == "before":
                start.features = None  # forward scans the window, as it did
            step = partial(train_step, model, opt, config, batch, start, masks, device)
            _, t_step = timed(step, device)
            if i > 0:
                times[variant]["inputs"].append(t_in)
                times[variant]["step"].append(t_in + t_step)
    _set_dense(model, grammar, None)
    return {v: {k: statistics.median(x) for k, x in t.items()} for v, t in times.items()}


def table(result: dict, args: argparse.Namespace, device: torch.device) -> str:
    unit = "CPU ms" if device.type == "cpu" else "wall ms"
    b = result["before"]
    lines = [
        f"| variant ({args.preset}, {device.type}, median of {args.batches} batches) "
        f"| inputs {unit}/batch | step {unit} | inputs vs before | step vs before |",
        "|---|---|---|---|---|",
    ]
    for v in VARIANTS:
        r = result[v]
        lines.append(
            f"| {v} | {1e3 * r['inputs']:.1f} | {1e3 * r['step']:.1f} "
            f"| {r['inputs'] / b['inputs']:.2f}x | {r['step'] / b['step']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--work", help="folder for the prepared cache (default: a temp folder)")
    p.add_argument("--smoke", action="store_true", help="12 chorales: checks the plumbing")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        cache = chorale_cache(work, smoke=args.smoke)
        config = load_config(preset=args.preset, overrides=[f"data.cache={cache}", *args.set])
        result = measure(config, cache, args.batches, device)
    out = table(result, args, device)
    print(out)
    return out


if __name__ == "__main__":
    main()
