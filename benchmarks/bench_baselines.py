"""Baselines in bits per note: Aurl's small model vs MidiTok REMI + Hugging Face GPT-2.

Both models get the same treatment: the same chorale files in the same train/test split (our
cache's hash split), the same parameter count (GPT-2's width and depth are searched to match the
``small`` preset's count), the same training loop (AdamW, lr and batch of the ``small`` preset,
linear warmup, random windows of the preset's length) for the same budget of process CPU time
(``time.process_time``: CPU seconds of this process, so other load on the machine does not eat
into it), and the same windowed scoring (:func:`aurl.evaluation.likelihood.score_sequences`).
A 4-gram Kneser-Ney model over each tokenization is reported beside them.

Bits per note = total NLL in bits / the number of notes of the test files (NOTE_ONs in our
cache: one denominator for both tokenizations; REMI's own Pitch-token count is printed too).

Run (the lead runs the full budget; the default is the preset's hour):
    .venv/bin/python benchmarks/bench_baselines.py --minutes 60 --threads 2 --out baselines.json
    .venv/bin/python benchmarks/bench_baselines.py --smoke     # a minute: checks the plumbing
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from aurl.config import load_config
from aurl.data.cache import TokenCache, prepare
from aurl.data.corpus import build_corpus
from aurl.evaluation.likelihood import score_sequences
from aurl.evaluation.ngram import NgramModel
from aurl.models import build_model

LN2 = math.log(2.0)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are listed once


def remi_tokenizer():
    from miditok import REMI, TokenizerConfig

    cfg = TokenizerConfig(
        use_programs=True, one_token_stream_for_programs=True, use_tempos=True,
        use_velocities=True,
    )  # fmt: skip
    return REMI(cfg)


def remi_ids(tok, path: Path) -> np.ndarray:
    """BOS + REMI ids of one file + EOS (the same START ... END framing as ours)."""
    seq = tok.encode(path)
    return np.array([tok.vocab["BOS_None"], *seq.ids, tok.vocab["EOS_None"]], dtype=np.int64)


def gpt2_like(target: int, vocab_size: int, window: int, bos: int, eos: int):
    """A GPT-2 whose parameter count is closest to ``target`` (width in steps of 64)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    best = None
    for layers in range(1, 13):
        for width in range(64, 1025, 64):
            # per block: attention 4 w^2 + 4 w, MLP 8 w^2 + 5 w, two LayerNorms 4 w
            count = layers * (12 * width * width + 13 * width)
            count += (vocab_size + window) * width + 2 * width  # embeddings (head tied), final LN
            if best is None or abs(count - target) < abs(best[0] - target):
                best = (count, layers, width)
    _, layers, width = best
    cfg = GPT2Config(
        vocab_size=vocab_size, n_positions=window, n_embd=width, n_layer=layers,
        n_head=max(1, width // 64), resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
        bos_token_id=bos, eos_token_id=eos,
    )  # fmt: skip
    return GPT2LMHeadModel(cfg)


def batches(seqs: list[np.ndarray], window: int, batch: int, pad: int, rng):
    """Endless random windows (B, window + 1) from ``seqs``, longer pieces drawn more often."""
    lengths = np.array([len(s) for s in seqs], dtype=np.float64)
    p = lengths / lengths.sum()
    while True:
        out = np.full((batch, window + 1), pad, dtype=np.int64)
        for r, i in enumerate(rng.choice(len(seqs), size=batch, p=p)):
            s = seqs[i]
            start = rng.integers(0, max(1, len(s) - window))
            piece = s[start : start + window + 1]
            out[r, : len(piece)] = piece
        yield torch.from_numpy(out)


def train(model, seqs, *, window, batch, lr, cpu_seconds, pad, warmup=100, seed=0) -> dict:
    """AdamW on random windows until ``cpu_seconds`` of process CPU time are spent."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    t0, step, loss_v = time.process_time(), 0, float("nan")
    for ids in batches(seqs, window, batch, pad, np.random.default_rng(seed)):
        if time.process_time() - t0 >= cpu_seconds:
            break
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warmup)
        logits = model(ids[:, :-1]).logits  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), ignore_index=pad
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step, loss_v = step + 1, loss.item()
    return {"steps": step, "cpu_seconds": time.process_time() - t0, "last_loss": loss_v}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=60.0, help="CPU minutes per model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny split and budget")
    ap.add_argument("--work", default="", help="folder for corpus and cache (default: temp)")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    ap.add_argument("--ngram-only", action="store_true", help="only the n-gram baselines")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    budget = 8.0 if args.smoke else args.minutes * 60

    work = Path(args.work or tempfile.mkdtemp(prefix="aurl-baselines-"))
    config = load_config(preset="small")
    build_corpus("bach-chorales", work / "corpus", workers=1)
    prepare(work / "corpus", work / "cache", vocab_config=config.vocab, workers=1)
    cache = TokenCache(work / "cache")
    train_rows, test_rows = cache.split_indices("train"), cache.split_indices("test")
    if args.smoke:
        train_rows, test_rows = train_rows[:20], test_rows[:4]
    window = 64 if args.smoke else config.data.window
    notes = int(cache.notes[test_rows].sum())  # one denominator for both tokenizations

    ours_train = [np.asarray(cache.tokens(i), np.int64) for i in train_rows]
    ours_test = [np.asarray(cache.tokens(i), np.int64) for i in test_rows]
    tok = remi_tokenizer()
    files = lambda rows: [work / "corpus" / cache.relpath(i) for i in rows]  # noqa: E731
    remi_train = [remi_ids(tok, p) for p in files(train_rows)]
    remi_test = [remi_ids(tok, p) for p in files(test_rows)]
    remi_pitches = sum(
        int(np.isin(s, [v for k, v in tok.vocab.items() if k.startswith("Pitch_")]).sum())
        for s in remi_test
    )

    ours = build_model(config)
    gpt2 = gpt2_like(n_params(ours), len(tok), window, tok.vocab["BOS_None"], tok.vocab["EOS_None"])
    results = {
        "budget_cpu_seconds": budget, "threads": args.threads, "window": window,
        "train_files": len(train_rows), "test_files": len(test_rows), "test_notes": notes,
        "remi_test_pitch_tokens": remi_pitches,
    }  # fmt: skip
    runs = [
        ("aurl small", ours, ours_train, ours_test, 2),
        ("REMI + GPT-2", gpt2, remi_train, remi_test, tok.pad_token_id),
    ]
    for name, model, tr, te, pad in [] if args.ngram_only else runs:
        fit = train(model, tr, window=window, batch=config.data.batch_size,
                    lr=config.training.lr, cpu_seconds=budget, pad=pad)  # fmt: skip
        r = score_sequences(model, te, window=window, batch_size=8)
        results[name] = {
            "parameters": n_params(model), **fit, "test_tokens": r.tokens,
            "loss": r.loss, "bits_per_note": r.nll / LN2 / notes,
        }  # fmt: skip
        print(
            f"{name:14s} params {n_params(model):>9,d} steps {fit['steps']:>6d} "
            f"cpu {fit['cpu_seconds']:.0f}s loss {r.loss:.3f} bits/note {r.nll / LN2 / notes:.3f}"
        )
    for name, tr, te, size in [
        ("4-gram ours", ours_train, ours_test, ours.vocab.size),
        ("4-gram REMI", remi_train, remi_test, len(tok)),
    ]:
        r = NgramModel(4, size).fit(tr).score(te)
        results[name] = {"loss": r.loss, "bits_per_note": r.nll / LN2 / notes}
        print(f"{name:14s} loss {r.loss:.3f} bits/note {r.nll / LN2 / notes:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
