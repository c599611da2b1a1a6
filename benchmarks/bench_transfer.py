"""Style transfer with a style-conditioned VAE: does the output move toward the target style
while keeping the source's rhythm and contour?

For held-out pieces (``--split``, the grouped split) of every style and each other style ``t``
as the target, three decodings of ``--length`` tokens, same seed, same sampling:

- ``transfer``: the source opening's posterior-mean latent, decoded with style ``t`` (what
  ``aurl generate --variations SOURCE --style t`` writes first);
- ``prior``: a latent drawn from the prior, decoded with style ``t`` (the baseline: the target
  style with nothing of the source);
- ``own style``: the source's latent decoded with its own style (the control: how much the
  latent alone keeps).

Measured on each output against the source opening:

- ``p(target)``: the probability of ``t`` under the judge, a logistic regression on the 16
  scalar metrics fitted on the train split (:func:`aurl.analysis.style.fit_logistic`). The
  judge shares nothing with the generating model, so a model cannot please it by scoring its
  own outputs; ``source p(target)`` is the judge on the source itself (where transfer starts);
- ``rhythm``: :func:`aurl.analysis.style.rhythm_similarity` (Jaccard of sixteenth-grid onsets);
- ``contour``: :func:`aurl.analysis.style.contour_similarity` (difflib ratio of the skylines'
  Parsons codes).

Transfer works where ``p(target)`` rises well above the source's (toward the prior baseline's)
while rhythm and contour stay above the prior baseline's (which is what chance similarity to
the source looks like).

Run:
    .venv/bin/python benchmarks/bench_transfer.py --cache CACHE --checkpoint MODEL_DIR \\
        --sources-per-style 6 --length 256 --threads 1 --out transfer.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from aurl.analysis.style import (
    contour_similarity,
    fit_logistic,
    predict_logistic,
    rhythm_similarity,
)
from aurl.cli.evaluate import load_model
from aurl.config import GenerationConfig
from aurl.data.cache import TokenCache
from aurl.data.tokenizer import Tokenizer
from aurl.evaluation.latent import encode_mean
from aurl.evaluation.metrics import SCALAR_METRICS
from aurl.evaluation.style import piece_metrics
from aurl.fileio import atomic_write_text
from aurl.generation.generate import generate
from aurl.models.vae import Latents

CONDITIONS = ("transfer", "prior", "own style")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", required=True, help="token cache with style labels")
    p.add_argument("--checkpoint", help="a VAE style model: model folder, run or checkpoint")
    p.add_argument("--model", help="or a shipped model by name")
    p.add_argument("--split", default="test", choices=["valid", "test"])
    p.add_argument("--sources-per-style", type=int, default=6)
    p.add_argument("--length", type=int, default=256, help="tokens encoded and generated")
    p.add_argument("--judge-per-style", type=int, default=150, help="judge's train pieces")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.process_time()

    model, _, _ = load_model(args.checkpoint, "cpu", args.model)
    styles = list(model.config.styles)
    if model.config.mode not in ("vae", "vae_gan") or not styles:
        raise SystemExit("style transfer needs a VAE trained with model.styles")
    cache = TokenCache(args.cache)
    sid = cache.model_styles(styles)
    tok = Tokenizer(cache.vocab_config)

    def metrics_of(ids: np.ndarray) -> np.ndarray:
        m = piece_metrics(tok, ids)
        return np.array([m[k] for k in SCALAR_METRICS], dtype=np.float64)

    train = cache.split_indices("train")
    judge_rows = np.concatenate([train[sid[train] == i][: args.judge_per_style]
                                 for i in range(len(styles))])  # fmt: skip
    x = np.stack([metrics_of(np.asarray(cache.tokens(int(r)))[: args.length]) for r in judge_rows])
    judge = fit_logistic(x, sid[judge_rows], len(styles))

    held = cache.split_indices(args.split)
    held = held[(sid[held] >= 0) & (cache.lengths[held] >= args.length)]
    sources = np.concatenate([held[sid[held] == i][: args.sources_per_style]
                              for i in range(len(styles))])  # fmt: skip
    src_ids = {int(r): np.asarray(cache.tokens(int(r)), dtype=np.int64)[: args.length]
               for r in sources}  # fmt: skip
    src_notes = {r: tok.decode_to_notes(ids) for r, ids in src_ids.items()}
    src_prob = {r: predict_logistic(judge, metrics_of(ids)[None])[0] for r, ids in src_ids.items()}
    z = {r: encode_mean(model, ids) for r, ids in src_ids.items()}

    def decode(rows: list[int], latents: Latents, style: str, seed: int) -> list[np.ndarray]:
        config = GenerationConfig(max_tokens=args.length, temperature=args.temperature,
                                  seed=seed, style=style, window=model.config.max_seq_len)  # fmt: skip
        pieces = generate(model, config, num_samples=len(rows), latents=latents)
        return [tok.decode_to_notes(piece.ids) for piece in pieces]

    def stack(rows: list[int]) -> Latents:
        return Latents([torch.cat(level) for level in zip(*(z[r].levels for r in rows))])

    records = []
    for t, target in enumerate(styles):
        rows = [int(r) for r in sources if sid[r] != t]
        gen = torch.Generator().manual_seed(args.seed + t)
        outputs = {
            "transfer": decode(rows, stack(rows), target, args.seed + t),
            "prior": decode(rows, model.sample_prior(len(rows), length=args.length,
                                                     generator=gen), target, args.seed + t),
        }  # fmt: skip
        for r, notes in zip(rows, outputs["transfer"]):
            records.append(record(r, styles[sid[r]], target, "transfer", notes, src_notes[r],
                                  src_prob[r][t], judge, metrics_of_notes(notes), t))  # fmt: skip
        for r, notes in zip(rows, outputs["prior"]):
            records.append(record(r, styles[sid[r]], target, "prior", notes, src_notes[r],
                                  src_prob[r][t], judge, metrics_of_notes(notes), t))  # fmt: skip
    for s, name in enumerate(styles):  # the control: each source under its own style
        rows = [int(r) for r in sources if sid[r] == s]
        if rows:
            for r, notes in zip(rows, decode(rows, stack(rows), name, args.seed + 100 + s)):
                records.append(record(r, name, name, "own style", notes, src_notes[r],
                                      src_prob[r][s], judge, metrics_of_notes(notes), s))  # fmt: skip

    summary = {}
    for cond in CONDITIONS:
        rs = [r for r in records if r["condition"] == cond]
        summary[cond] = {
            "pairs": len(rs),
            "source_p_target": float(np.mean([r["source_p_target"] for r in rs])),
            "p_target": float(np.mean([r["p_target"] for r in rs])),
            "judged_target": float(np.mean([r["judged_target"] for r in rs])),
            "rhythm": float(np.nanmean([r["rhythm"] for r in rs])),
            "contour": float(np.nanmean([r["contour"] for r in rs])),
        }
    pairs = {}  # transfer vs prior, pair by pair (same source, same target)
    tr = {(r["row"], r["target"]): r for r in records if r["condition"] == "transfer"}
    pr = {(r["row"], r["target"]): r for r in records if r["condition"] == "prior"}
    for k in ("rhythm", "contour"):
        d = np.array([tr[key][k] - pr[key][k] for key in tr])
        pairs[f"{k}_transfer_above_prior"] = float(np.nanmean(d > 0))
    pairs["p_target_above_source"] = float(np.mean([r["p_target"] > r["source_p_target"]
                                                    for r in tr.values()]))  # fmt: skip
    result = {
        "cache": str(args.cache), "model": args.checkpoint or args.model, "split": args.split,
        "styles": styles, "length": args.length, "temperature": args.temperature,
        "sources": len(sources), "summary": summary, "pairs": pairs,
        "cpu_s": round(time.process_time() - t_start, 1), "load_average": os.getloadavg(),
        "records": records,
    }  # fmt: skip
    for cond, s in summary.items():
        print(f"{cond}: {s['pairs']} pairs; p(target) {s['p_target']:.3f} (source "
              f"{s['source_p_target']:.3f}), judged target {s['judged_target']:.2f}; rhythm "
              f"{s['rhythm']:.3f}, contour {s['contour']:.3f}")  # fmt: skip
    print("transfer vs prior, pair by pair: " + ", ".join(f"{k} {v:.2f}" for k, v in pairs.items()))
    print(f"CPU {result['cpu_s']} s, load {os.getloadavg()[0]:.1f}")
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")


def metrics_of_notes(notes: np.ndarray) -> np.ndarray:
    from aurl.evaluation.metrics import scalar_metrics

    m = scalar_metrics(notes)
    return np.array([m[k] for k in SCALAR_METRICS], dtype=np.float64)


def record(row, source_style, target, cond, notes, src, src_p, judge, feats, t) -> dict:
    prob = predict_logistic(judge, feats[None])[0]
    return {
        "row": row, "source_style": source_style, "target": target, "condition": cond,
        "source_p_target": float(src_p), "p_target": float(prob[t]),
        "judged_target": bool(prob.argmax() == t), "notes": int(len(notes)),
        "rhythm": rhythm_similarity(src, notes), "contour": contour_similarity(src, notes),
    }  # fmt: skip


if __name__ == "__main__":
    main()
