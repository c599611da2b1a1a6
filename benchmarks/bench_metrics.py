"""Evaluation speed: musical metrics, set distances and the report for 100 generated pieces
against 100 reference pieces (target: under a minute on 2 cores, bounded memory).

Generated: 100 pieces of up to 512 tokens sampled from the shipped model (timed apart, not
counted). Reference: 100 bundled chorales. Timed: :func:`aurl.evaluation.report.evaluate_sets`
(per-piece metrics, Yang & Lerch intra/inter-set distances, overlap areas, KL, Frechet) and
:func:`write_report` (Markdown and plots), wall and process CPU time, and the peak RSS growth.

    python benchmarks/bench_metrics.py
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import aurl
from aurl.config import GenerationConfig
from aurl.data.tokenizer import Tokenizer
from aurl.evaluation.report import evaluate_sets, write_report
from aurl.generation.generate import generate
from aurl.models import MusicTransformerVAEGAN

CHORALES = Path(aurl.__file__).parent / "data" / "bundled" / "bach-chorales"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pieces", type=int, default=100)
    ap.add_argument("--tokens", type=int, default=512)
    args = ap.parse_args()
    model = MusicTransformerVAEGAN.from_pretrained(Path(aurl.__file__).parent / "pretrained")
    tokenizer = Tokenizer(model.vocab_config)
    t = time.perf_counter()
    generated = []
    with torch.inference_mode():
        for seed in range(0, args.pieces, 25):
            cfg = GenerationConfig(max_tokens=args.tokens, seed=seed)
            n = min(25, args.pieces - seed)
            generated += [
                tokenizer.decode_to_notes(p.ids) for p in generate(model, cfg, num_samples=n)
            ]
    files = sorted(CHORALES.glob("*.mid"))[: args.pieces]
    reference = [tokenizer.decode_to_notes(tokenizer.encode_file(f)) for f in files]
    print(f"generated {len(generated)} pieces in {time.perf_counter() - t:.1f} s (not counted)")
    notes = np.mean([len(p) for p in generated]), np.mean([len(p) for p in reference])
    print(f"notes per piece: generated {notes[0]:.0f}, reference {notes[1]:.0f}")

    rss0 = peak_rss_mb()
    wall, cpu = time.perf_counter(), time.process_time()
    results, gen_f, ref_f = evaluate_sets(generated, reference)
    metrics_wall, metrics_cpu = time.perf_counter() - wall, time.process_time() - cpu
    with tempfile.TemporaryDirectory() as out:
        write_report(
            out, results, generated_features=gen_f, reference_features=ref_f, samples=generated
        )
    total_wall, total_cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"metrics + distances: {metrics_wall:.1f} s wall, {metrics_cpu:.1f} s CPU")
    print(f"with the report and plots: {total_wall:.1f} s wall, {total_cpu:.1f} s CPU")
    print(
        f"peak RSS {peak_rss_mb():.0f} MB (growth during evaluation {peak_rss_mb() - rss0:.0f} MB)"
    )
    print(f"target under 60 s: {'ok' if total_wall < 60 else 'NOT MET'}")


if __name__ == "__main__":
    main()
