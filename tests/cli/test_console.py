"""The console entry (:func:`aurl.cli.console`, what the ``aurl`` script and ``python -m aurl``
run) ends the process with ``os._exit`` after the command: what a normal exit does first must
still happen (output flushed into a pipe, ``atexit`` handlers, non-daemon threads joined, the
command's exit status), and :func:`aurl.cli.main` itself must return, not exit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
# block-buffered stdout (no PYTHONUNBUFFERED): output lost at os._exit unless flushed
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | {"PYTHONPATH": str(SRC)}


def console(code: str, *argv: str) -> subprocess.CompletedProcess:
    """Run ``code`` (which ends by calling the console entry) with ``argv``, output piped."""
    return subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, env=ENV, timeout=60
    )


PRELUDE = """
import atexit, sys, threading, time
def later():
    time.sleep(1.0)  # past the command's end
    print("thread done", flush=False)
threading.Thread(target=later).start()
print("printed before the command")
atexit.register(lambda: print("atexit ran"))
from aurl.cli import console
console()
"""


def test_a_failing_command_keeps_its_status_output_threads_and_atexit(tmp_path) -> None:
    """`aurl generate --threads 0` fails with status 2 and one line on stderr; the buffered
    stdout, a non-daemon thread's late line and the atexit handler all reach the pipe."""
    r = console(PRELUDE, "generate", "--out", str(tmp_path), "--threads", "0")
    assert r.returncode == 2
    assert r.stderr.strip() == "error: --threads 0: give 1 or more"
    assert r.stdout.splitlines() == ["printed before the command", "thread done", "atexit ran"]


def test_python_m_aurl_prints_what_main_prints(capsys) -> None:
    """`python -m aurl config show` writes through a pipe every line main() prints, status 0."""
    from aurl.cli import main

    argv = ["config", "show", "--preset", "tiny"]
    assert main(argv) == 0
    want = capsys.readouterr().out
    r = subprocess.run(
        [sys.executable, "-m", "aurl", *argv], capture_output=True, text=True, env=ENV, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == want and len(want.splitlines()) > 50


def test_main_returns_instead_of_exiting() -> None:
    """Tests call main() in-process: it returns the status and the interpreter goes on."""
    code = (
        "from aurl.cli import main\n"
        "status = main(['config', 'show', '--preset', 'tiny'])\n"
        "print('still here', status)\n"
    )
    r = console(code)
    assert r.stdout.splitlines()[-1] == "still here 0"
