"""Style transfer with a style-conditioned VAE: does the output move toward the target style
while keeping the source's rhythm and contour?

For held-out pieces (``--split``, the grouped split) of every style and each other style ``t``
as the target, three decodings of ``--length`` tokens, same seed, same sampling:

- ``transfer``: the source opening's posterior-mean latent, decoded with style ``t`` (what
  ``aurl generate --variations SOURCE --style t`` writes first);
- ``prior``: a latent drawn from the prior, decoded with style ``t`` (the baseline: the target
  style with nothing of the source);
- ``own style``: the source's latent decoded with its own style (the control: how much the
  latent alone keeps);
- ``rhythm``, ``contour``, ``both``: constrained transfer (:mod:`aurl.generation.transfer`,
  ``aurl generate --variations SOURCE --style t --keep K``): the source's latent in style
  ``t`` with the source's onsets, its skyline's contour, or both imposed on the decoding,
  given ``--transfer-tokens`` (default ``--length``: the same budget as the others, so that the
  judge compares pieces of one length; twice that lets the output cover the whole opening, as
  it may play more notes per onset, and it ends where the opening ends). ``lapses``: tokens per
  piece at which the kept masks gave way to the grammar's.

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
the source looks like). The intervals are 95% bootstrap intervals of the mean paired difference
(against the source's p(target), against the prior's similarity), resampling the sources (a
source's three targets stay together).

Run:
    .venv/bin/python benchmarks/bench_transfer.py --cache CACHE --model styles \\
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
from aurl.data.grammar import Grammar
from aurl.data.tokenizer import Tokenizer
from aurl.evaluation.latent import encode_mean
from aurl.evaluation.metrics import SCALAR_METRICS
from aurl.evaluation.style import piece_metrics
from aurl.fileio import atomic_write_text
from aurl.generation.generate import generate
from aurl.generation.transfer import transfer_masker
from aurl.models.vae import Latents

KEEPS = ("rhythm", "contour", "both")
CONDITIONS = ("transfer", *KEEPS, "prior", "own style")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", required=True, help="token cache with style labels")
    p.add_argument("--checkpoint", help="a VAE style model: model folder, run or checkpoint")
    p.add_argument("--model", help="or a shipped model by name")
    p.add_argument("--split", default="test", choices=["valid", "test"])
    p.add_argument("--sources-per-style", type=int, default=6)
    p.add_argument("--length", type=int, default=256, help="tokens encoded and generated")
    p.add_argument("--transfer-tokens", type=int, help="constrained decodings' limit (--length)")
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
    sid_of = {name: i for i, name in enumerate(styles)}
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

    lapses: dict[tuple[int, str, str], float] = {}  # (row, target, keep) -> masks given way
    violations: dict[str, int] = {}  # keep -> grammar violations over all its outputs
    grammar = Grammar(tok.vocab)

    def decode(
        rows: list[int], latents: Latents, style: str, seed: int, keep: str = "none"
    ) -> list[np.ndarray]:
        tokens = args.length if keep == "none" else args.transfer_tokens or args.length
        config = GenerationConfig(max_tokens=tokens, temperature=args.temperature,
                                  seed=seed, style=style, window=model.config.max_seq_len)  # fmt: skip
        masker = transfer_masker(model, config, [src_ids[r] for r in rows], tok, keep)
        pieces = generate(model, config, num_samples=len(rows), latents=latents, masker=masker)
        for r in rows:  # the batch's lapses shared out: a mean per piece
            lapses[(r, style, keep)] = getattr(masker, "lapses", 0) / len(rows)
        for piece in pieces:  # every output must pass the grammar
            violations[keep] = violations.get(keep, 0) + grammar.count_violations(
                torch.as_tensor(piece.ids)[None]
            )
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
        for keep in KEEPS:
            outputs[keep] = decode(rows, stack(rows), target, args.seed + t, keep)
        for cond, pieces in outputs.items():
            for r, notes in zip(rows, pieces):
                records.append(record(r, styles[sid[r]], target, cond, notes, src_notes[r],
                                      src_prob[r][t], judge, metrics_of_notes(notes), t, sid_of))  # fmt: skip
                records[-1]["lapses"] = lapses.get((r, target, cond), 0.0)
    for s, name in enumerate(styles):  # the control: each source under its own style
        rows = [int(r) for r in sources if sid[r] == s]
        if rows:
            for r, notes in zip(rows, decode(rows, stack(rows), name, args.seed + 100 + s)):
                records.append(record(r, name, name, "own style", notes, src_notes[r],
                                      src_prob[r][s], judge, metrics_of_notes(notes), s, sid_of))  # fmt: skip

    summary = {}
    for cond in CONDITIONS:
        rs = [r for r in records if r["condition"] == cond]
        summary[cond] = {
            "pairs": len(rs),
            "source_p_target": float(np.mean([r["source_p_target"] for r in rs])),
            "p_target": float(np.mean([r["p_target"] for r in rs])),
            "judged_target": float(np.mean([r["judged_target"] for r in rs])),
            "median_p_target": float(np.median([r["p_target"] for r in rs])),
            "p_source_style": float(np.mean([r["p_source_style"] for r in rs])),
            "p_target_by_target": {
                name: float(np.mean([r["p_target"] for r in rs if r["target"] == name]))
                for name in styles
                if any(r["target"] == name for r in rs)
            },
            "rhythm": float(np.nanmean([r["rhythm"] for r in rs])),
            "contour": float(np.nanmean([r["contour"] for r in rs])),
            "lapses": float(np.mean([r.get("lapses", 0.0) for r in rs])),
        }
    pairs: dict[str, object] = {}  # each transfer vs the prior, pair by pair
    pr = {(r["row"], r["target"]): r for r in records if r["condition"] == "prior"}
    for cond in ("transfer", *KEEPS):
        tr = {(r["row"], r["target"]): r for r in records if r["condition"] == cond}
        keys = sorted(tr)
        rows = np.array([key[0] for key in keys])
        for k in ("rhythm", "contour"):
            d = np.array([tr[key][k] - pr[key][k] for key in keys])
            pairs[f"{cond}: {k} above prior"] = float(np.nanmean(d > 0))
            pairs[f"{cond}: {k} - prior"] = interval(d, rows, args.seed)
        d = np.array([tr[key]["p_target"] - tr[key]["source_p_target"] for key in keys])
        pairs[f"{cond}: p_target above source"] = float(np.mean(d > 0))
        pairs[f"{cond}: p_target - source"] = interval(d, rows, args.seed)
    result = {
        "cache": str(args.cache), "model": args.checkpoint or args.model, "split": args.split,
        "styles": styles, "length": args.length, "temperature": args.temperature,
        "sources": len(sources), "summary": summary, "pairs": pairs, "violations": violations,
        "cpu_s": round(time.process_time() - t_start, 1), "load_average": os.getloadavg(),
        "records": records,
    }  # fmt: skip
    for cond, s in summary.items():
        print(f"{cond}: {s['pairs']} pairs; p(target) {s['p_target']:.3f} (source "
              f"{s['source_p_target']:.3f}), judged target {s['judged_target']:.2f}; rhythm "
              f"{s['rhythm']:.3f}, contour {s['contour']:.3f}, lapses {s['lapses']:.1f}; median "
              f"p(target) {s['median_p_target']:.3f}, p(source's style) {s['p_source_style']:.3f};"
              " by target " + ", ".join(f"{k} {v:.2f}" for k, v in s["p_target_by_target"].items()))  # fmt: skip
    for k, v in pairs.items():
        print(f"{k}: " + (f"{v:.2f}" if isinstance(v, float) else
                          f"{v['mean']:+.3f} [{v['low']:+.3f}, {v['high']:+.3f}]"))  # fmt: skip
    print("grammar violations: " + ", ".join(f"{k} {v}" for k, v in violations.items()))
    print(f"CPU {result['cpu_s']} s, load {os.getloadavg()[0]:.1f}")
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")


def interval(d: np.ndarray, rows: np.ndarray, seed: int, n: int = 2000) -> dict[str, float]:
    """Mean of the paired differences ``d`` and its 95% bootstrap interval, resampling the
    sources ``rows`` (each source's pairs together); NaN differences left out."""
    ok = np.isfinite(d)
    d, rows = d[ok], rows[ok]
    sources = np.unique(rows)
    by = [d[rows == s] for s in sources]
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(n):
        pick = rng.integers(0, len(sources), len(sources))
        means.append(np.concatenate([by[i] for i in pick]).mean())
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(d.mean()), "low": float(low), "high": float(high)}


def metrics_of_notes(notes: np.ndarray) -> np.ndarray:
    from aurl.evaluation.metrics import scalar_metrics

    m = scalar_metrics(notes)
    return np.array([m[k] for k in SCALAR_METRICS], dtype=np.float64)


def record(row, source_style, target, cond, notes, src, src_p, judge, feats, t, sid_of) -> dict:
    prob = predict_logistic(judge, feats[None])[0]
    return {
        "row": row, "source_style": source_style, "target": target, "condition": cond,
        "source_p_target": float(src_p), "p_target": float(prob[t]),
        "judged_target": bool(prob.argmax() == t), "notes": int(len(notes)),
        "p_source_style": float(prob[int(sid_of[source_style])]),
        "rhythm": rhythm_similarity(src, notes), "contour": contour_similarity(src, notes),
    }  # fmt: skip


if __name__ == "__main__":
    main()
