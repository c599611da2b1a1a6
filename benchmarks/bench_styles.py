"""Held-out style classification: a style model's Bayes posterior, the issue's baseline, and the
shipped classifier that combines them.

The same evidence for every classifier (the first ``--max-tokens`` tokens of each piece), the
same held-out pieces (``--split``, default ``test``: the grouped split, so no test piece shares
a tune group or a mass with a training piece):

- ``model likelihood (Bayes)``: the style ``s`` that maximises ``p(piece | s)`` under a model
  trained with ``model.styles`` (uniform prior), :func:`aurl.analysis.style.guess_style`;
- ``logistic regression on metrics`` (the baseline): :func:`aurl.analysis.style.fit_logistic`
  on the 16 scalar evaluation metrics of the openings, fitted on the train split (at most
  ``--train-per-style`` pieces per style, the first by cache order);
- ``likelihood + metrics`` (what ``aurl analyze --style`` uses when the model folder ships a
  ``style_classifier.json``): :class:`aurl.analysis.style.StyleClassifier`, a logistic
  regression over each style's bits per note minus their mean, plus the metrics, fitted on
  the ``--fit-on`` split(s) (default ``valid``: pieces the model never trained on, so the
  likelihood margins it learns from are the ones held-out pieces show); and the same fitted
  on likelihoods alone.

Reported: accuracy of each, per style, confusion matrices, piece counts, and the process CPU
seconds of the feature passes (``--threads 1`` for numbers unaffected by other load). The
features of every piece are kept in ``--features FILE.npz`` (reused when it exists, so a
second call with other fitting options takes seconds). ``--save-classifier DIR`` writes the
combined classifier into a model folder.

Run (the cache from a corpus folder with style labels, the model from ``aurl train`` with
``model.styles``; BENCHMARKS.md "Styles" has the commands that built them):
    .venv/bin/python benchmarks/bench_styles.py --cache CACHE --checkpoint RUN_DIR \\
        --threads 1 --features feats.npz --out styles.json
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
    CLASSIFIER_FILE,
    fit_logistic,
    fit_style_classifier,
    guess_style,
    predict_logistic,
)
from aurl.cli.evaluate import load_model
from aurl.data.cache import TokenCache
from aurl.data.tokenizer import Tokenizer
from aurl.evaluation.metrics import SCALAR_METRICS
from aurl.evaluation.style import piece_metrics, style_log_likelihoods
from aurl.fileio import atomic_write_text


def confusion(truth: list[int], guess: list[int], k: int) -> list[list[int]]:
    m = np.zeros((k, k), dtype=int)
    for t, g in zip(truth, guess):
        m[t, g] += 1
    return m.tolist()


def summary(name: str, styles: list[str], truth, guess, cpu: float | None = None) -> dict:
    t, g = np.asarray(truth), np.asarray(guess)
    per = {s: float((g[t == i] == i).mean()) if (t == i).any() else None
           for i, s in enumerate(styles)}  # fmt: skip
    return {
        "classifier": name, "accuracy": float((t == g).mean()), "per_style": per,
        "confusion": confusion(list(t), list(g), len(styles)), "cpu_s": cpu,
    }  # fmt: skip


def compute_features(model, cache, rows, tok, *, window: int, max_tokens: int,
                     likelihood: bool = True) -> dict:  # fmt: skip
    """Each row's NLL per style (nats; NaN without ``likelihood``), notes and metrics of its
    opening, with CPU seconds."""
    nll, notes, metrics = [], [], []
    t_lik = t_met = 0.0
    for r in rows:
        ids = np.asarray(cache.tokens(int(r)), dtype=np.int64)[:max_tokens]
        t0 = time.process_time()
        meter = cache.meters[int(r)] if model.config.meter else None
        if likelihood:
            n, k = style_log_likelihoods(model, ids, window=window, meter=meter,
                                         max_tokens=max_tokens)  # fmt: skip
        else:
            n, k = np.full(len(model.config.styles), np.nan), 0
        t1 = time.process_time()
        m = piece_metrics(tok, ids)
        t_lik, t_met = t_lik + t1 - t0, t_met + time.process_time() - t1
        nll.append(n), notes.append(k), metrics.append([m[name] for name in SCALAR_METRICS])
    return {"rows": np.asarray(rows, np.int64), "nll": np.array(nll), "notes": np.array(notes),
            "metrics": np.array(metrics, np.float64), "cpu_lik": t_lik, "cpu_met": t_met}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", required=True, help="token cache with style labels")
    p.add_argument("--checkpoint", help="style model: a model folder, run or checkpoint")
    p.add_argument("--model", help="or a shipped model by name")
    p.add_argument("--split", default="test", choices=["valid", "test"])
    p.add_argument("--fit-on", default="valid", help="split(s) the combined classifier is "
                   "fitted on: valid, train or train+valid (train: likelihoods of every train "
                   "piece, the slow part)")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=512, help="opening every classifier sees")
    p.add_argument("--window", type=int, default=0, help="scoring window (0: the model's)")
    p.add_argument("--train-per-style", type=int, default=200, help="train pieces per style")
    p.add_argument("--per-style", type=int, default=0,
                   help="held-out (and fit) pieces per style, the first by cache order (0: all; "
                        "`all` holds 1,294 folk test pieces of 1,492)")  # fmt: skip
    p.add_argument("--l2", type=float, default=1e-2, help="L2 of the combined classifier")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--features", type=Path, help="npz of every piece's features (reused)")
    p.add_argument("--save-classifier", type=Path, metavar="DIR",
                   help=f"write the combined classifier as DIR/{CLASSIFIER_FILE}")  # fmt: skip
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
        r = r[sid[r] >= 0]
        cap = args.train_per_style if split == "train" else args.per_style
        if cap:
            r = np.concatenate([r[sid[r] == i][:cap] for i in range(len(styles))])
        return r

    fit_splits = set(args.fit_on.split("+"))
    needed = {"train", args.split, *fit_splits}
    feats: dict[str, dict] = {}
    if args.features and args.features.is_file():
        saved = np.load(args.features)
        for s in needed:
            if f"{s}_rows" in saved and np.array_equal(saved[f"{s}_rows"], rows(s)) and (
                int(saved["max_tokens"]) == args.max_tokens
            ) and (s not in fit_splits | {args.split} or np.isfinite(saved[f"{s}_nll"]).all()):  # fmt: skip
                feats[s] = {k: saved[f"{s}_{k}"] for k in ("rows", "nll", "notes", "metrics")}
                feats[s].update(cpu_lik=float(saved[f"{s}_cpu_lik"]),
                                cpu_met=float(saved[f"{s}_cpu_met"]))  # fmt: skip
    for s in sorted(needed - feats.keys()):
        print(f"scoring {s}: {len(rows(s))} pieces")
        feats[s] = compute_features(model, cache, rows(s), tok, window=window,
                                    max_tokens=args.max_tokens,
                                    likelihood=s in fit_splits | {args.split})  # fmt: skip
    if args.features:
        flat = {f"{s}_{k}": v for s, f in feats.items() for k, v in f.items()}
        np.savez(args.features, max_tokens=args.max_tokens, **flat)

    def bits(f: dict) -> np.ndarray:
        return f["nll"] / np.log(2) / np.maximum(f["notes"], 1)[:, None]  # (N, K)

    held = feats[args.split]
    truth = sid[held["rows"]]
    results = []
    bayes = [styles.index(guess_style(styles, n.tolist(), int(k)).style)
             for n, k in zip(held["nll"], held["notes"])]  # fmt: skip
    results.append(summary("model likelihood (Bayes, uniform prior)", styles, truth, bayes,
                           round(held["cpu_lik"], 1)))  # fmt: skip
    tr = feats["train"]
    base = fit_logistic(tr["metrics"], sid[tr["rows"]], len(styles))
    results.append(summary("logistic regression on metrics (fit on train)", styles, truth,
                           predict_logistic(base, held["metrics"]).argmax(1),
                           round(held["cpu_met"], 1)))  # fmt: skip
    fit = [feats[s] for s in args.fit_on.split("+")]
    fit_bits = np.concatenate([bits(f) for f in fit])
    fit_met = np.concatenate([f["metrics"] for f in fit])
    fit_y = np.concatenate([sid[f["rows"]] for f in fit])
    fitted = {}
    for name, lik, met in (("likelihood + metrics", True, True), ("likelihood", True, False)):
        clf = fit_style_classifier(styles, fit_bits, fit_met, fit_y, metric_names=list(SCALAR_METRICS),
                                   max_tokens=args.max_tokens, l2=args.l2, use_likelihood=lik,
                                   use_metrics=met)  # fmt: skip
        x = np.stack([clf.vector(b, dict(zip(SCALAR_METRICS, m)))
                      for b, m in zip(bits(held), held["metrics"])])  # fmt: skip
        label = f"logistic regression on {name} (fit on {args.fit_on})"
        results.append(summary(label, styles, truth, clf.predict(x).argmax(1),
                               round(held["cpu_lik"] + held["cpu_met"], 1)))  # fmt: skip
        fitted[name] = clf
    if args.save_classifier:
        path = args.save_classifier / CLASSIFIER_FILE
        atomic_write_text(path, json.dumps(fitted["likelihood + metrics"].to_dict(), indent=1))
        print(f"wrote {path}")

    counts = {s: int((truth == i).sum()) for i, s in enumerate(styles)}
    fit_counts = {s: int((fit_y == i).sum()) for i, s in enumerate(styles)}
    result = {
        "cache": str(args.cache), "model": args.checkpoint or args.model, "split": args.split,
        "styles": styles, "held_out_pieces": counts, "fit_on": args.fit_on,
        "fit_pieces": fit_counts, "max_tokens": args.max_tokens, "window": window,
        "load_average": os.getloadavg(), "results": results,
    }  # fmt: skip
    for r in results:
        per = ", ".join(f"{s} {v:.2f}" for s, v in r["per_style"].items() if v is not None)
        print(f"{r['classifier']}: accuracy {r['accuracy']:.3f} over {len(truth)} {args.split} "
              f"pieces ({per}); CPU {r['cpu_s']} s")  # fmt: skip
    print(f"held-out pieces per style: {counts}; fitted on {fit_counts}; "
          f"load {os.getloadavg()[0]:.1f}")  # fmt: skip
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
