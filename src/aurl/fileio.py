"""Atomic file writes and file digests, shared by every layer (a leaf: imports no aurl module).

A file is written to a hidden temporary name beside its target, fsynced, renamed over the
target and the folder fsynced: a crash or a full disk at any moment leaves either the old file or
the complete new one, never half a file.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fsync_path(path: str | Path) -> None:
    """fsync a file or a folder by name (a folder: so that renames inside it are durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """The temporary name :func:`atomic_write` uses for ``path``: hidden, same folder, and the
    same suffix, since some writers choose the format by it."""
    return path.with_name(f".{path.name}.tmp{path.suffix}")


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Write ``path`` through ``write(tmp_path)``, then fsync, rename over ``path``, fsync the folder.

    The folder is created if needed; the temporary file is removed if ``write`` fails.
    Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write` of a UTF-8 text."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, hex, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def not_a_file(path: str | Path) -> str | None:
    """Why ``path`` is not a regular file to read, as the end of an error line ("does not exist",
    "is a folder", "is not a regular file (a device, pipe or socket)"); None when it is one.
    Stats only, never opens: opening a FIFO or a device can block forever. A permission error
    of ``stat`` (a folder it may not search) is raised: the command line names it."""
    import errno
    import stat

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist"
    except NotADirectoryError:
        return "does not exist (a folder on its path is a file)"
    except PermissionError:
        raise
    except OSError as e:  # a symbolic link loop (ELOOP), a name too long: an OSError traceback
        if e.errno == errno.ELOOP:
            return "is a loop of symbolic links"
        return f"cannot be read ({e.strerror or e})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a folder"
    return "is not a regular file (a device, pipe or socket)"
