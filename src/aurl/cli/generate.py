"""``aurl generate``: new pieces from a trained model, written as MIDI, MusicXML, PNG or WAV.

Everything is checked before the model runs: options, constraints, output names (no overwrite
without ``--force``), the checkpoint and the primer. torch, music21 and matplotlib load only
when needed, so the command starts fast.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from aurl.engines import ENGINES
from aurl.engines.cpu import PRECISIONS

VOICE_LEAN = 0.9  # --spacing, --ranges with voice leading: harmonize's ComposeOptions values
MAX_VOICES = 8  # --voices: tracks the piece is written in

SHIPPED = Path(__file__).resolve().parent.parent / "pretrained"


def register(sub: argparse._SubParsersAction) -> None:
    from aurl.cli import HelpFormatter

    p = sub.add_parser(
        "generate",
        help="compose new pieces with a trained model",
        description=(
            "Generate pieces with the shipped model (or --checkpoint), under musical "
            "constraints, and write them to --out. Example:\n"
            "  aurl generate --num-samples 4 --seconds 30 --key 'D minor' --out pieces/"
        ),
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--out", required=True, metavar="DIR",
        help="output folder: sample_seed{S}_{i}.mid etc., and sample_seed{S}.yaml with the "
        "settings that made them",
    )  # fmt: skip
    p.add_argument(
        "--checkpoint", metavar="DIR",
        help="model folder (default: shipped model); with --engine onnx an ONNX export folder",
    )  # fmt: skip
    add_model_argument(p)
    add_adapter_argument(p)
    engine = p.add_argument(
        "--engine", choices=("auto", *ENGINES), default="auto",
        help="auto (default): native where it runs the model and the flags, else torch (--beam, "
        "--variations, --interpolate, --adapter, --device cuda), onnx for --int4 or an ONNX "
        "export folder; torch: PyTorch; onnx: onnxruntime on the CPU, never imports torch (the shipped "
        "model's graphs are written once to ~/.cache/aurl/onnx, see docs/design.md); their "
        "precision: %(default_precision)s, unless --int8 / --int4 / --fp32; native: Aurl's own "
        "compiled decode step on the CPU, reads the model folder directly, never imports torch "
        "or onnxruntime; int8 weights unless --fp32 (docs/design.md)",
    )  # fmt: skip
    engine.default_precision = default_precision()
    p.add_argument("--num-samples", type=int, default=1, metavar="N", help="pieces (default 1)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--max-tokens", type=int, metavar="N", help="length limit in tokens")
    length.add_argument(
        "--seconds", type=float, metavar="S",
        help="length in seconds (within a beat); no note starts in the last beat, so the piece "
        "ends on a chord held at least a beat",
    )  # fmt: skip
    add_precision_arguments(
        p,
        int8="int8 weights, faster on CPU: PyTorch's int8 on the torch engine (onnxruntime's "
        "int8 graphs on a CPU without bf16); with --engine onnx the model's int8 graphs; "
        "--engine native's default",
        int4="with --engine onnx: the model's int4 graphs (onnxruntime MatMulNBits, 4-bit "
        "weights in blocks of 32), the default on CPUs with integer dot products (AVX2, VNNI, "
        "ARM dotprod)",
        fp32="fp32 weights: the torch engine's default; with --engine onnx the model's fp32 "
        "graphs (the default on CPUs without integer dot products); with --engine native fp32 "
        "weights and cache (the torch model's logits to 1e-5)",
    )
    p.add_argument(
        "--min-tokens", type=int, metavar="N", help="no END before N generated tokens (default 0)"
    )
    p.add_argument(
        "--cadence", choices=("phrases", "thorough", "ending", "off"), default="phrases",
        help="with --seconds: 'phrases' (default) draws 4 rows per piece, every 8 beats keeps "
        "the one whose cadences come nearest the chorales' rate, tries 7 more endings of a bar "
        "where the piece does not close, and up to 3 x 7 of two bars while it ends on no "
        "cadence (~1.8x the CPU); 'thorough' tries 15 endings of two bars (~2.1x); 'ending' "
        "only redraws the ending (~1.3x); 'off' samples one row (see docs/design.md)",
    )  # fmt: skip
    s = p.add_argument_group("sampling")
    s.add_argument("--temperature", type=float, metavar="T", help="0 = greedy (default 1)")
    s.add_argument("--top-k", type=int, metavar="K", help="keep the K likeliest ids (0: off)")
    s.add_argument("--top-p", type=float, metavar="P", help="nucleus mass (1: off)")
    s.add_argument("--min-p", type=float, metavar="P", help="min-p relative threshold (0: off)")
    s.add_argument("--repetition-penalty", type=float, metavar="R", help="> 1 discourages repeats")
    s.add_argument("--beam", type=int, metavar="B", help="beam search with B beams")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    c = p.add_argument_group("constraints")
    c.add_argument("--key", metavar="KEY", help="e.g. 'D minor', 'Bb major'; 'primer': its key")
    c.add_argument("--key-strictness", type=float, metavar="S", help="1 masks out-of-key notes")
    c.add_argument("--pitch-range", nargs=2, type=int, metavar=("LOW", "HIGH"), help="MIDI pitches")
    c.add_argument("--tempo", metavar="BPM|LOW-HIGH", help="fixed tempo or a range, e.g. 90-120")
    c.add_argument("--instruments", metavar="F,F", help="allowed GM families (program // 8)")
    c.add_argument("--density", type=float, metavar="D", help="target notes per beat")
    c.add_argument("--polyphony", type=int, metavar="N", help="most notes sounding at once")
    c.add_argument(
        "--voice-leading", action=argparse.BooleanOptionalAction, default=None,
        help="never start a note that moves in parallel fifths or octaves with a lower voice, "
        "read against the chord before it as --voices splits the piece, and lean to keep the "
        "upper voices within an octave (--spacing) and each voice in its range (--ranges); "
        "default: on with --voices, off otherwise",
    )  # fmt: skip
    c.add_argument(
        "--spacing", type=float, metavar="S",
        help=f"0..0.999: a note more than an octave above the note under it (the lowest "
        f"excepted) gets log(1 - S) (default {VOICE_LEAN} with voice leading, else 0)",
    )  # fmt: skip
    c.add_argument(
        "--ranges", type=float, metavar="R",
        help=f"0..0.999, with --voices 2-4: a note outside the textbook range of the SATB voice "
        f"of its rank from the bottom gets log(1 - R) (default {VOICE_LEAN} with voice "
        "leading, else 0)",
    )  # fmt: skip
    c.add_argument(
        "--meter", metavar="N/D",
        help="time signature the bars follow, e.g. 3/4 (models trained with model.meter; "
        "default 4/4)",
    )  # fmt: skip
    k = p.add_argument_group("conditioning")
    k.add_argument(
        "--style", metavar="NAME",
        help="generate in this style (models trained with model.styles, e.g. folk, chorale)",
    )  # fmt: skip
    k.add_argument("--primer", metavar="FILE", help="MIDI file to continue")
    k.add_argument("--primer-seconds", type=float, metavar="S", help="use only its first S s")
    k.add_argument(
        "--variations", metavar="FILE",
        help="VAE: variations of this MIDI file (the first from its posterior mean); with "
        "--style, style transfer: its latent decoded in that style",
    )  # fmt: skip
    k.add_argument(
        "--keep", choices=("rhythm", "contour", "both", "none"),
        help="with --variations: what the output keeps of the file, imposed on the decoding "
        "(rhythm: its onsets; contour: its top line's up/down/repeat; both; none: only what "
        "the latent carries). Default with --style: rhythm (style transfer, docs/design.md); "
        "without: none",
    )  # fmt: skip
    k.add_argument("--interpolate", nargs=2, metavar=("A", "B"), help="VAE: path from A to B")
    k.add_argument("--steps", type=int, default=5, help="pieces on the --interpolate path")
    o = p.add_argument_group("output")
    o.add_argument("--format", default="mid", metavar="LIST", help="mid,musicxml,png,wav")
    o.add_argument("--soundfont", metavar="SF2",
                   help="SoundFont (.sf2 / .sf3) for --format wav; without it WAV comes from "
                   "the built-in synthesizer (an organ-like tone, 22 kHz mono)")  # fmt: skip
    o.add_argument(
        "--voices", type=int, metavar="N",
        help="write the notes as N voices on N tracks (4: Soprano, Alto, Tenor, Bass), decoded "
        "as voices (--voice-leading; --no-voice-leading decodes them freely); 0: one track, "
        "decoded freely. Default: the voices the model is written in (its config.json's "
        "'voices': 4 for the shipped chorales), else 0",
    )  # fmt: skip
    o.add_argument("--force", action="store_true", help="overwrite existing files")
    o.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    o.add_argument(
        "--threads", type=int, default=1,
        help="CPU threads (default 1: token-by-token decoding of a small batch gains little "
        "from more, and loses much when other jobs share the cores)",
    )  # fmt: skip
    p.set_defaults(func=run)


def _tempo(text: str | None) -> dict[str, Any]:
    from aurl.errors import ConfigError

    if not text:
        return {}
    try:
        if "-" in text.strip().lstrip("-"):
            lo, hi = (float(x) for x in text.split("-", 1))
            return {"tempo_range": [lo, hi]}
        return {"tempo": float(text)}
    except ValueError:
        raise ConfigError(
            f"--tempo {text!r}: give BPM (e.g. 100) or a range (e.g. 90-120)"
        ) from None


def generation_config(args: argparse.Namespace):
    """The :class:`GenerationConfig` the flags describe (defaults for anything not given)."""
    from aurl.cli import checks
    from aurl.config import GenerationConfig, build
    from aurl.errors import ConfigError

    checks.nonempty(args.key, "--key", "a key such as 'D minor'")  # '' ran without a key
    values: dict[str, Any] = {"seed": args.seed}
    flags = {
        "max_tokens": args.max_tokens, "seconds": args.seconds, "temperature": args.temperature,
        "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty, "beam": args.beam, "key": args.key,
        "key_strictness": args.key_strictness, "density": args.density,
        "polyphony_cap": args.polyphony, "min_tokens": args.min_tokens,
    }  # fmt: skip
    values.update({k: v for k, v in flags.items() if v is not None})
    if args.seconds is not None and args.max_tokens is None:
        values["max_tokens"] = 1_000_000  # the time limit decides
    if args.pitch_range:
        values["pitch_low"], values["pitch_high"] = args.pitch_range
    if args.instruments:
        try:
            values["instruments"] = [int(x) for x in args.instruments.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(
                f"--instruments {args.instruments!r}: give family numbers like 0,5"
            ) from None
    values.update(_tempo(args.tempo))
    style = checks.nonempty(getattr(args, "style", None), "--style", "a model.styles name")
    if style:
        values["style"] = style
    # '' ran in 4/4, as if --meter were not given
    if checks.nonempty(getattr(args, "meter", None), "--meter", "a time signature such as 3/4"):
        from aurl.data.meter import parse_meter

        values["meter"] = "{}/{}".format(*parse_meter(args.meter))
    voices = getattr(args, "voices", None)
    # checked here, not by the config (0..16): 17 once read "generation.voices: 17 is out of
    # range; allowed [0, 16]", and 9..16 are refused too
    if voices is not None and not 0 <= voices <= MAX_VOICES:
        raise ConfigError(f"--voices {voices}: give 1 to {MAX_VOICES} (4 for SATB; 0: one track)")
    if voices:
        values["voices"] = voices  # the voices the piece is written in
    leading = getattr(args, "voice_leading", None)
    if leading is None:  # voices asked for: written as voices
        leading = bool(voices)
    if leading:
        values["voice_leading"] = True
    for name in ("spacing", "ranges"):  # the leans of voice writing: on with voice leading
        lean = getattr(args, name, None)
        if lean is not None or leading:
            values[name] = VOICE_LEAN if lean is None else lean
    config = build(GenerationConfig, values, prefix="generation")
    ranges = getattr(args, "ranges", None)
    if ranges and not 2 <= config.voices <= 4:  # SATB's (voices.voice_ranges): it leaned nothing
        raise ConfigError(f"--ranges {ranges} leans each voice into its SATB range: add "
                          "--voices 2, 3 or 4 (or leave --ranges out)")  # fmt: skip
    return config


def add_model_argument(p: argparse.ArgumentParser) -> None:
    """``--model NAME``: a shipped model by name (:mod:`aurl.shipped`), beside --checkpoint."""
    from aurl.shipped import DEFAULT

    p.add_argument(
        "--model", metavar="NAME",
        help=f"a shipped model by name (default {DEFAULT!r}); --checkpoint DIR for your own",
    )  # fmt: skip


def add_adapter_argument(p: argparse.ArgumentParser) -> None:
    """``--adapter DIR``: a LoRA adapter folder from ``aurl train --lora`` applied to the model."""
    p.add_argument(
        "--adapter", metavar="DIR",
        help="LoRA adapter folder ('aurl train --lora' writes RUN/adapter), merged into the "
        "model; refused unless the model is the adapter's base (same weights, by SHA-256)",
    )  # fmt: skip


def with_adapter(model, adapter: str | None, weights: Path):
    """``model`` with the adapter folder ``adapter`` merged in (``weights``: the file the model
    was loaded from, which must be the adapter's base); ``model`` as is without one."""
    if not adapter:
        return model
    from aurl.models.lora import apply_adapter

    return apply_adapter(model, adapter, weights)


def model_folder(checkpoint: str | None, model: str | None = None) -> Path:
    """The folder of ``checkpoint`` or of the shipped model ``model`` (None: the default),
    checked without loading anything (so a wrong path fails before torch is imported).

    Raises:
        CheckpointError: no such shipped model, or ``checkpoint`` is not a folder.
        ConfigError: both given.
    """
    from aurl.errors import CheckpointError, ConfigError
    from aurl.shipped import shipped_model

    if checkpoint and model:
        raise ConfigError("give --model NAME or --checkpoint DIR, not both")
    if not checkpoint:
        return shipped_model(model, SHIPPED)
    folder = Path(checkpoint)
    if not folder.is_dir():
        raise CheckpointError(f"--checkpoint {folder} is not a folder: give a model folder")
    if not (folder / "config.json").is_file() and (hint := run_folder_hint(folder)):
        raise CheckpointError(f"--checkpoint {folder} is a training run, not a model: {hint}")
    return folder


def run_folder_hint(run: Path) -> str:
    """What to give instead of a training run's folder (``aurl train --out RUN``): its
    exported model (``RUN/model``), its LoRA adapter (``RUN/adapter``), or the export command
    for a run that wrote checkpoints only; "" when ``run`` does not look like a run."""
    if (run / "model" / "config.json").is_file():
        return f"give --checkpoint {run / 'model'} (its exported weights)"
    if (run / "adapter" / "adapter.json").is_file():
        return f"give --adapter {run / 'adapter'} (its LoRA adapter) with the model it tuned"
    if (run / "checkpoints").is_dir():
        return (f"export its weights first (aurl checkpoint export {run} --out {run / 'model'}), "
                f"then give --checkpoint {run / 'model'}")  # fmt: skip
    return ""


def load_model(checkpoint: str | None, device: str, model_name: str | None = None):
    """The model of ``checkpoint`` (a save_pretrained folder) or the shipped one named
    ``model_name`` (None: the default), in eval mode.

    Raises:
        CheckpointError: no shipped model, or a missing, damaged or mismatched checkpoint.
    """
    from aurl.errors import CheckpointError

    folder = model_folder(checkpoint, model_name)
    from aurl.data.vocab import Vocab
    from aurl.models import MusicTransformerVAEGAN

    model = MusicTransformerVAEGAN.from_pretrained(folder, map_location=device)
    if model.head.weight.shape[0] != Vocab(model.vocab_config).size:
        raise CheckpointError(
            f"{folder}: the weights have {model.head.weight.shape[0]} output ids but the "
            f"vocabulary has {Vocab(model.vocab_config).size}: the checkpoint is inconsistent"
        )
    return model.eval()


def primer_key(primer, tokenizer) -> str:
    """The key of the primer's notes (``--key primer``).

    Raises:
        ConstraintError: no primer, or too few pitch classes to find a key.
    """
    from aurl.analysis.keys import estimate_key
    from aurl.errors import ConstraintError, DataError

    if primer is None:
        raise ConstraintError("--key primer needs --primer FILE")
    try:
        # a primer is an excerpt: its last bass note need not be the tonic
        return estimate_key(tokenizer.decode_to_notes(primer), final_bass_weight=0.0).name
    except DataError as e:
        raise ConstraintError(f"--key primer: {e}") from None


def run(args: argparse.Namespace) -> int:
    import time

    from aurl.cli import checks
    from aurl.errors import ConfigError
    from aurl.generation.export import check_free, output_paths, parse_formats

    t0 = time.perf_counter()
    default_model(args)
    default_voices(args)
    config = generation_config(args)
    formats = parse_formats(args.format)
    checks.soundfont(args.soundfont)
    checks.out_dir(args.out)
    checks.threads(args.threads)
    checks.count(args.num_samples, "--num-samples")
    checks.finite(args.primer_seconds, "--primer-seconds", least=0, most=3600)
    checks.count(args.steps, "--steps", least=2)
    conditioning = [x for x in ("primer", "variations", "interpolate") if getattr(args, x)]
    if len(conditioning) > 1:
        raise ConfigError(f"use one of --primer, --variations, --interpolate (got {conditioning})")
    transfer_keep(args)  # --keep without --variations fails before anything loads
    n = args.steps if args.interpolate else args.num_samples
    stem = f"sample_seed{args.seed}"
    paths = output_paths(args.out, n, formats, stem=stem)
    # the resolved settings beside the pieces, named like them: another run (another seed)
    # into the same folder keeps its own
    settings = Path(args.out) / f"{stem}.yaml"
    check_free([*paths, {"settings": settings}], force=args.force)
    if args.adapter and args.int8 and args.engine != "onnx":
        raise ConfigError("--adapter is merged into a torch model: drop --int8")
    if args.int4 and args.engine not in ("onnx", "auto"):
        raise ConfigError("--int4 chooses the onnx engine's graphs: add --engine onnx")
    if args.engine == "auto":
        engine = auto_engine(args)
        if engine is not None:
            return finish(args, config, engine, None, paths, settings, t0)
    if args.engine == "native":
        engine = native_engine(args)
        return finish(args, config, engine, None, paths, settings, t0)
    if args.engine == "onnx":
        engine = onnx_engine(args)
        return finish(args, config, engine, None, paths, settings, t0)
    if args.int8 and args.device == "cpu":
        engine = int8_onnx_engine(args, config)
        if engine is not None:
            return finish(args, config, engine, None, paths, settings, t0)
    model_folder(
        args.checkpoint, args.model
    )  # a wrong path or name fails here, before torch loads (~1 s)
    require_torch("--engine torch" if args.engine != "auto" else "this model with these flags "
                  "(--engine auto: the native engine does not run them here)")
    import torch

    checks.device(args.device)
    torch.set_num_threads(args.threads)

    from aurl.engines.torch_engine import TorchEngine

    model = load_model(args.checkpoint, args.device, args.model)
    weights = model_folder(args.checkpoint, args.model) / "model.safetensors"
    model = with_adapter(model, args.adapter, weights)
    if args.int8:
        from aurl.models.quantize import quantize_int8

        model = quantize_int8(model)  # about 2x faster decoding on CPU; weights read as int8
    return finish(args, config, TorchEngine(model), model, paths, settings, t0)


def default_model(args: argparse.Namespace) -> None:
    """No ``--model`` / ``--checkpoint``: ``--variations`` / ``--interpolate`` take the shipped
    VAE (:data:`aurl.shipped.VAE_DEFAULT`), ``--style`` the shipped style model
    (:data:`aurl.shipped.STYLES_DEFAULT`), instead of the default transformer (which has
    neither a latent nor styles); each says so on stderr."""
    from aurl.shipped import STYLES_DEFAULT, VAE_DEFAULT

    if args.checkpoint or args.model or args.engine == "onnx":
        return
    if (args.variations or args.interpolate) and args.engine != "native":  # native: refused
        what = "--variations" if args.variations else "--interpolate"
        args.model = default_for(what, VAE_DEFAULT, "VAE", "the default model has no latent")
    elif args.style:
        _known_style(SHIPPED / STYLES_DEFAULT, args.style)  # a bad name: its one error line only
        args.model = default_for("--style", STYLES_DEFAULT, "style model",
                                 "the default model has no styles")  # fmt: skip


def default_voices(args: argparse.Namespace) -> None:
    """No ``--voices``: the voices the model is written in (:func:`model_voices`; the shipped
    chorales: 4), said on stderr by :func:`finish` once every check has passed; a model that
    names none leaves the piece one free track, and so does ``--adapter``: it tuned the model
    to other music (the folk tunes of the README's example are one line, not four voices)."""
    if args.voices is not None or getattr(args, "adapter", None):
        return
    folder = model_folder(args.checkpoint, args.model)  # a wrong path or name: its one line
    args.voices = model_voices(folder)
    args.model_voices = bool(args.voices)


def model_voices(folder: Path) -> int:
    """The voices the music of the model in ``folder`` is written in: its ``config.json``'s
    ``voices`` (1 to :data:`MAX_VOICES`), the default of ``aurl generate --voices``; 0 where it
    names none or the file cannot be read (the model's own load reports that).

    Raises:
        CheckpointError: ``voices`` is there but not a whole number 1 to :data:`MAX_VOICES`.
    """
    import json

    from aurl.errors import CheckpointError

    path = folder / "config.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return 0
    voices = meta.get("voices", 0) if isinstance(meta, dict) else 0
    if voices == 0 and not isinstance(voices, bool):
        return 0
    if isinstance(voices, bool) or not isinstance(voices, int) or not 1 <= voices <= MAX_VOICES:
        raise CheckpointError(
            f"{path}: 'voices' is {json.dumps(voices)[:40]}: give the voices the model's music "
            f"is written in, 1 to {MAX_VOICES} (4 for SATB), or remove the key"
        )
    return voices


def default_for(what: str, name: str, kind: str, why: str) -> str | None:
    """``name`` when it is shipped (else None), said on stderr as ``what: using the shipped
    KIND 'name' (why)``: the model a flag that the default model cannot serve (``--variations``,
    ``--style``) falls back to when no model is named."""
    import sys

    from aurl.shipped import shipped_models

    if name not in shipped_models(SHIPPED):
        return None
    print(f"{what}: using the shipped {kind} {name!r} ({why})", file=sys.stderr)
    return name


def model_section(folder: Path) -> dict:
    """The ``model`` section of ``folder``'s ``config.json``, read without torch; {} when it
    cannot be read (the model's own load reports that)."""
    import json

    try:
        model = json.loads((folder / "config.json").read_text()).get("model", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return model if isinstance(model, dict) else {}


def _known_style(folder: Path, name: str) -> None:
    """Raise the style error of ``name`` for the model in ``folder`` (its ``model.styles``)
    before anything is said or loaded."""
    from aurl.style_ids import style_id

    styles = model_section(folder).get("styles")
    if isinstance(styles, list) and all(isinstance(s, str) for s in styles):
        style_id(tuple(styles), name)


def require_torch(
    what: str, instead: str = " (or generate with --engine onnx --checkpoint EXPORT_DIR)"
) -> None:
    """Raise :class:`ConfigError` with the install command (and ``instead``, what runs
    without it) when torch is missing."""
    import importlib.util

    from aurl.errors import ConfigError

    if importlib.util.find_spec("torch") is None:
        raise ConfigError(
            f"{what} needs PyTorch, which is not installed: pip install 'aurl[torch]'{instead}"
        )


def int8_onnx_engine(args: argparse.Namespace, config):
    """The int8 path of a CPU without bf16 instructions (AVX512-BF16 or AMX): PyTorch's int8
    runs its activations in bf16, emulated there, so ``--int8`` runs onnxruntime's integer
    kernels on int8 graphs instead (exported once to the cache, :mod:`aurl.engines.shipped`).
    None where the CPU has bf16 or the request needs the torch engine (then torch's int8)."""
    from aurl.engines.cpu import cpu_summary, has_bf16

    if has_bf16() or (config.beam > 1) or args.variations or args.interpolate:
        return None
    import importlib.util

    folder = model_folder(args.checkpoint, args.model)
    model = model_section(folder)  # {}: the torch loader names the problem
    if model.get("mode") != "transformer" or model.get("attention", "full") != "full":
        return None
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    from aurl.engines.shipped import load_shipped_onnx

    print(f"--int8 on {cpu_summary()}: no bf16 instructions, so int8 runs on onnxruntime")
    return load_shipped_onnx(folder, precision="int8", threads=args.threads)


def auto_engine(args: argparse.Namespace):
    """``--engine auto``: the native engine of the model folder (int8, or fp32 with ``--fp32``)
    where it runs the model and the flags; the onnx engine for ``--int4`` or an ONNX export
    folder; None where torch decodes (``--beam``, ``--variations``, ``--interpolate``,
    ``--adapter``, ``--device cuda``; a model the native step lacks, or no compiled step on this
    installation; a folder neither can read gets torch's own message)."""
    if args.int4:  # only onnx has int4 graphs: a flag it cannot honour is its own error
        return onnx_engine(args)
    if args.device != "cpu" or (args.beam or 1) > 1:
        return None
    if args.variations or args.interpolate or args.adapter:
        return None
    folder = model_folder(args.checkpoint, args.model)
    if (folder / "decoder.onnx").is_file() and not (folder / "model.safetensors").is_file():
        return onnx_engine(args)  # an ONNX export folder
    from aurl.engines.native_engine import native_where_it_runs

    engine = native_where_it_runs(folder, weights="fp32" if args.fp32 else "int8")
    if engine is not None:
        _one_thread(args)
    return engine


def _one_thread(args: argparse.Namespace) -> None:
    """Say that ``--threads N`` does not apply to the native engine (one core's bandwidth)."""
    if args.threads != 1:
        import sys

        print(f"--threads {args.threads}: the native engine decodes on one thread (one core's "
              "memory bandwidth is what its step needs)", file=sys.stderr)  # fmt: skip


def onnx_engine(args: argparse.Namespace):
    """The onnx engine of ``--checkpoint`` (an export folder) or of the shipped model.

    Raises:
        ConfigError: a flag the onnx engine cannot honour, or no onnxruntime.
        CheckpointError: not an export folder, or one of another version or vocabulary.
    """
    from aurl.errors import CheckpointError, ConfigError

    given = args.checkpoint is not None
    unsupported = {
        f"--{p}": given
        and getattr(args, p, False)
        and f"--checkpoint names an export, whose precision is its own: export {p} graphs "
        f"with `aurl export --format onnx{'' if p == 'fp32' else ' --' + p}` and pass that "
        f"folder (without --checkpoint, --{p} takes the shipped model's {p} export)"
        for p in PRECISIONS
    }
    unsupported |= {
        "--beam": (args.beam or 1) > 1 and "beam search runs on --engine torch",
        "--variations": args.variations and "VAE latents run on --engine torch",
        "--interpolate": args.interpolate and "VAE latents run on --engine torch",
        "--device": args.device != "cpu" and "onnxruntime runs here on the CPU only",
        "--adapter": args.adapter and "a LoRA adapter is merged into a torch model",
        "--style": getattr(args, "style", None) and "its export has no style input",
    }
    for flag, why in unsupported.items():
        if why:
            raise ConfigError(f"--engine onnx does not support {flag}: {why}")
    from aurl.engines.onnx_engine import OnnxEngine, import_onnxruntime

    import_onnxruntime()  # a missing onnxruntime fails before any export
    if args.checkpoint is None:
        from aurl.engines.shipped import load_shipped_onnx

        folder = model_folder(None, args.model)
        return load_shipped_onnx(folder, precision=chosen_precision(args), threads=args.threads)
    folder = Path(args.checkpoint)
    if (folder / "model.safetensors").is_file():
        raise CheckpointError(
            f"--checkpoint {folder} is a model folder, not an ONNX export: run `aurl export "
            f"--format onnx --checkpoint {folder} --out DIR` and pass --checkpoint DIR"
        )
    return OnnxEngine(folder, threads=args.threads)


def native_engine(args: argparse.Namespace):
    """The native engine (:class:`aurl.engines.native_engine.NativeEngine`) of ``--checkpoint``
    (a model folder) or of the shipped model ``--model`` (default: the default model): int8
    weights, or fp32 with ``--fp32``.

    Raises:
        ConfigError: a flag the native engine cannot honour, or no compiled step.
        CheckpointError: not a model folder, or a damaged one.
    """
    from aurl.errors import CheckpointError, ConfigError

    unsupported = {
        "--beam": (args.beam or 1) > 1 and "beam search runs on --engine torch",
        "--variations": args.variations and "VAE latents run on --engine torch",
        "--interpolate": args.interpolate and "VAE latents run on --engine torch",
        "--device": args.device != "cpu" and "the native step runs on the CPU only",
        "--adapter": args.adapter and "a LoRA adapter is merged into a torch model",
    }
    for flag, why in unsupported.items():
        if why:
            raise ConfigError(f"--engine native does not support {flag}: {why}")
    from aurl.engines.native_engine import NativeEngine, load_library

    load_library()  # a missing compiled step fails before the weights are read
    _one_thread(args)
    folder = model_folder(args.checkpoint, args.model)
    if (folder / "decoder.onnx").is_file() and not (folder / "model.safetensors").is_file():
        raise CheckpointError(
            f"--checkpoint {folder} is an ONNX export: --engine native reads a model folder "
            "(config.json + model.safetensors); use --engine onnx for an export"
        )
    return NativeEngine(folder, weights="fp32" if args.fp32 else "int8")


def chosen_precision(args: argparse.Namespace, *, quantized: str = "int4") -> str:
    """The precision of a model's graphs on the onnx engine (``aurl generate --engine onnx``
    without ``--checkpoint``, the composing commands, ``aurl evaluate --task``): ``--int8`` /
    ``--int4`` / ``--fp32`` when given, else :func:`aurl.engines.cpu.onnx_precision` (int4
    where the CPU has integer dot products: 1.12x the int8 graphs' speed on AVX2, within 0.005
    grammar-masked bits/note of fp32; fp32 elsewhere). ``quantized``: the default where the CPU
    has integer dot products (the composing commands pass
    :data:`aurl.engines.cpu.COMPOSING_QUANTIZED`)."""
    for precision in PRECISIONS:
        if getattr(args, precision, False):
            return precision
    from aurl.engines.cpu import onnx_precision

    return onnx_precision(quantized=quantized)


def precision_flag(args: argparse.Namespace) -> str | None:
    """The precision flag given (``--int8``, ``--int4`` or ``--fp32``; argparse allows one), or
    None."""
    return next((f"--{p}" for p in PRECISIONS if getattr(args, p, False)), None)


def default_precision(quantized: str = "int4") -> Any:
    """The lazy ``--help`` words for the onnx engine's default precision on this CPU
    (:class:`aurl.engines.cpu.DefaultPrecision`)."""
    from aurl.engines.cpu import DefaultPrecision

    return DefaultPrecision(quantized)


def add_precision_arguments(
    p: argparse.ArgumentParser, *, int8: str, int4: str, fp32: str, quantized: str = "int4"
) -> None:
    """``--int8`` / ``--int4`` / ``--fp32`` on ``p``, mutually exclusive (argparse refuses two
    in one line), with these help texts; ``%(default_precision)s`` in one reads this CPU's
    default (``quantized`` where it has integer dot products) when the help is printed
    (:func:`default_precision`)."""
    group = p.add_mutually_exclusive_group()
    for flag, text in (("--int8", int8), ("--int4", int4), ("--fp32", fp32)):
        action = group.add_argument(flag, action="store_true", help=text)
        action.default_precision = default_precision(quantized)


def finish(args, config, engine, model, paths, settings, t0: float) -> int:
    """Primer, constraints, latents, generation and the written files, for either engine
    (``model``: the torch model behind a torch engine, for VAE latents; None for onnx)."""
    import gc
    import sys
    import time

    from aurl.config import DataConfig
    from aurl.data.tokenizer import Tokenizer
    from aurl.errors import ConstraintError
    from aurl.generation.generate import generate, load_primer, make_masker
    from aurl.progress import bar

    n = len(paths)
    if not gc.isenabled():
        # the console ran the imports and the engine's build without the cyclic collector
        # (cli.NO_GC): what they made stays for the run, out of the collector's sight; it
        # watches again what the generation makes, so a long run of many pieces stays bounded
        gc.freeze()
        gc.enable()
    vocab_config = engine.vocab.config
    # Primers are encoded under the generation polyphony cap, so they obey the same grammar.
    tokenizer = Tokenizer(vocab_config, DataConfig(polyphony_cap=config.polyphony_cap))
    primer = None
    if args.primer:
        primer = load_primer(args.primer, tokenizer, seconds=args.primer_seconds or 0.0)
    if config.key.lower() == "primer":
        config = dataclasses.replace(config, key=primer_key(primer, tokenizer))
        print(f"key of the primer: {config.key}")
    device = None if engine.numpy else engine.device
    masker = make_masker(engine.vocab, config, device)  # constraint errors before any work
    latents = None
    is_vae = engine.config.mode in ("vae", "vae_gan")
    if (args.variations or args.interpolate) and not is_vae:
        raise ConstraintError(
            f"--variations/--interpolate need a VAE model; this one is {engine.config.mode!r}"
        )
    source = None  # the --variations piece, read once (aurl.generation.transfer.read_source)
    if args.variations and model is not None and is_vae:
        from aurl.generation.transfer import read_source

        source = read_source(args.variations, tokenizer)
    if model is not None and is_vae:
        import torch

        from aurl.generation.generate import interpolation_latents, piece_latents, prior_latents

        generator = torch.Generator(device=device).manual_seed(args.seed)
        if args.variations:
            latents = piece_latents(model, source.ids, n=n, generator=generator)
        elif args.interpolate:
            latents = interpolation_latents(model, *args.interpolate, tokenizer, steps=n)
        else:
            latents = prior_latents(model, n, args.seed)
    keep = transfer_keep(args)
    if getattr(args, "model_voices", False):  # said once every check has passed
        print(f"--voices {args.voices}: the voices this model is written in (--voices 0: one "
              "track, decoded freely)", file=sys.stderr)  # fmt: skip
    if keep != "none":  # the file's rhythm / contour kept (aurl.generation.transfer)
        from aurl.generation.transfer import transfer_config, transfer_masker

        if args.max_tokens is None and args.seconds is None:
            config = transfer_config(config, [source.ids])
        if not config.meter and getattr(engine.config, "meter", False):
            config = dataclasses.replace(config, meter="{}/{}".format(*source.meter))
        masker = transfer_masker(engine, config, [source.ids] * n, tokenizer, keep)
        pieces = generate(
            engine, config, num_samples=n, latents=latents, masker=masker, progress=bar
        )
    elif config.seconds > 0 and getattr(args, "cadence", "off") != "off":
        from aurl.generation.cadence import CADENCE_MODES, generate_with_cadence

        options = CADENCE_MODES[args.cadence]
        pieces = generate_with_cadence(
            engine, config, num_samples=n, primer=primer, latents=latents, masker=masker,
            options=options, progress=bar,
        )  # fmt: skip
    else:
        pieces = generate(
            engine, config, num_samples=n, primer=primer, latents=latents, masker=masker,
            progress=bar,
        )  # fmt: skip
    write_pieces(pieces, paths, tokenizer, config, soundfont=args.soundfont, voices=args.voices)
    import shlex

    from aurl.config import Config
    from aurl.fileio import atomic_write_text

    # vocabulary and model of the checkpoint, sampling and constraints, under the command line
    # (which says what the config does not: --keep, --cadence, --variations FILE, --engine)
    resolved = Config(vocab=vocab_config, model=engine.config, generation=config)
    header = "# " + shlex.join(["aurl", *getattr(args, "argv", ["generate"])]) + "\n"
    header += f"# engine: {engine_line(engine)}\n"
    print(f"wrote {atomic_write_text(settings, header + resolved.to_yaml())}")
    print(f"generated {n} piece(s) in {time.perf_counter() - t0:.1f} s")
    return 0


def engine_line(engine) -> str:
    """What decoded, for the settings file's header: torch and its device, or the numpy engine
    with its weights (the precision is the CPU's default unless a flag chose) and folder."""
    if engine.name == "torch":
        return f"torch on {engine.device}"
    what = "weights of" if engine.name == "native" else "graphs in"
    return f"{engine.name}, {engine.weights} {what} {engine.folder}"


def transfer_keep(args: argparse.Namespace) -> str:
    """What ``--variations`` keeps of its file: ``--keep``, else ``rhythm`` with ``--style``
    (style transfer) and ``none`` without (the VAE's free variations).

    Raises:
        ConfigError: ``--keep`` without ``--variations``.
    """
    from aurl.errors import ConfigError

    keep = getattr(args, "keep", None)
    if keep and not args.variations:
        raise ConfigError(f"--keep {keep} needs --variations FILE (the piece to keep)")
    if not args.variations:
        return "none"  # (aurl.generation.transfer stays unimported: ~10 ms of a cold start)
    from aurl.generation.transfer import DEFAULT_KEEP

    return keep or (DEFAULT_KEEP if getattr(args, "style", None) else "none")


def write_pieces(
    pieces, paths, tokenizer, config, *, soundfont: str | None, voices: int | None = None
) -> None:
    """Decode, export and print what was written with a one-line summary per piece (split into
    ``voices`` tracks when given, see :func:`aurl.generation.export.voice_data`)."""
    from aurl.data.tokenizer import data_to_notes
    from aurl.generation.export import export_piece, signed

    for piece, targets in zip(pieces, paths):
        data = tokenizer.decode_to_data(piece.ids)  # MIDI and PNG need no symusic score
        notes = data_to_notes(data)
        duration = float((notes["onset_s"] + notes["duration_s"]).max()) if len(notes) else 0.0
        key = signed(data, config.meter, notes)  # the meter asked and the key found, in the file
        score = data
        if voices:  # as a table: MIDI and PNG still need no symusic score
            from aurl.generation.export import voice_data

            score = voice_data(data, voices)
        name = next(iter(targets.values())).stem
        written = export_piece(score, notes, targets, soundfont=soundfont, title=name)
        for path in written:
            print(f"wrote {path}")
        wanted = f" (asked {config.key})" if config.key else ""
        leading = f", {_parallels_line(notes, voices)}" if voices and voices > 1 else ""
        print(
            f"{name}: {duration:.1f} s, {len(notes)} notes, {len(piece.ids)} tokens, "
            f"key {key}{wanted}{leading}"
        )


def _parallels_line(notes, voices: int) -> str:
    """'N parallel 5ths/8ves in M moves' of the piece split as ``--voices`` writes it (the rule
    ``aurl evaluate --task harmonize`` counts)."""
    from aurl.analysis.part_writing import parallels_line
    from aurl.data.notes import pitched
    from aurl.generation.voices import assign_voices

    notes = pitched(notes)
    voice = assign_voices(notes, voices)
    return parallels_line([notes[voice == v] for v in range(voices)])
