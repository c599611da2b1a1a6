"""A model folder's ONNX export, written once to a cache folder and reused.

The shipped model (``src/aurl/pretrained``) ships as safetensors only: its ONNX graphs (about
15 MB in fp32, 5 MB int8, 4 MB int4) are written on first use of ``aurl generate --engine
onnx`` by a run that imports torch, into

    $AURL_CACHE/onnx/<name>-<key>[-int8|-int4]/   (AURL_CACHE default: $XDG_CACHE_HOME/aurl, else ~/.cache/aurl)

where ``name`` is ``shipped`` for the shipped model's folder and ``model`` for any other, and
``key`` is a hash of the weights' bytes, the config's text and the export format version, so
retrained weights (even of the same size and time stamp), another config or a new format get
a new folder and no run ever decodes with stale graphs. The weights' hash (~20-40 ms of CPU for
the ~14 MB, on every cold start) is remembered in ``$AURL_CACHE/onnx/digests.json`` under the
file's stat (:func:`weights_digest`), as git's index remembers a file's hash. Every
later run finds the folder and never imports torch. Which precision a command takes is
:func:`aurl.engines.cpu.onnx_precision`'s rule (int4 where the CPU has integer dot products,
else fp32; ``--fp32`` / ``--int8`` / ``--int4`` choose), and ``aurl generate --int8`` on a CPU
without bf16 instructions caches its int8 graphs the same way (see :mod:`aurl.engines.cpu`).

**What the cache keeps.** A run that writes a new export removes the exports it makes stale
(:func:`prune_stale`): folders of the same name whose key differs and that are of an older
export version, or whose recorded source is the same model folder (its weights or config
changed) or a folder that no longer exists; exports of other model folders that still exist
(the name ``model`` is every such folder's), and every precision of the current key, stay. Only folders this cache wrote are touched: a directory
(not a link) directly under ``$AURL_CACHE/onnx``, named ``<name>-<16 hex>[-int8|-int4]``,
holding Aurl's ``config.json``. Two runs at once: a run that loads an export holds a shared
``flock`` on its ``config.json`` from finding it until onnxruntime has read the graph
(:func:`load_shipped_onnx`); the pruner takes an exclusive one without waiting (a folder in use
is skipped, pruned by a later run), renames the folder to a ``.stale-*`` name while holding it
(a reader that then gets its lock sees the file gone from its place and looks again), and only
then deletes it. Stale entries of ``digests.json`` (files gone or changed) go with them. POSIX
only: elsewhere nothing is pruned.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

from aurl.engines.cpu import PRECISIONS  # what the cache holds; fp32 folders have no suffix
from aurl.fileio import atomic_write_text, file_sha256

EXPORT_VERSION = 3  # aurl.models.onnx_export.VERSION (held equal by the tests)


def cache_root() -> Path:
    """``$AURL_CACHE``, else ``$XDG_CACHE_HOME/aurl``, else ``~/.cache/aurl``."""
    if os.environ.get("AURL_CACHE"):
        return Path(os.environ["AURL_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "aurl"


SETTLED_NS = 2_000_000_000  # a file changed this recently may change again within one tick


def weights_digest(path: Path) -> str:
    """The SHA-256 of ``path``'s bytes, remembered in ``$AURL_CACHE/onnx/digests.json`` under
    its stat: size, mtime, ctime, inode and device. Any write to the file sets its ctime, which
    no ``utime`` call sets back, so a changed file is hashed again; a file changed less than
    :data:`SETTLED_NS` before it was hashed is not remembered (file times advance by clock
    ticks of a few ms: a second write within the tick would keep the stat). POSIX only (on
    Windows ``st_ctime`` is the creation time): elsewhere every call hashes."""
    if os.name != "posix":
        return file_sha256(path)
    memo = cache_root() / "onnx" / "digests.json"
    st = path.stat()
    stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
    name = str(path.resolve())
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):  # none yet, or damaged: hash and write it again
        known = {}
    entry = known.get(name) if isinstance(known, dict) else None
    if isinstance(entry, dict) and entry.get("stat") == stamp:
        return str(entry["sha256"])
    digest = file_sha256(path)
    if time.time_ns() - st.st_ctime_ns > SETTLED_NS:
        known = known if isinstance(known, dict) else {}
        known[name] = {"stat": stamp, "sha256": digest}
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(memo, json.dumps(known, indent=1))
        except OSError:  # a read-only cache (exports baked in): the next run hashes again
            pass
    return digest


EXPORT_NAME = re.compile(r"(shipped|model)-([0-9a-f]{16})(?:-(int8|int4))?")


def shipped_onnx_folder(shipped: Path, *, precision: str = "fp32") -> Path:
    """Where the ``precision`` ONNX export of the model folder ``shipped`` lives (existing or
    not): ``$AURL_CACHE/onnx/<name>-<key>[-int8|-int4]``.

    Raises:
        ConfigError: ``precision`` is none of :data:`PRECISIONS`.
    """
    if precision not in PRECISIONS:
        from aurl.errors import ConfigError

        raise ConfigError(f"precision {precision!r}: give one of {', '.join(PRECISIONS)}")
    key = hashlib.sha256(weights_digest(shipped / "model.safetensors").encode())
    key.update((shipped / "config.json").read_bytes())
    key.update(f"v{EXPORT_VERSION}".encode())
    name = "shipped" if shipped.name == "pretrained" else "model"
    suffix = "" if precision == "fp32" else f"-{precision}"
    return cache_root() / "onnx" / f"{name}-{key.hexdigest()[:16]}{suffix}"


def ensure_shipped_onnx(shipped: Path, *, precision: str = "fp32", log=print) -> Path:
    """The ``precision`` export folder of the model folder ``shipped`` (by default the shipped
    model), written first if missing (this imports torch); a run that writes one then removes
    the exports it makes stale (:func:`prune_stale`)."""
    folder = shipped_onnx_folder(shipped, precision=precision)
    if (folder / "config.json").is_file():
        return folder
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        from aurl.errors import CheckpointError

        raise CheckpointError(
            f"the shipped model's ONNX graphs are not in {folder} yet and writing them needs "
            "PyTorch: run `aurl export --format onnx --out DIR` where aurl[torch] is installed "
            "and pass --checkpoint DIR"
        )
    from aurl.models import MusicTransformerVAEGAN
    from aurl.models.onnx_export import export_onnx

    model = MusicTransformerVAEGAN.from_pretrained(shipped)
    source = {"model": str(shipped.resolve())}  # what prune_stale compares
    export_onnx(model, folder, int8=precision == "int8", int4=precision == "int4",
                source=source)  # config.json last  # fmt: skip
    log(f"wrote the ONNX export of {shipped} to {folder} (once; later runs reuse it)")
    removed = prune_stale(folder, shipped)
    if removed:
        log(f"removed {len(removed)} stale ONNX export(s) from {folder.parent}: "
            f"{', '.join(p.name for p in removed)}")  # fmt: skip
    return folder


def load_shipped_onnx(shipped: Path, *, precision: str = "fp32", threads: int = 1, log=print):
    """The onnx engine (:class:`aurl.engines.onnx_engine.OnnxEngine`) of the ``precision``
    export of the model folder ``shipped``, written first if missing
    (:func:`ensure_shipped_onnx`). The folder is held under a shared lock from finding it until
    onnxruntime has read the graph, so a concurrent :func:`prune_stale` never deletes it midway;
    if one moved it away in between, it is looked up (and written) again.

    Raises:
        CheckpointError: see :func:`ensure_shipped_onnx` and the engine.
    """
    from aurl.engines.onnx_engine import OnnxEngine
    from aurl.errors import CheckpointError

    for _ in range(3):
        folder = ensure_shipped_onnx(shipped, precision=precision, log=log)
        with _held(folder / "config.json", exclusive=False) as held:
            if held:
                try:
                    return OnnxEngine(folder, threads=threads)
                except CheckpointError as e:  # damaged in the cache: no export of the user's
                    raise CheckpointError(
                        f"{e} (Aurl's cached export of {shipped}: remove {folder} and run "
                        "again to have it written anew)"
                    ) from None
    raise CheckpointError(
        f"{folder} was removed three times while loading it (another run pruning the cache "
        f"{folder.parent}?): run again, or set AURL_CACHE to a folder of your own"
    )


@contextlib.contextmanager
def _held(path: Path, *, exclusive: bool) -> Iterator[bool]:
    """A ``flock`` on the file ``path`` for the ``with`` block: shared (waits for an exclusive
    holder) or exclusive (never waits). Yields whether it is held on the file still at
    ``path`` (False: missing, moved away meanwhile, or an exclusive lock another run holds).
    Where ``flock`` is missing or refused (not POSIX, some network file systems) it yields True
    for a shared lock (readers go on as before) and False for an exclusive one (nothing is
    pruned)."""
    try:
        import fcntl
    except ImportError:
        yield not exclusive
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB if exclusive else fcntl.LOCK_SH)
        except BlockingIOError:
            yield False
            return
        except OSError:
            yield not exclusive
            return
        try:
            here = os.stat(path).st_ino == os.fstat(fd).st_ino
        except OSError:
            here = False
        yield here
    finally:
        os.close(fd)  # releases the lock


def _is_export(folder: Path) -> dict | None:
    """The ``config.json`` of ``folder`` when it is an ONNX export Aurl wrote, else None."""
    try:
        meta = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == "aurl-onnx" else None


def _source_of(meta: dict) -> Path | None:
    """The model folder an export records as its source, absolute, or None (none recorded, or
    a relative path whose base is unknown)."""
    source = meta.get("source")
    model = source.get("model") if isinstance(source, dict) else None
    return Path(model) if isinstance(model, str) and Path(model).is_absolute() else None


def prune_stale(current: Path, shipped: Path) -> list[Path]:
    """Remove the exports that the export ``current`` of the model folder ``shipped`` makes
    stale, and the stale entries of ``digests.json``; returns the folders removed.

    Stale: a folder directly under ``current.parent`` (not a link), named like ``current``
    (``<name>-<16 hex>[-int8|-int4]``) with the same ``name`` and another key, holding Aurl's
    ``config.json`` of an older export version, or whose source is ``shipped`` itself or no
    existing folder (or is not recorded). A folder in use (:func:`load_shipped_onnx` holds its lock) is skipped. POSIX
    only (elsewhere it removes nothing).
    """
    if os.name != "posix":
        return []
    import shutil

    root = current.parent
    mine = EXPORT_NAME.fullmatch(current.name)
    if mine is None or root.resolve() != (cache_root() / "onnx").resolve():
        return []
    here = shipped.resolve()
    removed: list[Path] = []
    for folder in sorted(root.iterdir()):
        if folder.name.startswith(".stale-") and not folder.is_symlink():
            shutil.rmtree(folder, ignore_errors=True)  # left by a pruner that was stopped
            continue
        found = EXPORT_NAME.fullmatch(folder.name)
        if found is None or found[1] != mine[1] or found[2] == mine[2]:
            continue
        if folder.is_symlink() or not folder.is_dir():
            continue
        meta = _is_export(folder)
        if meta is None:
            continue  # not (or not yet: config.json is written last) an export Aurl wrote
        source = _source_of(meta)
        older = isinstance(meta.get("version"), int) and meta["version"] < EXPORT_VERSION
        if not older and source is not None and source != here and source.is_dir():
            continue  # another model folder's export, still in use there
        with _held(folder / "config.json", exclusive=True) as held:
            if not held:
                continue  # a run is loading it: a later run prunes it
            trash = root / f".stale-{folder.name}-{os.getpid()}-{time.monotonic_ns()}"
            try:
                folder.rename(trash)
            except OSError:
                continue
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(folder)
    prune_digests(root / "digests.json")
    return removed


def prune_digests(memo: Path) -> None:
    """Drop the entries of the weights-hash memo ``memo`` (:func:`weights_digest`) whose file
    is gone or has changed since (its stat differs): they can never be read back."""
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(known, dict):
        return
    kept = {}
    for name, entry in known.items():
        try:
            st = os.stat(name)
        except OSError:
            continue
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
        if isinstance(entry, dict) and entry.get("stat") == stamp:
            kept[name] = entry
    if len(kept) < len(known):
        with contextlib.suppress(OSError):  # a read-only cache: the entries stay, harmless
            atomic_write_text(memo, json.dumps(kept, indent=1))
