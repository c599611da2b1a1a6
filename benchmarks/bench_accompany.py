"""Accompanying one voice of a held-out chorale (``aurl accompany``'s library call), against Bach.

For each four-track chorale of the grouped test split and each given part (Alto, Tenor, Bass,
and the Soprano as a control), the other three voices are composed around the part on the
native engine (forcing, the command's default), and scored:

- ``above``: of the slices (every onset) where the part sounds, the share where exactly as many
  of the model's notes sound above it as Bach wrote voices above it (1 above the alto, 2 above
  the tenor, 3 above the bass, 0 above the soprano): the voices go "around" the part;
- ``names``: results whose tracks repeat a name;
- the four-part rules of ``aurl evaluate --task harmonize`` (parallel fifths and octaves per 100
  moves, crossings, spacing, out of range), the four voices read by rank of median pitch;
- ``kept``: the part's notes found note for note in the result.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/bench_accompany.py [--limit N] [--seed S]
    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/bench_accompany.py --infill

(``aurl evaluate --task accompany`` gives the alto, tenor and bass rows with the same scoring;
``--infill`` is ``aurl evaluate --task infill``'s table: ``evaluation.tasks.evaluate_infill``.)
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import numpy as np

from aurl.cli.compose import first_qpm, read_score
from aurl.engines.native_engine import NativeEngine
from aurl.evaluation.tasks import BUNDLED, held_out_chorales, voice_rules, voices_above
from aurl.generation.compose import ComposeOptions, TimeMap, accompany, track_notes
from aurl.generation.voices import SATB
from aurl.shipped import shipped_model

RULES = ("parallels_per_100_moves", "crossings_per_100_slices", "spacing_per_100_slices",
         "out_of_range_per_100_notes")  # fmt: skip


def by_rank(tracks: list[tuple[str, np.ndarray]]) -> list[np.ndarray]:
    """The tracks' notes, highest median pitch first."""
    return [n for _, n in sorted(tracks, key=lambda t: -float(np.median(t[1]["pitch"])))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=0, help="the first N chorales only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the table's numbers here")
    ap.add_argument("--infill", action="store_true", help="infill of one voice instead")
    args = ap.parse_args()
    if args.infill:  # the library's task, as `aurl evaluate --task infill` runs it
        from aurl.evaluation.tasks import evaluate_infill, infill_table

        files = held_out_chorales(BUNDLED, "test")[: args.limit or None]
        engine = NativeEngine(shipped_model(), weights="int8")
        model = SimpleNamespace(vocab_config=engine.vocab_config)  # unused: engine decodes
        print(infill_table(evaluate_infill(model, files, seed=args.seed, engine=engine)))
        return
    files = held_out_chorales(BUNDLED, "test")[: args.limit or None]
    engine = NativeEngine(shipped_model(), weights="int8")
    rows: dict[str, dict[str, list[float]]] = {}
    t0 = time.perf_counter()
    for f in files:
        score = read_score(f)
        tracks = track_notes(score)
        names = [n for n, _ in tracks]
        if sorted(names) != sorted(SATB):
            continue
        bach = dict(tracks)
        for k, name in enumerate(SATB):
            part = np.sort(bach[name], order=["onset", "pitch"])
            (c,) = accompany(engine, part, voices=4, part_name=name,
                             options=ComposeOptions(seed=args.seed, particles=1),
                             qpm=first_qpm(score), like=score,
                             meter=TimeMap.of_score(score).meter)  # fmt: skip
            out = track_notes(c.score)
            got = dict(out)
            r = rows.setdefault(name, {})
            r.setdefault("names", []).append(float(len(set(n for n, _ in out)) != len(out)))
            given = [n for nm, n in out if nm == name]
            kept = bool(given) and np.array_equal(
                np.sort(given[0], order=["onset", "pitch"])[["onset", "pitch"]],
                part[["onset", "pitch"]])  # fmt: skip
            r.setdefault("kept", []).append(float(kept))
            others = [n for nm, n in out if nm != name] if len(got) == len(out) else [
                n for _, n in out][1:]  # fmt: skip
            r.setdefault("above", []).append(voices_above(part, others, k))
            rules = voice_rules(by_rank(out))
            for key in RULES:
                r.setdefault(key, []).append(rules[key])
        bach_rules = voice_rules([bach[n] for n in SATB])
        for key in RULES:
            rows.setdefault("bach", {}).setdefault(key, []).append(bach_rules[key])
    wall = time.perf_counter() - t0
    table = {name: {k: float(np.mean(v)) for k, v in r.items()} for name, r in rows.items()}
    print(f"{len(files)} chorales, seed {args.seed}, {wall:.0f} s")
    cols = ["above", "names", "kept", *RULES]
    print("| given part | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, r in table.items():
        print(f"| {name} | " + " | ".join(f"{r[c]:.3f}" if c in r else "" for c in cols) + " |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(table, fh, indent=1)


if __name__ == "__main__":
    main()
