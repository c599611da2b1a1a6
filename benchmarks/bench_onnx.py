"""CPU decoding, batch 1, through the whole generation loop: onnxruntime fp32 / int8 against
PyTorch fp32 / int8 and Hugging Face ``generate`` (fp32), side by side in one run; and the cold
start of ``aurl generate --engine onnx``.

Model: the shipped model's shape and weights (``--shape shipped``, 3.4M parameters) or the
``full`` preset's shape with seeded random weights (``--shape full``, 26M). Ours: ``generate()``
with constraints on (key D minor, pitch range 36..96, sampling at temperature 1), pieces of
``--tokens`` (default 1024; ``min_tokens`` holds END back); HF: ``GPT2LMHeadModel`` of the same
shape, ``generate`` greedy with ``min_new_tokens`` (no constraints: the baseline's own loop).
Each variant lives in one worker process, built and warmed up before any timing; the pieces
interleave HF, every other variant (order rotating round by round), HF, ..., so each variant's
piece lies between two HF pieces seconds apart and gives one ratio (to their geometric mean).
Reported: the median ratio over ``--rounds`` with its interquartile range and a bootstrap 95%
interval of the median, both for wall-clock tokens/s and for tokens per CPU second of the worker
(what it needed itself, which other jobs on shared cores inflate far less), and the CPU (model
name and instruction sets) in every row. (This machine's speed drifts ~1.5x within minutes: a
ratio of totals or of medians taken minutes apart moves with it.) The output is markdown table
rows, ready to paste into BENCHMARKS.md, headed by the load average before and after.

Cold start: ``aurl generate --engine onnx --checkpoint EXPORT --max-tokens 512 --min-tokens 504``
to a MIDI file, run as the ``aurl`` console script of each tree's pyproject.toml runs it: wall
time (spawn to exit) and CPU time (user + system) of the whole process, median and range over ``--rounds`` runs (every command alternating
round by round), beside ``python -c 'import numpy, onnxruntime'``, ``python -c 'import torch'``
and the torch engine's same command (``--no-torch`` leaves those two out); the headline also gets
the median of the per-round ratios baseline / this tree of its two rows (adjacent in each round). Every command runs
once unmeasured first (writing the bytecode caches), then each onnx row is measured with
bytecode caching as a pip-installed package has it ("cached", the headline) and with
``PYTHONDONTWRITEBYTECODE=1`` on a copy of aurl without ``__pycache__`` ("compiled from
source": its modules compiled on every run; site-packages keep their installed ``.pyc``), and,
cached, at ``--baseline`` (a commit of this repository, ``git archive``: default the commit
before the fifth pass), so the headline is an absolute and a ratio from the same run. Last,
one run per tree split into phases (imports, engine, generation, writing, and the rest of the
process: interpreter start and exit). With the shipped shape, the command as users type it
(``aurl generate --engine onnx`` without ``--checkpoint``: the shipped model's export of this
CPU's default precision, :func:`aurl.engines.cpu.onnx_precision`, from a cache the unmeasured
run writes) is a row too, and with ``--baseline`` the baseline's own default command beside it
(its own cache): the second headline is their per-round ratio, and the graphs each read (the
cache folders and their ``config.json`` precision) are printed and checked first.

Run:  .venv/bin/python benchmarks/bench_onnx.py [--shape shipped|full] [--tokens 1024]
      [--rounds 3] [--threads 1] [--only decode|cold|parts|parity|kv|attention] [--variants onnx-int8,...]
      [--baseline REV] [--no-torch]

``--only parity``: bits per note (grammar-masked, and raw) on the whole tune-grouped test split of the bundled chorales, PyTorch fp32
against the fp32, int8 and int4 graphs (the shipped model; the goal: within 0.02 of fp32).

``--only kv``: the graph step as the engine runs it (version 3: q|k|v packed, the KV cache updated
in place) against the version 2 graph (q, k, v split) and against separate present buffers (the
whole cache copied per step), at 16 / 512 / 960 cached tokens (:func:`kv`).

``--only attention``: GroupQueryAttention alone (the engine's node, the same with ``scale`` 1,
numpy) over 16 / 512 / 960 cached tokens, and the bytes of keys and values it reads per second.

``--only parts``: the onnx engine's per-token CPU time split into the graph step alone (at a few
cached lengths) and the rest of the loop (onnxruntime stubbed out), fp32 and int8.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "src" / "aurl" / "pretrained"
VARIANTS = ("hf", "torch-fp32", "torch-int8", "onnx-fp32", "onnx-int8", "onnx-int4",
            "native-fp32", "native-int8")  # fmt: skip
DEFAULT_VARIANTS = VARIANTS  # int4: `--engine onnx`'s default where the CPU has dot products
LABELS = {
    "hf": "HF `generate` fp32",
    "torch-fp32": "PyTorch fp32 (`--engine torch`)",
    "torch-int8": "PyTorch int8 (int8 weights, bf16 activations)",
    "onnx-fp32": "onnxruntime fp32 (`--engine onnx --fp32`)",
    "onnx-int8": "onnxruntime int8 (`--engine onnx --int8`)",
    "onnx-int4": "onnxruntime int4 (`--engine onnx` on AVX2 / VNNI, MatMulNBits)",
    "native-fp32": "Aurl's C step fp32 (`--engine native --fp32`)",
    "native-int8": "Aurl's C step int8 (`--engine native`)",
}


def loadavg() -> str:
    """The 1-minute load average (``/proc/loadavg``), or '?' where there is none."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def torch_model(shape: str):
    import torch

    from aurl.config import load_config
    from aurl.models import MusicTransformerVAEGAN, build_model

    if shape == "shipped":
        return MusicTransformerVAEGAN.from_pretrained(SHIPPED)
    torch.manual_seed(0)
    cfg = load_config(preset="full", overrides=["model.mode=transformer"])
    return build_model(cfg).eval()


def prepare(shape: str, folder: Path, int4: bool = False) -> None:
    """The fp32 and int8 exports of the model (and the int4 one if ``int4``), once per run, and
    its model folder (``model/``: what the native engine reads)."""
    from aurl.models.onnx_export import export_onnx

    model = torch_model(shape)
    model.save_pretrained(folder / "model")
    export_onnx(model, folder / "fp32")
    export_onnx(model, folder / "int8", int8=True)
    if int4:
        export_onnx(model, folder / "int4", int4=True)


def bytes_per_token(graph: Path) -> int:
    """Bytes of the graph's constants that every one-token step reads: every initializer but
    the tables it looks rows up in (embeddings through ``Gather``, the rotary cos / sin caches
    of ``GroupQueryAttention``), of which a step reads a row."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph))
    tables = {n.input[0] for n in model.graph.node if n.op_type == "Gather"}
    tables |= {
        x for n in model.graph.node if n.op_type == "GroupQueryAttention" for x in n.input[7:9]
    }
    return sum(
        numpy_helper.to_array(t).nbytes for t in model.graph.initializer if t.name not in tables
    )


def memory_bandwidth() -> tuple[float, float]:
    """(read, copy) GB/s of one thread on this machine: the best of 10 sums of a 100 MB int64
    array (bytes read per second) and of 10 copies of a 100 MB array into another (bytes read
    plus bytes written per second)."""
    import numpy as np

    a = np.ones(100_000_000 // 8, dtype=np.int64)
    b = np.empty_like(a)
    np.copyto(b, a)  # pages of b touched before timing
    read = copy = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        a.sum()
        read = min(read, time.perf_counter() - t)
        t = time.perf_counter()
        np.copyto(b, a)
        copy = min(copy, time.perf_counter() - t)
    return a.nbytes / read / 1e9, 2 * a.nbytes / copy / 1e9


def limit_rows(folder: Path, shape: str, tokens: int) -> list[str]:
    """What memory bandwidth allows (lines to print under the decode table): per token the
    weights each graph reads plus the KV cache at the run's mean length (fp32 keys and values,
    every layer), against this machine's read bandwidth measured now."""
    import json

    meta = json.loads((folder / "int8" / "config.json").read_text())
    kv = 2 * meta["n_layers"] * meta["n_heads"] * meta["head_dim"] * 4  # bytes per cached token
    read, copy = memory_bandwidth()
    lines = [f"memory bandwidth, one thread: read {read:.1f} GB/s (sum of 100 MB), copy {copy:.1f} "
             f"GB/s (read + write, 100 MB); {shape} shape, {tokens} tokens: KV cache "
             f"{kv * tokens / 2 / 1e6:.1f} MB read per token at the mean length ({tokens // 2})"]  # fmt: skip
    for weights in [w for w in ("fp32", "int8", "int4") if (folder / w).is_dir()]:
        w = bytes_per_token(folder / weights / meta["graphs"]["decoder"])
        total = w + kv * tokens / 2
        lines.append(f"{weights}: weights {w / 1e6:.1f} MB per token, with the cache "
                     f"{total / 1e6:.1f} MB: at most {read * 1e9 / total:.0f} tokens/s "
                     f"({read * 1e9 / w:.0f} from the weights alone)")  # fmt: skip
    if (folder / "int8").is_dir():  # the native int8 engine: the same weights, a half-float cache
        w = bytes_per_token(folder / "int8" / meta["graphs"]["decoder"])
        total = w + kv / 2 * tokens / 2
        lines.append(f"native int8 (keys and values in half floats): with the cache "
                     f"{total / 1e6:.1f} MB: at most {read * 1e9 / total:.0f} tokens/s")  # fmt: skip
    return lines


def runner(variant: str, shape: str, tokens: int, threads: int, folder: Path):
    """A function ``run(n) -> tokens generated`` of one variant, built and warmed up once:
    ours is ``generate()`` under constraints, HF its ``generate``."""
    from aurl.config import GenerationConfig
    from aurl.generation.generate import generate

    cfg = GenerationConfig(
        max_tokens=tokens, min_tokens=tokens - 8, key="D minor", pitch_low=36, pitch_high=96,
        seed=0, window=max(tokens + 16, 512),
    )  # fmt: skip
    if variant.startswith("onnx"):
        from aurl.engines.onnx_engine import OnnxEngine

        model = OnnxEngine(folder / variant.split("-")[1], threads=threads)
    elif variant.startswith("native"):
        from aurl.engines.native_engine import NativeEngine

        model = NativeEngine(folder / "model", weights=variant.split("-")[1])
    else:
        import torch

        torch.set_num_threads(threads)
        model = torch_model(shape)
        if variant == "hf":
            return hf_runner(model, tokens)
        if variant == "torch-int8":
            from aurl.models.quantize import quantize_int8

            model = quantize_int8(model)

    def run(n: int) -> int:
        return len(generate(model, dataclasses_replace(cfg, n))[0].generated)

    run(16)  # warm-up
    return run


def serve_worker(variant: str, shape: str, tokens: int, threads: int, folder: Path) -> None:
    """The worker process of one variant: builds its runner, prints ``ready``, then for each
    line ``N`` on stdin generates one piece of N tokens and prints its timing as one JSON line
    (tokens per wall second and per CPU second of this process)."""
    run = runner(variant, shape, tokens, threads, folder)
    print("ready", flush=True)
    for line in sys.stdin:
        t0, c0 = time.perf_counter(), time.process_time()
        n = run(int(line))
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(json.dumps({"tokens_per_s": n / dt, "tokens_per_cpu_s": n / cpu}), flush=True)


def dataclasses_replace(cfg, n: int):
    import dataclasses

    return dataclasses.replace(cfg, max_tokens=n, min_tokens=max(n - 8, 0))


def hf_runner(ours, tokens: int):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    m = ours.config
    hf = GPT2Config(
        vocab_size=774, n_positions=max(m.max_seq_len, tokens + 1), n_embd=m.d_model,
        n_layer=m.n_layers, n_head=m.n_heads, n_inner=m.ff_mult * m.d_model, bos_token_id=0,
        eos_token_id=1, pad_token_id=2,
    )  # fmt: skip
    model = GPT2LMHeadModel(hf).eval()
    start = torch.zeros(1, 1, dtype=torch.long)

    def run(n: int) -> int:
        with torch.inference_mode():
            out = model.generate(
                input_ids=start, attention_mask=torch.ones_like(start), max_new_tokens=n,
                min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=2,
            )  # fmt: skip
        return out.shape[1] - 1

    run(16)  # warm-up
    return run


def ratio_stats(ratios: list[float], *, seed: int = 0, draws: int = 2000) -> dict[str, float]:
    """Median of per-round ratios, their interquartile range and a bootstrap 95% interval of
    the median (rounds resampled with replacement, ``draws`` times, seeded): a summary that one
    fast or slow minute of the machine moves far less than a ratio of totals."""
    import numpy as np

    r = np.asarray(ratios, dtype=np.float64)
    q1, med, q3 = np.percentile(r, [25, 50, 75])
    boots = np.median(np.random.default_rng(seed).choice(r, (draws, len(r))), axis=1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"median": float(med), "q1": float(q1), "q3": float(q3), "lo": float(lo),
            "hi": float(hi), "n": len(r)}  # fmt: skip


def fmt_ratio(st: dict[str, float]) -> str:
    """``5.12x [IQR 4.90-5.31; 95% 4.85-5.40]``."""
    return (f"{st['median']:.2f}x [IQR {st['q1']:.2f}-{st['q3']:.2f}; 95% {st['lo']:.2f}-"
            f"{st['hi']:.2f}]")  # fmt: skip


def bracketed(hf: list[float], ours: list[float]) -> list[float]:
    """Per-round ratios of ``ours[r]`` to the geometric mean of the HF pieces run just before
    and just after it (``hf[r]``, ``hf[r + 1]``): each ratio compares pieces seconds apart."""
    return [o / (hf[r] * hf[r + 1]) ** 0.5 for r, o in enumerate(ours)]


def decode(args: argparse.Namespace, folder: Path, cpu: str, load: str) -> None:
    """Batch-1 decoding, every variant in its own long-lived worker process (built and warmed
    up before any timing), pieces of ``--tokens`` interleaved: HF, then each variant (their
    order rotating round by round), then HF again, ... so each variant's piece is bracketed by
    two HF pieces seconds apart and gives one ratio; the table reports the median ratio over
    ``--rounds`` with its IQR and a bootstrap 95% interval (:func:`ratio_stats`)."""
    import subprocess as sp

    chosen = ["hf"] + [v for v in VARIANTS[1:] if v in args.variants.split(",")]
    common = ["--shape", args.shape, "--tokens", str(args.tokens), "--threads", str(args.threads)]
    procs = {}
    for v in chosen:
        cmd = [sys.executable, __file__, "--worker", v, *common, "--folder", str(folder)]
        procs[v] = sp.Popen(cmd, stdin=sp.PIPE, stdout=sp.PIPE, text=True)
        line = procs[v].stdout.readline()
        if line.strip() != "ready":
            raise SystemExit(f"worker {v} failed to start: {line!r}")

    def piece(v: str) -> dict:
        procs[v].stdin.write(f"{args.tokens}\n")
        procs[v].stdin.flush()
        return json.loads(procs[v].stdout.readline())

    results: dict[str, list[dict]] = {v: [] for v in chosen}
    others = chosen[1:]
    results["hf"].append(piece("hf"))
    for r in range(args.rounds):
        k = r % len(others) if others else 0
        for v in others[k:] + others[:k]:
            results[v].append(piece(v))
        results["hf"].append(piece("hf"))
    for p in procs.values():
        p.stdin.close()
        p.wait()
    print(f"decode: {args.shape} shape, batch 1, {args.tokens}-token pieces, --threads "
          f"{args.threads}, {args.rounds} rounds, each variant's piece between two HF pieces; "
          f"load average before/after: {load} / {loadavg()}")  # fmt: skip
    print("| variant | tokens/s (wall, median) | vs HF (wall): median [IQR; 95% bootstrap] | "
          "tokens per CPU second | vs HF (CPU) | CPU |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for v in chosen:
        wall_r = statistics.median(x["tokens_per_s"] for x in results[v])
        cpu_r = statistics.median(x["tokens_per_cpu_s"] for x in results[v])
        if v == "hf":
            print(f"| {LABELS[v]} | {wall_r:.0f} | 1 | {cpu_r:.0f} | 1 | {cpu} |")
            continue
        ratios = {
            key: ratio_stats(bracketed([x[key] for x in results["hf"]], [x[key] for x in results[v]]))
            for key in ("tokens_per_s", "tokens_per_cpu_s")
        }  # fmt: skip
        print(f"| {LABELS[v]} | {wall_r:.0f} | {fmt_ratio(ratios['tokens_per_s'])} | "
              f"{cpu_r:.0f} | {fmt_ratio(ratios['tokens_per_cpu_s'])} | {cpu} |")  # fmt: skip
    pairs = [("onnx-fp32", "onnx-int8"), ("torch-fp32", "torch-int8"), ("onnx-int8", "onnx-int4"),
             ("onnx-int4", "native-int8"), ("onnx-int8", "native-int8"),
             ("onnx-fp32", "native-fp32")]  # fmt: skip
    for a_name, b_name in pairs:  # one precision against another of the same engine, piece by piece
        a_runs, b_runs = results.get(a_name), results.get(b_name)
        if a_runs and b_runs:
            for key, what in (("tokens_per_s", "wall"), ("tokens_per_cpu_s", "CPU")):
                st = ratio_stats([b[key] / a[key] for a, b in zip(a_runs, b_runs)])
                print(f"{b_name} / {a_name} ({what}, the same round): {fmt_ratio(st)}")
    for line in limit_rows(folder, args.shape, args.tokens):
        print(line)


def parts(folder: Path, tokens: int, threads: int, cpu: str) -> None:
    """Per-token CPU time of the onnx engine's two halves, printed as table rows: one step of
    the graph alone (onnxruntime) at a few cached lengths, and the rest of the loop (features,
    masks, sampling, bookkeeping) with onnxruntime replaced by a stub that returns fixed logits.
    CPU time of this process, the minimum over rounds: the least disturbed by other jobs."""

    from aurl.config import GenerationConfig
    from aurl.engines.onnx_engine import OnnxEngine
    from aurl.generation.generate import generate

    cfg = GenerationConfig(
        max_tokens=tokens, min_tokens=tokens - 8, key="D minor", pitch_low=36, pitch_high=96,
        seed=0, window=tokens + 16,
    )  # fmt: skip
    rows: dict[str, dict[str, float]] = {}
    for weights in ("fp32", "int8"):
        engine = OnnxEngine(folder / weights, threads=threads)
        ids = generate(engine, cfg)[0].ids  # a real piece to feed
        for cached in (16, tokens // 2, tokens - 64):
            best = float("inf")
            for _ in range(3):
                state = engine.init_state(1, capacity=tokens + 16)
                engine.step(ids[None, :cached], state)
                c0 = time.process_time()
                for j in range(cached, cached + 32):
                    engine.step(ids[None, j : j + 1], state)
                best = min(best, (time.process_time() - c0) / 32)
            rows.setdefault(f"graph step at {cached} cached tokens", {})[weights] = best
        logits = engine.step(ids[None, :1], engine.init_state(1))[0, -1]

        def stub(io: object, engine=engine, logits=logits) -> None:
            engine._logits[(1, 1)][0][0, 0] = logits

        engine.session.run_with_iobinding = stub
        best = float("inf")
        for _ in range(3):
            c0 = time.process_time()
            n = len(generate(engine, cfg)[0].generated)
            best = min(best, (time.process_time() - c0) / n)
        rows.setdefault("the loop without the graph (features, masks, sampling)", {})[weights] = (
            best
        )
    print(f"per token, CPU time (min of 3), --threads {threads}; load average {loadavg()}")
    print("| part | fp32 | int8 | CPU |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['fp32'] * 1e3:.3f} ms | {r['int8'] * 1e3:.3f} ms | {cpu} |")
    shares = {w: op_shares(folder / w, ids, tokens // 2, threads) for w in ("fp32", "int8")}
    print(f"onnxruntime's profiler, 32 steps at {tokens // 2} cached tokens: share of the "
          "kernels' time by operator (the profiler's own cost inflates every kernel alike)")  # fmt: skip
    print("| operator | fp32 | int8 |")
    print("|---|---|---|")
    ops = {*shares["fp32"], *shares["int8"]}
    for op in sorted(ops, key=lambda o: [-shares[w].get(o, 0.0) for w in ("int8", "fp32")]):
        fp32, int8 = (100 * shares[w].get(op, 0.0) for w in ("fp32", "int8"))
        print(f"| {op} | {fp32:.1f}% | {int8:.1f}% |")


def op_shares(folder: Path, ids: object, cached: int, threads: int) -> dict[str, float]:
    """Share of each operator type in the kernel time of 32 one-token steps after ``cached``
    tokens of ``ids`` (onnxruntime's profiler)."""
    import collections
    import os

    from aurl.engines import onnx_engine

    ort = onnx_engine.import_onnxruntime()
    plain = ort.SessionOptions

    class Profiled(plain):  # the engine's options, with the profiler on
        def __init__(self) -> None:
            super().__init__()
            self.enable_profiling = True
            self.profile_file_prefix = str(folder / "profile")

    ort.SessionOptions = Profiled
    try:
        engine = onnx_engine.OnnxEngine(folder, threads=threads)
    finally:
        ort.SessionOptions = plain
    state = engine.init_state(1, capacity=cached + 48)
    engine.step(ids[None, :cached], state)
    for j in range(cached, cached + 32):
        engine.step(ids[None, j : j + 1], state)
    trace = engine.session.end_profiling()
    events = json.loads(Path(trace).read_text())
    os.remove(trace)
    runs = sorted(e["ts"] + e["dur"] for e in events if e.get("name") == "model_run")
    prefill_end = runs[0] if runs else 0  # the one-token steps' kernels only
    by_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] > prefill_end:
            by_op[e["args"]["op_name"]] += e["dur"]
    total = sum(by_op.values())
    return {op: t / total for op, t in by_op.items()}


def step_time(engine, ids, cached: int, *, in_place: bool) -> float:
    """CPU seconds per one-token step of ``engine`` over 32 steps after ``cached`` tokens of
    ``ids``; ``in_place`` False binds separate zeroed ``present`` buffers (see :func:`kv`)."""
    import numpy as np

    state = engine.init_state(1, capacity=1040)
    engine.step(ids[None, :cached], state)
    engine.step(ids[None, cached : cached + 1], state)  # binds the state's buffers
    if not in_place:
        ort = engine._ort
        for name, c in zip(engine.cache_names, state.cache):
            separate = ort.OrtValue.ortvalue_from_numpy(np.zeros_like(c))
            engine.io.bind_ortvalue_output(f"present_{name}", separate)
    c0 = time.process_time()
    for j in range(cached + 1, cached + 33):
        engine.step(ids[None, j : j + 1], state)
    return (time.process_time() - c0) / 32


def split_export(folder: Path, weights: str) -> Path:
    """A version 2 copy of the ``weights`` export in ``folder``: the same model's graph with
    q, k and v split before each attention (``pack_qkv`` skipped), beside the version 3 one."""
    import shutil

    from aurl.models import onnx_export

    out = folder / f"{weights}-split"
    shutil.copytree(folder / weights, out)
    pack, onnx_export.pack_qkv = onnx_export.pack_qkv, lambda path: None
    try:
        onnx_export.export_graph(torch_model("shipped"), out / "decoder.onnx")
    finally:
        onnx_export.pack_qkv = pack
    if weights == "int8":
        onnx_export.quantize_graph(out / "decoder.onnx")
    meta = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**meta, "version": 2}))
    return out


def kv(folder: Path, rounds: int, threads: int, cpu: str) -> None:
    """The graph step as the engine runs it (version 3: q|k|v packed into each attention, the
    KV cache updated in place: each layer's buffer bound as both ``past`` and ``present``, so
    GroupQueryAttention writes the new position only) against (a) the version 2 graph of the
    same weights (q, k and v split before each attention), in place too, and (b) the version 3
    graph given separate ``present`` buffers (the kernel then clears each present buffer and
    copies the whole past cache into it every step: the cost of a cache returned rather than
    updated). CPU time per step over 32 steps after 16 / 512 / 960 cached tokens of a real
    piece, capacity 1040; the three alternating round by round, min of ``rounds``; fp32 and
    int8 graphs of the shipped shape."""
    from aurl.config import GenerationConfig
    from aurl.engines.onnx_engine import OnnxEngine
    from aurl.generation.generate import generate

    cfg = GenerationConfig(max_tokens=1024, min_tokens=1016, key="D minor", pitch_low=36,
                           pitch_high=96, seed=0, window=1040)  # fmt: skip
    hows = ("in place", "split", "copied")
    best: dict[tuple[str, int, str], float] = {}
    for weights in ("fp32", "int8"):
        engine = OnnxEngine(folder / weights, threads=threads)
        split = OnnxEngine(split_export(folder, weights), threads=threads)
        ids = generate(engine, cfg)[0].ids
        for r in range(rounds):
            for cached in (16, 512, 960):
                for how in hows[r % 3 :] + hows[: r % 3]:
                    e = split if how == "split" else engine
                    t = step_time(e, ids, cached, in_place=how != "copied")
                    key = (weights, cached, how)
                    best[key] = min(best.get(key, float("inf")), t)
    print(f"graph step, CPU time per step (min of {rounds}, alternating), shipped shape, "
          f"capacity 1040, --threads {threads}; load average {loadavg()}")  # fmt: skip
    print("| graph | cached tokens | v3: q\\|k\\|v packed, KV cache in place (the engine) | "
          "v2: q, k, v split, in place | v3, present copied each step | CPU |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for weights in ("fp32", "int8"):
        for cached in (16, 512, 960):
            a, b, c = (best[weights, cached, how] for how in hows)
            print(f"| {weights} | {cached} | {a * 1e6:.0f} us | {b * 1e6:.0f} us ({b / a:.2f}x) | "
                  f"{c * 1e6:.0f} us ({c / a:.2f}x) | {cpu} |")  # fmt: skip


def attention(rounds: int, cpu: str) -> None:
    """onnxruntime's GroupQueryAttention alone, as the engine runs it (4 layers of the shipped
    shape: 4 heads of 64, q|k|v packed, the KV cache bound as past and present, capacity 1040,
    one new token), against the same node with ``scale`` 1 (q scaled beforehand: MLAS then
    takes its M=1 kernel for q.K^T, which it takes only when alpha is 1, instead of packing
    K^T) and against numpy (OpenBLAS gemv) over the same cache, at 16 / 512 / 960 cached
    tokens: CPU time per step (200 steps, min of ``rounds``, alternating), and the bytes of
    keys and values read per second."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    H, hd, C, L = 4, 64, 1040, 4
    D = H * hd

    def session(scale: float | None):
        f32, i32 = TensorProto.FLOAT, TensorProto.INT32
        ins = [helper.make_tensor_value_info("qkv", f32, [1, 1, 3 * D]),
               helper.make_tensor_value_info("seqlens_k", i32, [1]),
               helper.make_tensor_value_info("total", i32, []),
               helper.make_tensor_value_info("cos", f32, [C, hd // 2]),
               helper.make_tensor_value_info("sin", f32, [C, hd // 2])]  # fmt: skip
        nodes, outs = [], []
        attrs = {"num_heads": H, "kv_num_heads": H, "do_rotary": 1, "rotary_interleaved": 0}
        if scale is not None:
            attrs["scale"] = scale
        for i in range(L):
            ins += [helper.make_tensor_value_info(f"pk{i}", f32, [1, H, C, hd]),
                    helper.make_tensor_value_info(f"pv{i}", f32, [1, H, C, hd])]  # fmt: skip
            outs += [
                helper.make_tensor_value_info(n, f32, None) for n in (f"y{i}", f"k{i}", f"v{i}")
            ]
            nodes.append(helper.make_node(
                "GroupQueryAttention", ["qkv", "", "", f"pk{i}", f"pv{i}", "seqlens_k", "total",
                                        "cos", "sin"],
                [f"y{i}", f"k{i}", f"v{i}"], domain="com.microsoft", **attrs,
            ))  # fmt: skip
        model = helper.make_model(
            helper.make_graph(nodes, "attention", ins, outs),
            opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
        )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        return ort.InferenceSession(
            model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )

    rng = np.random.default_rng(0)
    cache = [rng.standard_normal((1, H, C, hd)).astype(np.float32) for _ in range(2 * L)]
    values = [ort.OrtValue.ortvalue_from_numpy(c) for c in cache]
    angle = np.arange(C)[:, None] * 10000.0 ** (-np.arange(hd // 2) / (hd // 2))[None]
    cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)
    qkv = rng.standard_normal((1, 1, 3 * D)).astype(np.float32)

    def graph_step(sess, cached: int, n: int = 200) -> float:
        io = sess.io_binding()
        feeds = {"qkv": qkv, "seqlens_k": np.array([cached], np.int32),
                 "total": np.array(cached + 1, np.int32), "cos": cos, "sin": sin}  # fmt: skip
        for name, value in feeds.items():
            io.bind_cpu_input(name, value)
        for i in range(L):
            for kv, j in (("k", 2 * i), ("v", 2 * i + 1)):
                io.bind_ortvalue_input(f"p{kv}{i}", values[j])
                io.bind_ortvalue_output(f"{kv}{i}", values[j])
            io.bind_output(f"y{i}")
        sess.run_with_iobinding(io)
        c0 = time.process_time()
        for _ in range(n):
            sess.run_with_iobinding(io)
        return (time.process_time() - c0) / n

    def numpy_step(cached: int, n: int = 200) -> float:
        q = qkv[0, 0, :D].reshape(H, 1, hd)
        c0 = time.process_time()
        for _ in range(n):
            for i in range(L):
                k, v = cache[2 * i][0, :, : cached + 1], cache[2 * i + 1][0, :, : cached + 1]
                s = np.matmul(q, k.transpose(0, 2, 1)) * np.float32(hd**-0.5)
                s = np.exp(s - s.max(-1, keepdims=True))
                np.matmul(s / s.sum(-1, keepdims=True), v)
        return (time.process_time() - c0) / n

    sessions = {"GroupQueryAttention (the engine's)": session(None),
                "GroupQueryAttention, scale 1 (q scaled before)": session(1.0)}  # fmt: skip
    best: dict[tuple[str, int], float] = {}
    names = [*sessions, "numpy (OpenBLAS, run with OPENBLAS_NUM_THREADS=1) over the same cache"]
    for r in range(rounds):
        for cached in (16, 512, 960):
            for name in names[r % 3 :] + names[: r % 3]:  # the order rotates round by round
                sess = sessions.get(name)
                t = graph_step(sess, cached) if sess is not None else numpy_step(cached)
                best[name, cached] = min(best.get((name, cached), float("inf")), t)
    print(f"attention alone, 4 layers x 4 heads of 64, one new token, CPU time per step (min of "
          f"{rounds}); load average {loadavg()}")  # fmt: skip
    print("| kernel | 16 cached | 512 cached | 960 cached | keys + values read at 960 | CPU |")
    print("|---|---|---|---|---|---|")
    for name in names:
        t = [best[name, c] for c in (16, 512, 960)]
        rate = 2 * L * H * 961 * hd * 4 / t[2] / 1e9
        print(f"| {name} | {t[0] * 1e6:.0f} us | {t[1] * 1e6:.0f} us | {t[2] * 1e6:.0f} us | "
              f"{rate:.1f} GB/s | {cpu} |")  # fmt: skip


def parity(folder: Path, window: int) -> None:
    """Bits per note on the whole tune-grouped test split of the bundled chorales (the split
    of the model card and ``aurl evaluate``; every piece in full, in windows of ``window``
    tokens whose musical time and grammar features carry the tokens before, as generation
    slides its window; each piece's meter from the cache's index), for PyTorch fp32 and the
    fp32, int8 and int4 graphs of the same model, as table rows, two measures each: the
    **grammar-masked** bits per note (each distribution renormalised over the ids the grammar
    allows, as the sampler draws and the model card reports) and the raw logits' (every id,
    the earlier passes' measure). The issue's int8 parity goal: within 0.02 of fp32."""
    import tempfile

    import numpy as np
    import torch

    from aurl.data.cache import TokenCache, prepare
    from aurl.data.grammar import Grammar
    from aurl.data.vocab import Kind
    from aurl.engines.onnx_engine import OnnxEngine
    from aurl.engines.torch_engine import TorchEngine

    chorales = ROOT / "src/aurl/data/bundled/bach-chorales"
    model = torch_model("shipped").eval()
    with tempfile.TemporaryDirectory() as tmp:
        prepare(chorales, Path(tmp) / "cache", vocab_config=model.vocab_config, workers=1)
        cache = TokenCache(Path(tmp) / "cache")
        rows = [int(r) for r in cache.split_indices("test")]
        pieces = [np.asarray(cache.tokens(r), dtype=np.int64) for r in rows]
        meters = [np.asarray(cache.meters[r], dtype=np.int64)[None] for r in rows]
    grammar = Grammar(model.vocab, 16)
    with torch.no_grad():  # row t: the ids allowed after ids[: t + 1]
        allowed = [grammar.sequence_masks(torch.from_numpy(ids[None]))[0].numpy()
                   for ids in pieces]  # fmt: skip

    def bits(engine) -> tuple[float, float]:
        arr = (lambda x: x) if engine.numpy else torch.from_numpy
        nll = np.zeros(2)
        notes = 0
        for ids, meter, ok in zip(pieces, meters, allowed):
            for w in range(0, len(ids) - 1, window):
                history = arr(ids[None, :w]) if w else None
                state = engine.init_state(1, capacity=window, history=history,
                                          meter=arr(meter))  # fmt: skip
                logits = engine.step(arr(ids[None, w : w + window]), state)[0]
                logits = np.asarray(logits, dtype=np.float64)
                targets = ids[w + 1 : w + 1 + window]  # the last logit predicts the next window
                n = len(targets)
                for k, x in enumerate((np.where(ok[w : w + n], logits[:n], -np.inf), logits[:n])):
                    m = x.max(-1, keepdims=True)
                    logp = x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
                    nll[k] -= logp[np.arange(n), targets].sum()
                notes += int((engine.vocab.kind[targets] == Kind.NOTE_ON).sum())
        masked, raw = nll / np.log(2.0) / notes
        return float(masked), float(raw)

    with torch.no_grad():
        ref = bits(TorchEngine(model))
    rows_out = {"PyTorch fp32": ref}
    for weights in [w for w in ("fp32", "int8", "int4") if (folder / w).is_dir()]:
        rows_out[f"onnxruntime {weights}"] = bits(OnnxEngine(folder / weights))
    from aurl.engines.native_engine import NativeEngine

    for weights in ("fp32", "int8"):
        rows_out[f"Aurl's C step {weights}"] = bits(NativeEngine(SHIPPED, weights=weights))
    n = sum(len(x) for x in pieces)
    fp32 = rows_out.get("onnxruntime fp32", ref)
    print(f"bits/note, tune-grouped test split of the bundled chorales: {len(pieces)} pieces, "
          f"{n} tokens, windows of {window}, meters from the cache")  # fmt: skip
    print("| engine | bits/note, grammar-masked | minus onnxruntime fp32 | raw logits | minus "
          "onnxruntime fp32 |")  # fmt: skip
    print("|---|---|---|---|---|")
    for name, (masked, raw) in rows_out.items():
        print(f"| {name} | {masked:.4f} | {masked - fp32[0]:+.4f} | {raw:.4f} | "
              f"{raw - fp32[1]:+.4f} |")  # fmt: skip


def wall(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds user + system) of one run of ``cmd`` (in ``env``, default
    this process's); the CPU time is what the process itself needed, which other jobs on
    shared cores inflate far less."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    dt = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return dt, cpu


def bytecode_envs(tmp: Path) -> tuple[dict[str, str], dict[str, str]]:
    """The environments of the cold-start rows: ``(installed, from_source)``, both importing
    the aurl this process imports. A pip-installed package has its ``.pyc`` files (pip
    compiles them), so "as installed" runs with bytecode caching on (a warm-up run writes the
    caches first); ``from_source`` runs a copy of the package without ``__pycache__`` folders
    under ``PYTHONDONTWRITEBYTECODE=1``, so aurl's modules are compiled from source on every
    run (site-packages keep their installed ``.pyc``), as on a source checkout of a machine
    that disables bytecode writing (this one does)."""
    import os
    import shutil

    import aurl

    package = Path(aurl.__file__).resolve().parent
    copy = tmp / "nopyc"
    shutil.copytree(package, copy / "aurl", ignore=shutil.ignore_patterns("__pycache__"))
    base = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    rest = [base["PYTHONPATH"]] if base.get("PYTHONPATH") else []
    installed = dict(base, PYTHONPATH=os.pathsep.join([str(package.parent), *rest]))
    from_source = dict(base, PYTHONDONTWRITEBYTECODE="1")
    from_source["PYTHONPATH"] = os.pathsep.join([str(copy), *rest])
    return installed, from_source


BASELINE = "b89066c"  # the commit before the fifth cold-start pass (issue 17)


def entry(pyproject: str) -> str:
    """What the ``aurl`` console script pip writes from ``pyproject`` (the text of a
    pyproject.toml) runs: ``from MODULE import FUNC; sys.exit(FUNC())`` (``python -m aurl``
    adds runpy, ~5 ms)."""
    import re

    found = re.search(r'^aurl\s*=\s*"([\w.]+):(\w+)"', pyproject, re.MULTILINE)
    module, func = found.groups() if found else ("aurl.cli", "main")
    return f"import sys; from {module} import {func}; sys.exit({func}())"


ENTRY = entry((ROOT / "pyproject.toml").read_text())


def baseline_entry(rev: str) -> str:
    """:func:`entry` of commit ``rev``'s pyproject.toml (its own console script)."""
    r = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:pyproject.toml"], capture_output=True, text=True
    )
    return entry(r.stdout)


def baseline_tree(rev: str, tmp: Path) -> Path | None:
    """``src/`` of commit ``rev`` of this repository (``git archive``, no checkout touched),
    or None where git or the commit is missing."""
    import io
    import tarfile

    r = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", rev, "src/aurl"],
        capture_output=True,
    )
    if r.returncode != 0:
        print(f"no baseline: git archive {rev} failed: {r.stderr.decode().strip()}")
        return None
    with tarfile.open(fileobj=io.BytesIO(r.stdout)) as tar:
        tar.extractall(
            tmp / "baseline", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {})
        )
    return tmp / "baseline" / "src"


PHASES = """
import sys, time
t0 = time.perf_counter()
import aurl.cli as cli
import aurl.cli.generate as g
ends = [("aurl.cli imports", time.perf_counter())]
def until(f, name):  # the phase ``name`` ends when ``f`` returns
    def w(*a, **k):
        r = f(*a, **k)
        ends.append((name, time.perf_counter()))
        return r
    return w
def before(f, name):  # the phase ``name`` ends when ``f`` is called
    def w(*a, **k):
        ends.append((name, time.perf_counter()))
        return f(*a, **k)
    return w
g.generation_config = until(g.generation_config, "parser, the run's imports (numpy, aurl.data), options")
g.onnx_engine = until(g.onnx_engine, "engine (onnxruntime + session)")
g.write_pieces = before(g.write_pieces, "generation")
_main = cli.main
def timed(argv=None):
    code = _main(argv)
    ends.append(("files (MIDI, settings)", time.perf_counter()))
    prev, out = t0, []
    for name, t in ends:
        out.append(f"{name} {1e3 * (t - prev):.0f} ms")
        prev = t
    print("phases:", ", ".join(out), f"| total {1e3 * (prev - t0):.0f}", flush=True)
    return code
cli.main = timed  # the console entry (ENTRY) calls it, then exits as the tree's script does
"""


def phases(src: Path, entry_code: str, args: list[str]) -> str:
    """One run of the tree ``src`` in phases (:data:`PHASES`, then ``entry_code``, the tree's
    console entry), with the rest of the process's wall time (interpreter start, the command's
    exit) as the last phase."""
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", PHASES + entry_code, *args],
                       capture_output=True, text=True, env=cold_env(src))  # fmt: skip
    wall = 1e3 * (time.perf_counter() - t)
    lines = [x for x in r.stdout.splitlines() if x.startswith("phases:")]
    if not lines:
        return r.stderr.strip()[-200:]
    line, total = lines[-1].rsplit(" | total ", 1)
    return f"{line}, interpreter start + exit {wall - float(total):.0f} ms (process {wall:.0f} ms)"


def cold_env(src: Path) -> dict[str, str]:
    """This process's environment with bytecode caching on and ``src`` first on the path."""
    import os

    base = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    rest = [base["PYTHONPATH"]] if base.get("PYTHONPATH") else []
    return dict(base, PYTHONPATH=os.pathsep.join([str(src), *rest]))


def cold(args: argparse.Namespace, folder: Path, cpu: str) -> None:
    """The cold-start rows (see the module docstring): medians over ``--rounds`` runs, every
    command alternating round by round; the headline is the int8 command with cached bytecode,
    beside the same command at ``--baseline`` (ratio in the same run)."""
    py = sys.executable
    gen = [py, "-c", ENTRY, "generate", "--max-tokens", "512", "--min-tokens", "504", "--force",
           "--out", str(folder / "pieces")]  # fmt: skip
    onnx = [*gen, "--engine", "onnx", "--checkpoint"]
    installed, from_source = bytecode_envs(folder)
    rows: list[tuple[str, str, list[str], dict[str, str]]] = [
        ("`python -c 'import numpy, onnxruntime'`", "cached", [py, "-c", "import numpy, onnxruntime"], installed),
    ]  # fmt: skip
    if not args.no_torch:
        rows.append(("`python -c 'import torch'`", "cached", [py, "-c", "import torch"], installed))
        if args.shape == "shipped":
            cmd = [*gen, "--checkpoint", str(SHIPPED)]
            rows.append(("`aurl generate` (torch engine, fp32)", "cached", cmd, installed))
    tree = Path(__import__("aurl").__file__).resolve().parents[1]
    base = baseline_tree(args.baseline, folder) if args.baseline else None
    base_entry = baseline_entry(args.baseline) if base is not None else ENTRY
    if base is not None:  # the baseline reads its own export (newer config keys are unknown to it)
        for weights in ("fp32", "int8"):
            export = [py, "-c", base_entry, "export", "--format", "onnx", "--out",
                      str(folder / f"base-{weights}"), *(["--int8"] if weights == "int8" else [])]  # fmt: skip
            subprocess.run(export, check=True, capture_output=True, env=cold_env(base))
    for weights in ("fp32", "int8"):
        cmd = [*onnx, str(folder / weights)]
        name = f"`aurl generate --engine onnx` ({weights} export)"
        rows.append((name, "cached", cmd, installed))
        rows.append((name, "compiled from source", cmd, from_source))
        if base is not None:
            old = [py, "-c", base_entry, *onnx[3:], str(folder / f"base-{weights}")]
            rows.append((f"{name} at {args.baseline}", "cached", old, cold_env(base)))
    if (folder / "int4").is_dir():  # with onnx-int4 in --variants (the default): cached only
        rows.append(("`aurl generate --engine onnx` (int4 export)", "cached",
                     [*onnx, str(folder / "int4")], installed))  # fmt: skip
    default = None  # the command as users type it: the shipped model's cached export
    if args.shape == "shipped":
        from aurl.engines.cpu import onnx_precision

        default = DEFAULT.format(onnx_precision())
        env = dict(installed, AURL_CACHE=str(folder / "cache"))  # written by the unmeasured run
        rows.append((default, "cached", [*gen, "--engine", "onnx"], env))
        if base is not None:  # the baseline's default, from its own cache, right after ours
            env = dict(cold_env(base), AURL_CACHE=str(folder / "base-cache"))
            rows.append((BASE_DEFAULT.format(args.baseline), "cached",
                         [py, "-c", base_entry, *gen[3:], "--engine", "onnx"], env))  # fmt: skip
    for _, _, cmd, env in rows:  # once unmeasured: writes the .pyc files an install has
        subprocess.run(cmd, check=True, capture_output=True, env=env)
    if default is not None:
        print(default_graphs(folder, args.baseline if base is not None else None))
    load = loadavg()
    runs: list[list[tuple[float, float]]] = [[] for _ in rows]
    for r in range(args.rounds):
        order = list(enumerate(rows)) if r % 2 == 0 else list(enumerate(rows))[::-1]
        for i, (_, _, cmd, env) in order:
            runs[i].append(wall(cmd, env))
    print(f"cold start: {args.rounds} rounds alternating, median (min-max); load average "
          f"{load} before, {loadavg()} after; {cpu}")  # fmt: skip
    print("| command | bytecode | wall | process CPU | CPU |")
    print("|---|---|---|---|---|")
    med: dict[tuple[str, str], float] = {}
    for (name, label, _, _), rs in zip(rows, runs):
        times, cpus = [x[0] for x in rs], [x[1] for x in rs]
        med[name, label] = statistics.median(times)
        print(f"| {name} | {label} | {statistics.median(times):.3f} s ({min(times):.2f}-"
              f"{max(times):.2f}) | {statistics.median(cpus):.3f} s | {cpu} |")  # fmt: skip
    int8 = "`aurl generate --engine onnx` (int8 export)"
    line = f"headline: {int8}, cached bytecode: {med[int8, 'cached']:.3f} s median wall"
    if base is not None:
        old = med[f"{int8} at {args.baseline}", "cached"]
        line += (
            f"; at {args.baseline} {old:.3f} s: ratio {old / med[int8, 'cached']:.2f}x "
            "(baseline / this tree)"
        )
    if base is not None:  # the two int8 rows of each round, adjacent in time: one ratio each
        names = [(name, label) for name, label, _, _ in rows]
        ours = [x[0] for x in runs[names.index((int8, "cached"))]]
        then = [x[0] for x in runs[names.index((f"{int8} at {args.baseline}", "cached"))]]
        line += f"; per-round ratio {fmt_ratio(ratio_stats([b / o for b, o in zip(then, ours)]))}"
    print(line)
    if default is not None and base is not None:  # the default command, ours against the baseline's
        names = [(name, label) for name, label, _, _ in rows]
        ours = [x[0] for x in runs[names.index((default, "cached"))]]
        then = [x[0] for x in runs[names.index((BASE_DEFAULT.format(args.baseline), "cached"))]]
        print(f"headline: {default}, cached bytecode: {med[default, 'cached']:.3f} s median wall; "
              f"at {args.baseline} (its own default) {statistics.median(then):.3f} s; per-round "
              f"ratio {fmt_ratio(ratio_stats([b / o for b, o in zip(then, ours)]))} "
              "(baseline / this tree)")  # fmt: skip
    for label, src, int8_dir in [("this tree", tree, "int8")] + (
        [(args.baseline, base, "base-int8")] if base else []
    ):
        code = ENTRY if src == tree else base_entry
        print(f"{label}, one run: {phases(src, code, [*onnx[3:], str(folder / int8_dir)])}")


DEFAULT = "`aurl generate --engine onnx` (no --checkpoint: {}, this CPU's default)"
BASE_DEFAULT = "`aurl generate --engine onnx` (no --checkpoint) at {}: that tree's default"


def default_graphs(folder: Path, baseline: str | None) -> str:
    """Which graphs the default command's rows read: the export folders its unmeasured run
    wrote into each cache (``cache``: this tree's, ``base-cache``: ``baseline``'s), with the
    precision each ``config.json`` records. Raises SystemExit when this tree's cache holds
    other than one folder of :func:`aurl.engines.cpu.onnx_precision`'s precision (the rows
    would not time the default command)."""
    from aurl.engines.cpu import onnx_precision

    said = []
    for label, cache in [("this tree", "cache")] + ([(baseline, "base-cache")] if baseline else []):
        found = sorted(p for p in (folder / cache / "onnx").glob("*/config.json"))
        weights = [json.loads(p.read_text()).get("weights", "fp32") for p in found]
        names = ", ".join(f"{p.parent.name} ({w})" for p, w in zip(found, weights))
        said.append(f"{label}: {names}")
        if cache == "cache" and weights != [onnx_precision()]:
            raise SystemExit(f"the default command read {weights}, not [{onnx_precision()!r}]")
    return "the default command's graphs: " + "; ".join(said)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=["shipped", "full"], default="shipped")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", choices=["decode", "cold", "parts", "parity", "kv", "attention"])
    ap.add_argument(
        "--variants", default=",".join(DEFAULT_VARIANTS),
        help="decode variants, comma-separated (hf, the baseline, always runs)",
    )  # fmt: skip
    ap.add_argument(
        "--baseline", default=BASELINE,
        help=f"cold start: also time the onnx commands at this commit (default {BASELINE}, the "
        "commit before the fifth pass; '' for none)",
    )  # fmt: skip
    ap.add_argument("--no-torch", action="store_true", help="cold start: leave out the torch rows")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        serve_worker(args.worker, args.shape, args.tokens, args.threads, Path(args.folder))
        return 0
    from aurl.engines.cpu import cpu_summary

    cpu, load = cpu_summary(), loadavg()
    if args.only == "attention":  # no export needed
        attention(args.rounds, cpu)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        int4 = "onnx-int4" in args.variants.split(",") or args.only == "parity"
        prepare(args.shape, folder, int4=int4)
        if args.only == "parts":
            parts(folder, args.tokens, args.threads, cpu)
            return 0
        if args.only == "parity":
            parity(folder, window=512)
            return 0
        if args.only == "kv":
            kv(folder, args.rounds, args.threads, cpu)
            return 0
        if args.only not in ("cold", "parts"):
            decode(args, folder, cpu, load)
        if args.only not in ("decode", "parts"):
            cold(args, folder, cpu)
    return 0


if __name__ == "__main__":
    sys.exit(main())
