"""``aurl train`` and ``aurl checkpoint list|average|export``."""

from __future__ import annotations

import argparse
import sys

from aurl.cli.config import add_config_arguments, config_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model on a token cache (resumable; DDP under torchrun)",
        description="Train the model the config describes on a token cache from 'aurl data "
        "prepare'. The resolved config, checkpoints (checkpoints/step-NNNNNNN: the last one and "
        "the training.keep_best best by validation loss), metrics.jsonl, train.log, TensorBoard "
        "scalars (tb/) and samples go to --out. Run it again with the same --out to resume "
        "where it stopped. Several processes: torchrun --nproc_per_node N -m aurl train ...",
        epilog="example: aurl train --preset small --data cache/ --out runs/small "
        "training.max_minutes=60",
    )
    add_config_arguments(p)
    p.add_argument("--data", metavar="CACHE", help="token cache folder (sets data.cache)")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder (created; resumed)")
    p.add_argument(
        "--resume", metavar="PATH", help="start from this checkpoint folder instead of the latest"
    )
    p.add_argument(
        "--init-from", metavar="BASE",
        help="start a NEW run from a model's weights: 'shipped' (the default shipped model), a "
        "shipped model's name, or a model / checkpoint / run folder. The run takes the base's "
        "model and vocabulary config; its optimizer, schedule and steps are its own",
    )  # fmt: skip
    p.add_argument(
        "--lora", type=int, default=0, metavar="RANK",
        help="with --init-from: train low-rank adapters of this rank (e.g. 8) on the base's "
        "attention and feed-forward projections, the base frozen; written to OUT/adapter "
        "for 'aurl generate --adapter'",
    )  # fmt: skip
    p.add_argument(
        "--lora-alpha", type=float, default=None, metavar="A",
        help="the adapters' scale numerator (alpha / rank scales them; default 2 * rank)",
    )  # fmt: skip
    p.set_defaults(func=run_train)

    c = sub.add_parser(
        "checkpoint",
        help="list, average or export checkpoints of a run",
        description="Work with the checkpoints of a training run folder.",
    )
    csub = c.add_subparsers(dest="checkpoint_command", metavar="ACTION")
    ls = csub.add_parser("list", help="list a run's checkpoints with their metrics")
    ls.add_argument("run", metavar="RUN", help="training run folder")
    ls.set_defaults(func=run_list)
    avg = csub.add_parser(
        "average",
        help="average the weights of the best N checkpoints into a pretrained model folder",
        description="Average the weights of the N checkpoints with the lowest validation loss "
        "(verified against their SHA-256 first) and write model.safetensors + config.json, "
        "loadable with MusicTransformerVAEGAN.from_pretrained and 'aurl generate --checkpoint'.",
    )
    avg.add_argument("run", metavar="RUN", help="training run folder")
    avg.add_argument("--best", type=int, default=3, metavar="N", help="how many (default 3)")
    avg.add_argument("--out", required=True, metavar="DIR", help="output model folder")
    avg.set_defaults(func=run_average)
    exp = csub.add_parser(
        "export",
        help="export the weights alone (safetensors + config.json) of one checkpoint",
        description="Write a checkpoint's weights and config without the optimizer state: "
        "a pretrained model folder. CHECKPOINT is a checkpoint folder, or a run folder (its "
        "best checkpoint by validation loss, else its latest).",
    )
    exp.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint or run folder")
    exp.add_argument("--out", required=True, metavar="DIR", help="output model folder")
    exp.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
        help="store the weights in this precision (bfloat16/float16 halve the file)",
    )  # fmt: skip
    exp.add_argument(
        "--voices", type=int, default=0, metavar="N",
        help="the voices the model's music is written in (4 for chorales trained on SATB "
        "files), recorded in its config.json: 'aurl generate' then writes N voice tracks by "
        "default; 0 (default): not recorded, one free track",
    )  # fmt: skip
    exp.set_defaults(func=run_export)
    c.set_defaults(func=lambda args: c.print_help() or 2)


# a rank above the model's width adds parameters and nothing else (rank 100,000 on a 32-wide
# model was 102M parameters); the base's own width is checked once it is read
MAX_LORA_RANK = 4096


def run_train(args: argparse.Namespace) -> int:
    from aurl.cli.generate import require_torch

    require_torch("aurl train", "")  # before the trainer's imports (a ModuleNotFoundError)
    from aurl.cli import checks
    from aurl.errors import ConfigError
    from aurl.progress import bar
    from aurl.training.trainer import train

    checks.out_dir(args.out)
    if args.lora:  # 0: no adapters
        checks.count(args.lora, "--lora", most=MAX_LORA_RANK)
    checks.finite(args.lora_alpha, "--lora-alpha", least=1e-3, most=1e6)
    if args.lora_alpha is not None and not args.lora:  # was ignored: a full fine-tune ran
        raise ConfigError(f"--lora-alpha {args.lora_alpha:g} scales adapters: add --lora RANK")
    if args.init_from is not None and not args.init_from.strip():  # was: trained from scratch
        raise ConfigError(
            "--init-from '': give 'shipped', a shipped model's name, or a model / checkpoint / "
            "run folder (or leave --init-from out to train from scratch)"
        )
    if args.data:
        args.overrides = [*args.overrides, f"data.cache={args.data}"]
    config = config_from_args(args)
    base = None
    if args.init_from:
        from aurl.training.finetune import explicit_keys, finetune_config, load_base

        base = load_base(args.init_from)
        if args.lora > base.model.d_model:
            raise ConfigError(
                f"--lora {args.lora}: above the base's width (model.d_model "
                f"{base.model.d_model}) an adapter only adds parameters: give at most that"
            )
        config = finetune_config(config, base, explicit_keys(args.overrides))
    else:
        config = resumed_finetune_config(config, args)
    result = train(
        config, args.out, resume=args.resume, progress=bar, init_from=base, lora=args.lora,
        lora_alpha=args.lora_alpha,
    )  # fmt: skip
    if result.stopped == "interrupted":
        print(f"interrupted at step {result.step}: checkpoint saved; run the same command to "
              "resume", file=sys.stderr)  # fmt: skip
        return 130
    return 0


def resumed_finetune_config(config, args: argparse.Namespace):
    """Going on with a fine-tune run (no --init-from): its model and vocabulary are the
    checkpoint's, not the preset's (explicit contrary overrides refused)."""
    from pathlib import Path

    from aurl.training.checkpoint import latest_checkpoint, load_checkpoint
    from aurl.training.finetune import Base, explicit_keys, finetune_config

    source = args.resume or latest_checkpoint(args.out)
    if source is None or not Path(source).exists():
        return config
    start = load_checkpoint(source)
    if not start.state.get("finetune"):
        return config
    c = start.config
    base = Base(str(start.path), start.path / "model.safetensors", "", c.model, c.vocab, {})
    return finetune_config(config, base, explicit_keys(args.overrides))


def run_list(args: argparse.Namespace) -> int:
    from aurl.training.checkpoint import best_checkpoints, checkpoint_metrics, list_checkpoints

    found = list_checkpoints(args.run)
    if not found:
        print(f"{args.run}: no checkpoints")
        return 1
    best = best_checkpoints(args.run, len(found))
    for p in found:
        vl = checkpoint_metrics(p).get("valid_loss")
        rank = f"  best #{best.index(p) + 1}" if p in best else ""
        print(f"{p.name}  valid_loss {'-' if vl is None else f'{vl:.4f}'}{rank}")
    return 0


def run_average(args: argparse.Namespace) -> int:
    from aurl.cli import checks
    from aurl.training.checkpoint import average_checkpoints, best_checkpoints

    checks.count(args.best, "--best", most=10_000)  # 0 and -1 read as "none with a loss"
    checks.out_dir(args.out)
    paths = best_checkpoints(args.run, args.best)
    out = average_checkpoints(paths, args.out)
    print(f"averaged {', '.join(p.name for p in paths)} -> {out}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from aurl.cli import checks
    from aurl.training.checkpoint import export_weights

    checks.out_dir(args.out)
    from aurl.cli.generate import MAX_VOICES
    from aurl.errors import ConfigError

    if not 0 <= args.voices <= MAX_VOICES:
        raise ConfigError(f"--voices {args.voices}: give 1 to {MAX_VOICES} (4 for SATB), or 0")
    out = export_weights(args.checkpoint, args.out, dtype=args.dtype, voices=args.voices)
    print(f"exported {out}")
    return 0
