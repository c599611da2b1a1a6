"""The ``aurl`` command line: the only place that parses argv.

Each subcommand lives in a small module of this package with ``register(subparsers)``; heavy
imports (torch, music21) happen inside the command, so ``aurl --help`` stays fast. A command
line that starts with the name of one of those modules registers that module alone (importing
and registering the other eight cost a cold ``aurl generate`` ~10 ms of CPU at load 7).
"""

from __future__ import annotations

import argparse
import sys

from aurl import __version__
from aurl.errors import AurlError, ConfigError

# modules of aurl.cli; compose registers harmonize, infill and accompany
COMMANDS = (
    "data",
    "config",
    "train",
    "generate",
    "compose",
    "evaluate",
    "analyze",
    "export",
    "serve",
)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``aurl`` parser: every command, or only the command ``argv[0]`` when it is the name
    of a module of :data:`COMMANDS` (what ``argv`` parses to is the same either way)."""
    import importlib

    parser = argparse.ArgumentParser(
        prog="aurl",
        description=(
            "Aurl learns from MIDI collections and composes new music. Typical session:\n"
            "  aurl data corpus --name bach-chorales --out corpus/\n"
            "  aurl data prepare corpus/ --out cache/\n"
            "  aurl train --preset small data.cache=cache/ --out runs/small\n"
            "  aurl generate --num-samples 4 --out pieces/\n"
            "Run 'aurl COMMAND --help' for each command's options."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"aurl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    names = (argv[0],) if argv and argv[0] in COMMANDS else COMMANDS
    for name in names:
        importlib.import_module(f"aurl.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``aurl`` console script; returns the exit status."""
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    if extra:
        # key=value overrides may come after options (`--out DIR training.lr=1e-3`): argparse
        # stops collecting a nargs="*" positional at the first option, so gather the rest here.
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except AurlError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
