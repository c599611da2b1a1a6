"""Generation speed: the full loop with grammar and constraints against the bare model step.

Side by side in one process, alternating, same model, same number of steps:

- bare: ``model.step`` + temperature sampling, nothing masked (the floor any loop pays);
- grammar: :func:`aurl.generation.generate.generate` with no constraint (grammar always on);
- constrained: ``generate`` with key, pitch range, tempo range, instrument set and density on.

Tokens/s count every row of every step (B x steps), median of the rounds. Overhead = 1 - loop / bare
tokens/s, taken per round (the three loops run back to back) and the median over rounds reported:
a paired ratio (the bare loop runs before and after the two, and its mean is the reference), so a
shared machine's drift between rounds cancels. Batch 8 against
batch 1 throughput comes from the same runs. Times are the process's CPU time (all threads), which
a machine shared with other jobs disturbs far less than wall time; ``--clock wall`` for wall time. Cold start: ``aurl generate --max-tokens 512`` to a
MIDI file on disk, as a fresh process, against ``python -c 'import torch'``.

The model: ``--checkpoint DIR``, else the shipped model (``src/aurl/pretrained``), else a random
model of the ``small`` preset (the shipped model's shape; speed does not depend on the weights).

Run:  .venv/bin/python benchmarks/bench_generate.py [--threads 2] [--tokens 256] [--rounds 3]
      [--checkpoint DIR] [--device cpu] [--clock cpu|wall] [--skip-cold]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "src" / "aurl" / "pretrained"


def model_folder(checkpoint: str | None, tmp: Path) -> tuple[Path, str]:
    if checkpoint:
        return Path(checkpoint), checkpoint
    if (SHIPPED / "config.json").is_file():
        return SHIPPED, "shipped"
    import torch

    from aurl.config import load_config
    from aurl.models import build_model

    torch.manual_seed(0)
    build_model(load_config(preset="small")).save_pretrained(tmp / "small")
    return tmp / "small", "random small preset"


CLOCK = time.process_time


def bare_loop(model, batch: int, tokens: int, device) -> float:
    """Seconds for ``tokens`` steps of model.step + sampling, no masks."""
    import torch

    from aurl.generation.sampling import SamplingOptions, filter_logits, sample

    opts = SamplingOptions()
    gen = torch.Generator(device=device).manual_seed(0)
    state = model.init_state(batch, device=device, capacity=tokens + 2)
    ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
    sync(device)
    t0 = CLOCK()
    logits = model.step(ids, state)[:, -1]
    for _ in range(tokens):
        nxt = sample(filter_logits(logits.float(), opts), opts, gen)
        logits = model.step(nxt[:, None], state)[:, -1]
    sync(device)
    return CLOCK() - t0


def full_loop(model, batch: int, tokens: int, constrained: bool, device) -> tuple[float, int]:
    """Seconds and steps of ``generate`` (stops early only if every row ends)."""
    from aurl.config import GenerationConfig
    from aurl.generation.generate import generate

    extra = {}
    if constrained:
        extra = dict(key="C major", pitch_low=48, pitch_high=84, tempo_range=(80.0, 140.0),
                     instruments=(0, 5), density=2.0)  # fmt: skip
    cfg = GenerationConfig(max_tokens=tokens, seed=0, window=tokens + 16, **extra)
    sync(device)
    t0 = CLOCK()
    pieces = generate(model, cfg, num_samples=batch)
    sync(device)
    return CLOCK() - t0, max(len(p.generated) for p in pieces)


def paired_overhead(rounds: list[dict[str, float]], name: str) -> float:
    """Median over rounds of 1 - bare / loop (seconds per step), each round's loops run back to
    back: a paired ratio, so the machine's drift between rounds cancels."""
    return round(float(np.median([1 - r["bare"] / r[name] for r in rounds])), 3)


def sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child: user + system) of one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def full_length_seed(model, tokens: int) -> int:
    """A seed whose piece runs to the token limit (an untrained model may end early), so the
    cold start times all ``tokens`` tokens."""
    from aurl.config import GenerationConfig
    from aurl.generation.generate import generate

    for seed in range(50):
        piece = generate(model, GenerationConfig(max_tokens=tokens, seed=seed))[0]
        if len(piece.generated) >= tokens - 4:  # the last tokens may be spent ending cleanly
            return seed
    raise SystemExit(f"no seed in 0..49 gives {tokens} tokens with this model")


def cold_start(folder: Path, tmp: Path, rounds: int, seed: int) -> dict[str, float]:
    py = sys.executable
    base, cmd = [], []
    for r in range(rounds):
        base.append(timed([py, "-c", "import torch"]))
        out = tmp / f"cold{r}"
        cmd.append(timed([py, "-m", "aurl", "generate", "--checkpoint", str(folder),
                          "--max-tokens", "512", "--seed", str(seed), "--out", str(out)]))  # fmt: skip
        assert any(out.glob("*.mid"))
    return {
        "import_torch_wall_s": min(w for w, _ in base),
        "import_torch_cpu_s": min(c for _, c in base),
        "aurl_generate_512_wall_s": min(w for w, _ in cmd),
        "aurl_generate_512_cpu_s": min(c for _, c in cmd),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--checkpoint")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-cold", action="store_true")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter

    import torch

    from aurl.models import MusicTransformerVAEGAN

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        folder, label = model_folder(args.checkpoint, tmp)
        model = MusicTransformerVAEGAN.from_pretrained(folder, map_location=args.device).eval()
        print(f"model {label}: {model.parameter_counts()['total']:,} parameters, "
              f"device {args.device}, threads {args.threads}, {args.clock} clock")  # fmt: skip
        results: dict[str, dict[str, float]] = {}
        for batch in (1, 8):
            full_loop(model, batch, 16, True, args.device)  # warm-up
            rounds = []  # seconds per step of the three loops, run back to back
            for _ in range(args.rounds):  # alternate so load changes hit all three alike
                before = bare_loop(model, batch, args.tokens, args.device) / args.tokens
                r = {}
                for name in ("grammar", "constrained"):
                    t, steps = full_loop(model, batch, args.tokens, name == "constrained",
                                         args.device)  # fmt: skip
                    r[name] = t / steps
                # the bare loop before and after the two: its mean sits where they ran
                r["bare"] = (
                    before + bare_loop(model, batch, args.tokens, args.device) / args.tokens
                ) / 2
                rounds.append(r)
            typical = {k: float(np.median([r[k] for r in rounds])) for k in rounds[0]}
            tps = {k: batch / v for k, v in typical.items()}
            results[f"batch{batch}"] = {
                **{f"{k}_tok_s": round(v, 1) for k, v in tps.items()},
                "grammar_overhead": paired_overhead(rounds, "grammar"),
                "constrained_overhead": paired_overhead(rounds, "constrained"),
            }
            r = results[f"batch{batch}"]
            print(f"batch {batch}: bare {r['bare_tok_s']} tok/s, grammar {r['grammar_tok_s']} "
                  f"tok/s (overhead {r['grammar_overhead']:.1%}), constrained "
                  f"{r['constrained_tok_s']} tok/s (overhead {r['constrained_overhead']:.1%})")  # fmt: skip
        speedup = results["batch8"]["constrained_tok_s"] / results["batch1"]["constrained_tok_s"]
        results["batch8_vs_batch1"] = {"throughput_ratio": round(speedup, 2)}
        print(f"batch 8 vs 1 (constrained loop): {speedup:.2f}x tokens/s")
        if not args.skip_cold:
            seed = full_length_seed(model, 512)
            results["cold_start"] = cold_start(folder, tmp, args.rounds, seed)
            c = results["cold_start"]
            print(f"cold start: aurl generate 512 tokens -> MIDI {c['aurl_generate_512_wall_s']:.2f}"
                  f" s wall, {c['aurl_generate_512_cpu_s']:.2f} s CPU (import torch alone "
                  f"{c['import_torch_wall_s']:.2f} s wall, {c['import_torch_cpu_s']:.2f} s CPU)")  # fmt: skip
        print(json.dumps(results))


if __name__ == "__main__":
    main()
