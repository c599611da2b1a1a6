"""Ablations that decide: does each of the model's features earn its compute?

Four variants of one preset, trained for the same number of optimizer steps on the grouped split
(:mod:`aurl.data.tunes`: no test chorale shares a tune with a training one), each with several
seeds, then scored on the test split:

- ``full``: the preset as it is (musical positions with meter, grammar features, the
  grammar-masked loss; windows start from their prefix's state);
- ``no-positions``: ``model.musical_position=false`` (no beat / bar / tempo embedding);
- ``no-grammar-features``: ``model.grammar_features=false`` (no sounding-pitch input);
- ``no-masked-loss``: ``loss.grammar_masked=false`` (plain cross-entropy over all 774 ids; no
  grammar masks are built for training).

Each variant is scored the way the sampler draws (``grammar-masked``: the distribution
renormalised over the ids the grammar allows; bits per note = NLL in bits / test notes) and
raw. Step time, two ways: the median wall ``step_s`` the trainer logs (forward, backward, the
update and, where the variant needs them, the grammar masks and the window start states;
validation and checkpoints excluded), and this process's CPU seconds for the whole ``train``
call divided by the steps (setup and the one validation included), which other load on a
shared machine does not inflate. Run with ``--threads 1`` for comparable CPU numbers.

The issue's budget is about 10 CPU-minutes of the ``small`` preset per run (12 runs, 2 hours);
``--steps`` sets it. One prepared cache serves every run (built from the bundled corpus into
``--work`` unless ``--cache`` names one).

Run:
    .venv/bin/python benchmarks/bench_ablation.py --preset small --steps 400 --threads 2 \\
        --out ablation.json                      # ~10 CPU-min per run on the 2-core machine
    .venv/bin/python benchmarks/bench_ablation.py --preset tiny --steps 30 --seeds 0 1 2 \\
        --test-pieces 8                          # minutes: checks the plumbing
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from aurl.config import load_config
from aurl.data.cache import TokenCache, prepare
from aurl.data.corpus import build_corpus
from aurl.data.grammar import Grammar
from aurl.evaluation.likelihood import score_sequences
from aurl.training.trainer import train

VARIANTS = {
    "full": [],
    "no-positions": ["model.musical_position=false"],
    "no-grammar-features": ["model.grammar_features=false"],
    "no-masked-loss": ["loss.grammar_masked=false"],
}


def grouped_cache(work: Path) -> Path:
    """The bundled chorales prepared into ``work/cache`` (split by tune group)."""
    cache = work / "cache"
    if not (cache / "index.npz").is_file():
        build_corpus("bach-chorales", work / "corpus")
        prepare(work / "corpus", cache, workers=1)
    return cache


def step_seconds(run_dir: Path) -> float:
    """Median of the trainer's logged ``step_s``, the first record (warm-up) left out."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    steps = [r["step_s"] for r in records if r.get("kind") == "train" and "step_s" in r]
    return statistics.median(steps[1:] or steps)


def run_one(
    variant: str, seed: int, args: argparse.Namespace, cache: Path, work: Path
) -> dict[str, float]:
    overrides = [
        f"data.cache={cache}", f"training.max_steps={args.steps}", f"training.seed={seed}",
        f"training.eval_every={args.steps}", f"training.save_every={args.steps}",
        "training.sample_every=0", "training.keep_best=0", "training.device=cpu",
        f"training.log_every={max(1, args.steps // 10)}", *args.set, *VARIANTS[variant],
    ]  # fmt: skip
    config = load_config(preset=args.preset, overrides=overrides)
    run_dir = work / f"{variant}-seed{seed}"
    t0, c0 = time.perf_counter(), time.process_time()
    result = train(config, run_dir)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    model = result.model.eval()
    tc = TokenCache(cache)
    rows = tc.split_indices("test")[: args.test_pieces or None]
    seqs = [np.asarray(tc.tokens(int(r)), np.int64) for r in rows]
    meters = [tc.meters[int(r)] for r in rows]
    common = dict(window=config.data.window, batch_size=config.data.batch_size, meters=meters)
    grammar = Grammar(model.vocab, config.data.polyphony_cap)
    masked = score_sequences(model, seqs, grammar=grammar, **common)
    raw = score_sequences(model, seqs, **common)
    return {
        "variant": variant, "seed": seed, "steps": result.step,
        "bits_per_note": masked.bits_per_note, "bits_per_note_raw": raw.bits_per_note,
        "step_s": step_seconds(run_dir), "train_wall_s": wall, "train_cpu_s": cpu,
        "test_pieces": len(seqs), "test_notes": masked.notes,
    }  # fmt: skip


def table(results: list[dict], args: argparse.Namespace) -> str:
    """The Markdown table for BENCHMARKS.md: mean +- sample std over seeds per variant."""
    lines = [
        f"| variant ({args.preset}, {args.steps} steps, seeds {' '.join(map(str, args.seeds))}) "
        "| bits/note (grammar-masked) | raw | wall s/step | CPU s/step | CPU vs full |",
        "|---|---|---|---|---|---|",
    ]
    base = None
    for variant in args.variants:
        rs = [r for r in results if r["variant"] == variant]
        if not rs:
            continue
        bpn = [r["bits_per_note"] for r in rs]
        raw = [r["bits_per_note_raw"] for r in rs]
        step = statistics.mean(r["step_s"] for r in rs)
        cpu = statistics.mean(r["train_cpu_s"] / max(r["steps"], 1) for r in rs)
        base = base if base is not None else cpu
        sd = statistics.stdev(bpn) if len(bpn) > 1 else float("nan")
        lines.append(
            f"| {variant} | {statistics.mean(bpn):.3f} +- {sd:.3f} | {statistics.mean(raw):.2f} "
            f"| {step:.3f} | {cpu:.3f} | {cpu / base:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps per run (the budget)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--cache", help="a prepared cache (default: the bundled corpus, grouped)")
    p.add_argument("--work", help="folder for the cache and the runs (default: a temp folder)")
    p.add_argument("--test-pieces", type=int, default=0, help="score the first N (0: all)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", help="write every run's numbers here (JSON)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="aurl-ablation-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache) if args.cache else grouped_cache(work)
    results = []
    for seed in args.seeds:  # variants interleaved, so that the machine's drift hits them alike
        for variant in args.variants:
            r = run_one(variant, seed, args, cache, work)
            results.append(r)
            print(
                f"{variant} seed {seed}: bits/note {r['bits_per_note']:.3f} "
                f"(raw {r['bits_per_note_raw']:.2f}) step {r['step_s']:.3f} s "
                f"train {r['train_wall_s']:.0f} s wall {r['train_cpu_s']:.0f} s cpu",
                flush=True,
            )
    print(table(results, args))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
