"""``aurl export``: a model as files another runtime loads (ONNX for onnxruntime).

``aurl export --format onnx`` writes ``decoder.onnx`` and ``config.json`` into ``--out`` (see
:mod:`aurl.models.onnx_export` for the graph's inputs and outputs); ``aurl generate --engine
onnx --checkpoint OUT`` then runs without torch.
(``aurl checkpoint export`` is another command: a training checkpoint to a model folder.)
"""

from __future__ import annotations

import argparse

FORMATS = ("onnx",)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a model as ONNX graphs (for onnxruntime, no torch)",
        description=(
            "Export a model for another runtime. Example:\n"
            "  aurl export --format onnx --out model-onnx/\n"
            "  aurl generate --engine onnx --checkpoint model-onnx/ --out pieces/"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--format", required=True, choices=FORMATS, help="onnx")
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--model", metavar="NAME", help="a shipped model by name (default: the default model)"
    )
    src.add_argument("--checkpoint", metavar="DIR", help="a model folder (aurl train / save)")
    p.add_argument(
        "--int8", action="store_true",
        help="int8 MatMul weights (onnxruntime dynamic quantization): about 3x smaller",
    )  # fmt: skip
    p.add_argument(
        "--int4", action="store_true",
        help="4-bit MatMul weights (onnxruntime MatMulNBits, blocks of 32): smaller and faster "
        "than --int8 on CPU, within 0.008 bits/note of fp32; what --engine onnx takes by "
        "default on CPUs with integer dot products (see BENCHMARKS.md)",
    )  # fmt: skip
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the .onnx files")
    p.add_argument("--force", action="store_true", help="overwrite an existing export")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    from aurl.cli.generate import model_folder, require_torch
    from aurl.errors import ConfigError

    t0 = time.perf_counter()
    if args.int8 and args.int4:
        raise ConfigError("give one of --int8 and --int4, not both")
    from aurl.cli import checks

    folder = model_folder(args.checkpoint, args.model)  # a wrong path fails before torch loads
    out = checks.out_dir(args.out)
    taken = [out / n for n in ("config.json", "decoder.onnx", "prefill.onnx", "decoder_step.onnx")]
    if not args.force and any(p.exists() for p in taken):
        raise ConfigError(f"{out} already holds an export: pass --force to overwrite it")
    require_torch("aurl export")
    try:
        import onnx  # noqa: F401  (the exporter writes through it)
    except ImportError:
        raise ConfigError("aurl export needs the onnx package: pip install onnx") from None

    from aurl.cli.generate import load_model
    from aurl.models.onnx_export import export_onnx

    model = load_model(args.checkpoint, "cpu", args.model)
    export_onnx(model, out, int8=args.int8, int4=args.int4, source={"model": str(folder)})
    for name in ("decoder.onnx", "config.json"):
        print(f"wrote {out / name}")
    print(f"exported in {time.perf_counter() - t0:.1f} s")
    return 0
