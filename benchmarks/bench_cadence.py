"""Cadences of generated pieces against the held-out chorales (issue 12, the music goals).

Generates ``--pieces`` pieces of the README's kind (``aurl generate --seconds S --seed i``, one
piece per seed ``0 .. N-1``, the shipped default model unless ``--checkpoint``) with each
``--variants`` ending, side by side: for each seed every variant runs back to back, so load
drifts hit them alike. Each piece and each test chorale of the grouped split (the bundled
manifest's ``split == "test"``) is analysed by :mod:`aurl.evaluation.phrases`, the analysis
``aurl evaluate`` and ``aurl analyze`` use (skyline phrases, cadences at their arrivals in the
local key).

Reported per set, with 95% intervals because N is small:

- cadences per 8 beats: mean over pieces, percentile bootstrap over pieces (``--boot``
  resamples); the ratio generated / chorales with a bootstrap of both sets;
- share of pieces ending on a cadence (their last phrase's arrival is one): Clopper-Pearson;
- cadences per phrase, phrases per piece and the pooled phrase-length histogram (beats, bins of
  :data:`aurl.evaluation.phrases.LENGTH_BINS`) with its median;
- for the chorales, the same metrics with Bach's fermatas as the phrase ends
  (:mod:`aurl.data.fermatas`), and how well the skyline phrase detector finds them
  (precision / recall of phrase arrivals within ``--tolerance`` beats);
- how long the final chord sounds: of the pieces ending on a cadence, from the cadence's
  arrival; of every piece, from the latest onset among the notes sounding at its end
  (:func:`final_hold_beats`);
- CPU seconds per piece of each variant (``time.process_time``: this process, all threads;
  ``--threads`` torch threads, 1 by default like ``aurl generate``).

Goals (issue 12): generated cadences per beat within 25% of the chorales' (a ratio in
[0.75, 1.25]) and >= 80% of pieces ending on a cadence.

Run:  .venv/bin/python benchmarks/bench_cadence.py [--pieces 16] [--seconds 30]
          [--variants plain ending phrased mode:phrases] [--particles 4]
          [--endings 8] [--tail-beats 4] [--phrase-beats 8] [--json out.json]
          [--engine onnx] [--first-seed 16 --write DIR]   then   --merge DIR DIR ...

``mode:NAME`` is ``aurl generate --cadence NAME`` as shipped; ``--write DIR`` keeps each
piece's MIDI file, notes and CPU seconds, so seed ranges can run in separate processes and
``--merge`` reads them back into one table (the second pass's n = 32 run, BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "src" / "aurl" / "data" / "bundled" / "bach-chorales"


# --------------------------------------------------------------------------------------------
# Intervals
# --------------------------------------------------------------------------------------------


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact binomial interval of ``k`` successes in ``n`` (NaN, NaN for n == 0)."""
    from scipy.stats import beta

    if n == 0:
        return float("nan"), float("nan")
    a = (1 - level) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return lo, hi


def bootstrap_mean(x: np.ndarray, boot: int, rng: np.random.Generator) -> tuple[float, float]:
    """95% percentile interval of the mean of ``x`` (finite entries) over ``boot`` resamples."""
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return float("nan"), float("nan")
    means = x[rng.integers(0, len(x), (boot, len(x)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def bootstrap_ratio(
    a: np.ndarray, b: np.ndarray, boot: int, rng: np.random.Generator
) -> tuple[float, float]:
    """95% percentile interval of ``mean(a) / mean(b)``, both sets resampled independently."""
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    ma = a[rng.integers(0, len(a), (boot, len(a)))].mean(1)
    mb = b[rng.integers(0, len(b), (boot, len(b)))].mean(1)
    r = ma / np.maximum(mb, 1e-12)
    return float(np.percentile(r, 2.5)), float(np.percentile(r, 97.5))


# --------------------------------------------------------------------------------------------
# One set of pieces
# --------------------------------------------------------------------------------------------


def final_chord_beats(notes: np.ndarray, a) -> float:
    """Beats from the arrival of the cadence a piece ends on to its last release (how long
    its final chord sounds); NaN for a piece that ends on no cadence."""
    from aurl.data.notes import pitched

    if not a.last_closes:
        return float("nan")
    p = pitched(notes)
    return float((p["onset"] + p["duration"]).max()) - a.cadences[-1].beat


def final_hold_beats(notes: np.ndarray) -> float:
    """Beats the final chord of a piece sounds, whatever it closes on: from the latest onset
    among the notes still sounding at the piece's last release to that release."""
    from aurl.data.notes import pitched

    p = pitched(notes)
    release = p["onset"] + p["duration"]
    end = float(release.max())
    return end - float(p["onset"][release >= end - 1e-9].max())


def summarize(
    analyses: Sequence, boot: int, rng: np.random.Generator, notes: Sequence | None = None
) -> dict:
    """Set metrics with intervals, from :class:`aurl.evaluation.phrases.PhraseAnalysis`es
    (and, given the pieces' ``notes``, how long the final chord of those ending on a cadence
    sounds)."""
    from aurl.evaluation import phrases as P

    per8 = np.array([8 * P.cadences_per_beat(a) for a in analyses])
    ends = np.array([P.ends_on_cadence(a) for a in analyses])
    ends = ends[np.isfinite(ends)]
    k, n = int(ends.sum()), len(ends)
    per_phrase = np.array([P.cadences_per_phrase(a) for a in analyses])
    lengths = np.concatenate([P.phrase_lengths(a) for a in analyses] or [np.zeros(0)])
    kinds: dict[str, int] = {}
    final: dict[str, int] = {}  # the kind of cadence each piece ends on ("none": no cadence)
    for a in analyses:
        for c in a.cadences:
            kinds[c.kind] = kinds.get(c.kind, 0) + 1
        last = a.cadences[-1].kind if a.last_closes else "none"
        final[last] = final.get(last, 0) + 1
    held = np.array([final_chord_beats(n, a) for n, a in zip(notes or [], analyses)])
    held = held[np.isfinite(held)]
    hold = np.array([final_hold_beats(n) for n in notes or []])
    return {
        "final_hold_beats_median": float(np.median(hold)) if len(hold) else float("nan"),
        "final_hold_1_beat_or_more": (int((hold >= 1 - 1e-9).sum()), len(hold)),
        "final_chord_beats_median": float(np.median(held)) if len(held) else float("nan"),
        "final_chord_1_beat_or_more": (int((held >= 1).sum()), len(held)),
        "pieces": len(analyses),
        "cadences_per_8_beats": float(np.nanmean(per8)),
        "cadences_per_8_beats_ci": bootstrap_mean(per8, boot, rng),
        "ends_on_cadence": k / n if n else float("nan"),
        "ends_on_cadence_k_n": (k, n),
        "ends_on_cadence_ci": clopper_pearson(k, n),
        "cadences_per_phrase": float(np.nanmean(per_phrase)),
        "cadences_per_phrase_ci": bootstrap_mean(per_phrase, boot, rng),
        "phrases_per_piece": float(np.mean([len(a.phrases) for a in analyses])),
        "beats_per_piece": float(np.mean([a.beats for a in analyses])),
        "phrase_length_median": float(np.median(lengths)) if len(lengths) else float("nan"),
        "phrase_length_histogram": P.phrase_length_histogram(lengths).round(3).tolist(),
        "cadence_kinds": kinds,
        "final_cadence_kinds": final,
        "_per8": per8,
    }


def test_chorales(limit: int = 0) -> list[tuple[str, np.ndarray]]:
    """(file, notes) of the bundled chorales of the grouped split's test set."""
    from aurl.data.notes import notes_from_file

    manifest = json.loads((CORPUS / "manifest.json").read_text(encoding="utf-8"))
    files = [e["file"] for e in manifest["files"] if e.get("split") == "test"]
    files = files[:limit] if limit else files
    return [(f, notes_from_file(CORPUS / f)) for f in files]


def reference(boot: int, rng: np.random.Generator, tolerance: float, limit: int) -> dict:
    """The test chorales: skyline phrases, fermata phrases, and the detector against Bach."""
    from aurl.data.fermatas import load_fermatas
    from aurl.evaluation import phrases as P

    pieces = test_chorales(limit)
    fermatas = load_fermatas()
    skyline = [P.analyze_phrases(notes) for _, notes in pieces]
    all_notes = [notes for _, notes in pieces]
    with_fermatas = [P.analyze_phrases_at(notes, fermatas[f]) for f, notes in pieces]
    hits = found = true = 0
    for (f, _), a in zip(pieces, skyline):
        h, d, t = P.phrase_end_matches(a.phrases, fermatas[f], tolerance=tolerance)
        hits, found, true = hits + h, found + d, true + t
    return {
        "skyline": summarize(skyline, boot, rng, all_notes),
        "fermatas": summarize(with_fermatas, boot, rng, all_notes),
        "detector": {
            "tolerance_beats": tolerance,
            "precision": hits / found if found else float("nan"),
            "recall": hits / true if true else float("nan"),
            "precision_ci": clopper_pearson(hits, found),
            "recall_ci": clopper_pearson(hits, true),
            "matched": hits,
            "detected": found,
            "fermatas": true,
        },
    }


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def variants(
    wanted: Sequence[str], particles: int, endings: int, tail_beats: float, phrase_beats: float
) -> dict[str, Callable]:
    """name -> function(engine, config) -> one Piece: ``plain`` (``generate``), ``free-end``
    (``generate`` without the end rule of a length in seconds), ``ending``
    (the last ``tail_beats`` redrawn until the piece closes), ``phrased`` (particles resampled
    every ``phrase_beats`` towards the chorales' cadence rate, then the ending search),
    ``phrased:B`` (the same every ``B`` beats), ``phrased-most`` (towards the most cadences),
    ``mode:NAME`` (``aurl generate --cadence NAME`` as shipped: its
    :data:`aurl.generation.cadence.CADENCE_MODES` options, the other flags ignored)."""
    from aurl.generation.cadence import CADENCE_MODES, CadenceOptions, generate_with_cadence
    from aurl.generation.generate import generate

    def mode(name: str) -> Callable:
        options = CADENCE_MODES[name]
        return lambda engine, config: generate_with_cadence(engine, config, options=options)[0]

    def plain(engine, config):
        return generate(engine, config, num_samples=1)[0]

    def free_end(engine, config):  # plain, without the end rule (issue 12's third pass)
        import dataclasses

        from aurl.generation.constraints import LogitMasker
        from aurl.generation.generate import make_masker

        masker = make_masker(engine.vocab, config, None if engine.numpy else engine.device)
        free = dataclasses.replace(masker.constraints, hold_beats=0.0)
        masker = LogitMasker(engine.vocab, masker.grammar, free, device=masker.device)
        return generate(engine, config, num_samples=1, masker=masker)[0]

    def searched(phrase: float) -> Callable:
        options = CadenceOptions(
            particles=particles, endings=endings, tail_beats=tail_beats, phrase_beats=phrase
        )
        return lambda engine, config: generate_with_cadence(engine, config, options=options)[0]

    def most(engine, config):  # no target: the most cadences
        options = CadenceOptions(particles=particles, endings=endings, tail_beats=tail_beats,
                                 phrase_beats=phrase_beats, target_per_beat=0.0)  # fmt: skip
        return generate_with_cadence(engine, config, options=options)[0]

    named = {
        "plain": plain, "free-end": free_end, "ending": searched(0.0),
        "phrased": searched(phrase_beats),
        "phrased-most": most,
    }  # fmt: skip
    # "phrased:12": the phrase search with checkpoints every 12 beats; "mode:phrases"
    out = {}
    for v in wanted:
        if v in named:
            out[v] = named[v]
        elif v.startswith("mode:"):
            out[v] = mode(v.split(":", 1)[1])
        else:
            out[v] = searched(float(v.split(":")[1]))
    return out


def generated(args: argparse.Namespace, boot: int, rng: np.random.Generator) -> dict:
    import torch

    from aurl.cli.generate import load_model
    from aurl.config import DataConfig, GenerationConfig
    from aurl.data.tokenizer import Tokenizer
    from aurl.engines.torch_engine import TorchEngine
    from aurl.evaluation import phrases as P

    torch.set_num_threads(args.threads)
    if args.engine == "onnx":  # the shipped model's graphs (written once to ~/.cache/aurl/onnx)
        from aurl.cli.generate import model_folder
        from aurl.engines.onnx_engine import OnnxEngine
        from aurl.engines.shipped import ensure_shipped_onnx

        # --checkpoint: an export folder (aurl export --format onnx)
        folder = args.checkpoint or ensure_shipped_onnx(
            model_folder(None, None), precision=args.precision
        )
        engine = OnnxEngine(folder, threads=args.threads)
    else:
        engine = TorchEngine(load_model(args.checkpoint, "cpu"))
    base = GenerationConfig(seconds=args.seconds, max_tokens=1_000_000)
    tokenizer = Tokenizer(engine.vocab.config, DataConfig(polyphony_cap=base.polyphony_cap))
    fns = variants(args.variants, args.particles, args.endings, args.tail_beats, args.phrase_beats)
    analyses: dict[str, list] = {v: [] for v in args.variants}
    cpu: dict[str, float] = {v: 0.0 for v in args.variants}
    lengths: dict[str, list[float]] = {v: [] for v in args.variants}
    kept: dict[str, list] = {v: [] for v in args.variants}
    for seed in range(args.first_seed, args.first_seed + args.pieces):
        config = GenerationConfig(seconds=args.seconds, max_tokens=1_000_000, seed=seed)
        line = [f"seed {seed:2d}"]
        for v in args.variants:
            t0 = time.process_time()
            piece = fns[v](engine, config)
            spent = time.process_time() - t0
            cpu[v] += spent
            notes = tokenizer.decode_to_notes(piece.ids)
            if args.write:  # MIDI for aurl analyze, the notes and the CPU for --merge
                folder = Path(args.write)
                folder.mkdir(parents=True, exist_ok=True)
                stem = f"{v.replace(':', '-')}_seed{seed}"
                tokenizer.decode_to_midi(piece.ids, folder / f"{stem}.mid")
                np.save(folder / f"{stem}.npy", notes)
                with open(folder / "pieces.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps({"variant": v, "seed": seed, "cpu_s": spent,
                                        "notes": f"{stem}.npy"}) + "\n")  # fmt: skip
            lengths[v].append(float((notes["onset_s"] + notes["duration_s"]).max()))
            kept[v].append(notes)
            a = P.analyze_phrases(notes)
            analyses[v].append(a)
            last = a.cadences[-1].kind if a.last_closes else "open"
            line.append(f"{v}: {len(a.cadences)} cad / {len(a.phrases)} phr, end {last}, "
                        f"{spent:.1f} s")  # fmt: skip
        print("  ".join(line), flush=True)
    return _sets(args.variants, analyses, cpu, lengths, kept, boot, rng)


def _sets(names, analyses, cpu, lengths, kept, boot, rng) -> dict:
    out = {}
    for v in names:
        out[v] = summarize(analyses[v], boot, rng, kept[v])
        out[v]["cpu_s_per_piece"] = cpu[v] / len(analyses[v])
        out[v]["seconds_min_max"] = (min(lengths[v]), max(lengths[v]))
    return out


def merged(folders: Sequence[str], boot: int, rng: np.random.Generator) -> dict:
    """The sets of earlier runs' ``--write`` folders (seed ranges split over processes), read
    back from their saved notes and CPU seconds: each (variant, seed) once."""
    from aurl.evaluation import phrases as P

    seen: dict[tuple[str, int], tuple[Path, dict]] = {}
    for folder in map(Path, folders):
        for line in (folder / "pieces.jsonl").read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            seen[(rec["variant"], rec["seed"])] = (folder, rec)
    names = list(dict.fromkeys(v for v, _ in sorted(seen, key=lambda k: k[1])))
    analyses = {v: [] for v in names}
    cpu = {v: 0.0 for v in names}
    lengths: dict[str, list[float]] = {v: [] for v in names}
    kept: dict[str, list] = {v: [] for v in names}
    for (v, _), (folder, rec) in sorted(seen.items(), key=lambda kv: kv[0][1]):
        notes = np.load(folder / rec["notes"], allow_pickle=False)
        analyses[v].append(P.analyze_phrases(notes))
        kept[v].append(notes)
        cpu[v] += rec["cpu_s"]
        lengths[v].append(float((notes["onset_s"] + notes["duration_s"]).max()))
    for v in names:
        print(f"{v}: {len(analyses[v])} pieces")
    return _sets(names, analyses, cpu, lengths, kept, boot, rng)


def _ci(x: Sequence[float]) -> str:
    return f"[{x[0]:.2f}, {x[1]:.2f}]"


def table(rows: dict[str, dict], ref_per8: np.ndarray, boot: int, rng) -> list[str]:
    head = (
        "| set | pieces | cadences / 8 beats [95% CI] | vs chorales (skyline) [95% CI] | "
        "ends on a cadence [95% CI] | cadences / phrase | phrases / piece | median phrase "
        "(beats) | phrase lengths [0,2) [2,4) [4,6) [6,8) [8,12) [12,16) 16+ | CPU s / piece |"
    )
    lines = [head, "|" + "---|" * 10]
    for name, r in rows.items():
        ratio = r["cadences_per_8_beats"] / float(np.nanmean(ref_per8))
        rci = bootstrap_ratio(r["_per8"], ref_per8, boot, rng)
        k, n = r["ends_on_cadence_k_n"]
        cpu = f"{r['cpu_s_per_piece']:.2f}" if "cpu_s_per_piece" in r else ""
        lines.append(
            f"| {name} | {r['pieces']} | {r['cadences_per_8_beats']:.3f} "
            f"{_ci(r['cadences_per_8_beats_ci'])} | {ratio:.2f} {_ci(rci)} | "
            f"{k}/{n} = {r['ends_on_cadence']:.2f} {_ci(r['ends_on_cadence_ci'])} | "
            f"{r['cadences_per_phrase']:.2f} | {r['phrases_per_piece']:.1f} | "
            f"{r['phrase_length_median']:.1f} | "
            f"{' '.join(f'{x:.2f}' for x in r['phrase_length_histogram'])} | {cpu} |"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pieces", type=int, default=16, help="generated pieces per variant")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--variants", nargs="+", default=["plain", "ending", "phrased"])
    ap.add_argument("--particles", type=int, default=4, help="rows per piece (phrased)")
    ap.add_argument("--endings", type=int, default=8, help="candidate endings (ending, phrased)")
    ap.add_argument("--tail-beats", type=float, default=4.0, help="redrawn ending, beats")
    ap.add_argument("--phrase-beats", type=float, default=8.0, help="checkpoints (phrased)")
    ap.add_argument("--checkpoint", help="model folder (default: the shipped default model)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--engine", choices=("torch", "onnx"), default="torch",
                    help="onnx: the shipped model on onnxruntime (its ids differ from torch's)")  # fmt: skip
    ap.add_argument("--precision", choices=("fp32", "int8", "int4"), default="fp32",
                    help="--engine onnx without --checkpoint: which of the shipped model's graphs")  # fmt: skip
    ap.add_argument("--tolerance", type=float, default=0.5, help="beats, detector vs fermatas")
    ap.add_argument("--reference-limit", type=int, default=0, help="first N test chorales")
    ap.add_argument("--boot", type=int, default=10_000)
    ap.add_argument("--json", help="write the numbers here")
    ap.add_argument("--write", metavar="DIR", help="write each generated piece's MIDI here")
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first .. first + pieces")
    ap.add_argument("--merge", nargs="+", metavar="DIR",
                    help="no generation: the sets of these --write folders (seed ranges)")  # fmt: skip
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"load average at start: {Path('/proc/loadavg').read_text().split()[:3]}")
    ref = reference(args.boot, rng, args.tolerance, args.reference_limit)
    if args.merge:
        gen = merged(args.merge, args.boot, rng)
    else:
        gen = generated(args, args.boot, rng) if args.pieces > 0 else {}
    rows = {
        "chorales, skyline phrases": ref["skyline"],
        "chorales, fermata phrases": ref["fermatas"],
        **{f"generated, {v}": r for v, r in gen.items()},
    }
    print("\n".join(table(rows, ref["skyline"]["_per8"], args.boot, rng)))
    d = ref["detector"]
    print(
        f"skyline phrase ends vs Bach's fermatas (within {d['tolerance_beats']} beats, "
        f"{len(test_chorales(args.reference_limit))} test chorales): precision "
        f"{d['precision']:.3f} {_ci(d['precision_ci'])}, recall {d['recall']:.3f} "
        f"{_ci(d['recall_ci'])} ({d['matched']} matched of {d['detected']} detected, "
        f"{d['fermatas']} fermatas)"
    )
    for v, r in gen.items():
        print(f"{v}: lengths {r['seconds_min_max'][0]:.2f}-{r['seconds_min_max'][1]:.2f} s, "
              f"cadence kinds {r['cadence_kinds']}, last cadence {r['final_cadence_kinds']}")  # fmt: skip
    for name, r in rows.items():
        k, n = r["final_chord_1_beat_or_more"]
        print(f"{name}: the final chord of a piece ending on a cadence sounds a median "
              f"{r['final_chord_beats_median']:.2f} beats; {k}/{n} sound 1 beat or more")  # fmt: skip
        k, n = r["final_hold_1_beat_or_more"]
        print(f"{name}: the final chord of every piece (from its latest onset) sounds a median "
              f"{r['final_hold_beats_median']:.2f} beats; {k}/{n} sound 1 beat or more")  # fmt: skip
    print(f"load average at end: {Path('/proc/loadavg').read_text().split()[:3]}")
    if args.json:
        clean = {k: {kk: vv for kk, vv in r.items() if not kk.startswith("_")}
                 for k, r in rows.items()}  # fmt: skip
        Path(args.json).write_text(json.dumps({"sets": clean, "detector": d}, indent=1) + "\n")


if __name__ == "__main__":
    main()
