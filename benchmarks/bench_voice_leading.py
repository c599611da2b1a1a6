"""Free generation's voice leading: ``aurl generate --voices 4`` with and without it.

Runs the README's kind of command as a user does (``aurl generate --num-samples N --seconds S
--seed K``, the shipped default model, the default engine and ``--cadence``) three ways, one
after the other for each seed so load drifts hit them alike:

- ``--voices 4 --no-voice-leading``: before;
- ``--voices 4 --spacing 0 --ranges 0``: the parallels rule alone, knowing the four voices (a
  full last slice is read by rank);
- ``--voices 4 --ranges 0``: and the spacing lean;
- ``--voices 4``: voice leading as shipped, and the range lean;
- ``--voices 0 --voice-leading`` (the voices not said; before the shipped model said 4, what
  ``--voice-leading`` alone meant): the wide net (every reading within NEAR_STEP too:
  the voices unknown, as ``/api/generate`` with ``voice_leading`` and no ``voices``), the
  piece split into four voices here as ``--voices 4`` splits it.

For each set:

- the four voices (:func:`aurl.generation.voices.assign_voices`, what ``--voices 4`` writes)
  read with ``aurl evaluate --task harmonize``'s rules (:func:`aurl.evaluation.tasks.voice_rules`,
  pooled over pieces): parallel fifths and octaves per 100 moves, crossings, upper voices over an
  octave apart, out of range;
- cadences (:mod:`aurl.evaluation.phrases`, as ``bench_cadence.py``): per 8 beats, and the
  share of pieces ending on one;
- wall seconds per command (model load included);
- for the two masks: the share of Bach's own NOTE_ONs in the held-out chorales that the mask
  would refuse, stepped through each chorale (what the rule costs music that has no fault).

The held-out four-track chorales of the grouped split (``aurl evaluate``'s) give Bach's row.

Run:  .venv/bin/python benchmarks/bench_voice_leading.py [--pieces 16] [--seconds 30]
          [--seeds 0 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RULES = ("parallels", "moves", "crossings", "spacing", "out_of_range", "slices", "notes")


def pooled(voice_sets: list[list[np.ndarray]]) -> dict[str, float]:
    """The rules of :func:`voice_rules` pooled over pieces (counts summed, then rates)."""
    from aurl.evaluation.tasks import voice_rules

    total = dict.fromkeys(RULES, 0.0)
    for voices in voice_sets:
        r = voice_rules(voices)
        s = r["slices"]
        total["parallels"] += r["parallels"]
        total["moves"] += r["moves"]
        total["slices"] += s
        total["crossings"] += r["crossings_per_100_slices"] * s / 100
        total["spacing"] += r["spacing_per_100_slices"] * s / 100
        notes = sum(len(v) for v in voices)
        total["out_of_range"] += r["out_of_range_per_100_notes"] * notes / 100
        total["notes"] += notes
    return {
        "parallels_per_100_moves": 100 * total["parallels"] / max(1, total["moves"]),
        "crossings_per_100_slices": 100 * total["crossings"] / max(1, total["slices"]),
        "spacing_per_100_slices": 100 * total["spacing"] / max(1, total["slices"]),
        "out_of_range_per_100_notes": 100 * total["out_of_range"] / max(1, total["notes"]),
        "moves": int(total["moves"]),
    }


def cadences(pieces: list[np.ndarray]) -> dict[str, float]:
    from aurl.evaluation import phrases as P

    analyses = [P.analyze_phrases(n) for n in pieces]
    per8 = [8 * P.cadences_per_beat(a) for a in analyses]
    ends = np.array([P.ends_on_cadence(a) for a in analyses])
    ends = ends[np.isfinite(ends)]
    return {
        "cadences_per_8_beats": float(np.nanmean(per8)),
        "ends_on_cadence": f"{int(ends.sum())}/{len(ends)}",
    }


def read_folder(folder: Path) -> tuple[list[list[np.ndarray]], list[np.ndarray]]:
    """The four voices and the whole piece's notes of every MIDI file in ``folder``."""
    from aurl.data.notes import notes_from_file, pitched
    from aurl.generation.voices import assign_voices

    voices, whole = [], []
    for f in sorted(folder.glob("*.mid")):
        notes = pitched(notes_from_file(f))
        voice = assign_voices(notes, 4)
        voices.append([notes[voice == v] for v in range(4)])
        whole.append(notes)
    return voices, whole


def bach_refused(voices: int) -> float:
    """The share of Bach's NOTE_ONs (held-out chorales) the mask refuses, ``voices`` known
    (4) or not (0)."""
    from aurl.config import DataConfig, GenerationConfig
    from aurl.data.tokenizer import Tokenizer
    from aurl.data.vocab import Vocab
    from aurl.evaluation.tasks import held_out_chorales
    from aurl.generation.generate import make_masker

    vocab = Vocab()
    tokenizer = Tokenizer(vocab.config, DataConfig())
    masker = make_masker(vocab, GenerationConfig(voice_leading=True, voices=voices), None)
    zeros = np.zeros((1, vocab.size), np.float32)
    ons = refused = 0
    for f in held_out_chorales():
        ids = tokenizer.encode_file(f)
        state = masker.prime(masker.initial_state(1), ids[None, :1])
        for t in ids[1:].tolist():
            if vocab.note_on <= t < vocab.note_off:
                ons += 1
                refused += not np.isfinite(masker.apply_numpy(zeros, state)[0, t])
            state = masker.advance(state, np.array([t]))
    return refused / ons


def bach() -> dict:
    """Bach's row: the held-out four-track chorales (``aurl evaluate``'s set)."""
    from aurl.data.notes import notes_from_file
    from aurl.evaluation.tasks import chorale_voices, held_out_chorales

    files = held_out_chorales()
    voices = [chorale_voices(f) for f in files]
    whole = [notes_from_file(f) for f in files]
    return {**pooled(voices), **cadences(whole), "seconds": float("nan"), "bach_refused": ""}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pieces", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    aurl = str(Path(sys.executable).with_name("aurl"))
    rows = {
        "before (--voices 4 --no-voice-leading)": ["--voices", "4", "--no-voice-leading"],
        "parallels alone (--voices 4 --spacing 0 --ranges 0)":
            ["--voices", "4", "--spacing", "0", "--ranges", "0"],
        "parallels + spacing (--voices 4 --ranges 0)": ["--voices", "4", "--ranges", "0"],
        "voice leading, voices known (--voices 4)": ["--voices", "4"],
        "voice leading, the wide net (--voices 0 --voice-leading)": ["--voices", "0", "--voice-leading"],
    }
    refusal = {1: bach_refused(4), 2: bach_refused(4), 3: bach_refused(4), 4: bach_refused(0)}
    got: dict[str, dict] = {name: {"voices": [], "whole": [], "seconds": []} for name in rows}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for i, (name, flags) in enumerate(rows.items()):
                out = Path(tmp) / f"{i}_{seed}"
                cmd = [aurl, "generate", "--num-samples", str(args.pieces), "--seconds",
                       str(args.seconds), "--seed", str(seed), *flags, "--out", str(out)]  # fmt: skip
                t0 = time.perf_counter()
                subprocess.run(cmd, check=True, capture_output=True)
                spent = time.perf_counter() - t0
                v, w = read_folder(out)
                got[name]["voices"] += v
                got[name]["whole"] += w
                got[name]["seconds"].append(spent)
                print(f"seed {seed} {' '.join(flags)}: {spent:.1f} s", flush=True)
    table = {"bach (held-out chorales)": bach()}
    for i, name in enumerate(rows):
        g = got[name]
        table[name] = {**pooled(g["voices"]), **cadences(g["whole"]),
                       "seconds": float(np.median(g["seconds"])),
                       "bach_refused": f"{100 * refusal[i]:.2f}%" if i in refusal else ""}  # fmt: skip
    cols = ("parallels_per_100_moves", "crossings_per_100_slices", "spacing_per_100_slices",
            "out_of_range_per_100_notes", "cadences_per_8_beats", "ends_on_cadence", "seconds",
            "moves", "bach_refused")  # fmt: skip
    print(f"\n{args.pieces} pieces x seeds {args.seeds}, {args.seconds:g} s each; "
          "seconds: median wall per command")  # fmt: skip
    print("| set | par. 5ths/8ves /100 moves | crossings /100 slices | spacing > 8ve /100 slices "
          "| out of range /100 notes | cadences /8 beats | ends on a cadence | s per command "
          "| moves | Bach's notes refused |")  # fmt: skip
    print("|---" * (len(cols) + 1) + "|")
    for name, r in table.items():
        cells = [f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
