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
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

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


PRECISIONS = ("fp32", "int8", "int4")  # what the cache holds; fp32 folders have no suffix


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
    model), written first if missing (this imports torch)."""
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
    source = {"model": str(shipped.resolve())}
    export_onnx(model, folder, int8=precision == "int8", int4=precision == "int4",
                source=source)  # config.json last  # fmt: skip
    log(f"wrote the ONNX export of {shipped} to {folder} (once; later runs reuse it)")
    return folder


def load_shipped_onnx(shipped: Path, *, precision: str = "fp32", threads: int = 1, log=print):
    """The onnx engine (:class:`aurl.engines.onnx_engine.OnnxEngine`) of the ``precision``
    export of the model folder ``shipped``, written first if missing
    (:func:`ensure_shipped_onnx`).

    Raises:
        CheckpointError: see :func:`ensure_shipped_onnx` and the engine.
    """
    from aurl.engines.onnx_engine import OnnxEngine

    folder = ensure_shipped_onnx(shipped, precision=precision, log=log)
    return OnnxEngine(folder, threads=threads)
