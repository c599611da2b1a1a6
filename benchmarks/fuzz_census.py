"""How often symusic kills its process on the fuzz corpus, with and without the pre-pass, in
both ``sanitize_data`` modes: the measurement behind ``midi_io.SANITIZE_DATA``.

Every mutant of tests/data/test_fuzz.py (same seed, same generator) is parsed by
``symusic.Score.from_midi`` in forked workers (aurl.data.isolate), once per configuration and
``--rounds`` times (an out-of-bounds access crashes only some runs); a worker killed by a signal
counts as a crash.

    PYTHONPATH=src python benchmarks/fuzz_census.py --mutants 20000 --rounds 2

``--fresh N``: instead, the junk-tail mutants among the first N, raw, each parse in a fresh
interpreter (the issue's report: "about 1 in 20 crash a fresh process").
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections import Counter
from pathlib import Path

from aurl.data.isolate import Failed, isolated_map
from aurl.data.smf import check_smf
from aurl.errors import MidiReadError

_spec = importlib.util.spec_from_file_location(
    "test_fuzz", Path(__file__).parents[1] / "tests" / "data" / "test_fuzz.py"
)
fuzz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz)

CONFIGS = [(False, False), (False, True), (True, False), (True, True)]  # (pre-pass, sanitize)


def _parse(task: tuple[int, bool, bool]) -> str:
    import symusic

    k, prepass, sanitize = task
    name, data = fuzz.mutant(k)
    if prepass:
        try:
            data, _ = check_smf(data, name)
        except MidiReadError:
            return "refused"
    try:
        symusic.Score.from_midi(data, sanitize_data=sanitize)
        return "parsed"
    except Exception:  # noqa: BLE001 - a clean rejection; only a dead process counts here
        return "rejected"


def fresh(n: int) -> None:
    """One fresh interpreter per parse of each junk-tail mutant, both modes, raw bytes."""
    import subprocess
    import tempfile

    ks = [k for k in range(n) if "(junk_tail" in fuzz.mutant(k)[0]]
    crashes = {False: 0, True: 0}
    with tempfile.TemporaryDirectory() as tmp:
        for k in ks:
            path = Path(tmp) / "m.mid"
            path.write_bytes(fuzz.mutant(k)[1])
            for sanitize in crashes:
                code = (
                    "import symusic, pathlib\ntry: symusic.Score.from_midi("
                    f"pathlib.Path({str(path)!r}).read_bytes(), sanitize_data={sanitize})\n"
                    "except Exception: pass"
                )
                crashes[sanitize] += subprocess.run([sys.executable, "-c", code]).returncode < 0
    print(f"{len(ks)} junk-tail mutants, fresh process each: crashes by sanitize_data {crashes}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mutants", type=int, default=fuzz.MUTANTS)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--fresh", type=int, default=0, metavar="N")
    args = ap.parse_args()
    if args.fresh:
        return fresh(args.fresh)
    print(f"{args.mutants} mutants (seed {fuzz.SEED}) x {args.rounds} rounds")
    for prepass, sanitize in CONFIGS:
        t0 = time.perf_counter()
        tasks = [(k, prepass, sanitize) for _ in range(args.rounds) for k in range(args.mutants)]
        counts: Counter = Counter()
        crashed_kinds: Counter = Counter()
        for i, res in isolated_map(_parse, tasks, workers=args.workers, seconds=lambda _: 20.0):
            if isinstance(res, Failed):
                counts[res.reason] += 1
                crashed_kinds[fuzz.mutant(tasks[i][0])[0].split("(")[1].split(" of")[0]] += 1
            else:
                counts[res] += 1
        print(
            f"pre-pass {'on ' if prepass else 'off'} sanitize_data={sanitize!s:5}: "
            f"{dict(counts)} crashes by kind {dict(crashed_kinds)} "
            f"({time.perf_counter() - t0:.0f} s)"
        )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
