"""Held-out style classification: a style model's Bayes posterior against the issue's baseline.

Two classifiers, the same evidence (the first ``--max-tokens`` tokens of each piece), the same
held-out pieces (``--split``, default ``test``: the grouped split, so no test piece shares a
tune group or a mass with a training piece):

- ``model likelihood``: :func:`aurl.evaluation.style.classify_style`, the style ``s`` that
  maximises ``p(piece | s)`` under a model trained with ``model.styles`` (uniform prior);
- ``logistic regression on metrics``: :func:`aurl.analysis.style.fit_logistic` on the scalar
  evaluation metrics of the same openings (decoded to notes), fitted on the train split (at
  most ``--train-per-style`` pieces per style, the first by cache order).

Reported: accuracy of each, per style, the confusion matrices, piece counts, and the process
CPU seconds of each classifier (``--threads 1`` for numbers unaffected by other load).

Run (the cache from a corpus folder with style labels, the model from ``aurl train`` with
``model.styles``; BENCHMARKS.md "Style classification" has the commands that built them):
    .venv/bin/python benchmarks/bench_styles.py --cache CACHE --checkpoint RUN_DIR \\
        --threads 1 --out styles.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from aurl.analysis.style import fit_logistic, predict_logistic
from aurl.cli.evaluate import load_model
from aurl.data.cache import TokenCache
from aurl.data.tokenizer import Tokenizer
from aurl.evaluation.metrics import SCALAR_METRICS, scalar_metrics
from aurl.evaluation.style import classify_style


def features(tok: Tokenizer, ids: np.ndarray) -> np.ndarray:
    """(F,) the scalar metrics of the notes ``ids`` decode to (NaN where undefined)."""
    values = scalar_metrics(tok.decode_to_notes(np.asarray(ids, dtype=np.int64)))
    return np.array([values[k] for k in SCALAR_METRICS], dtype=np.float64)


def confusion(truth: list[int], guess: list[int], k: int) -> list[list[int]]:
    m = np.zeros((k, k), dtype=int)
    for t, g in zip(truth, guess):
        m[t, g] += 1
    return m.tolist()


def summary(name: str, styles: list[str], truth: list[int], guess: list[int], cpu: float) -> dict:
    t, g = np.array(truth), np.array(guess)
    per = {s: float((g[t == i] == i).mean()) if (t == i).any() else None
           for i, s in enumerate(styles)}  # fmt: skip
    return {
        "classifier": name, "accuracy": float((t == g).mean()), "per_style": per,
        "confusion": confusion(truth, guess, len(styles)), "cpu_s": round(cpu, 1),
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", required=True, help="token cache with style labels")
    p.add_argument("--checkpoint", help="style model: a model folder, run or checkpoint")
    p.add_argument("--model", help="or a shipped model by name")
    p.add_argument("--split", default="test", choices=["valid", "test"])
    p.add_argument("--max-tokens", type=int, default=512, help="opening both classifiers see")
    p.add_argument("--window", type=int, default=0, help="scoring window (0: the model's)")
    p.add_argument("--train-per-style", type=int, default=200, help="baseline training pieces")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    model, _, window = load_model(args.checkpoint, "cpu", args.model)
    window = args.window or window
    styles = list(model.config.styles)
    if not styles:
        raise SystemExit("the model has no styles (model.styles): train one with model.styles")
    cache = TokenCache(args.cache)
    sid = cache.model_styles(styles)  # (N,) model style id per row, -1 none
    tok = Tokenizer(cache.vocab_config)

    def rows(split: str) -> np.ndarray:
        r = cache.split_indices(split)
        return r[sid[r] >= 0]

    held = rows(args.split)
    train_rows = np.concatenate([rows("train")[sid[rows("train")] == i][: args.train_per_style]
                                 for i in range(len(styles))])  # fmt: skip
    opening = {int(r): np.asarray(cache.tokens(int(r)))[: args.max_tokens] for r in held}
    truth = [int(sid[r]) for r in held]

    t0 = time.process_time()
    x_train = np.stack([features(tok, np.asarray(cache.tokens(int(r)))[: args.max_tokens])
                        for r in train_rows])  # fmt: skip
    fitted = fit_logistic(x_train, sid[train_rows], len(styles))
    x_held = np.stack([features(tok, opening[int(r)]) for r in held])
    base = predict_logistic(fitted, x_held).argmax(axis=1).tolist()
    base_cpu = time.process_time() - t0

    t0 = time.process_time()
    guesses = []
    for r in held:
        meter = cache.meters[int(r)] if model.config.meter else None
        g = classify_style(model, opening[int(r)], window=window, meter=meter,
                           max_tokens=args.max_tokens)  # fmt: skip
        guesses.append(styles.index(g.style))
    model_cpu = time.process_time() - t0

    counts = {s: int(sum(t == i for t in truth)) for i, s in enumerate(styles)}
    train_counts = {s: int((sid[train_rows] == i).sum()) for i, s in enumerate(styles)}
    result = {
        "cache": str(args.cache), "model": args.checkpoint or args.model, "split": args.split,
        "styles": styles, "held_out_pieces": counts, "baseline_train_pieces": train_counts,
        "max_tokens": args.max_tokens, "window": window, "load_average": os.getloadavg(),
        "results": [summary("model likelihood (Bayes, uniform prior)", styles, truth, guesses,
                            model_cpu),
                    summary("logistic regression on metrics", styles, truth, base, base_cpu)],
    }  # fmt: skip
    for r in result["results"]:
        per = ", ".join(f"{s} {v:.2f}" for s, v in r["per_style"].items() if v is not None)
        print(f"{r['classifier']}: accuracy {r['accuracy']:.3f} over {len(truth)} {args.split} "
              f"pieces ({per}); CPU {r['cpu_s']} s")  # fmt: skip
    print(f"held-out pieces per style: {counts}; load {os.getloadavg()[0]:.1f}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
