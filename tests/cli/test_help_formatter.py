"""The CLI's help formatter (:class:`aurl.cli.HelpFormatter`) formats as argparse's own
raw-description formatter does, without importing shutil on the way to a command."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aurl.cli import HelpFormatter, build_parser

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.mark.parametrize("columns", ["60", "100", "137"])
def test_help_reads_as_argparse_formats_it(monkeypatch, columns) -> None:
    """`aurl generate --help` and `aurl --help` at several terminal widths (COLUMNS): the same
    text, line for line, as with argparse.RawDescriptionHelpFormatter."""
    monkeypatch.setenv("COLUMNS", columns)
    for argv in (["generate"], None):
        ours = build_parser(argv)
        parsers = [ours, *(ours._subparsers._group_actions[0].choices.values())]
        want = []
        for p in parsers:
            p.formatter_class = argparse.RawDescriptionHelpFormatter
            want.append(p.format_help())
            p.formatter_class = HelpFormatter
        assert [p.format_help() for p in parsers] == want


def test_a_command_line_does_not_import_shutil() -> None:
    """Parsing `aurl generate ...` leaves shutil (and bz2, lzma) unimported."""
    code = (
        "import sys\nfrom aurl.cli import build_parser\n"
        "build_parser(sys.argv[1:]).parse_args(sys.argv[1:])\n"
        "print(*sorted(m for m in ('shutil', 'bz2', 'lzma') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    argv = ["generate", "--engine", "onnx", "--out", "o", "--key", "D minor"]
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == []
