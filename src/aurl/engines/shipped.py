"""The shipped model's ONNX export, written once to a cache folder and reused.

The shipped model (``src/aurl/pretrained``) ships as safetensors only: its ONNX graphs (about
29 MB in fp32) are written on first use of ``aurl generate --engine onnx`` by a run that imports
torch, into

    $AURL_CACHE/onnx/shipped-<key>/    (AURL_CACHE default: $XDG_CACHE_HOME/aurl, else ~/.cache/aurl)

where ``key`` names the weights (their size and modification time, and the config's text) and
the export format version, so a new model or a new format gets a new folder. Every later run
finds the folder and never imports torch.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

EXPORT_VERSION = 1  # aurl.models.onnx_export.VERSION (held equal by the tests)


def cache_root() -> Path:
    """``$AURL_CACHE``, else ``$XDG_CACHE_HOME/aurl``, else ``~/.cache/aurl``."""
    if os.environ.get("AURL_CACHE"):
        return Path(os.environ["AURL_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "aurl"


def shipped_onnx_folder(shipped: Path) -> Path:
    """Where the ONNX export of the model folder ``shipped`` lives (existing or not)."""
    weights = (shipped / "model.safetensors").stat()
    key = hashlib.sha256()
    key.update((shipped / "config.json").read_bytes())
    key.update(f"{weights.st_size} {weights.st_mtime_ns} v{EXPORT_VERSION}".encode())
    return cache_root() / "onnx" / f"shipped-{key.hexdigest()[:16]}"


def ensure_shipped_onnx(shipped: Path, *, log=print) -> Path:
    """The shipped model's export folder, written first if missing (this imports torch)."""
    folder = shipped_onnx_folder(shipped)
    if (folder / "config.json").is_file():
        return folder
    from aurl.models import MusicTransformerVAEGAN
    from aurl.models.onnx_export import export_onnx

    model = MusicTransformerVAEGAN.from_pretrained(shipped)
    export_onnx(model, folder, source={"model": str(shipped)})  # config.json written last
    log(f"wrote the shipped model's ONNX export to {folder} (once; later runs reuse it)")
    return folder
