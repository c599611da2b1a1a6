"""The whole MIDI read with the SMF pre-pass against today's read without it (target <= 1.2x).

Side by side in one process, on the same files, alternating: ``read_midi_data`` as it ships
(``_load_bytes`` -> ``check_smf`` -> symusic -> repair) against the same function with
``check_smf`` replaced by the identity (what the read was before the pre-pass). Each round reads
every file once with each; the median round of each is reported, and the ratio. A second line
times the pre-pass alone on the same bytes (already in memory), per file and per MB, and the
slow path (every track's events walked) for scale.

Run:  PYTHONPATH=src python benchmarks/bench_read.py [--dir DIR] [--rounds N]
      (default: the bundled Bach chorales and tests/fixtures/midi; the classical corpus:
      ``aurl data corpus --name classical --out /tmp/classical`` then ``--dir /tmp/classical``)
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

from aurl.data import midi_io
from aurl.data.smf import SmfRepairs, check_smf

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = [
    ROOT / "src" / "aurl" / "data" / "bundled" / "bach-chorales",
    ROOT / "tests" / "fixtures",
]


def _no_prepass(data: bytes, name: str = "") -> tuple[bytes, SmfRepairs]:
    return data, SmfRepairs()


def _read_all(files: list[Path]) -> float:
    t0 = time.perf_counter()
    for f in files:
        with contextlib.suppress(Exception):  # a file fails the same way in both arms
            midi_io.read_midi_data(f)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, action="append", help="folder(s) of MIDI files")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    folders = args.dir or DEFAULT
    files = sorted(
        p for d in folders for p in d.rglob("*") if p.suffix.lower() in (".mid", ".midi")
    )
    size = sum(f.stat().st_size for f in files)
    print(f"{len(files)} files, {size / 2**20:.1f} MiB from {', '.join(map(str, folders))}")
    shipped = midi_io.check_smf
    _read_all(files)  # warm the page cache and imports
    today, ours = [], []
    for r in range(args.rounds):  # ABBA: neither arm always runs first
        for arm in ("today", "ours") if r % 2 == 0 else ("ours", "today"):
            midi_io.check_smf = _no_prepass if arm == "today" else shipped
            (today if arm == "today" else ours).append(_read_all(files))
    midi_io.check_smf = shipped
    t, o = statistics.median(today), statistics.median(ours)
    print(
        f"read_midi_data  today (no pre-pass) {t * 1e3 / len(files):.3f} ms/file   "
        f"with pre-pass {o * 1e3 / len(files):.3f} ms/file   ratio {o / t:.3f}x   "
        f"(median of {args.rounds} rounds)"
    )
    blobs = [f.read_bytes() for f in files]
    for label, walk_all in (("fast path (as shipped)", False), ("every event walked", True)):
        runs = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            for b in blobs:
                with contextlib.suppress(Exception):
                    check_smf(b, walk_all=walk_all)
            runs.append(time.perf_counter() - t0)
        s = statistics.median(runs)
        print(
            f"check_smf alone, {label}: {s * 1e6 / len(files):.1f} us/file, "
            f"{s / (size / 2**20) * 1e3:.2f} ms/MiB"
        )


if __name__ == "__main__":
    main()
