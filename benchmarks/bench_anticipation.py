"""Anticipation training vs constrained decoding (forcing) for harmonization: bits per note of
Bach's alto, tenor and bass given his soprano, on the held-out four-track chorales.

Rows (the same pieces, the same tokens, the same notes counted, the plan's masks throughout;
each piece in its own meter, as ``aurl evaluate --task harmonize`` scores it):

- ``shipped, forcing``: the shipped model under the plan (soprano forced, time clipped), and
  under the grammar alone ("unconditional"); also in 4/4 throughout (how the task scored
  before the meter reached the model);
- ``anticipation, controls``: the anticipation model with the soprano's NOTE_ONs shown
  ``model.anticipation`` beats ahead (:func:`aurl.generation.anticipation.score_anticipated`),
  under the plan's masks (and under the grammar alone: still conditioned by the controls);
- ``anticipation, forcing only``: the same model without controls (as a plain model);
- ``anticipation, wrong controls``: the controls of the next piece's soprano (does the model
  read them at all?).

The difference shipped forcing - anticipation with controls is taken per piece; its 95%
interval is a bootstrap over pieces (10,000 resamples, seed 0). With ``--generate N`` the first
N pieces are also harmonized (forcing alone, one sample, seed 0) by both models and scored by
:func:`aurl.evaluation.tasks.evaluate_harmonize` (rules, chord agreement, cadences, melody
kept on the written file). The top line the model was trained on is compared with the soprano
track's line (share of the soprano's onsets it finds, share of its onsets that are soprano).

Run:  PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_anticipation.py \\
        --checkpoint RUN/model [--data FOLDER] [--limit N] [--generate N] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split(" ")[0]
    except OSError:
        return "?"


def top_line_agreement(files: list[Path]) -> dict[str, float]:
    """Recall and precision of the top line (training's melody) against the soprano track."""
    from aurl.data.anticipation import token_times, top_line
    from aurl.data.tokenizer import Tokenizer
    from aurl.data.vocab import Vocab
    from aurl.evaluation.tasks import chorale_voices
    from aurl.generation.compose import melody_line

    vocab, tok = Vocab(), Tokenizer()
    got_n = want_n = both = 0
    for f in files:
        seq = np.asarray(tok.encode_file(f), np.int64)
        flags = top_line(seq, vocab)
        tau = token_times(seq, vocab)
        got = set(zip(tau[flags].tolist(), vocab.value[seq[flags]].tolist()))
        line = melody_line(chorale_voices(f)[0])
        steps = np.round(line["onset"] * vocab.config.steps_per_beat).astype(int)
        want = set(zip(steps.tolist(), line["pitch"].astype(int).tolist()))
        got_n, want_n, both = got_n + len(got), want_n + len(want), both + len(got & want)
    return {"soprano_found": both / max(1, want_n), "top_is_soprano": both / max(1, got_n)}


def bootstrap(diff: np.ndarray, weights: np.ndarray, n: int = 10_000) -> tuple[float, float]:
    """95% interval of the note-weighted mean of per-piece differences, resampling pieces."""
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(diff), size=(n, len(diff)))
    means = (diff[idx] * weights[idx]).sum(1) / weights[idx].sum(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="the anticipation model's folder")
    ap.add_argument("--data", default=None, help="chorale folder with manifest.json (bundled)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--generate", type=int, default=0, help="harmonize the first N pieces")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from aurl.cli.generate import load_model
    from aurl.data.meter import read_meter
    from aurl.data.tokenizer import Tokenizer
    from aurl.evaluation.tasks import (
        BUNDLED,
        Variant,
        _encode_notes,
        chorale_voices,
        evaluate_harmonize,
        held_out_chorales,
    )
    from aurl.generation.anticipation import score_anticipated, supports_anticipation
    from aurl.generation.compose import make_plan, melody_line, score_plan

    shipped = load_model(None, "cpu")
    model = load_model(args.checkpoint, "cpu")
    assert supports_anticipation(model), f"{args.checkpoint} has no anticipation controls"
    files = held_out_chorales(Path(args.data) if args.data else BUNDLED, args.split)
    if args.limit:
        files = files[: args.limit]
    print(f"{len(files)} pieces; load average before: {loadavg()}", flush=True)
    tokenizer = Tokenizer(shipped.vocab_config)
    names = ["shipped_forcing", "shipped_forcing_44", "anticipation_controls",
             "anticipation_forcing_only", "anticipation_wrong_controls"]  # fmt: skip
    per: dict[str, list[tuple[float, float]]] = {k: [] for k in names}
    notes: list[int] = []
    c0 = time.process_time()
    lines = [melody_line(chorale_voices(p)[0], name=str(p)) for p in files]
    for i, path in enumerate(files):
        voices = chorale_voices(path)
        line = melody_line(voices[0], name=str(path))
        bach = np.sort(np.concatenate(voices), order=["onset", "pitch"])
        meter = read_meter(path)
        plan = make_plan(line, shipped.vocab, ceiling=True, max_free=3)
        ids = _encode_notes(bach, tokenizer, path)
        scores = {
            "shipped_forcing": score_plan(shipped, plan, ids, meter=meter),
            "shipped_forcing_44": score_plan(shipped, plan, ids),
            "anticipation_controls": score_anticipated(model, plan, ids, meter=meter),
            "anticipation_forcing_only": score_plan(model, plan, ids, meter=meter),
            "anticipation_wrong_controls": score_anticipated(
                model, plan, ids, meter=meter, controls_from=make_plan(
                    lines[(i + 1) % len(files)], shipped.vocab, ceiling=True, max_free=3),
            ),
        }  # fmt: skip
        counts = {s.free_notes for s in scores.values()}
        assert len(counts) == 1, f"{path}: notes counted differ {counts}"
        notes.append(counts.pop())
        for k, s in scores.items():
            per[k].append((s.conditional_bits, s.unconditional_bits))
    n = np.array(notes, float)
    out: dict = {"pieces": len(files), "atb_notes": int(n.sum()), "rows": {}}
    for k, rows in per.items():
        cond = np.array([r[0] for r in rows], float)
        uncond = np.array([r[1] for r in rows], float)
        out["rows"][k] = {
            "conditional": cond.sum() / n.sum(),
            "grammar_only": uncond.sum() / n.sum(),
        }
    a = np.array([r[0] for r in per["shipped_forcing"]], float) / n
    b = np.array([r[0] for r in per["anticipation_controls"]], float) / n
    lo, hi = bootstrap(a - b, n)
    out["forcing_minus_anticipation"] = {
        "bits_per_note": out["rows"]["shipped_forcing"]["conditional"]
        - out["rows"]["anticipation_controls"]["conditional"],
        "ci95": [lo, hi],
        "pieces_anticipation_better": int((b < a).sum()),
    }
    out["likelihood_cpu_s"] = time.process_time() - c0
    out["top_line"] = top_line_agreement(files)
    if args.generate:
        gen = files[: args.generate]
        forcing = (Variant("forcing", 1),)
        c1 = time.process_time()
        g_ship = evaluate_harmonize(shipped, gen, variants=forcing, seed=0)
        c2 = time.process_time()
        g_ant = evaluate_harmonize(model, gen, variants=forcing, seed=0)
        c3 = time.process_time()
        keys = ("parallels_per_100_moves", "crossings_per_100_slices",
                "spacing_per_100_slices", "out_of_range_per_100_notes", "chord_agreement",
                "pc_agreement", "cadence_rate", "melody_kept", "seconds")  # fmt: skip
        pick = lambda row: {k: row.get(k, math.nan) for k in keys}  # noqa: E731
        out["generated"] = {
            "pieces": len(gen),
            "bach": pick(g_ship["rows"]["bach"]),
            "shipped_forcing": {**pick(g_ship["rows"]["forcing"]), "cpu_s": c2 - c1},
            "anticipation_forcing": {**pick(g_ant["rows"]["forcing"]), "cpu_s": c3 - c2},
        }
    out["load_after"] = loadavg()
    text = json.dumps(out, indent=1, default=float)
    print(text)
    if args.out:
        from aurl.fileio import atomic_write_text

        atomic_write_text(Path(args.out), text + "\n")


if __name__ == "__main__":
    main()
