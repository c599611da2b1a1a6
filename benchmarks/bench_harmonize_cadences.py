"""Cadences at phrase ends, the upper voices' spacing and the voices' ranges when harmonizing
held-out chorales: forcing and 8-particle SMC, with and without the leans towards cadences,
upper voices within an octave and each voice in its range (``ComposeOptions.cadences``,
``spacing``, ``ranges``), on the native engine
(int8) of the shipped model, scored as ``aurl evaluate --task harmonize`` scores them (Bach's
row is the reference; the likelihood line runs the torch model).

The held-out chorales can be split over processes (``--first``, ``--count``, one JSON each with
``--write``) and merged (``--merge A.json B.json``): means weighted by the pieces, parallels
pooled over moves as the task pools them.

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_harmonize_cadences.py \
        [--first 0 --count 21] [--seed 0] [--write part.json]
      .venv/bin/python benchmarks/bench_harmonize_cadences.py --merge part0.json part1.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

#: name -> (particles, cadences, spacing, ranges): the decoder before the three leans, each
#: lean added, and the defaults (all three), for forcing and for 8 particles
VARIANTS = {
    "forcing, none": (1, False, 0.0, 0.0),
    "forcing, cadences": (1, True, 0.0, 0.0),
    "forcing, cadences + spacing": (1, True, 0.9, 0.0),
    "forcing, cadences + spacing + ranges (default)": (1, True, 0.9, 0.9),
    "smc8, none": (8, False, 0.0, 0.0),
    "smc8, cadences + spacing + ranges (default)": (8, True, 0.9, 0.9),
}


def run(args: argparse.Namespace) -> dict:
    from aurl.cli.generate import load_model
    from aurl.engines.native_engine import NativeEngine
    from aurl.evaluation.tasks import Variant, evaluate_harmonize, held_out_chorales
    from aurl.shipped import shipped_model

    variants = tuple(
        Variant(name, k, cadences=cadences, spacing=spacing, ranges=ranges)
        for name, (k, cadences, spacing, ranges) in VARIANTS.items()
        if not args.only or name in args.only
    )
    files = held_out_chorales()[args.first : args.first + args.count]
    t0 = time.perf_counter()
    res = evaluate_harmonize(
        load_model(None, "cpu"), files, variants=variants, seed=args.seed,
        engine=NativeEngine(shipped_model()),
    )  # fmt: skip
    print(f"{len(files)} chorales, {time.perf_counter() - t0:.0f} s", flush=True)
    return {"pieces": res["pieces"], "files": len(files)}


def merge(parts: list[dict]) -> dict:
    """Rows of several runs: per-piece means, parallels pooled over moves."""
    pieces: dict[str, list[dict]] = {}
    for part in parts:
        for name, items in part["pieces"].items():
            pieces.setdefault(name, []).extend(items)
    rows = {}
    for name, items in pieces.items():
        keys = [k for k in items[0] if k not in ("moves", "parallels", "slices")]
        rows[name] = {k: float(np.nanmean([r[k] for r in items], dtype=np.float64)) for k in keys}
        moves = sum(r["moves"] for r in items)
        rows[name]["parallels_per_100_moves"] = (
            100.0 * sum(r["parallels"] for r in items) / max(1, moves)
        )
    return {"rows": rows, "files": sum(p["files"] for p in parts)}


def table(result: dict) -> str:
    cols = [
        ("parallels_per_100_moves", "par. 5ths/8ves /100 moves"),
        ("crossings_per_100_slices", "crossings /100 slices"),
        ("spacing_per_100_slices", "spacing > 8ve /100 slices"),
        ("out_of_range_per_100_notes", "out of range /100 notes"),
        ("chord_agreement", "chord agreement"),
        ("pc_agreement", "pitch-class agreement"),
        ("cadence_rate", "**cadence at phrase ends**"),
        ("given_bits_per_note", "bits per melody note"),
        ("melody_kept", "melody kept"),
        ("seconds", "s per piece"),
    ]
    lines = [f"{result['files']} chorales", "",
             "| row | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---|" * len(cols)]  # fmt: skip
    for name, row in result["rows"].items():
        cells = [f"{row.get(k, float('nan')):.3f}" for k, _ in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--first", type=int, default=0, help="first held-out chorale")
    ap.add_argument("--count", type=int, default=1000, help="how many (default: all 41)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="+", metavar="ROW", help=f"rows of {list(VARIANTS)}")
    ap.add_argument("--write", metavar="JSON", help="keep the per-piece metrics for --merge")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="merge earlier --write files")
    args = ap.parse_args()
    if args.merge:
        parts = [json.loads(Path(p).read_text()) for p in args.merge]
    else:
        parts = [run(args)]
        if args.write:
            with open(args.write, "w") as f:
                json.dump(parts[0], f)
    print(table(merge(parts)))


if __name__ == "__main__":
    main()
