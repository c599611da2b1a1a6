"""VAE vs VAE-GAN on the tune-grouped chorale split: what adversarial training changes.

Issue 12, points 4 and 5. Each model (a ``vae`` and a ``vae_gan`` trained with the same recipe
and seed) is measured on the held-out split (``--split test``: the 43 chorales no training piece
shares a hymn tune with) the same way:

- **Likelihood**, grammar-masked bits per note over whole pieces, each cut into windows of the
  model's training length (consecutive windows share one token, so every token after START is
  scored once; a later window starts from its prefix's musical-time and grammar state, as in
  training). Three conditionings of each window:

  * ``elbo``: a posterior *sample* z ~ q(z | window), plus the window's KL(q || prior): the
    negative ELBO, an upper bound on the model's -log p(piece), the number that compares with a
    transformer's bits per note;
  * ``posterior mean``: the window decoded from its own posterior mean (what ``aurl evaluate``
    reports for a VAE: a reconstruction, not a likelihood);
  * ``prior``: z drawn from the prior N(0, I) (how generation conditions).

  ``kl``: the KL part of ``elbo`` in bits per note, and per level in nats per token.
  A style model (``model.styles``) is scored under ``--style NAME`` (default: no style).
- **Active units** (Burda et al. 2016): latent dimensions whose posterior mean over the pieces'
  openings (and the level's units) varies by more than 0.01, per level.
- **Reconstruction** (:func:`aurl.evaluation.latent.reconstruction`): the first ``--length``
  tokens of every piece that long, given its own posterior mean, another piece's, or prior
  draws; with the number of pieces whose own latent beats the other piece's.
- **Interpolation** (:func:`aurl.evaluation.latent.interpolation_curves`): ``--pairs`` pairs of
  pieces in the same meter, ``--steps`` points on the spherical path; the ends' bits per note
  along it, the largest step against the expected direction and the total change; a pair is
  *monotone* when both ends move by more than its tolerance and no step goes back by more than
  it; the tolerance is twice the path's noise, the spread of an end's bits over
  ``--noise-draws`` latents drawn from its own posterior (at least 0.01 bits per note).
- **Music**: ``--samples`` pieces of up to ``--max-tokens`` tokens decoded from prior latents
  (as ``aurl generate`` samples a VAE), against the split's chorales with ``aurl evaluate``'s
  metrics (:func:`aurl.evaluation.report.evaluate_sets`): the 16 scalar metrics (means, overlap
  area of the inter-set distances with the reference's intra-set ones), the Frechet distance,
  and phrases and cadences (:mod:`aurl.evaluation.phrases`).

The models are measured in parallel processes (``--jobs``), one torch thread each.

Run (the runs of BENCHMARKS.md "VAE vs VAE-GAN"):
    PYTHONPATH=src .venv/bin/python benchmarks/bench_vaegan.py --cache runs/cache \\
        --model vae=runs/vae --model vae_gan=runs/vae_gan --samples 24 --jobs 2 \\
        --out runs/vaegan.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aurl.config import GenerationConfig
from aurl.data.cache import TokenCache
from aurl.data.grammar import Grammar
from aurl.data.tokenizer import Tokenizer
from aurl.data.vocab import Kind
from aurl.evaluation.latent import encode_mean, interpolation_curves, reconstruction
from aurl.evaluation.likelihood import plan_windows
from aurl.evaluation.metrics import SCALAR_METRICS
from aurl.evaluation.report import evaluate_sets
from aurl.fileio import atomic_write_text
from aurl.generation.generate import generate
from aurl.models.losses import active_units

LN2 = math.log(2.0)
CONDITIONS = ("elbo", "posterior mean", "prior")
PHRASES = ("cadences_per_beat", "cadences_per_phrase", "ends_on_cadence", "phrase_length_mean")


# --------------------------------------------------------------------------------------------
# Likelihood of whole pieces under the three conditionings
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def score_piece(
    model: Any,
    ids: np.ndarray,
    meter: Any,
    grammar: Grammar,
    window: int,
    gen: torch.Generator,
    style: int | None = None,
) -> dict[str, Any]:
    """Grammar-masked NLL (nats) of one piece under each conditioning, its notes and tokens,
    and the KL (nats) of its windows' posteriors per level."""
    vocab = model.vocab
    is_note = torch.from_numpy(vocab.kind == Kind.NOTE_ON)
    full = torch.as_tensor(ids, dtype=torch.long)
    masks = grammar.sequence_masks(full[None])[0]  # (L, V): what the grammar allows after t
    mtr = None
    if getattr(model.config, "meter", False) and meter is not None:
        mtr = torch.as_tensor(np.asarray(meter), dtype=torch.long)[None]
    nll = dict.fromkeys(CONDITIONS, 0.0)
    kl_levels: list[float] = []
    notes = tokens = 0
    for start, end, first in plan_windows(len(ids), window, 1):
        x = full[start:end][None]
        begin = model.start_after(full[:start][None]) if start > 0 else None
        post = model.encode(x)
        kls = [float(k.sum()) for k in post.kl()]
        kl_levels = [a + b for a, b in zip(kl_levels, kls)] if kl_levels else kls
        latents = {
            "elbo": post.sample(gen),
            "posterior mean": post.mean(),
            "prior": model.sample_prior(1, length=end - start, generator=gen),
        }
        target = full[first:end]
        allowed = masks[first - 1 : end - 1]
        ok = allowed.gather(1, target[:, None])[:, 0]
        rows = slice(first - 1 - start, end - 1 - start)
        for name, z in latents.items():
            sty = None if style is None else torch.tensor([style])
            logits = model(x, latents=z, start=begin, meter=mtr, style=sty).logits[0, rows].float()
            masked = torch.log_softmax(logits.masked_fill(~allowed, -math.inf), -1)
            lp = torch.where(ok[:, None], masked, torch.log_softmax(logits, -1))
            nll[name] -= float(lp.gather(1, target[:, None]).sum())
        notes += int(is_note[target].sum())
        tokens += len(target)
    nll["elbo"] += sum(kl_levels)
    return {"nll": nll, "kl_levels": kl_levels, "notes": notes, "tokens": tokens}


def likelihood(model: Any, seqs: list, meters: list, grammar: Grammar, window: int,
               seed: int, style: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Bits per note of the pieces under each conditioning, and the KL's share."""
    gen = torch.Generator().manual_seed(seed)
    rows = [score_piece(model, s, m, grammar, window, gen, style) for s, m in zip(seqs, meters)]
    notes = sum(r["notes"] for r in rows)
    tokens = sum(r["tokens"] for r in rows)
    levels = np.sum([r["kl_levels"] for r in rows], axis=0)
    out = {
        f"bits_per_note_{k.replace(' ', '_')}": sum(r["nll"][k] for r in rows) / LN2 / notes
        for k in CONDITIONS
    }
    out.update(
        kl_bits_per_note=float(levels.sum()) / LN2 / notes,
        kl_nats_per_token_level=[float(v) / tokens for v in levels],
        pieces=len(rows), notes=notes, tokens=tokens,
    )  # fmt: skip
    return out


def units(model: Any, seqs: list, length: int) -> dict[str, Any]:
    """Active units per level over the pieces' openings (posterior means), and the total."""
    mus = [encode_mean(model, np.asarray(s[:length], np.int64)).levels for s in seqs]
    per_level = []
    for level in range(len(mus[0])):
        stacked = torch.cat([m[level].reshape(-1, m[level].shape[-1]) for m in mus])
        per_level.append(int(active_units([stacked])))
    return {"active_units_level": per_level, "active_units": sum(per_level),
            "latent_dims_level": [int(m.shape[-1]) for m in mus[0]]}  # fmt: skip


def interpolation(model: Any, seqs: list, meters: list, grammar: Grammar, *, length: int,
                  pairs: int, steps: int, noise_draws: int = 4) -> dict[str, Any]:  # fmt: skip
    """Bits of the ends along ``pairs`` paths between pieces of the same meter."""
    long = [i for i, s in enumerate(seqs) if len(s) >= length]
    chosen, used = [], set()
    for i in long:  # consecutive pieces of the split with the same meter, each used once
        if i in used:
            continue
        j = next((j for j in long if j > i and j not in used
                  and tuple(meters[j]) == tuple(meters[i])), None)  # fmt: skip
        if j is not None:
            chosen.append((i, j))
            used |= {i, j}
        if len(chosen) == pairs:
            break
    rows = []
    for i, j in chosen:
        r = interpolation_curves(model, seqs[i][:length], seqs[j][:length], steps=steps,
                                 grammar=grammar, meter=meters[i],
                                 noise_draws=noise_draws)  # fmt: skip
        rows.append({"pair": [i, j], **r.to_dict()})
    return {
        "pairs": len(rows), "steps": steps, "length": length,
        "monotone_pairs": sum(r["monotone"] for r in rows),
        "mean_change": float(np.mean([r["change"] for r in rows])) if rows else float("nan"),
        "mean_tolerance": (
            float(np.mean([r["tolerance"] for r in rows])) if rows else float("nan")
        ),
        "mean_worst_step_against": (
            float(np.mean([r["worst_step_against"] for r in rows])) if rows else float("nan")
        ),
        "paths": rows,
    }  # fmt: skip


# --------------------------------------------------------------------------------------------
# Generated music against the chorales
# --------------------------------------------------------------------------------------------


def music(model: Any, seqs: list, *, samples: int, max_tokens: int, seed: int,
          batch: int = 8) -> dict[str, Any]:  # fmt: skip
    """``aurl evaluate``'s metrics of ``samples`` pieces decoded from prior latents vs ``seqs``."""
    tok = Tokenizer(model.vocab_config)
    generated = []
    for k, first in enumerate(range(0, samples, batch)):
        n = min(batch, samples - first)
        gen = torch.Generator().manual_seed(seed + k)
        latents = model.sample_prior(n, generator=gen)
        config = GenerationConfig(max_tokens=max_tokens, seed=seed + k)
        for piece in generate(model, config, num_samples=n, latents=latents):
            generated.append(tok.decode_to_notes(piece.ids))
    reference = [tok.decode_to_notes(s) for s in seqs]
    sets, _, _ = evaluate_sets(generated, reference)
    dist = sets["distances"]
    oa = {m: dist[m]["overlap_area"] for m in SCALAR_METRICS}
    return {
        "samples": len(generated),
        "notes_per_sample": float(np.mean([len(g) for g in generated])),
        "metrics": {
            m: {
                "generated": sets["generated"][m]["mean"],
                "reference": sets["reference"][m]["mean"],
                "overlap_area": oa[m],
            }
            for m in SCALAR_METRICS
        },  # fmt: skip
        "mean_overlap_area": float(np.nanmean(list(oa.values()))),
        "frechet_distance": dist["frechet_distance"],
        "phrases": {
            p: {
                "generated": sets["phrases"]["generated"][p]["mean"],
                "reference": sets["phrases"]["reference"][p]["mean"],
            }
            for p in PHRASES
        },  # fmt: skip
    }


# --------------------------------------------------------------------------------------------
# One model, all models, the table
# --------------------------------------------------------------------------------------------


def measure(path: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every number above for the model at ``path`` (a run, checkpoint or model folder)."""
    from aurl.cli.evaluate import load_model

    torch.manual_seed(args.seed)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    model, _, window = load_model(path, "cpu")
    torch.manual_seed(args.seed)  # loading a run folder draws initial weights first
    cache = TokenCache(args.cache)
    rows = cache.split_indices(args.split)[: args.limit or None]
    seqs = [np.asarray(cache.tokens(int(r)), dtype=np.int64) for r in rows]
    meters = [tuple(int(v) for v in cache.meters[int(r)]) for r in rows]
    cap = cache.meta.get("tokenizer", {}).get("polyphony_cap", 16)
    grammar = Grammar(model.vocab, cap)
    length = min(args.length, window)
    out: dict[str, Any] = {"checkpoint": path, "mode": model.config.mode, "window": window}
    style = None
    if args.style:
        from aurl.models.style import style_id

        style = style_id(model.config.styles, args.style)
    out["likelihood"] = likelihood(model, seqs, meters, grammar, window, args.seed, style)
    out["units"] = units(model, seqs, length)
    rec = reconstruction(model, seqs, length=length, grammar=grammar, meters=meters,
                         prior_draws=args.prior_draws, seed=args.seed)  # fmt: skip
    out["reconstruction"] = rec.to_dict()
    out["interpolation"] = interpolation(model, seqs, meters, grammar, length=length,
                                         pairs=args.pairs, steps=args.steps,
                                         noise_draws=args.noise_draws)  # fmt: skip
    if args.samples:
        out["music"] = music(model, seqs, samples=args.samples, max_tokens=args.max_tokens,
                             seed=args.seed)  # fmt: skip
    out["cpu_s"] = time.process_time() - cpu0
    out["wall_s"] = time.perf_counter() - wall0
    return out


def table(results: dict[str, dict[str, Any]]) -> str:
    """The comparison as a markdown table, one column per model."""
    names = list(results)
    lines = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]

    def row(label: str, fn, fmt: str = "{:.3f}") -> None:
        cells = []
        for n in names:
            try:
                v = fn(results[n])
                cells.append(fmt.format(*v) if isinstance(v, tuple) else fmt.format(v))
            except (KeyError, TypeError):
                cells.append("-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    L, R, I, M = "likelihood", "reconstruction", "interpolation", "music"  # noqa: E741
    row("test bits/note, -ELBO (sampled z + KL)", lambda r: r[L]["bits_per_note_elbo"])
    row("... of which KL", lambda r: r[L]["kl_bits_per_note"])
    row("test bits/note given own posterior mean", lambda r: r[L]["bits_per_note_posterior_mean"])
    row("test bits/note given prior draws", lambda r: r[L]["bits_per_note_prior"])
    row("KL nats/token, global / segment level",
        lambda r: tuple(r[L]["kl_nats_per_token_level"]), "{:.4f} / {:.4f}")  # fmt: skip
    row("active units, global / segment (of dims)",
        lambda r: (*r["units"]["active_units_level"], *r["units"]["latent_dims_level"]),
        "{} / {} (of {} / {})")  # fmt: skip
    row(
        "reconstruction own / other / prior, bits/note",
        lambda r: (r[R]["own"], r[R]["other"], r[R]["prior"]),
        "{:.3f} / {:.3f} / {:.3f}",
    )
    row("own beats other / prior (pieces)",
        lambda r: (r[R]["own_better_than_other"], r[R]["own_better_than_prior"], r[R]["pieces"]),
        "{} / {} of {}")  # fmt: skip
    row("interpolation: monotone paths (within tolerance)",
        lambda r: (r[I]["monotone_pairs"], r[I]["pairs"]), "{} of {}")  # fmt: skip
    row("interpolation: mean tolerance (2 sd over posterior draws), bits/note",
        lambda r: r[I]["mean_tolerance"])  # fmt: skip
    row(
        "interpolation: mean change / worst step against, bits/note",
        lambda r: (r[I]["mean_change"], r[I]["mean_worst_step_against"]),
        "{:.3f} / {:.3f}",
    )
    row("generated: mean overlap area (16 metrics)", lambda r: r[M]["mean_overlap_area"])
    row("generated: Frechet distance", lambda r: r[M]["frechet_distance"], "{:.2f}")
    for p in PHRASES:
        row(f"{p}, generated (chorales)",
            lambda r, p=p: (r[M]["phrases"][p]["generated"], r[M]["phrases"][p]["reference"]),
            "{:.3f} ({:.3f})")  # fmt: skip
    row("CPU s of the measurement", lambda r: r["cpu_s"], "{:.0f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", required=True, help="the tune-grouped chorale token cache")
    p.add_argument("--model", action="append", default=[], metavar="LABEL=DIR",
                   help="a model to measure (run, checkpoint or model folder); repeat")  # fmt: skip
    p.add_argument("--split", default="test", choices=["valid", "test"])
    p.add_argument("--limit", type=int, default=0, help="first N pieces of the split (0: all)")
    p.add_argument("--length", type=int, default=512, help="opening encoded for reconstruction")
    p.add_argument("--prior-draws", type=int, default=2)
    p.add_argument("--pairs", type=int, default=8, help="interpolation paths")
    p.add_argument("--steps", type=int, default=5, help="points on each path")
    p.add_argument("--noise-draws", type=int, default=4,
                   help="posterior draws per path end for its noise (the tolerance)")  # fmt: skip
    p.add_argument("--samples", type=int, default=24, help="generated pieces per model")
    p.add_argument("--max-tokens", type=int, default=768)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--style", default="",
                   help="a style model: score the likelihood rows under this style (default none)")  # fmt: skip
    p.add_argument("--jobs", type=int, default=1, help="models measured at once (processes)")
    p.add_argument("--merge", type=Path, nargs="+", default=[],
                   help="instead of measuring: the tables of earlier --out files, side by side")  # fmt: skip
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args()
    torch.set_num_threads(1)
    models = dict(m.split("=", 1) for m in args.model)
    if not models and not args.merge:
        p.error("give --model LABEL=DIR (repeat) or --merge FILE ...")
    if args.merge:
        results = {}
        for f in args.merge:
            results.update(json.loads(f.read_text())["models"])
    elif args.jobs > 1 and len(models) > 1:
        results = run_parallel(models, args)
    else:
        results = {}
        for label, path in models.items():
            results[label] = measure(path, args)
            print(f"{label}: measured in {results[label]['cpu_s']:.0f} CPU s", file=sys.stderr)
    results = {"settings": {k: str(v) for k, v in vars(args).items()}, "models": results,
               "loadavg": Path("/proc/loadavg").read_text().split()[:3]
               if Path("/proc/loadavg").exists() else None}  # fmt: skip
    print(table(results["models"]))
    if args.out:
        atomic_write_text(args.out, json.dumps(results, indent=1))
        print(f"wrote {args.out}", file=sys.stderr)


def run_parallel(models: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    """Each model in its own process (this script with one ``--model`` and a temporary
    ``--out``), ``args.jobs`` at a time."""
    argv = [a for a in sys.argv[1:]]
    base, skip = [], False
    for a in argv:  # drop --model / --out / --jobs and their values
        if skip:
            skip = False
            continue
        if a in ("--model", "--out", "--jobs"):
            skip = True
            continue
        if a.startswith(("--model=", "--out=", "--jobs=")):
            continue
        base.append(a)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        pending = list(models.items())
        running: list[tuple[str, Path, subprocess.Popen]] = []
        while pending or running:
            while pending and len(running) < args.jobs:
                label, path = pending.pop(0)
                out = Path(tmp) / f"{label}.json"
                cmd = [sys.executable, __file__, *base, "--model", f"{label}={path}",
                       "--out", str(out)]  # fmt: skip
                env = dict(os.environ, OMP_NUM_THREADS="1")
                running.append(
                    (label, out, subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL))
                )
            label, out, proc = running.pop(0)
            if proc.wait() != 0:
                raise SystemExit(f"measuring {label} failed (exit {proc.returncode})")
            results[label] = json.loads(out.read_text())["models"][label]
    return results


if __name__ == "__main__":
    main()
