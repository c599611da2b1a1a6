"""Fine-tuning on a held-out style: the chorale model on ~50 folk tunes, three ways, same steps.

Rows, each scored in bits per note (grammar-masked, as the sampler draws) on the folk corpus's
test split (grouped: no test tune shares a title or a melody with a training tune):

- ``base (no training)``: the base model as it is (zero-shot on folk);
- ``from scratch``: the base's shape, random weights, trained on the folk tunes;
- ``full fine-tune``: ``--init-from BASE``, every weight trained;
- ``LoRA rank R``: ``--init-from BASE --lora R``, only the adapters trained; scored as
  ``aurl generate --adapter`` uses it (the adapter folder merged into the base).

Every run: the same steps, batch, window and schedule; its own learning rate (``--lr-*``: from
scratch and full fine-tuning fixed beforehand, LoRA's picked on the valid split out of 1e-3 and
3e-3; nothing was tuned on the test split), the best checkpoint by validation loss. Also reported: trainable parameters, the adapter's size
on disk, and the process CPU seconds per run (not inflated by other load; use ``--threads 1``).

The base comes from the command line (``--base shipped``, a shipped name or a model folder), so
the numbers can be re-measured when the shipped weights change. The folk tunes: ``--corpus DIR``
(a folder from ``aurl data corpus --name folk``), else ``--limit`` tunes are converted into
``--work``. The first ``--train-tunes`` of the train split (by file name) train; all of the
valid and test splits are kept.

Run:
    .venv/bin/python benchmarks/bench_finetune.py --base shipped --steps 150 --threads 1 \\
        --corpus folk/ --work /tmp/ft --out finetune.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from aurl.config import load_config
from aurl.data.cache import TokenCache, prepare
from aurl.data.grammar import Grammar
from aurl.evaluation.likelihood import score_sequences
from aurl.models.lora import apply_adapter
from aurl.models.pretrained import load_pretrained
from aurl.training.finetune import finetune_config, load_base
from aurl.training.trainer import train


def subset(corpus: Path, out: Path, train_tunes: int) -> dict[str, int]:
    """``out``: the first ``train_tunes`` train files of ``corpus`` and all valid / test files,
    with the manifest entries (groups, so the cache splits as the corpus does)."""
    manifest = json.loads((corpus / "manifest.json").read_text())
    train_files = sorted(e["file"] for e in manifest["files"] if e["split"] == "train")
    keep = set(train_files[:train_tunes])
    entries = [e for e in manifest["files"] if e["split"] != "train" or e["file"] in keep]
    out.mkdir(parents=True, exist_ok=True)
    for e in entries:
        shutil.copyfile(corpus / e["file"], out / e["file"])
    (out / "manifest.json").write_text(json.dumps({**manifest, "files": entries}, indent=1))
    return {s: sum(e["split"] == s for e in entries) for s in ("train", "valid", "test")}


def score(model: torch.nn.Module, cache: Path, window: int) -> dict[str, float]:
    tc = TokenCache(cache)
    rows = tc.split_indices("test")
    seqs = [np.asarray(tc.tokens(int(r)), np.int64) for r in rows]
    meters = [tc.meters[int(r)] for r in rows]
    grammar = Grammar(model.vocab, 16)
    r = score_sequences(model.eval(), seqs, window=window, batch_size=8, grammar=grammar,
                        meters=meters)  # fmt: skip
    return {"bits_per_note": r.bits_per_note, "test_pieces": len(seqs), "test_notes": r.notes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base", default="shipped", help="shipped, a shipped name, or a model folder")
    p.add_argument("--corpus", help="folk corpus folder (default: convert --limit tunes)")
    p.add_argument("--limit", type=int, default=300, help="tunes to convert without --corpus")
    p.add_argument("--train-tunes", type=int, default=50)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lora", type=int, default=8, help="LoRA rank")
    p.add_argument("--lr-scratch", type=float, default=1e-3)
    p.add_argument("--lr-full", type=float, default=1e-4)
    # 3e-3: chosen on the valid split over 1e-3 (BENCHMARKS.md); 10x-30x full fine-tuning's
    p.add_argument("--lr-lora", type=float, default=3e-3)
    p.add_argument("--variants", nargs="+", default=["base", "scratch", "full", "lora"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", help="folder for the data and the runs (default: a temp folder)")
    p.add_argument("--out", help="write the numbers here (JSON)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="aurl-finetune-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = Path(args.corpus) if args.corpus else work / "folk"
    if not args.corpus:
        from aurl.data.folk import build_folk

        build_folk(corpus, limit=args.limit, workers=1)
    base = load_base(args.base)
    data = work / f"folk-{args.train_tunes}"
    if not data.is_dir():
        counts = subset(corpus, data, args.train_tunes)
        print(f"tunes: {counts}", flush=True)
    cache = work / f"cache-{args.train_tunes}"
    if not (cache / "index.npz").is_file():
        prepare(data, cache, vocab_config=base.vocab, workers=1)
    common = [
        f"data.cache={cache}", f"data.window={args.window}", f"data.batch_size={args.batch_size}",
        f"training.max_steps={args.steps}", f"training.warmup_steps={max(1, args.steps // 10)}",
        f"training.eval_every={max(1, args.steps // 3)}", f"training.save_every={args.steps}",
        "training.sample_every=0", "training.keep_best=1", "training.device=cpu",
        f"training.log_every={max(1, args.steps // 10)}", "training.eval_batches=8",
    ]  # fmt: skip
    # parameters, tied ones once (the state dict lists the tied head and embedding both)
    n_base = sum(p.numel() for p in load_pretrained(base.weights.parent).parameters())
    results = []
    for variant in args.variants:
        lr = {"scratch": args.lr_scratch, "full": args.lr_full, "lora": args.lr_lora}.get(variant)
        config = finetune_config(load_config(overrides=[*common, f"training.lr={lr or 0}"]), base)
        run = work / f"run-{variant}"
        shutil.rmtree(run, ignore_errors=True)
        c0 = time.process_time()
        row = {"variant": variant, "lr": lr, "steps": 0, "trained_params": 0, "adapter_bytes": 0}
        if variant == "base":
            model = load_pretrained(base.weights.parent)
        elif variant == "lora":
            train(config, run, init_from=base, lora=args.lora, echo=lambda line: None)
            model = apply_adapter(load_pretrained(base.weights.parent), run / "adapter",
                                  base.weights)  # fmt: skip
            adapter = run / "adapter" / "adapter.safetensors"
            row["adapter_bytes"] = adapter.stat().st_size
            row["trained_params"] = sum(
                v.numel() for v in load_pretrained_tensors(adapter).values()
            )
        else:
            init = base if variant == "full" else None
            train(config, run, init_from=init, echo=lambda line: None)
            model = load_pretrained(run / "model")
            row["trained_params"] = n_base
        if variant != "base":
            row["steps"] = args.steps
        row["train_cpu_s"] = time.process_time() - c0
        row.update(score(model, cache, args.window))
        row["trained_fraction"] = row["trained_params"] / n_base
        results.append(row)
        print(
            f"{variant}: bits/note {row['bits_per_note']:.3f} trained {row['trained_params']:,} "
            f"({100 * row['trained_fraction']:.2f}%) cpu {row['train_cpu_s']:.0f} s",
            flush=True,
        )
    print(table(results, args, base.name))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


def load_pretrained_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def table(results: list[dict], args: argparse.Namespace, base_name: str) -> str:
    names = {"base": "base (no training)", "scratch": "from scratch (same shape)",
             "full": "full fine-tune", "lora": f"LoRA rank {args.lora}"}  # fmt: skip
    lines = [
        f"| {base_name} -> folk, {args.train_tunes} tunes, {args.steps} steps | lr "
        "| bits/note (test) | trained params | % of model | adapter on disk | CPU s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        size = f"{r['adapter_bytes'] / 1024:.0f} KiB" if r["adapter_bytes"] else "-"
        lr = f"{r['lr']:g}" if r["lr"] else "-"
        lines.append(
            f"| {names[r['variant']]} | {lr} | {r['bits_per_note']:.3f} | "
            f"{r['trained_params']:,} | {100 * r['trained_fraction']:.2f}% | {size} | "
            f"{r['train_cpu_s']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
