"""A model folder's ONNX export, written once to a cache folder and reused.

The shipped model (``src/aurl/pretrained``) ships as safetensors only: its ONNX graphs (about
29 MB in fp32) are written on first use of ``aurl generate --engine onnx`` by a run that imports
torch, into

    $AURL_CACHE/onnx/<name>-<key>[-int8]/   (AURL_CACHE default: $XDG_CACHE_HOME/aurl, else ~/.cache/aurl)

where ``key`` is a hash of the weights' bytes, the config's text and the export format version,
so retrained weights (even of the same size and time stamp), another config or a new format get
a new folder and no run ever decodes with stale graphs. (Hashing the ~14 MB of weights costs a
few milliseconds per run.) Every
later run finds the folder and never imports torch. ``aurl generate --engine onnx`` takes the
int8 folder by default on CPUs with integer dot products (``--fp32``: the fp32 one), and
``aurl generate --int8`` on a CPU without bf16 instructions caches its int8 graphs the same way
(see :mod:`aurl.engines.cpu`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from aurl.fileio import file_sha256

EXPORT_VERSION = 2  # aurl.models.onnx_export.VERSION (held equal by the tests)


def cache_root() -> Path:
    """``$AURL_CACHE``, else ``$XDG_CACHE_HOME/aurl``, else ``~/.cache/aurl``."""
    if os.environ.get("AURL_CACHE"):
        return Path(os.environ["AURL_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "aurl"


def shipped_onnx_folder(shipped: Path, *, int8: bool = False) -> Path:
    """Where the ONNX export of the model folder ``shipped`` lives (existing or not)."""
    key = hashlib.sha256(file_sha256(shipped / "model.safetensors").encode())
    key.update((shipped / "config.json").read_bytes())
    key.update(f"v{EXPORT_VERSION}".encode())
    name = "shipped" if shipped.name == "pretrained" else "model"
    return cache_root() / "onnx" / f"{name}-{key.hexdigest()[:16]}{'-int8' if int8 else ''}"


def ensure_shipped_onnx(shipped: Path, *, int8: bool = False, log=print) -> Path:
    """The export folder of the model folder ``shipped`` (by default the shipped model),
    written first if missing (this imports torch)."""
    folder = shipped_onnx_folder(shipped, int8=int8)
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
    export_onnx(model, folder, int8=int8, source={"model": str(shipped)})  # config.json last
    log(f"wrote the ONNX export of {shipped} to {folder} (once; later runs reuse it)")
    return folder
