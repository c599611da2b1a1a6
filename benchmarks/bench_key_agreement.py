"""Agreement of Aurl's global key with music21's key analysis and with the source key signature.

For every bundled Bach chorale (``src/aurl/data/bundled/bach-chorales/manifest.json``) this
reads our MIDI with :func:`aurl.data.notes.notes_from_file`, estimates the key with
:func:`aurl.analysis.keys.estimate_key`, and compares it with the source score from music21's
corpus:

- ``music21``: ``score.analyze('key')`` (music21's default, Krumhansl-Schmuckler with the
  Aarden-Essen profiles), same tonic and mode;
- ``signature``: the key signature of the score (first ``KeySignature``): our key's signature
  (sharps/flats, so a key or its relative) equals it;
- ``modal``: the signature, or the same signature read as Dorian (our minor key has one flat
  more) or Mixolydian (our major key has one sharp more): chorale melodies in those modes kept
  their modal signature;
- phrase ends (:func:`aurl.analysis.structure.phrase_boundaries`, the arrival notes) against
  the soprano's fermatas, for the files whose repeats were not expanded;
- ``signature+mode``: where the score's signature carries a mode (a music21 ``Key``), same
  tonic and mode.

Run:  .venv/bin/python benchmarks/bench_key_agreement.py [--limit N] [--profile NAME]
          [--final-bass-weight W]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "src" / "aurl" / "data" / "bundled" / "bach-chorales"


def source_keys(score) -> tuple[str, int, str | None]:
    """(music21 analysed key name, key-signature sharps, signature key name or None)."""
    import music21

    analysed = score.analyze("key")
    m21_name = f"{analysed.tonic.name.replace('-', 'b')} {analysed.mode}"
    sigs = list(score.recurse().getElementsByClass(music21.key.KeySignature))
    sharps = sigs[0].sharps if sigs else 0
    sig_name = None
    if sigs and isinstance(sigs[0], music21.key.Key) and sigs[0].mode in ("major", "minor"):
        sig_name = f"{sigs[0].tonic.name.replace('-', 'b')} {sigs[0].mode}"
    return m21_name, sharps, sig_name


def fermatas(score) -> set[float]:
    """Offsets (beats) of the soprano's fermata notes: the chorale's phrase ends."""
    import music21

    return {
        float(n.offset)
        for n in score.parts[0].flatten().notes
        if any(isinstance(x, music21.expressions.Fermata) for x in n.expressions)
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=0, help="first N chorales only (0: all)")
    parser.add_argument("--profile", default=None, help="key profile (default: aurl's default)")
    parser.add_argument(
        "--final-bass-weight", type=float, default=None, help="key-finder final-bass cue"
    )
    parser.add_argument("--json", type=Path, default=None, help="write per-file results here")
    args = parser.parse_args(argv)

    import music21

    from aurl.analysis.keys import DEFAULT_PROFILE, FINAL_BASS_WEIGHT, estimate_key, parse_key
    from aurl.analysis.structure import phrase_boundaries
    from aurl.data.notes import notes_from_file

    profile = args.profile or DEFAULT_PROFILE
    weight = FINAL_BASS_WEIGHT if args.final_bass_weight is None else args.final_bass_weight
    files = json.loads((CORPUS / "manifest.json").read_text())["files"]
    if args.limit:
        files = files[: args.limit]
    rows = []
    t0 = time.perf_counter()
    found = true_ends = hits = 0  # phrase ends: ours, the score's fermatas, both
    for entry in files:
        notes = notes_from_file(CORPUS / entry["file"])
        ours = estimate_key(notes, profile=profile, final_bass_weight=weight)
        score = music21.corpus.parse(entry["source"])
        m21_name, sharps, sig_name = source_keys(score)
        if entry.get("repeats") == "none":  # expanded repeats move the offsets
            ends = {p.arrival for p in phrase_boundaries(notes)}
            truth = fermatas(score)
            found, true_ends, hits = (
                found + len(ends),
                true_ends + len(truth),
                hits + len(ends & truth),
            )
        rows.append(
            {
                "file": entry["file"],
                "ours": ours.name,
                "music21": m21_name,
                "signature_sharps": sharps,
                "signature_key": sig_name,
                "agree_music21": ours.index == parse_key(m21_name).index,
                "agree_signature": ours.sharps == sharps or {ours.sharps, sharps} == {6, -6},
                # Dorian pieces were notated with one flat fewer than their minor key and
                # Mixolydian ones with one sharp fewer than their major key
                "agree_signature_modal": ours.sharps == sharps
                or (ours.sharps - sharps == (-1 if ours.mode == "minor" else 1)),
                "agree_signature_key": None
                if sig_name is None
                else ours.index == parse_key(sig_name).index,
            }
        )
    n = len(rows)
    m21 = sum(r["agree_music21"] for r in rows)
    sig = sum(r["agree_signature"] for r in rows)
    modal = sum(r["agree_signature_modal"] for r in rows)
    with_mode = [r for r in rows if r["agree_signature_key"] is not None]
    sig_key = sum(r["agree_signature_key"] for r in with_mode)
    print(
        f"chorales {n}  profile {profile}  final-bass weight {weight}  seconds {time.perf_counter() - t0:.0f}"
    )
    print(f"agree with music21 analyze('key')      {m21}/{n} = {m21 / n:.1%}")
    print(f"agree with key signature (or relative) {sig}/{n} = {sig / n:.1%}")
    print(f"  ... or its modal (Dorian/Mixolydian) reading {modal}/{n} = {modal / n:.1%}")
    if with_mode:
        k = len(with_mode)
        print(f"agree with signature key incl. mode    {sig_key}/{k} = {sig_key / k:.1%}")
    if true_ends:
        print(
            f"phrase ends vs soprano fermatas (files without repeats): recall "
            f"{hits}/{true_ends} = {hits / true_ends:.1%}, precision {hits}/{found} = "
            f"{hits / max(found, 1):.1%}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
