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
        [--first 0 --count 21] [--seed 0] [--write part.json] [--only ROW ...]
        [--strictness 0.97 0.997 [--strictness-of forcing smc8]]
      .venv/bin/python benchmarks/bench_harmonize_cadences.py --merge part0.json part1.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

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
    for s in args.strictness or ():  # the defaults, but the cadence lean's strictness
        variants += tuple(
            Variant(f"{kind}, cadence strictness {s:g}", k, cadence_strictness=s)
            for kind, k in (("forcing", 1), ("smc8", 8))
            if kind in args.strictness_of
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
    """Rows of several runs' pieces together (:func:`aurl.evaluation.tasks.pooled_rows`)."""
    from aurl.evaluation.tasks import pooled_rows

    pieces: dict[str, list[dict]] = {}
    for part in parts:
        for name, items in part["pieces"].items():
            pieces.setdefault(name, []).extend(items)
    return {"rows": pooled_rows(pieces), "files": sum(p["files"] for p in parts)}


def table(result: dict) -> str:
    from aurl.evaluation.tasks import HARMONIZE_COLUMNS, rows_table

    columns = [*HARMONIZE_COLUMNS[:-2], ("given_bits_per_note", "bits per melody note"),
               *HARMONIZE_COLUMNS[-2:]]  # fmt: skip
    return "\n".join([f"{result['files']} chorales", "", *rows_table(result["rows"], columns)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--first", type=int, default=0, help="first held-out chorale")
    ap.add_argument("--count", type=int, default=1000, help="how many (default: all 41)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="+", metavar="ROW", help=f"rows of {list(VARIANTS)}")
    ap.add_argument("--strictness", type=float, nargs="+", metavar="S",
                    help="rows of the defaults with the cadence lean's strictness S")
    ap.add_argument("--strictness-of", nargs="+", default=["forcing"],
                    choices=["forcing", "smc8"], help="which decoders --strictness rows use")
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
