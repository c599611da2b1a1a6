"""Pickups: the bundled chorales start their first note at tick 0, so for the 238 of 350 that
open with a pickup (an upbeat) every bar line the model reads (musical time counts bars from
tick 0) is off by the pickup. This A/B pads each pickup with the missing beats of its first bar
(tick 0 a bar line, as a notation program's MIDI export writes it) and anneals the shipped
model on each version with the model card's CPU recipe, then scores each on its own test split.

  A: the bundled corpus as it is;   B: the same files, pickups padded.

The first bar's length and its pickup are read from the score inside music21 each file was
converted from (``manifest.json``'s ``source``): pad = bar length - first measure's length.

Run:  .venv/bin/python benchmarks/bench_pickups.py --corpus runs/corpus --out /tmp/pk
      (``aurl data corpus --out runs/corpus`` first; two 200-step anneals: ~10 min each idle)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

ANNEAL = [  # the model card's CPU anneal (MODEL_CARD.md), from the shipped weights
    "--init-from", "shipped", "--preset", "small", "model.dropout=0.2",
    "data.augment.transpose_prob=1.0", "data.batch_size=16", "training.lr=2e-4",
    "training.warmup_steps=10", "training.max_steps=200", "training.min_lr_ratio=0.05",
    "training.eval_every=50", "training.save_every=50", "training.keep_best=1",
    "training.sample_every=0", "training.max_minutes=60",
]  # fmt: skip


def pad_pickups(corpus: Path, out: Path) -> Counter:
    """``corpus`` copied to ``out`` with each pickup padded; the pads' counts (beats)."""
    import symusic
    from music21 import corpus as m21corpus

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    manifest = json.loads((corpus / "manifest.json").read_text())
    shutil.copy(corpus / "manifest.json", out / "manifest.json")
    pads = Counter()
    for entry in manifest["files"]:
        first = m21corpus.parse(entry["source"], forceSource=True).parts[0].getElementsByClass("Measure")[0]
        pad = float(first.barDuration.quarterLength - first.duration.quarterLength)
        pads[pad] += 1
        score = symusic.Score(str(corpus / entry["file"]))
        if pad > 1e-6:
            ticks = int(round(pad * score.tpq))
            for track in score.tracks:
                notes = track.notes.numpy()
                track.notes = symusic.Note.from_numpy(**{**notes, "time": notes["time"] + ticks})
            tempos = score.tempos.numpy()  # the opening tempo stays at 0, later ones move
            later = tempos["time"] > 0
            score.tempos = symusic.Tempo.from_numpy(time=tempos["time"] + ticks * later,
                                                    mspq=tempos["mspq"])  # fmt: skip
        score.dump_midi(str(out / entry["file"]))
    return pads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=Path("runs/corpus"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/pickups"))
    args = ap.parse_args()
    aurl = str(Path(sys.executable).with_name("aurl"))
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    padded = args.out / "corpus_padded"
    print("pads (beats: files):", dict(pad_pickups(args.corpus, padded)), flush=True)
    for arm, corpus in (("A", args.corpus), ("B", padded)):
        cache, run, model = (args.out / f"{x}_{arm}" for x in ("cache", "run", "model"))
        for path in (cache, run, model):
            shutil.rmtree(path, ignore_errors=True)
        subprocess.run([aurl, "data", "prepare", str(corpus), "--out", str(cache)], check=True,
                       capture_output=True)  # fmt: skip
        subprocess.run([aurl, "train", *ANNEAL, "--data", str(cache), "--out", str(run)],
                       check=True, env=env)  # fmt: skip
        subprocess.run([aurl, "checkpoint", "export", str(run), "--out", str(model)], check=True)
        for name, checkpoint in (("shipped", None), (f"annealed {arm}", model)):
            which = ["--checkpoint", str(checkpoint)] if checkpoint else []
            r = subprocess.run([aurl, "evaluate", *which, "--data", str(cache), "--split", "test",
                                "--samples", "0", "--out", str(args.out / f"eval_{arm}_{name[0]}")],
                               check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)  # fmt: skip
            line = next(x for x in r.stdout.splitlines() if "bits/note" in x)
            print(f"arm {arm}, {name}: {line}", flush=True)


if __name__ == "__main__":
    main()
