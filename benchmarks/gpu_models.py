"""Train a model for release within a fixed wall-clock budget on a lent GPU (issues 12 and 15).

A lent GPU gives a session minutes, not a number of steps, and the cosine schedule needs its
length in steps. So each job:

1. **calibrates**: ``aurl train`` for ``--calib`` steps with the job's settings, and reads the
   median seconds per step from its ``metrics.jsonl`` (the first logged interval, which holds
   the warm-up, left out);
2. **trains**: ``aurl train`` with ``training.max_steps`` = the steps that fit in ``--budget``
   seconds (times ``--margin`` for the validation passes and the start), validating every eighth
   of the run and keeping the best checkpoint by validation loss; ``training.max_minutes`` is
   the budget, a hard stop;
3. **exports** the best checkpoint (``aurl checkpoint export RUN --dtype ...``);
4. **scores** the chorale test split (``--eval-cache``) the way ``aurl evaluate`` scores a model
   (the training window, the grammar's renormalisation, each piece's meter), under the style
   ``--style`` for a style-conditioned model.

Everything runs in this one process through :func:`aurl.cli.main` (one import of torch), and the
printed ``aurl train`` command of step 2 is the exact command a model card gives. Several jobs
may share one GPU (each is its own process): the card then says so.

Run (on the GPU; BENCHMARKS.md "The GPU run"):
    python3 benchmarks/gpu_models.py --job small --cache .bench/cache --budget 150 \\
        --out .bench/models --preset small -- data.batch_size=32 model.dropout=0.2
    .venv/bin/python benchmarks/gpu_models.py --smoke --out /tmp/gm   # seconds, on the CPU
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

from aurl.cli import main as aurl


def step_seconds(run: Path) -> float:
    """Median seconds per optimizer step over the logged intervals after the first."""
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step_s"] for r in recs if r.get("kind") == "train"]
    if not steps:
        raise SystemExit(f"{run}: no training step was logged; raise --calib")
    return statistics.median(steps[1:] or steps)


def call(argv: list[str]) -> None:
    print("+ aurl " + " ".join(shlex.quote(a) for a in argv), flush=True)
    rc = aurl(argv)
    if rc:
        raise SystemExit(f"aurl {argv[0]} failed with exit status {rc}")


def score(model_dir: Path, cache_dir: Path, device: str, style: str | None) -> dict:
    """Bits per note of the test split as ``aurl evaluate`` computes it (grammar-masked)."""
    import numpy as np

    from aurl.cli.evaluate import load_model
    from aurl.data.cache import TokenCache
    from aurl.data.grammar import Grammar
    from aurl.evaluation.likelihood import score_sequences

    model, _, window = load_model(str(model_dir), device)
    cache = TokenCache(cache_dir)
    rows = cache.split_indices("test")
    seqs = [np.asarray(cache.tokens(int(r)), np.int64) for r in rows]
    styles = None
    if style is not None:
        styles = [list(model.config.styles).index(style)] * len(seqs)
    r = score_sequences(
        model, seqs, window=window, batch_size=8, device=device,
        grammar=Grammar(model.vocab), meters=[cache.meters[int(i)] for i in rows], styles=styles,
    )  # fmt: skip
    return {"files": len(seqs), "notes": r.notes, "bits_per_note": r.bits_per_note,
            "window": window}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--job", default="model", help="name of the job (folders and the report)")
    p.add_argument("--cache", help="training token cache")
    p.add_argument(
        "--eval-cache", help="chorale cache whose test split is scored (default --cache)"
    )
    p.add_argument("--preset", default="small")
    p.add_argument("--budget", type=float, default=150.0, help="training seconds (step 2)")
    p.add_argument("--calib", type=int, default=40, help="calibration steps (step 1)")
    p.add_argument("--margin", type=float, default=0.8, help="share of the budget for steps")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--style", help="score the test split under this style")
    p.add_argument("--voices", type=int, default=0,
                   help="the voices the model is written in (checkpoint export --voices)")  # fmt: skip
    p.add_argument(
        "--init-from", metavar="BASE",
        help="start both runs from this model (aurl train --init-from: shipped, a name, a folder)",
    )  # fmt: skip
    p.add_argument("--device", default=None, help="default: cuda when there is one, else cpu")
    p.add_argument("--out", required=True, help="folder for the runs, the model and the report")
    p.add_argument("--smoke", action="store_true", help="tiny preset on 30 chorales, the CPU")
    p.add_argument("overrides", nargs="*", help="key=value settings of the job")
    args = p.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_gpu import prepare_work

        prepare_work(out / "data", smoke=True)
        args.cache, args.preset, args.calib, args.budget = str(out / "data/cache"), "tiny", 4, 8
        args.overrides = ["data.window=64", "data.batch_size=4", *args.overrides]
    eval_cache = Path(args.eval_cache or args.cache)
    common = [
        "--preset", args.preset, "--data", args.cache, f"training.device={device}",
        f"training.precision={'bf16' if device.startswith('cuda') else 'fp32'}",
        f"data.num_workers={4 if device.startswith('cuda') else 0}", "training.sample_every=0",
        *(["--init-from", args.init_from] if args.init_from else []), *args.overrides,
    ]  # fmt: skip
    report: dict = {"job": args.job, "device": device, "budget_s": args.budget}
    t0 = time.perf_counter()
    calib = out / f"{args.job}-calib"
    call(["train", "--out", str(calib), *common, f"training.max_steps={args.calib}",
          "training.log_every=5", "training.eval_every=100000", "training.save_every=100000",
          "training.keep_best=0", "training.max_minutes=0"])  # fmt: skip
    report["step_s"] = step_seconds(calib)
    steps = max(10, int(args.margin * args.budget / report["step_s"]))
    every = max(1, steps // 8)
    run = out / f"{args.job}-run"
    train_argv = ["train", "--out", str(run), *common, f"training.max_steps={steps}",
                  f"training.eval_every={every}", f"training.save_every={every}",
                  "training.keep_best=1", f"training.max_minutes={args.budget / 60:.3f}",
                  f"training.log_every={max(1, min(50, every // 2))}"]  # fmt: skip
    report["command"] = "aurl " + " ".join(shlex.quote(a) for a in train_argv)
    t1 = time.perf_counter()
    call(train_argv)
    report["train_wall_s"] = time.perf_counter() - t1
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    report["valid"] = [(r["step"], r["bits_per_note"]) for r in recs if r.get("kind") == "valid"]
    report["last_step"] = max((r["step"] for r in recs if "step" in r), default=0)
    model = out / f"{args.job}-model"
    call(["checkpoint", "export", str(run), "--out", str(model), "--dtype", args.dtype,
          "--voices", str(args.voices)])  # fmt: skip
    report["test"] = score(model, eval_cache, device, args.style)
    report["total_wall_s"] = time.perf_counter() - t0
    (out / f"{args.job}.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report), flush=True)
    return report


if __name__ == "__main__":
    main()
