"""Infilling: fill-in-the-middle training against constrained decoding, at the same training budget.

For every piece of a cache's split (default: the tune-grouped test split, 43 chorales) the middle
is a span of ``--bars`` bars (default 4) of the piece's own meter, starting at the bar line of
the piece's bar grid (counted from its first event, as the model's features count) nearest to
``(length - span) / 2``; its tokens run from the first event at or after the span's start to the
first event at or after its end. Scored rows, each in bits per note of Bach's own middle (sum of
-log2 p over the middle's tokens, grammar-masked as the sampler draws, divided by the middle's
NOTE_ONs; the same tokens and the same masks for every row):

- ``(a) shipped, prefix only``: the shipped left-to-right model given the prefix: what
  constrained decoding conditions on (it forces the given notes but cannot see ahead);
- ``(b) FIM, prefix + suffix``: the FIM model in FIM order ``[SUF] suffix [PRE] prefix [MID]
  middle``; the suffix loses the NOTE_OFFs of the notes the middle leaves sounding (they would
  name the middle's pitches; infilling closes its notes at the span's end); ``+EOM`` adds the
  bits of EOM after the middle (the model's "the middle ends here");
- ``(c) FIM, prefix only``: the FIM model used left to right (what it gives up or gains as a
  plain model on the same tokens).

Every row sees at most ``--context`` tokens (512: the training window): (a)/(c) the last
``context - |middle|`` prefix tokens, (b) the middle, 4 sentinels and the rest shared between
suffix and prefix. Musical time and grammar state always come from the whole piece before.

The plain cost of FIM training is measured by ``aurl evaluate`` over the whole split (the
command is printed; the CPU-trained shipped model's 2.851 came from the same command).

Run (the FIM model trained with the shipped recipe plus ``model.fim=true data.fim_rate=0.5``):
    OMP_NUM_THREADS=1 python benchmarks/bench_infill.py --fim runs/fim-800/model \\
        --cache /work/runs/cache --out runs/bench_infill.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from aurl.cli.generate import load_model
from aurl.data.cache import TokenCache
from aurl.data.vocab import Kind, Vocab
from aurl.generation.fim import first_event_at, middle_bits_fim, middle_bits_plain
from aurl.models.model import bar_ticks


def middle_of(ids: np.ndarray, vocab: Vocab, meter: np.ndarray, bars: int) -> tuple[int, int]:
    """Token indices ``(i, j)`` of the ``bars``-bar span nearest the piece's middle."""
    bar = int(bar_ticks(torch.as_tensor(meter)[None], vocab.config.steps_per_beat)[0])
    shift = np.where(vocab.kind[ids] == Kind.TIME_SHIFT, vocab.value[ids], 0)
    total = int(shift.sum())
    span = bars * bar
    a = max(bar, int(round((total - span) / 2 / bar)) * bar)
    if a + span >= total:
        raise ValueError("piece shorter than the span plus a bar")
    return first_event_at(ids, vocab, a), first_event_at(ids, vocab, a + span)


def join_bits(judge, notes: np.ndarray, vocab: Vocab, a: int, b: int, bar: int, meter) -> float:
    """Bits per note the ``judge`` (left to right) gives the bar after the span ``[a, b)``
    (steps) of ``notes``: how well the kept music continues from what the span holds."""
    from aurl.generation.compose import make_plan
    from aurl.generation.fim import given_stream

    ids = given_stream(make_plan(notes, vocab, free_span=(a / 32, b / 32)), vocab)
    i, j = first_event_at(ids, vocab, b), first_event_at(ids, vocab, b + bar)
    s = middle_bits_plain(judge, ids, i, j, meter=meter)
    return s.bits, s.notes


def generated_joins(shipped, fim, cache, rows, vocab: Vocab, bars: int, seed: int) -> dict:
    """Infill each piece's middle with constrained decoding (shipped model) and with the FIM
    model (one sample each, forcing); judge each join by the shipped model's bits per note of
    the bar after the span, Bach's own middle as the reference; count note-level faults of the
    written notes (overlapping same-pitch notes, notes outside the span)."""
    from aurl.data.tokenizer import Tokenizer
    from aurl.generation.compose import ComposeOptions, infill, infill_regenerated

    tok = Tokenizer(cache.vocab_config)
    out = {k: [0.0, 0] for k in ("bach", "constrained", "fim")}
    faults = {"constrained": 0, "fim": 0}
    cpu = {"constrained": 0.0, "fim": 0.0}
    for row in rows:
        ids = np.asarray(cache.tokens(int(row)), np.int64)
        meter = np.asarray(cache.meters[int(row)], np.int64)
        m = (int(meter[0]), int(meter[1]))
        bar = int(bar_ticks(torch.as_tensor(meter)[None], vocab.config.steps_per_beat)[0])
        i, j = middle_of(ids, vocab, meter, bars)
        shift = np.where(vocab.kind[ids] == Kind.TIME_SHIFT, vocab.value[ids], 0)
        a, b = int(shift[:i].sum()), int(shift[:j].sum())
        notes = tok.decode_to_notes(ids)
        span = (a / 32, b / 32)
        kept = notes[~infill_regenerated(notes, span)]
        bits, n = join_bits(shipped, notes, vocab, a, b, bar, m)
        out["bach"][0] += bits
        out["bach"][1] += n
        for name, model in (("constrained", shipped), ("fim", fim)):
            t0 = time.process_time()
            (c,) = infill(model, notes, span, options=ComposeOptions(particles=1, seed=seed))
            cpu[name] += time.process_time() - t0
            new = c.notes
            inside = (new["onset"] >= span[0]) & (new["onset"] + new["duration"] <= span[1] + 1e-9)
            both = np.sort(np.concatenate([kept, new]), order=["onset", "pitch"])
            end = both["onset"] + both["duration"]
            same = both["pitch"][:, None] == both["pitch"][None, :]
            overlap = same & (both["onset"][:, None] < end[None, :]) & (
                both["onset"][None, :] < end[:, None])  # fmt: skip
            np.fill_diagonal(overlap, False)
            faults[name] += int((~inside).sum()) + int(overlap.sum() // 2)
            bits, n = join_bits(shipped, both, vocab, a, b, bar, m)
            out[name][0] += bits
            out[name][1] += n
    return {
        "pieces": len(rows),
        "join_bits_per_note": {k: v[0] / max(1, v[1]) for k, v in out.items()},
        "note_faults": faults,
        "cpu_seconds": cpu,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fim", required=True, help="the FIM model's folder (save_pretrained)")
    ap.add_argument("--shipped", default=None, help="the left-to-right model (default: shipped)")
    ap.add_argument("--cache", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--bars", type=int, default=4)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--limit", type=int, default=0, help="first N pieces only (0: all)")
    ap.add_argument(
        "--generate",
        type=int,
        default=0,
        help="also infill the first N pieces both ways and judge the joins",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cache = TokenCache(args.cache)
    vocab = Vocab(cache.vocab_config)
    shipped = load_model(args.shipped, "cpu")
    fim = load_model(args.fim, "cpu")
    if fim.fim is None:
        raise SystemExit(f"{args.fim}: not a FIM model (model.fim is false)")
    rows = cache.split_indices(args.split)
    if args.limit:
        rows = rows[: args.limit]
    totals = {k: 0.0 for k in ("a", "b", "b_eom", "c")}
    notes = tokens = pieces = skipped = 0
    per_piece = []
    cpu0 = time.process_time()
    for row in rows:
        ids = np.asarray(cache.tokens(int(row)), np.int64)
        meter = np.asarray(cache.meters[int(row)], np.int64)
        try:
            i, j = middle_of(ids, vocab, meter, args.bars)
        except ValueError:
            skipped += 1
            continue
        m = (int(meter[0]), int(meter[1]))
        kw = dict(context=args.context, meter=m)
        a = middle_bits_plain(shipped, ids, i, j, **kw)
        b = middle_bits_fim(fim, ids, i, j, **kw)
        c = middle_bits_plain(fim, ids, i, j, **kw)
        assert a.notes == b.notes == c.notes and a.tokens == b.tokens
        totals["a"] += a.bits
        totals["b"] += b.bits
        totals["b_eom"] += b.bits + b.eom_bits
        totals["c"] += c.bits
        notes, tokens, pieces = notes + a.notes, tokens + a.tokens, pieces + 1
        per_piece.append({
            "row": int(row), "i": i, "j": j, "notes": a.notes,
            "a": a.bits / max(1, a.notes), "b": b.bits / max(1, b.notes),
            "c": c.bits / max(1, c.notes),
        })  # fmt: skip
    bpn = {k: v / max(1, notes) for k, v in totals.items()}
    wins = sum(p["b"] < p["a"] for p in per_piece)
    diffs = np.array([p["a"] - p["b"] for p in per_piece])
    # a paired bootstrap over pieces for the (a) - (b) difference in pooled bits per note
    rng = np.random.default_rng(0)
    n_arr = np.array([p["notes"] for p in per_piece], float)
    a_arr = np.array([p["a"] for p in per_piece]) * n_arr
    b_arr = np.array([p["b"] for p in per_piece]) * n_arr
    boot = []
    for _ in range(2000):
        k = rng.integers(0, len(per_piece), len(per_piece))
        boot.append((a_arr[k].sum() - b_arr[k].sum()) / n_arr[k].sum())
    lo, hi = np.percentile(boot, [2.5, 97.5])
    result = {
        "split": args.split, "pieces": pieces, "skipped": skipped, "middle_notes": notes,
        "middle_tokens": tokens, "bars": args.bars, "context": args.context,
        "bits_per_note": {
            "a_shipped_prefix_only": bpn["a"], "b_fim_prefix_suffix": bpn["b"],
            "b_fim_prefix_suffix_with_eom": bpn["b_eom"], "c_fim_prefix_only": bpn["c"],
        },
        "a_minus_b": bpn["a"] - bpn["b"], "a_minus_b_95ci": [float(lo), float(hi)],
        "pieces_where_b_beats_a": wins, "median_piece_a_minus_b": float(np.median(diffs)),
        "cpu_seconds": time.process_time() - cpu0,
        "plain_cost_command": (
            f"aurl evaluate --checkpoint {args.fim} --data {args.cache} --split {args.split} "
            "--samples 0 --out runs/eval-fim"
        ),
        "per_piece": per_piece,
    }  # fmt: skip
    for k, v in result["bits_per_note"].items():
        print(f"{k:32s} {v:.3f} bits/note")
    print(f"pieces {pieces} (skipped {skipped}) middle notes {notes} tokens {tokens}")
    print(f"(a) - (b) {bpn['a'] - bpn['b']:.3f} bits/note, 95% CI [{lo:.3f}, {hi:.3f}]; "
          f"(b) better on {wins}/{pieces} pieces")  # fmt: skip
    print(f"cpu {result['cpu_seconds']:.1f} s")
    if args.generate:
        joins = generated_joins(shipped, fim, cache, rows[: args.generate], vocab, args.bars, 0)
        result["generated"] = joins
        for k, v in joins["join_bits_per_note"].items():
            print(f"join (bar after the span, shipped judge) {k:12s} {v:.3f} bits/note")
        print(f"note faults {joins['note_faults']} cpu {joins['cpu_seconds']}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    assert math.isfinite(bpn["b"])


if __name__ == "__main__":
    main()
