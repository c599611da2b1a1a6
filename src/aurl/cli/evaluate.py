"""``aurl evaluate``: likelihood, musical metrics, set distances and baselines, as a report.

Writes ``metrics.json`` and ``report.md`` (with ``plots/``) into ``--out``: bits per note of the
model and of a token n-gram baseline on one split, metric summaries of generated samples and of
the split's pieces, and Yang & Lerch distances between the two sets. torch and matplotlib load
only inside the command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    from aurl.cli.generate import add_adapter_argument, add_model_argument, add_precision_arguments
    from aurl.engines.cpu import COMPOSING_QUANTIZED

    p = sub.add_parser(
        "evaluate",
        help="score a model: bits per note, musical metrics, distances to real music, report",
        description="Evaluate a model on a split of a token cache (or a folder of MIDI files, "
        "prepared into OUT/cache first; unreadable files are reported and skipped): likelihood "
        "(loss, perplexity, bits per note) next to a token n-gram baseline, N generated samples "
        "against the split's pieces on musical metrics (MusPy / Yang & Lerch), and a report. "
        "Without --checkpoint the shipped model is evaluated.",
    )
    p.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="model folder (save_pretrained), training checkpoint, or run folder "
        "(its latest checkpoint; its training curves go into the report)",
    )
    add_model_argument(p)
    add_adapter_argument(p)
    p.add_argument(
        "--data", metavar="DIR_OR_CACHE",
        help="token cache or MIDI folder (required; with --task harmonize: a folder of "
        "four-track chorales with a manifest.json, default the bundled Bach chorales)",
    )  # fmt: skip
    p.add_argument(
        "--task", choices=["harmonize", "accompany", "infill"],
        help="evaluate a composing task instead, on each held-out chorale (--split): "
        "harmonize its soprano and compare with Bach (likelihood, four-part rules, chords, "
        "cadences); accompany its alto, tenor and bass in turn (the voices above and below "
        "the part, four-part rules); infill: write bars 3-6 again, each voice alone and every "
        "voice at once (the voice's place, parallels, spacing)",
    )  # fmt: skip
    p.add_argument("--limit", type=int, metavar="N", help="--task: the first N chorales only")
    p.add_argument(
        "--engine", choices=("auto", "onnx", "native", "torch"), default="auto",
        help="--task: what decodes the harmonizations: auto (default, as for aurl harmonize: "
        "native where it runs the model, else torch), native (Aurl's compiled step, int8 "
        "unless --fp32), onnx (the model's onnx graphs; torch where onnxruntime is missing) "
        "or torch",
    )  # fmt: skip
    add_precision_arguments(
        p,
        int8="--task --engine onnx (or native): decode on the model's int8 graphs, the onnx "
        "default on CPUs with integer dot products (AVX2, VNNI, ARM dotprod), as for aurl "
        "harmonize; the default: %(default_precision)s",
        int4="--task --engine onnx: decode on the model's int4 onnx graphs",
        fp32="--task --engine onnx (or native): decode on the model's fp32 weights (the onnx "
        "default on other CPUs)",
        quantized=COMPOSING_QUANTIZED,
    )
    p.add_argument("--split", default="test", choices=["train", "valid", "test"])
    p.add_argument(
        "--style", metavar="NAME|each",
        help="a style model (model.styles): score every piece, and draw the samples, under style "
        "NAME; 'each': score each piece under its own style label from the cache (samples "
        "unconditioned); default: no style",
    )  # fmt: skip
    p.add_argument(
        "--samples", type=int, default=16, metavar="N", help="pieces to generate (0: none)"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="report folder")
    p.add_argument("--max-tokens", type=int, default=1024, help="tokens per generated sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")
    p.add_argument("--batch-size", type=int, default=8, help="windows / samples per batch")
    p.add_argument("--window", type=int, default=0, help="scoring window (0: the training window)")
    p.add_argument("--ngram-order", type=int, default=4, help="order of the n-gram baseline")
    p.add_argument("--run", metavar="DIR", help="training run folder for the curves plot")
    p.add_argument("--workers", type=int, default=0, help="processes to prepare a MIDI folder")
    p.set_defaults(func=run)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def load_model(
    checkpoint: str | None, device: str, model_name: str | None = None
) -> tuple[Any, Path | None, int]:
    """The model to evaluate (eval mode), the run folder it came from (or None) and the window
    it was trained on (``data.window``, recorded by the export; the default for model folders
    written before it was recorded).

    Raises:
        CheckpointError: no shipped model, or a missing, damaged or mismatched checkpoint.
    """
    from aurl.cli.generate import load_model as load_pretrained_folder
    from aurl.config import DataConfig

    if checkpoint is None or (Path(checkpoint) / "config.json").is_file():
        from aurl.cli.generate import model_folder
        from aurl.models.pretrained import trained_window

        model = load_pretrained_folder(checkpoint, device, model_name)
        window = trained_window(model_folder(checkpoint, model_name)) or DataConfig().window
        return model, None, min(window, model.config.max_seq_len)
    from aurl.errors import CheckpointError

    path = Path(checkpoint)
    if not path.exists():
        raise CheckpointError(f"--checkpoint {path} does not exist: check the path")
    from aurl.models import build_model
    from aurl.training.checkpoint import load_checkpoint, not_lora

    ck = load_checkpoint(path, map_location=device)
    not_lora(ck.path, ck.state)  # its weights are an adapter's
    model = build_model(ck.config).to(device)
    ck.load_weights(model)
    run_dir = path if (path / "checkpoints").is_dir() else ck.path.parent.parent
    return model.eval(), run_dir, min(ck.config.data.window, model.config.max_seq_len)


def adapted(loaded: tuple[Any, Path | None, int], args: argparse.Namespace) -> tuple:
    """:func:`load_model`'s result with ``--adapter`` merged into the model (checked against
    the weights file the model came from)."""
    if not getattr(args, "adapter", None):
        return loaded
    from aurl.cli.generate import model_folder, with_adapter
    from aurl.training.checkpoint import export_source, latest_checkpoint

    model, run_dir, window = loaded
    path = Path(args.checkpoint) if args.checkpoint else None
    if path is None or (path / "config.json").is_file():
        weights = model_folder(args.checkpoint, args.model) / "model.safetensors"
    else:  # a checkpoint, or a run folder: its latest checkpoint (as load_model reads it)
        source = latest_checkpoint(path) if (path / "checkpoints").is_dir() else export_source(path)
        weights = Path(source) / "model.safetensors"
    return with_adapter(model, args.adapter, weights), run_dir, window


def open_data(data: str, out: Path, vocab_config: Any, workers: int) -> Any:
    """A TokenCache for ``data``: opened as is, or prepared from a MIDI folder into OUT/cache."""
    from aurl.data.cache import TokenCache, prepare
    from aurl.errors import DataError
    from aurl.progress import bar

    path = Path(data)
    if (path / "index.npz").is_file():
        return TokenCache(path)
    if not path.is_dir():
        raise DataError(f"--data {path} is neither a token cache nor a folder of MIDI files")
    report = prepare(path, out / "cache", vocab_config=vocab_config, workers=workers, progress=bar)
    for rel, reason in report.failed:
        print(f"skipped {rel}: {reason}", file=sys.stderr)
    if report.files == 0:
        raise DataError(f"--data {path} holds no MIDI files (.mid, .midi, .kar)")
    return TokenCache(out / "cache")


def latent_report(model: Any, seqs: list, grammar: Any, window: int, meters: list) -> dict:
    """Reconstruction (own vs another piece's latent vs the prior) and one interpolation path,
    on the openings of the split's pieces (:mod:`aurl.evaluation.latent`)."""
    from aurl.evaluation.latent import interpolation_curves, reconstruction

    longest = sorted(len(s) for s in seqs)[-2] if len(seqs) > 1 else 0
    length = min(window, 512, longest)
    rec = reconstruction(model, seqs, length=length, grammar=grammar, meters=meters)
    keep = [i for i, s in enumerate(seqs) if len(s) >= length][:2]
    path = interpolation_curves(
        model, seqs[keep[0]][:length], seqs[keep[1]][:length], grammar=grammar,
        meter=meters[keep[0]],
    )  # fmt: skip
    return {"reconstruction": rec.to_dict(), "interpolation": path.to_dict()}


def piece_styles(model: Any, cache: Any, rows: Any, style: str | None) -> list[int] | None:
    """Each scored piece's style id for ``--style`` (None: no style): one name for all, or
    ``each``: the cache's label of each piece (-1 where it has none).

    Raises:
        ConfigError: the model has no styles, or not that one (the message lists them).
        DataError: ``each`` on a cache without labels, or with one the model lacks.
    """
    if not style:
        return None
    from aurl.style_ids import style_id

    styles = tuple(getattr(model.config, "styles", ()))
    if style == "each":
        if not styles:
            style_id(styles, style)  # raises: the model was trained without styles
        return [int(s) for s in cache.model_styles(styles)[rows]]
    return [style_id(styles, style)] * len(rows)


def generate_samples(
    model: Any, n: int, *, max_tokens: int, seed: int, batch: int, style: str = ""
) -> list:
    """``n`` sampled id arrays (START .. END), in batches, with the default sampling options
    (under ``style``, a name of a style model's styles; "": none)."""
    from aurl.config import GenerationConfig
    from aurl.generation.generate import generate, prior_latents
    from aurl.progress import bar

    out = []
    for k, start in enumerate(range(0, n, batch)):
        config = GenerationConfig(max_tokens=max_tokens, seed=seed + k, style=style)
        rows = min(batch, n - start)
        latents = prior_latents(model, rows, seed + k)  # a VAE: as `aurl generate --seed` draws
        pieces = generate(model, config, num_samples=rows, latents=latents, progress=bar)
        out.extend(piece.ids for piece in pieces)
    return out


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    import time

    from aurl.cli import checks
    from aurl.cli.generate import precision_flag
    from aurl.errors import ConfigError, DataError

    t0 = time.perf_counter()
    flag = precision_flag(args)
    if flag and not args.task:
        raise ConfigError(f"{flag} chooses --task's onnx graphs: add --task harmonize or drop it")
    if args.engine != "auto" and not args.task:
        raise ConfigError(f"--engine {args.engine} chooses what decodes --task: add --task "
                          "harmonize or drop it")  # fmt: skip
    native_flag = args.engine == "native" and flag in ("--int8", "--fp32")
    if flag and args.engine != "onnx" and not native_flag:  # aurl harmonize's rule
        raise ConfigError(f"{flag} chooses the onnx engine's graphs: add --engine onnx")
    checks.out_dir(args.out)
    checks.workers(args.workers)
    checks.nonempty(args.style, "--style", "a style of the model's model.styles or 'each'")
    if args.limit is not None and args.limit < 1:  # 0 read as "no limit" ran every chorale
        raise ConfigError(f"--limit {args.limit}: give 1 or more chorales (omit it for all)")
    checks.device(args.device)
    if args.task:
        # '' ran on the bundled chorales, as if --data were not given
        checks.nonempty(args.data, "--data", "a folder of four-track chorales")
        if args.style:
            raise ConfigError(f"--style {args.style} scores a split; --task harmonize takes none")
        from aurl.evaluation.tasks import run_task

        return run_task(args, lambda *a: adapted(load_model(*a), args))
    if not args.data:
        raise ConfigError("--data is required: give a token cache or a MIDI folder")
    if (
        args.samples < 0 or args.max_tokens < 2 or args.batch_size < 1 or args.ngram_order < 1
        or args.window < 0 or args.window == 1
    ):  # fmt: skip
        raise ConfigError(
            "--samples >= 0, --max-tokens >= 2, --batch-size >= 1, --ngram-order >= 1, "
            "--window 0 or >= 2"
        )
    out = Path(args.out)

    import numpy as np

    from aurl.config import DataConfig
    from aurl.data.grammar import Grammar
    from aurl.data.tokenizer import Tokenizer
    from aurl.evaluation.distances import set_features, summarize_set
    from aurl.evaluation.likelihood import score_sequences
    from aurl.evaluation.ngram import NgramModel, ngram_baseline
    from aurl.evaluation.report import evaluate_sets, write_report
    from aurl.progress import bar

    model, run_dir, trained_window = adapted(
        load_model(args.checkpoint, args.device, args.model), args
    )
    try:  # an order too high for the vocabulary fails here, before any scoring
        NgramModel(args.ngram_order, model.vocab.size)
    except ValueError as e:
        raise ConfigError(f"--ngram-order {args.ngram_order}: {e}; choose a lower order") from None
    if args.style:  # a style the model lacks fails before the --out folder is made
        from aurl.style_ids import style_id

        styles = tuple(getattr(model.config, "styles", ()))
        if args.style != "each" or not styles:
            style_id(styles, args.style)
    out.mkdir(parents=True, exist_ok=True)
    cache = open_data(args.data, out, model.vocab_config, args.workers)
    cache.check_vocab(model.vocab_config)  # a checkpoint of another vocabulary: clear error
    rows = cache.split_indices(args.split)
    if rows.size == 0:
        raise DataError(
            f"split {args.split!r} of {cache.path} has no files: choose another --split or "
            "prepare more data"
        )
    seqs = [np.asarray(cache.tokens(i), dtype=np.int64) for i in rows]
    styles = piece_styles(model, cache, rows, args.style)
    cap = cache.meta.get("tokenizer", {}).get("polyphony_cap", DataConfig().polyphony_cap)
    window = args.window or trained_window  # scoring past the training length would extrapolate
    common = dict(window=window, batch_size=args.batch_size, device=args.device, progress=bar,
                  meters=[cache.meters[i] for i in rows], styles=styles)  # fmt: skip
    likelihood = {
        "model": score_sequences(model, seqs, **common).to_dict(),
        "model, grammar-masked": score_sequences(
            model, seqs, grammar=Grammar(model.vocab, cap), **common
        ).to_dict(),
    }
    if cache.split_indices("train").size:
        baseline = ngram_baseline(cache, order=args.ngram_order, split=args.split)
        likelihood[f"{args.ngram_order}-gram (Kneser-Ney)"] = baseline.to_dict()

    latent = None
    if getattr(model, "encoder", None) is not None:  # a VAE: does its latent carry the piece?
        latent = latent_report(model, seqs, Grammar(model.vocab, cap), window, common["meters"])
        likelihood_note = "VAE: bits/note given each piece's own posterior mean (reconstruction)"
        print(
            f"latent: bits/note given own {latent['reconstruction']['own']:.3f}, another "
            f"piece's {latent['reconstruction']['other']:.3f}, the prior "
            f"{latent['reconstruction']['prior']:.3f} (first {latent['reconstruction']['length']}"
            f" tokens of {latent['reconstruction']['pieces']} pieces); {likelihood_note}"
        )

    tokenizer = Tokenizer(model.vocab_config)
    reference = [tokenizer.decode_to_notes(s) for s in seqs]
    sample_ids = []
    if args.samples:
        sample_ids = generate_samples(
            model,
            args.samples,
            max_tokens=args.max_tokens,
            seed=args.seed,
            batch=args.batch_size,
            style="" if args.style == "each" else (args.style or ""),
        )
        (out / "samples").mkdir(exist_ok=True)
        for i, ids in enumerate(sample_ids):
            tokenizer.decode_to_midi(ids, out / "samples" / f"sample_{i:03d}.mid")
    generated = [tokenizer.decode_to_notes(ids) for ids in sample_ids]

    results: dict[str, Any] = {
        "info": {
            "checkpoint": args.checkpoint or "shipped model",
            "data": str(args.data),
            "split": args.split,
            "style": args.style or "none",
            "pieces in split": int(rows.size),
            "generated samples": len(generated),
            "max tokens per sample": args.max_tokens,
            "seed": args.seed,
        },
        "likelihood": likelihood,
    }
    if latent is not None:
        results["latent"] = latent
    gen_features = ref_features = None
    if generated:
        sets, gen_features, ref_features = evaluate_sets(generated, reference, progress=bar)
        results.update(sets)
    else:  # no samples: still describe the reference set
        results["reference"] = summarize_set(set_features(reference, progress=bar))
    report = write_report(
        out,
        results,
        generated_features=gen_features,
        reference_features=ref_features,
        samples=generated,
        run_dir=args.run or run_dir,
    )
    from aurl.config import Config, GenerationConfig, write_config

    # the resolved settings beside the report: the model's vocabulary and architecture, the
    # scoring window and the sampling of the generated set
    data = DataConfig(window=window)
    sampling = GenerationConfig(max_tokens=args.max_tokens, seed=args.seed)
    write_config(
        Config(vocab=model.vocab_config, model=model.config, data=data, generation=sampling), out
    )
    bpn = " ".join(f"{k!r} {v['bits_per_note']:.3f}" for k, v in likelihood.items())
    print(f"bits/note {bpn}")
    print(f"wrote {out / 'metrics.json'} and {report} in {time.perf_counter() - t0:.1f} s")
    return 0
