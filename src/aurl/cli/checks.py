"""Checks of the options every command shares, made where argv enters, before any work.

Each raises :class:`aurl.errors.ConfigError` naming the flag and what to give, so a bad option
costs one line on stderr (exit 2) instead of a traceback after the model ran: an output folder
that is a file (found only when the first piece was written), a device torch cannot parse, a
thread count that crashes OpenMP (``torch.set_num_threads(20000)`` segfaults), a worker count
that forks thousands of processes, a count that would run for days.
"""

from __future__ import annotations

import os
from pathlib import Path

# more would run for days and fill the disk; run the command again with another --seed
MAX_PIECES = 1000
# torch.set_num_threads(20000) kills the process (SIGSEGV in OpenMP); 4096 still ran
MAX_THREADS = 1024


def out_dir(path: str, flag: str = "--out") -> Path:
    """``path`` as an output folder: refused when it (or a folder above it) is a file, when its
    name holds a NUL byte, or when the nearest existing folder is not writable."""
    from aurl.errors import ConfigError

    if "\0" in path:
        raise ConfigError(f"{flag} {path!r}: a path cannot hold a NUL byte")
    if not path.strip():  # Path('') is the current folder: the output went into it
        raise ConfigError(f"{flag} {path!r}: give a folder to write into")
    folder = Path(path)
    for p in (folder, *folder.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                what = "is" if p == folder else f"is inside {p}, which is"
                raise ConfigError(f"{flag} {folder} {what} a file, not a folder: give a folder")
            if not os.access(p, os.W_OK | os.X_OK):
                raise ConfigError(f"{flag} {folder}: {p} is not writable: give another folder")
            break
    return folder


def threads(n: int, flag: str = "--threads") -> int:
    """A CPU thread count in 1..:data:`MAX_THREADS`."""
    from aurl.errors import ConfigError

    if n < 1:
        raise ConfigError(f"{flag} {n}: give 1 or more")
    if n > MAX_THREADS:
        raise ConfigError(f"{flag} {n}: give at most {MAX_THREADS}")
    return n


def workers(n: int, flag: str = "--workers") -> int:
    """A process count: 0 (all cores) up to 4 per core; more only fork idle processes."""
    from aurl.errors import ConfigError

    most = 4 * (os.cpu_count() or 1)
    if not 0 <= n <= most:
        raise ConfigError(f"{flag} {n}: give 0 (all cores) to {most} (4 per core)")
    return n


def count(n: int, flag: str, *, least: int = 1, most: int = MAX_PIECES) -> int:
    """An integer option in ``least..most``."""
    from aurl.errors import ConfigError

    if not least <= n <= most:
        raise ConfigError(f"{flag} {n}: give {least} to {most}")
    return n


def finite(x: float | None, flag: str, *, least: float, most: float) -> float | None:
    """A float option in ``[least, most]`` (None passes: not given); NaN and inf refused."""
    import math

    from aurl.errors import ConfigError

    if x is not None and not (math.isfinite(x) and least <= x <= most):
        raise ConfigError(f"{flag} {x}: give a number from {least:g} to {most:g}")
    return x


def nonempty(value: str | None, flag: str, hint: str) -> str | None:
    """A name option given as ``''`` (None passes: not given): once read as "not given"."""
    from aurl.errors import ConfigError

    if value is not None and not value.strip():
        raise ConfigError(f"{flag} {value!r}: give {hint}, or leave {flag} out")
    return value


def device(name: str, flag: str = "--device") -> str:
    """A torch device this machine has: ``cpu``, ``cuda``, ``cuda:N`` (N below the GPU count)
    or ``mps``. Imports torch (call it where the model is about to load)."""
    import torch

    from aurl.errors import ConfigError

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(
            f"{flag} {name!r} is not a device: give cpu, cuda, cuda:N or mps"
        ) from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (dev.index or 0) >= n:
            raise ConfigError(f"{flag} {name}: this machine has {n} CUDA device(s): give cpu")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"{flag} mps: MPS is not available here: give cpu")
    elif dev.type != "cpu":
        raise ConfigError(f"{flag} {name!r}: give cpu, cuda, cuda:N or mps")
    return name


def soundfont(path: str | None, flag: str = "--soundfont") -> str | None:
    """A SoundFont file: a RIFF file whose form type is ``sfbk`` (what .sf2 and .sf3 are), so
    the synthesizer never gets a file that is not one."""
    from aurl.errors import ConfigError

    if path is None:
        return None
    from aurl.fileio import not_a_file

    p = Path(path)
    if why := not_a_file(p):
        raise ConfigError(f"{flag} {path} {why}: give an .sf2 or .sf3 file")
    try:
        with p.open("rb") as f:
            head = f.read(12)
    except OSError as e:
        raise ConfigError(f"{flag} {path} cannot be read ({e.strerror})") from None
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"sfbk":
        raise ConfigError(f"{flag} {path} is not a SoundFont (no RIFF sfbk header): give an .sf2")
    return path
