"""``aurl data prepare``: peak memory, throughput, incremental rerun; loader tokens/s.

Side by side in one run, on the same files:

- prepare: the real command (``aurl data prepare DIR --out CACHE``, a subprocess) against the
  baseline of a plain serial loop ``Tokenizer().encode_file`` over the same files in this
  process (the least work that gives the same tokens). Printed: files/s and tokens/s of both
  and their ratio, the time of an unchanged rerun, and the peak memory of the whole process tree
  (parent + workers) sampled from /proc every 10 ms: the sum of PSS (shared pages counted once
  -- what the tree costs the machine) and the largest single RSS. Target: PSS <= 500 MB.
- ``--replicate K``: the corpus is linked K times into a temp folder (K x files, same bytes)
  to show that memory stays flat as the file count grows.
- loader: training batches (window 512, batch 16, augmentation on) from ``build_loader``
  against the baseline of slicing the same windows straight out of the cache; tokens/s of both.

Run:  .venv/bin/python benchmarks/bench_prepare.py [--dir DIR] [--workers N] [--replicate K]
      (default folder: the bundled Bach chorales; the classical corpus:
      ``--dir /work/classical-corpus`` after ``aurl data corpus --name classical --out ...``)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHORALES = ROOT / "src" / "aurl" / "data" / "bundled" / "bach-chorales"
AURL = [sys.executable, "-m", "aurl"]


def _tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc/*/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return out


def _mem_kb(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of one process in kB (0, 0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            fields = dict(line.split()[:2] for line in f if line.split()[0] in ("Pss:", "Rss:"))
        return int(fields["Pss:"]), int(fields["Rss:"])
    except (OSError, KeyError, ValueError):
        return 0, 0


def run_measured(cmd: list[str]) -> tuple[float, float, float, str]:
    """Run ``cmd``; return (seconds, peak tree PSS MB, peak single RSS MB, stdout)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_pss = peak_rss = 0
    while proc.poll() is None:
        mems = [_mem_kb(p) for p in _tree(proc.pid)]
        peak_pss = max(peak_pss, sum(m[0] for m in mems))
        peak_rss = max([peak_rss] + [m[1] for m in mems])
        time.sleep(0.01)
    seconds = time.perf_counter() - t0
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {err.strip()[-500:]}")
    return seconds, peak_pss / 1024, peak_rss / 1024, out


def linked_corpus(src: Path, copies: int, tmp: Path) -> Path:
    """``copies`` sub-folders of symlinks to every MIDI file of ``src``."""
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in (".mid", ".midi"))
    dst = tmp / "linked"
    for k in range(copies):
        for f in files:
            target = dst / f"copy{k:04d}" / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(f.resolve())
    return dst


def bench_prepare(src: Path, workers: int, tmp: Path) -> Path:
    from aurl.data import Tokenizer
    from aurl.data.cache import TokenCache, find_midi_files
    from aurl.errors import MidiReadError

    files = list(find_midi_files(src))
    tok = Tokenizer()
    t0 = time.perf_counter()
    base_tokens = 0
    for rel in files:
        with contextlib.suppress(MidiReadError):  # the same files fail on both sides
            base_tokens += len(tok.encode_file(src / rel))
    base_s = time.perf_counter() - t0

    cache = tmp / "cache"
    cmd = AURL + ["data", "prepare", str(src), "--out", str(cache), "--workers", str(workers)]
    cold_s, pss, rss, out = run_measured(cmd)
    cold_in = float(re.search(r", ([\d.]+) s$", out.splitlines()[0]).group(1))
    warm_s, warm_pss, _, out = run_measured(cmd)
    warm_in = float(re.search(r", ([\d.]+) s$", out.splitlines()[0]).group(1))
    c = TokenCache(cache)
    tokens = c.total_tokens()
    assert tokens == base_tokens, (tokens, base_tokens)
    n = len(files)
    print(f"prepare {src}: {n} files, {tokens} tokens, workers {workers}")
    print(f"  baseline serial encode_file: {base_s:7.2f} s {n / base_s:9.0f} files/s "
          f"{base_tokens / base_s:11.0f} tokens/s")  # fmt: skip
    print(f"  aurl data prepare (cold):    {cold_s:7.2f} s {n / cold_s:9.0f} files/s "
          f"{tokens / cold_s:11.0f} tokens/s  ratio {base_s / cold_s:.2f}x baseline "
          "(wall: process start and imports included)")  # fmt: skip
    print(f"  prepare() itself (cold):     {cold_in:7.2f} s {n / cold_in:9.0f} files/s "
          f"{tokens / cold_in:11.0f} tokens/s  ratio {base_s / cold_in:.2f}x baseline")  # fmt: skip
    print(f"  unchanged rerun: {warm_s:.2f} s wall, {warm_in:.2f} s in prepare()")
    print(f"  peak memory: tree PSS {pss:.0f} MB (rerun {warm_pss:.0f} MB), largest RSS "
          f"{rss:.0f} MB  [target <= 500 MB: {'ok' if pss <= 500 else 'OVER'}]")  # fmt: skip
    return cache


def bench_loader(cache_dir: Path, batches: int) -> None:
    import numpy as np

    from aurl.config import DataConfig
    from aurl.data.cache import TokenCache
    from aurl.data.dataset import build_loader

    cache = TokenCache(cache_dir)
    data = DataConfig(window=512, batch_size=16, valid_fraction=0.1, test_fraction=0.1)
    loader = build_loader(cache, data, seed=0, augment=True)
    stream = iter(loader)
    next(stream)  # warm-up
    t0 = time.perf_counter()
    n_tok = 0
    for _ in range(batches):
        n_tok += int(next(stream)["attention_mask"].sum())
    loader_s = time.perf_counter() - t0
    stream.close()

    # baseline: the same number of windows sliced straight from the mmaps, no augmentation
    rows = cache.split_indices("train")
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    b_tok = 0
    for _ in range(batches):
        for row in rng.choice(rows, 16):
            ids = cache.tokens(int(row))
            off = int(rng.integers(max(1, len(ids) - 512)))
            b_tok += len(np.asarray(ids[off : off + 512], dtype=np.int64))
    base_s = time.perf_counter() - t0
    print(f"loader (window 512, batch 16, augmentation on, {batches} batches, 0 workers):")
    print(f"  baseline mmap slicing: {b_tok / base_s:11.0f} tokens/s")
    print(f"  build_loader:          {n_tok / loader_s:11.0f} tokens/s  "
          f"ratio {n_tok / loader_s / (b_tok / base_s):.2f}x baseline")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=CHORALES, help="folder of MIDI files")
    ap.add_argument("--workers", type=int, default=0, help="prepare processes (0: all cores)")
    ap.add_argument("--replicate", type=int, default=1, help="link the corpus K times")
    ap.add_argument("--batches", type=int, default=200, help="loader batches to time")
    args = ap.parse_args(argv)
    workers = args.workers or os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp(prefix="aurl-bench-prepare-"))
    try:
        src = linked_corpus(args.dir, args.replicate, tmp) if args.replicate > 1 else args.dir
        cache = bench_prepare(src, workers, tmp)
        bench_loader(cache, args.batches)
    finally:
        shutil.rmtree(tmp)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
