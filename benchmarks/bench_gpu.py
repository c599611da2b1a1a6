"""Aurl at GPU speed, side by side with Hugging Face GPT-2 of the same shape (issue 16).

One script, under 5 minutes on an H200, printing the table for BENCHMARKS.md:

1. **The quality race** (default 2 minutes each, the same GPU): Aurl's ``full`` preset
   (transformer mode, every musical feature on: musical positions with meter, grammar
   features, the grammar-masked loss, windows starting from their prefix's state) trained by
   :func:`aurl.training.trainer.train` on the bundled chorales' grouped split, against a
   ``GPT2LMHeadModel`` of the same width, depth and heads (SDPA attention) trained on MidiTok
   REMI tokens of the same train files (Aurl's own ids where MidiTok is absent; the table
   says which) by a plain loop: AdamW (fused on CUDA), the preset's lr with linear warmup,
   random windows of the same length and batch, bf16 autocast on CUDA; the same validations
   inside either budget (``--select``, below). Then each scores the test split: bits per note = NLL in bits / the test
   files' notes (one denominator for both tokenizations; Aurl renormalised over the grammar's
   ids, as it samples). With ``--select N`` (default 8) each side also validates N - 1 times
   inside its budget (Aurl every ``budget / N`` of the steps a 20-step calibration before the
   clock predicts; GPT-2 every ``budget / N`` of wall time) and its best state is scored as
   well: at these speeds both sides over-fit 262 chorales within the two minutes (the first
   GPU run, BENCHMARKS.md), so the last step alone measures over-fitting, not quality.
2. **Training throughput and MFU**, read from the race: real (non-padding) tokens per second of
   the steps after the first logged interval, and MFU = (6 N + 12 L d T) x tokens/s / peak
   (:mod:`aurl.training.mfu`; the H200's dense bf16 peak 989 TFLOP/s), with T each window's
   own real length (sum T_i^2 / sum T_i); ``mfu_at_window`` counts T = the window for every
   token, as the ninth session did (it credits attention over padding). ``fill``: the real
   share of the positions the blocks ran over (rows x their width). With ``--throughput`` Aurl
   trains twice, unpacked and packed (``data.pack``: several windows back to back in each row,
   block-diagonal attention); GPT-2 trains as before on random windows of its REMI sequences,
   right-padded to the window where a piece is shorter (its ``fill`` says how much).
3. **Decoding**, batch 1 and batch 64, ``--decode`` tokens after a 16-token prompt, sampling at
   temperature 1: Aurl's eager step loop (``model.step``, the grammar's mask, a draw, one host
   sync per token, as the generation loop runs), Aurl's static-cache step
   (:class:`aurl.generation.graphed.StaticDecoder`, one CUDA graph per token on CUDA; also with
   the step fused by ``torch.compile`` before the capture, on CUDA only, its compile untimed),
   and HF ``generate`` (KV cache, sampling) of the race's GPT-2.

The corpus is prepared on the CPU first (``--prepare DIR``: the cache, and the REMI ids when
MidiTok is installed), so that the GPU machine needs only torch, transformers and Aurl's source
(no symusic, music21 or miditok there). ``--smoke``: tiny preset, 30 chorales, seconds of
budget, on the CPU; the test suite runs it to check the plumbing.

Run:
    .venv/bin/python benchmarks/bench_gpu.py --prepare .bench     # here, on the CPU, once
    python3 benchmarks/bench_gpu.py --work .bench --device cuda   # on the GPU (BENCHMARKS.md)
    .venv/bin/python benchmarks/bench_gpu.py --smoke              # seconds, on the CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from aurl.config import load_config
from aurl.data.cache import TokenCache, prepare
from aurl.data.corpus import build_corpus
from aurl.data.grammar import Grammar
from aurl.data.vocab import PAD
from aurl.evaluation.likelihood import score_sequences
from aurl.models import layers
from aurl.training import mfu

LN2 = math.log(2.0)
PROMPT = 16


# --------------------------------------------------------------------------------------------
# Data, prepared on the CPU
# --------------------------------------------------------------------------------------------


def prepare_work(work: Path, smoke: bool) -> None:
    """The grouped chorale cache in ``work/cache`` and, with MidiTok, ``work/remi.npz`` (REMI
    ids of every cached file, by cache row). Kept when already there."""
    cache_dir = work / "cache"
    if not (cache_dir / "index.npz").is_file():
        build_corpus("bach-chorales", work / "corpus", workers=1)
        if smoke:  # 30 pieces: a few in each split
            for path in sorted((work / "corpus").rglob("*.mid"))[30:]:
                path.unlink()
        prepare(work / "corpus", cache_dir, workers=1)
    remi = work / "remi.npz"
    if remi.is_file():
        return
    try:
        from miditok import REMI, TokenizerConfig
    except ImportError:
        print("miditok is not installed: the GPT-2 baseline will read Aurl's ids")
        return
    tok = REMI(TokenizerConfig(use_programs=True, one_token_stream_for_programs=True,
                               use_tempos=True, use_velocities=True))  # fmt: skip
    cache = TokenCache(cache_dir)
    rows = {}
    for i in range(len(cache)):
        ids = tok.encode(work / "corpus" / cache.relpath(i)).ids
        rows[f"row{i}"] = np.array([tok.vocab["BOS_None"], *ids, tok.vocab["EOS_None"]], np.int64)
    np.savez(remi, vocab_size=len(tok), pad=tok.pad_token_id, bos=tok.vocab["BOS_None"],
             eos=tok.vocab["EOS_None"], **rows)  # fmt: skip


def baseline_sequences(work: Path, cache: TokenCache) -> tuple[dict, str]:
    """(train/test id arrays, vocab size, pad id) for GPT-2, and which tokens they are."""
    train_rows, test_rows = cache.split_indices("train"), cache.split_indices("test")
    valid_rows = cache.split_indices("valid")
    remi = work / "remi.npz"
    if remi.is_file():
        z = np.load(remi)
        seqs = {k: [z[f"row{i}"] for i in rows] for k, rows in
                (("train", train_rows), ("valid", valid_rows), ("test", test_rows))}  # fmt: skip
        return {**seqs, "vocab": int(z["vocab_size"]), "pad": int(z["pad"])}, "REMI"
    seqs = {k: [np.asarray(cache.tokens(int(i)), np.int64) for i in rows]
            for k, rows in (("train", train_rows), ("valid", valid_rows),
                            ("test", test_rows))}  # fmt: skip
    return {**seqs, "vocab": 774, "pad": PAD}, "aurl ids"


# --------------------------------------------------------------------------------------------
# The race
# --------------------------------------------------------------------------------------------


def aurl_race(config, work: Path, device: torch.device, *, scored: bool = True,
              select: int = 0) -> tuple[dict, torch.nn.Module]:  # fmt: skip
    """Aurl's side of the race (module docstring); ``select``: validations in the budget, the
    interval in steps from a 20-step calibration run before the clock starts."""
    from aurl.training.checkpoint import best_checkpoints, load_weights
    from aurl.training.trainer import train

    every = None
    if select:
        calib = work / "race-aurl-calib"
        shutil.rmtree(calib, ignore_errors=True)
        short = dataclasses.replace(config.training, max_steps=20, max_minutes=0.0, log_every=5)
        train(dataclasses.replace(config, training=short), calib, echo=lambda line: None)
        recs = [json.loads(x) for x in (calib / "metrics.jsonl").read_text().splitlines()]
        step_s = statistics.median(r["step_s"] for r in recs if r.get("kind") == "train")
        every = max(1, int(config.training.max_minutes * 60 / select / step_s))
        config = dataclasses.replace(config, training=dataclasses.replace(
            config.training, eval_every=every, save_every=every, keep_best=1))  # fmt: skip
    run = work / "race-aurl"
    shutil.rmtree(run, ignore_errors=True)  # a fresh run each time (a second call would resume)
    result = train(config, run, echo=lambda line: None)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in records if r.get("kind") == "train"]
    if not train_recs:
        raise RuntimeError(f"no training step was logged in {run}: raise --minutes")
    steady = train_recs[1:] or train_recs  # the first interval holds the warm-up
    model = result.model.eval()
    bits = best_bits = best_step = None
    if scored:
        cache = TokenCache(config.data.cache)
        rows = cache.split_indices("test")
        seqs = [np.asarray(cache.tokens(int(r)), np.int64) for r in rows]

        def test_bits() -> float:
            return score_sequences(
                model, seqs, window=config.data.window, batch_size=config.data.batch_size,
                grammar=Grammar(model.vocab, config.data.polyphony_cap),
                meters=[cache.meters[int(r)] for r in rows],
            ).bits_per_note  # fmt: skip

        bits = test_bits()
        best = best_checkpoints(run, 1) if select else []
        if best:
            load_weights(model, best[0] / "model.safetensors")
            best_step, best_bits = int(best[0].name.split("-")[-1]), test_bits()
    tok_s = statistics.median(r["tok_per_s"] for r in steady)
    params = sum(p.numel() for p in model.parameters())
    peak = mfu.peak_tflops(device, config.training.peak_tflops)
    c = config.model
    at_window = mfu.flops_per_token(params, c.n_layers, c.d_model, config.data.window)
    out = {
        "steps": result.step, "bits_per_note": bits, "bits_per_note_best": best_bits,
        "best_step": best_step, "eval_every": every, "tok_per_s": tok_s,
        "mfu": statistics.median(r["mfu"] for r in steady) if "mfu" in steady[-1] else None,
        "mfu_at_window": mfu.mfu(tok_s, at_window, peak) if peak else None,
        "fill": statistics.median(r["fill"] for r in steady), "params": params,
        "pack": config.data.pack,
    }  # fmt: skip
    return out, model


def warm_flex_attention(config, device: torch.device) -> None:
    """Compile FlexAttention's forward and backward for the packed rows' shape (batch x heads x
    window x head width, bf16) before a packed race, so its first step does not spend the
    compile inside the race's minutes (the trainer's later calls reuse the kernels: same
    shapes, a new document mask per batch). Nothing to do off CUDA."""
    if device.type != "cuda" or not layers.has_flex_attention():
        return
    c, B, W = config.model, config.data.batch_size, config.data.window
    segment = (torch.arange(W, device=device) * 3 // W).expand(B, W).contiguous()  # 3 a row
    mask = layers.BlockDiagonal.of(segment)
    shape = (B, c.n_heads, W, c.d_model // c.n_heads)
    q, k, v = (torch.randn(shape, device=device, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))  # fmt: skip
    mask.attend(q, k, v).float().sum().backward()
    torch.cuda.synchronize(device)


def gpt2_model(config, vocab: int, window: int, device: torch.device):
    from transformers import GPT2Config, GPT2LMHeadModel

    c = config.model
    cfg = GPT2Config(
        vocab_size=vocab, n_positions=window + 1, n_embd=c.d_model, n_layer=c.n_layers,
        n_head=c.n_heads, n_inner=c.ff_mult * c.d_model, resid_pdrop=c.dropout,
        embd_pdrop=c.dropout, attn_pdrop=c.dropout, bos_token_id=None, eos_token_id=None,
        attn_implementation="sdpa",
    )  # fmt: skip
    return GPT2LMHeadModel(cfg).to(device)


def gpt2_race(config, seqs: dict, notes: int, minutes: float, device: torch.device,
              peak: float | None, *, scored: bool = True, select: int = 0
              ) -> tuple[dict, torch.nn.Module]:  # fmt: skip
    """The plain loop on random windows for ``minutes`` of wall time (module docstring);
    ``select``: validations at equal intervals of the budget, the best state kept."""
    window, batch, pad = config.data.window, config.data.batch_size, seqs["pad"]
    torch.manual_seed(0)
    model = gpt2_model(config, seqs["vocab"], window, device).train()
    t = config.training
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2),
                            weight_decay=t.weight_decay, fused=device.type == "cuda" or None)  # fmt: skip
    rng = np.random.default_rng(0)
    lengths = np.array([len(s) for s in seqs["train"]], dtype=np.float64)
    bf16 = device.type == "cuda"
    step, tokens, timed_s, t0 = 0, 0, 0.0, time.perf_counter()
    all_real = all_sq = all_positions = 0  # the whole run's: rows' real share, MFU's context
    rates = []
    best: tuple[float, int, dict] | None = None  # (valid nll, step, state)
    next_eval = minutes * 60 / select if select else math.inf
    while time.perf_counter() - t0 < minutes * 60:
        if time.perf_counter() - t0 >= next_eval:  # inside the budget, as Aurl's validations are
            next_eval += minutes * 60 / select
            model.eval()
            nll = score_sequences(model, seqs["valid"], window=window, batch_size=batch).nll
            model.train()
            if best is None or nll < best[0]:
                best = (nll, step, {k: v.detach().clone() for k, v in model.state_dict().items()})
        s0 = time.perf_counter()  # the step's time includes drawing its batch, as Aurl's does
        ids = np.full((batch, window + 1), pad, dtype=np.int64)
        for r, i in enumerate(rng.choice(len(lengths), size=batch, p=lengths / lengths.sum())):
            s = seqs["train"][i]
            start = rng.integers(0, max(1, len(s) - window))
            piece = s[start : start + window + 1]
            ids[r, : len(piece)] = piece
        row_real = (ids[:, 1:] != pad).sum(1)  # (batch,) real targets of each row
        real = int(row_real.sum())
        all_real, all_sq = all_real + real, all_sq + int((row_real**2).sum())
        all_positions += batch * window
        x = torch.from_numpy(ids).to(device, non_blocking=True)
        for g in opt.param_groups:
            g["lr"] = t.lr * min(1.0, (step + 1) / max(t.warmup_steps, 1))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), ignore_index=pad
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        step += 1
        if step % 10 == 0:
            float(loss.detach())  # the sync a log line makes
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timed_s += time.perf_counter() - s0
        tokens += real
        if step % 10 == 0 or device.type == "cpu":
            rates.append(tokens / timed_s)
            tokens, timed_s = 0, 0.0
    tok_s = statistics.median(rates[1:] or rates) if rates else tokens / max(timed_s, 1e-9)
    model.eval()
    bits = best_bits = None
    if scored:
        bits = (
            score_sequences(model, seqs["test"], window=window, batch_size=batch).nll / LN2 / notes
        )
        if best is not None:
            model.load_state_dict(best[2])
            test = score_sequences(model, seqs["test"], window=window, batch_size=batch)
            best_bits = test.nll / LN2 / notes
    n = sum(p.numel() for p in model.parameters())
    L, d = config.model.n_layers, config.model.d_model
    per_token = mfu.flops_per_token(n, L, d, mfu.attention_context(all_sq, all_real))
    at_window = mfu.flops_per_token(n, L, d, window)
    out = {
        "steps": step, "bits_per_note": bits, "tok_per_s": tok_s, "bits_per_note_best": best_bits,
        "best_step": best[1] if best is not None else None,
        "mfu": mfu.mfu(tok_s, per_token, peak) if peak else None,
        "mfu_at_window": mfu.mfu(tok_s, at_window, peak) if peak else None,
        "fill": all_real / max(all_positions, 1), "params": n,
    }  # fmt: skip
    return out, model


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def aurl_decode(model, prompt: torch.Tensor, n: int, *, graphed: bool | None,
                fused: bool = False) -> float:  # fmt: skip
    """Tokens per second (all rows) of ``n`` tokens after ``prompt`` (B, PROMPT): the static
    decoder (``graphed``: its CUDA graph, or False: the same step eager) or, with None, the
    eager loop of ``model.step``, the grammar's mask and a draw (a host sync per token). The
    prompt and the graph's capture are not timed."""
    from aurl.generation.graphed import GraphedOptions, StaticDecoder
    from aurl.generation.sampling import SamplingOptions, sample

    device, B = prompt.device, prompt.shape[0]
    grammar = Grammar(model.vocab, polyphony_cap=8)
    meter = torch.tensor([[4, 4]] * B, device=device)
    state = model.init_state(B, capacity=PROMPT + n + 1, meter=meter)
    model.step(prompt[:, :-1], state)
    if graphed is not None:  # the capture (once per decoder) is not timed
        dec = StaticDecoder(model, state, grammar=grammar, graphs=graphed,
                            options=GraphedOptions(temperature=1.0, compile=fused))  # fmt: skip
        dec.capture()
    _sync(device)
    t0 = time.perf_counter()
    if graphed is None:
        gstate = grammar.state_after(prompt[:, :-1])
        last, options = prompt[:, -1:], SamplingOptions()
        for _ in range(n):
            gstate = grammar.advance(gstate, last[:, 0])
            logits = model.step(last, state)[:, 0]
            logits = logits.masked_fill(~grammar.allowed(gstate), float("-inf"))
            last = sample(logits, options)[:, None]
            last.cpu()  # the generation loop reads each id on the host
    else:
        dec.generate(prompt[:, -1], n, seed=0).cpu()
    _sync(device)
    return B * n / (time.perf_counter() - t0)


@torch.no_grad()
def hf_decode(model, prompt: torch.Tensor, n: int) -> float:
    device, B = prompt.device, prompt.shape[0]
    model.eval()
    _sync(device)
    t0 = time.perf_counter()
    model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=True, top_k=0,
                   pad_token_id=0, attention_mask=torch.ones_like(prompt))  # fmt: skip
    _sync(device)
    return B * n / (time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


def table(r: dict) -> str:
    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    a, g = r["aurl"], r.get("gpt2")
    gpt = f"HF GPT-2 ({r['baseline_tokens']})"
    if a is None:  # --decode-only
        lines = [f"| {r['device']}, {r['preset']} shape, untrained weights | Aurl | {gpt} |",
                 "|---|---|---|"]  # fmt: skip
        return "\n".join(lines + _decode_lines(r, num))
    lines = [
        f"| {r['device']}, {r['preset']} shape, batch {r['batch']} x {r['window']}, "
        f"race {r['minutes']} min | Aurl | {gpt} |",
        "|---|---|---|",
        f"| parameters | {a['params'] / 1e6:.1f}M | {num(g and g['params'] / 1e6, '.1f')}M |",
        f"| train tokens/s (real tokens) | {a['tok_per_s']:,.0f} "
        f"| {num(g and g['tok_per_s'], ',.0f')} |",
        f"| MFU (attention over each window's own length) "
        f"| {num(a['mfu'] and 100 * a['mfu'], '.1f')}% "
        f"| {num(g and g['mfu'] and 100 * g['mfu'], '.1f')}% |",
        f"| MFU (attention over the whole window, the ninth session's count) "
        f"| {num(a.get('mfu_at_window') and 100 * a['mfu_at_window'], '.1f')}% "
        f"| {num(g and g.get('mfu_at_window') and 100 * g['mfu_at_window'], '.1f')}% |",
        f"| real share of the rows | {num(a.get('fill'), '.3f')} "
        f"| {num(g and g.get('fill'), '.3f')} |",
        f"| optimizer steps in the race | {a['steps']} | {num(g and g['steps'], 'd')} |",
        f"| test bits/note, last step | {num(a['bits_per_note'], '.3f')} "
        f"| {num(g and g['bits_per_note'], '.3f')} |",
        f"| test bits/note, best of the validations (its step) "
        f"| {num(a.get('bits_per_note_best'), '.3f')} ({num(a.get('best_step'), 'd')}) "
        f"| {num(g and g.get('bits_per_note_best'), '.3f')} "
        f"({num(g and g.get('best_step'), 'd')}) |",
    ]
    p = r.get("aurl_packed")
    if p:
        lines.append(
            f"| Aurl packed (data.pack, {p['attention']}): train tokens/s (real) / MFU / "
            f"at window / real share "
            f"| {p['tok_per_s']:,.0f} / {num(p['mfu'] and 100 * p['mfu'], '.1f')}% / "
            f"{num(p['mfu_at_window'] and 100 * p['mfu_at_window'], '.1f')}% / "
            f"{p['fill']:.3f} (x{p['tok_per_s'] / a['tok_per_s']:.2f} unpacked) | - |"
        )
    return "\n".join(lines + _decode_lines(r, num))


def _decode_lines(r: dict, num) -> list[str]:
    lines = []
    for b, d in r["decode"].items():
        lines.append(
            f"| decode batch {b}, tokens/s: Aurl graphed / graphed + compiled / static eager / "
            f"step loop; HF generate | {num(d['graphed'], ',.0f')} / "
            f"{num(d.get('compiled'), ',.0f')} / {num(d['static'], ',.0f')} / "
            f"{num(d['eager'], ',.0f')} "
            f"| {num(d.get('hf'), ',.0f')} |"
        )
    return lines


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prepare", metavar="DIR", help="only prepare the data into DIR (CPU)")
    p.add_argument("--work", help="prepared folder (default: a temp folder, prepared here)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="full")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--minutes", type=float, default=2.0, help="race budget per model")
    p.add_argument("--decode", type=int, default=256, help="tokens per decoding run")
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--compile", action="store_true", help="training.compile for Aurl")
    p.add_argument("--select", type=int, default=8,
                   help="validations inside each side's budget, the best kept and scored too "
                        "(0: none, the first race's protocol)")  # fmt: skip
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="Aurl overrides")
    p.add_argument("--out", help="write the results as JSON here (also after each part)")
    p.add_argument(
        "--throughput",
        action="store_true",
        help="training tokens/s and MFU only: no scoring, no decoding",
    )
    p.add_argument(
        "--decode-only", action="store_true",
        help="decoding speeds only, on untrained models of the same shapes (no race: seconds)",
    )  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.preset, args.window, args.batch = "tiny", 64, 4
        args.minutes, args.decode, args.decode_batches = 0.05, 8, [1, 3]
    if args.prepare:
        prepare_work(Path(args.prepare), args.smoke)
        return {}
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        prepare_work(work, args.smoke)  # no-op when prepared
        results = run(args, work, device, save=lambda r: _save(r, args.out))
    print(table(results))
    _save(results, args.out)
    return results


def _save(results: dict, out: str | None) -> None:
    if out:
        Path(out).write_text(json.dumps(results, indent=2) + "\n")


def _guarded(what: str, fn, results: dict):
    """``fn()``, or None with the error recorded in ``results["errors"]`` (a lent GPU's minutes
    are few: one part that fails must not take the others' numbers with it)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - recorded and printed, the run goes on
        import traceback

        traceback.print_exc()
        results.setdefault("errors", {})[what] = f"{type(e).__name__}: {e}"
        return None


def run(args: argparse.Namespace, work: Path, device: torch.device, save=lambda r: None) -> dict:
    cuda = device.type == "cuda"
    overrides = [
        f"data.cache={work / 'cache'}", f"data.window={args.window}",
        f"data.batch_size={args.batch}", f"training.device={device}",
        f"data.num_workers={4 if cuda else 0}",  # augmentation and collate beside the GPU
        f"training.max_minutes={args.minutes}", "training.max_steps=100000",
        "training.eval_every=100000", "training.save_every=100000", "training.keep_best=0",
        "training.sample_every=0", f"training.log_every={1 if args.smoke else 10}",
        f"training.precision={'bf16' if cuda else 'fp32'}",
        f"training.compile={str(args.compile).lower()}", *args.set,
    ]  # fmt: skip
    config = load_config(preset=args.preset, overrides=overrides)
    peak = mfu.peak_tflops(device, config.training.peak_tflops)
    results: dict = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu", "preset": args.preset,
        "batch": args.batch, "window": args.window, "minutes": args.minutes,
        "peak_tflops": peak, "decode": {},
    }  # fmt: skip
    if args.decode_only:  # decoding speed does not depend on the weights: no race
        return decode_only(args, config, work, device, results, save)
    scored = not args.throughput
    select = 0 if args.throughput else args.select
    aurl, model = aurl_race(config, work, device, scored=scored, select=select)
    results["aurl"] = aurl
    print("aurl:", json.dumps(aurl), flush=True)
    save(results)
    if args.throughput:  # the same training on packed rows (data.pack), right after
        packed = load_config(preset=args.preset, overrides=[*overrides, "data.pack=true"])
        attention = "FlexAttention" if cuda and layers.has_flex_attention() else "dense mask"
        t0 = time.perf_counter()
        _guarded("flex warm-up", lambda: warm_flex_attention(packed, device), results)
        results["flex_warmup_s"] = time.perf_counter() - t0
        raced = None
        if "flex warm-up" not in results.get("errors", {}):  # compiled, or nothing to compile
            raced = _guarded("aurl packed", lambda: aurl_race(packed, work, device, scored=False),
                             results)  # fmt: skip
        if raced is None and cuda:  # a second try under the dense mask, recorded as such
            layers.FLEX_ON_CUDA, attention = False, "dense mask"
            raced = _guarded(
                "aurl packed, dense mask",
                lambda: aurl_race(packed, work, device, scored=False),
                results,
            )
        results["aurl_packed"] = {**raced[0], "attention": attention} if raced else None
        print("aurl packed:", json.dumps(results["aurl_packed"]), flush=True)
        save(results)
    cache = TokenCache(work / "cache")
    gpt2 = None
    seqs = hf_sequences(work, cache, results)
    if seqs is not None:
        notes = int(cache.notes[cache.split_indices("test")].sum())
        raced = _guarded("gpt2", lambda: gpt2_race(config, seqs, notes, args.minutes, device,
                                                   peak, scored=scored, select=select),
                         results)  # fmt: skip
        results["gpt2"], gpt2 = raced or (None, None)
        print("gpt2:", json.dumps(results["gpt2"]), flush=True)
        save(results)
    if args.throughput:
        return results
    decode_all(args, cache, model, gpt2, seqs, device, results, save)
    return results


def hf_sequences(work: Path, cache: TokenCache, results: dict) -> dict | None:
    """GPT-2's sequences (:func:`baseline_sequences`), or None where transformers is not
    installed; ``results["baseline_tokens"]`` says which tokens (or ``absent``)."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("transformers is not installed: no GPT-2 baseline")
        results["baseline_tokens"] = "absent"
        return None
    seqs, results["baseline_tokens"] = baseline_sequences(work, cache)
    return seqs


def decode_only(args: argparse.Namespace, config, work: Path, device: torch.device,
                results: dict, save) -> dict:  # fmt: skip
    """``--decode-only``: the decoding part alone, on untrained models of the race's shapes
    (Aurl's preset, GPT-2 of the same width and depth over the REMI vocabulary): every path
    decodes exactly ``--decode`` tokens whatever the weights say (HF's ``min_new_tokens``, no
    END in the static and eager loops' counts), so the speeds are those of trained models, in
    seconds instead of the race's four minutes."""
    from aurl.models import build_model

    torch.manual_seed(0)
    model = build_model(config).to(device).eval()
    results["aurl"] = results["gpt2"] = None
    cache = TokenCache(work / "cache")
    seqs = hf_sequences(work, cache, results)
    gpt2 = None if seqs is None else gpt2_model(config, seqs["vocab"], args.window, device).eval()
    decode_all(args, cache, model, gpt2, seqs, device, results, save)
    return results


def decode_all(args: argparse.Namespace, cache: TokenCache, model, gpt2, seqs: dict | None,
               device: torch.device, results: dict, save) -> None:  # fmt: skip
    """Batch-1 and batch-64 decoding (module docstring, part 3) into ``results["decode"]``."""
    cuda = device.type == "cuda"
    row = np.asarray(cache.tokens(int(cache.split_indices("test")[0])), np.int64)[:PROMPT]
    for b in args.decode_batches:
        prompt = torch.from_numpy(np.tile(row, (b, 1))).to(device)
        d = {
            name: _guarded(f"decode {b} {name}",
                           partial(aurl_decode, model, prompt, args.decode, graphed=g, fused=f),
                           results)  # fmt: skip
            for name, g, f in (("graphed", cuda, False), ("compiled", cuda, True),
                               ("static", False, False), ("eager", None, False))
            if cuda or not f  # inductor on the CPU: a minute of C++ for a smoke run
        }  # fmt: skip
        if gpt2 is not None:
            start = seqs["test"][0][:PROMPT]
            hf_prompt = torch.from_numpy(np.tile(start, (b, 1))).to(device)
            d["hf"] = _guarded(f"decode {b} hf", partial(hf_decode, gpt2, hf_prompt, args.decode),
                               results)  # fmt: skip
        results["decode"][b] = d
        print(f"decode {b}:", json.dumps(d), flush=True)
        save(results)


if __name__ == "__main__":
    main()
