"""The README's command (``aurl generate --num-samples 16 --seconds 30 --seed K``) with its
default, the voices the shipped model is written in (4), against ``--voices 0`` (one track,
decoded freely: the default before the model said its voices), seeds 0-2, the two commands one
after the other per seed; the pieces read as ``bench_voice_leading.py`` reads them.

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_default_voices.py
"""

import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_voice_leading import bach, cadences, pooled, read_folder  # noqa: E402

aurl = str(Path(sys.executable).with_name("aurl"))
tmp = Path(__import__("tempfile").mkdtemp())
rows = {"default (the model's 4 voices)": [], "--voices 0": ["--voices", "0"]}
got = {k: {"voices": [], "whole": [], "s": []} for k in rows}
for seed in (0, 1, 2):
    for i, (k, flags) in enumerate(rows.items()):
        out = tmp / f"{i}_{seed}"
        t0 = time.perf_counter()
        subprocess.run(
            [
                aurl,
                "generate",
                "--num-samples",
                "16",
                "--seconds",
                "30",
                "--seed",
                str(seed),
                *flags,
                "--force",
                "--out",
                str(out),
            ],
            check=True,
            capture_output=True,
        )
        got[k]["s"].append(time.perf_counter() - t0)
        v, w = read_folder(out)
        got[k]["voices"] += v
        got[k]["whole"] += w
        print(seed, k, f"{got[k]['s'][-1]:.1f} s", flush=True)
print("bach", bach())
for k, g in got.items():
    print(k, {**pooled(g["voices"]), **cadences(g["whole"]), "s": float(np.median(g["s"]))})
