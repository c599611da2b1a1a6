"""Aurl's tokenizer against miditok's MIDILike, side by side on the same files in one run.

Encode: MIDI file -> ids, parsing included (Aurl: ``Tokenizer().encode_file``, which also reads
and repairs; miditok: ``MIDILike.encode(path)``). Decode: ids -> MIDI bytes (Aurl:
``decode_to_bytes``; miditok: ``decode(tokens).dumps_midi()``). Both tokenizers get comparable
settings: 88 pitches, 32 velocities, programs, tempos, sustain pedal, 1/8-beat or finer grid
(miditok's default beat resolution; ours is 1/32 beat).

Each side runs ``--repeat`` times over all files (best time kept) and the ratios
Aurl / miditok are printed for files/s and tokens/s. Each side counts its own tokens: for the
same music MIDILike with programs writes about 2.2x as many (a Program token before every note
event), so files/s (the same files, the same notes) is the like-for-like ratio.

Run:  .venv/bin/python benchmarks/bench_tokenizer.py [--dir DIR] [--limit N] [--repeat R]
      (default folder: the bundled Bach chorales; ``--dir`` the classical corpus built by
      ``aurl data corpus --name classical --out DIR``)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHORALES = ROOT / "src" / "aurl" / "data" / "bundled" / "bach-chorales"


def best_of(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=CHORALES, help="folder of MIDI files")
    ap.add_argument("--limit", type=int, default=0, help="use the first N files (0: all)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per side; the best is kept")
    args = ap.parse_args(argv)

    from miditok import MIDILike, TokenizerConfig

    from aurl.data import Tokenizer
    from aurl.errors import MidiReadError

    files = sorted(p for p in args.dir.rglob("*") if p.suffix.lower() in (".mid", ".midi"))
    if args.limit:
        files = files[: args.limit]
    if not files:
        print(f"error: no MIDI files under {args.dir}", file=sys.stderr)
        return 2

    ours = Tokenizer()
    good = []
    for f in files:  # both sides get the same readable files
        try:
            ours.encode_file(f)
            good.append(f)
        except MidiReadError as e:
            print(f"skip {e}", file=sys.stderr)
    files = good
    theirs = MIDILike(
        TokenizerConfig(
            pitch_range=(21, 109), num_velocities=32, use_programs=True, use_tempos=True,
            use_sustain_pedals=True, use_time_signatures=False,
        )
    )  # fmt: skip

    def enc_ours():
        return [ours.encode_file(f) for f in files]

    def enc_theirs():
        return [theirs.encode(f) for f in files]

    t_enc_o, ids_o = best_of(enc_ours, args.repeat)
    t_enc_t, toks_t = best_of(enc_theirs, args.repeat)
    n_o = sum(len(x) for x in ids_o)
    n_t = sum(len(x.ids) if hasattr(x, "ids") else sum(len(s.ids) for s in x) for x in toks_t)

    def dec_ours():
        return [ours.decode_to_bytes(x) for x in ids_o]

    def dec_theirs():
        return [theirs.decode(x).dumps_midi() for x in toks_t]

    t_dec_o, _ = best_of(dec_ours, args.repeat)
    t_dec_t, _ = best_of(dec_theirs, args.repeat)

    nf = len(files)
    print(f"files {nf} from {args.dir} (best of {args.repeat})")
    print(f"{'':8} {'side':8} {'files/s':>10} {'tokens/s':>12} {'tokens':>10}")
    rows = [
        ("encode", "aurl", nf / t_enc_o, n_o / t_enc_o, n_o),
        ("encode", "miditok", nf / t_enc_t, n_t / t_enc_t, n_t),
        ("decode", "aurl", nf / t_dec_o, n_o / t_dec_o, n_o),
        ("decode", "miditok", nf / t_dec_t, n_t / t_dec_t, n_t),
    ]
    for what, side, fps, tps, n in rows:
        print(f"{what:8} {side:8} {fps:10.1f} {tps:12.0f} {n:10d}")
    print(
        f"ratio encode files/s {t_enc_t / t_enc_o:.1f}x tokens/s {(n_o / t_enc_o) / (n_t / t_enc_t):.1f}x"
    )
    print(
        f"ratio decode files/s {t_dec_t / t_dec_o:.1f}x tokens/s {(n_o / t_dec_o) / (n_t / t_dec_t):.1f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
