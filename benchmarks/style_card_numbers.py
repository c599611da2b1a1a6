"""Per-style held-out numbers of a style model for its model card: each style's split pieces
scored whole (256-token windows, grammar-masked; ``WINDOW=N``: N-token windows) under their own
style and with none, and, for a VAE, the latent check of
:func:`aurl.evaluation.latent.reconstruction` on the first 10 openings of 256 tokens per style
(own posterior mean vs another piece's vs prior draws).

Run:
    .venv/bin/python benchmarks/style_card_numbers.py MODEL_DIR CACHE test card.json
(``LIMIT=N`` in the environment: the first N pieces per style, for a quick check.)

``CARRIED=1``: instead, score with ``benchmarks/bench_vaegan.py``'s :func:`score_piece`: every
later window starts from its prefix's musical-time and grammar state (``score_sequences``
restarts them for a model with an encoder, which costs a model that leans on that state
dearly), under three conditionings (the negative ELBO with a posterior sample, the posterior
mean, prior draws), each piece under its own style.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import torch

from aurl.cli.evaluate import load_model
from aurl.data.cache import TokenCache
from aurl.data.grammar import Grammar
from aurl.evaluation.latent import reconstruction
from aurl.evaluation.likelihood import score_sequences
from aurl.fileio import atomic_write_text


def carried(model, seqs: list, meters: list, grammar: Grammar, style: int) -> dict:
    """Bits per note of whole pieces in 256-token windows that carry their prefix state."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_vaegan import LN2, score_piece

    gen = torch.Generator().manual_seed(0)
    rows = [score_piece(model, s, m, grammar, 256, gen, style) for s, m in zip(seqs, meters)]
    notes = sum(r["notes"] for r in rows)
    out = {f"bits_per_note_{k.replace(' ', '_')}": sum(r["nll"][k] for r in rows) / LN2 / notes
           for k in ("elbo", "posterior mean", "prior")}  # fmt: skip
    return {"files": len(seqs), "notes": notes, **out}


def main() -> None:
    torch.set_num_threads(1)
    model_dir, cache_dir, split, out_path = sys.argv[1:5]
    model, _, _ = load_model(model_dir, "cpu")
    cache = TokenCache(cache_dir)
    styles = list(model.config.styles)
    sid = cache.model_styles(styles)
    grammar = Grammar(model.vocab)
    limit = int(os.environ.get("LIMIT", "100000"))
    window = int(os.environ.get("WINDOW", "256"))
    out: dict = {"split": split, "per_style": {}}
    t0 = time.process_time()
    for k, style in enumerate(styles):
        rows = cache.split_indices(split)
        rows = rows[sid[rows] == k][:limit]
        seqs = [np.asarray(cache.tokens(int(r)), np.int64) for r in rows]
        meters = [cache.meters[int(r)] for r in rows]

        def score(style_id: int, seqs=seqs, meters=meters):
            return score_sequences(model, seqs, window=window, grammar=grammar, meters=meters,
                                   styles=[style_id] * len(seqs))  # fmt: skip

        if os.environ.get("CARRIED"):
            out["per_style"][style] = carried(model, seqs, meters, grammar, k)
            print(style, json.dumps(out["per_style"][style]), flush=True)
            continue
        own, none = score(k), score(-1)  # -1: no style (style dropout trained the model for it)
        out["per_style"][style] = {
            "files": len(rows), "notes": own.notes, "tokens": own.tokens, "window": window,
            "bits_per_note": own.bits_per_note, "bits_per_note_no_style": none.bits_per_note,
        }  # fmt: skip
        if getattr(model, "encoder", None) is not None:  # a VAE: does its latent carry the piece?
            keep = [i for i, x in enumerate(seqs) if len(x) >= 256][:10]
            rec = reconstruction(model, [seqs[i] for i in keep], length=256, grammar=grammar,
                                 meters=[meters[i] for i in keep], prior_draws=2)  # fmt: skip
            out["per_style"][style]["reconstruction"] = rec.to_dict()
        print(style, json.dumps(out["per_style"][style]), flush=True)
    out["cpu_s"] = time.process_time() - t0
    atomic_write_text(out_path, json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
