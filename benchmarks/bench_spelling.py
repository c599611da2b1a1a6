"""How many of Bach's note names the MusicXML export writes (``generation.export.
score_to_music21``, pitches named under the file's key signature by ``export.spelling``),
against music21's plain name of each MIDI pitch (what the export wrote before): per chorale of
the bundled 350, the multiset of names with octave of its MIDI file's export against the score
inside music21 it was converted from, pooled.

Run:  .venv/bin/python benchmarks/bench_spelling.py [--limit N]
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import symusic
from music21 import corpus, pitch

from aurl.generation.export import score_to_music21

CHORALES = Path(__file__).resolve().parents[1] / "src/aurl/data/bundled/bach-chorales"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=0, help="the first N chorales only")
    args = ap.parse_args()
    files = sorted(CHORALES.glob("*.mid"))[: args.limit or None]
    total = ours = plain = 0
    for f in files:
        name = f.stem.removeprefix("bach_")
        bach = Counter(p.nameWithOctave for n in corpus.parse("bach/" + name, forceSource=True).recurse().notes
                       for p in n.pitches)  # fmt: skip
        pitches = [p for n in score_to_music21(symusic.Score(str(f))).recurse().notes
                   for p in n.pitches]  # fmt: skip
        total += sum(bach.values())
        ours += sum((Counter(p.nameWithOctave for p in pitches) & bach).values())
        plain += sum((Counter(pitch.Pitch(midi=p.midi).nameWithOctave for p in pitches) & bach).values())
    print(f"{len(files)} chorales, {total} of Bach's notes named as he did: "
          f"the export {ours / total:.4f}, music21's plain names {plain / total:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
