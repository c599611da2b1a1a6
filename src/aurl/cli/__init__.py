"""The ``aurl`` command line: the only place that parses argv.

Each subcommand lives in a small module of this package with ``register(subparsers)``; heavy
imports (torch, music21) happen inside the command, so ``aurl --help`` stays fast. A command
line that starts with the name of one of those modules registers that module alone (importing
and registering the other eight cost a cold ``aurl generate`` ~10 ms of CPU at load 7).
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

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


def terminal_columns() -> int:
    """The terminal's width as :func:`shutil.get_terminal_size` reads it (``COLUMNS``, then
    stdout's terminal, else 80), without importing shutil."""
    import os

    try:
        columns = int(os.environ.get("COLUMNS", 0))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's raw-description formatter (descriptions keep their line breaks) sized by
    :func:`terminal_columns`: argparse's own default width imports shutil (and with it bz2,
    lzma and fnmatch, ~10 ms of a cold ``aurl generate``), and every ``add_argument`` builds a
    formatter, help or not."""

    def __init__(
        self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
        width: int | None = None,
    ) -> None:  # fmt: skip
        width = terminal_columns() - 2 if width is None else width
        super().__init__(prog, indent_increment, max_help_position, width)


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
        formatter_class=HelpFormatter,
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
    args.argv = list(argv)  # the command line as given, for files that record what made them
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except AurlError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except PermissionError as e:  # a file or folder this user may not open (session 8)
        print(f"error: {denied(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def denied(e: PermissionError) -> str:
    """One line for a file or folder the operating system refused (mode bits, ownership, a
    read-only mount): which one, and what to do."""
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None) or str(e)
    why = (e.strerror or "permission denied").lower()  # or "operation not permitted"
    return (f"{where}: {why}: run aurl as a user who may read it (and write where it writes), "
            "or change its permissions")  # fmt: skip


# one-shot commands whose objects live until the process ends and make no cyclic garbage worth
# collecting: the console runs them with Python's cyclic collector off (it only rescans what
# the imports made: ~7% of a cold ``aurl generate --engine onnx``'s CPU at load ~3)
NO_GC = frozenset({"generate"})


def console() -> NoReturn:
    """The ``aurl`` console script and ``python -m aurl``: :func:`main`, then a fast exit.

    By the time :func:`main` returns, a command's work is done (its files written atomically
    and closed), and tearing the interpreter down (every module, the onnxruntime session,
    numpy's state) cost a cold ``aurl generate --engine onnx`` ~0.1 s of its ~1 s on 2 cores.
    So this does what a normal exit does first (join the non-daemon threads, run the
    ``atexit`` handlers, flush stdout and stderr) and ends the process with ``os._exit``.
    :func:`main` itself never exits: tests and other callers run it in-process. The commands of
    :data:`NO_GC` start with the cyclic garbage collector off: the imports and the engine's
    build make only objects that live as long as the run; ``aurl generate`` then freezes them
    (``gc.freeze``) and turns the collector back on for what the generation makes; they also
    keep numpy's OpenBLAS to one thread unless ``OPENBLAS_NUM_THREADS`` says otherwise.
    """
    import atexit
    import gc
    import os
    import threading

    if sys.argv[1:2] and sys.argv[1] in NO_GC:
        gc.disable()
        # numpy's OpenBLAS starts one spinning thread per core at import (~0.12 s of another
        # core's CPU on 2 cores); a generation's numpy products are too small to share out
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    code = main()
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # a closed pipe: what Python's own exit reports as 120
            code = code or 120
    os._exit(code)
