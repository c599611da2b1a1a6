"""Weights I/O: safetensors + ``config.json``. Loading never unpickles anything.

A folder holds ``model.safetensors`` (tensors only, by construction of the format) and
``config.json`` with the model config, the vocab config and the format version, so the model
rebuilds from the folder alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from aurl.config import ModelConfig, VocabConfig, build, to_dict
from aurl.errors import CheckpointError, ConfigError
from aurl.fileio import atomic_write, atomic_write_text

if TYPE_CHECKING:
    from aurl.models.model import MusicTransformerVAEGAN

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT = "aurl-model"
VERSION = 1


def save_pretrained(model: MusicTransformerVAEGAN, folder: str | Path) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``folder`` (created if needed)."""
    from safetensors.torch import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model": to_dict(model.config),
        "vocab": to_dict(model.vocab_config),
        "auto_balance": model.auto_balance,
    }
    # shared (tied) tensors stored once
    atomic_write(
        folder / WEIGHTS, lambda tmp: save_model(model, str(tmp), metadata={"format": "pt"})
    )
    atomic_write_text(folder / CONFIG, json.dumps(meta, indent=2))
    return folder


def _check_safetensors(path: Path) -> None:
    """Refuse anything that is not a safetensors file before any parser sees it: a pickle
    (``torch.save``) begins with 0x80, a zip-format ``torch.save`` with ``PK``."""
    with path.open("rb") as f:
        head = f.read(9)
    if head[:1] == b"\x80" or head[:2] == b"PK":
        raise CheckpointError(
            f"{path} holds a pickle (torch.save) payload, not safetensors: refusing to load it "
            "(pickles can run code); convert it with save_pretrained from a trusted session"
        )
    if len(head) < 9 or head[8:9] != b"{":
        raise CheckpointError(f"{path} is not a safetensors file: re-save it with save_pretrained")


def fill_tied(tensors: dict[str, torch.Tensor], names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Tied tensors (output head = embedding) are stored once under one of their names: fill in
    the other wherever ``names`` (the model's state-dict keys) expects it. Returns ``tensors``."""
    names = set(names)
    for a, b in (("head.weight", "embed.weight"), ("embed.weight", "head.weight")):
        if a in names and a not in tensors and b in tensors:
            tensors[a] = tensors[b]
    return tensors


def load_pretrained(
    folder: str | Path, *, map_location: str | torch.device = "cpu"
) -> MusicTransformerVAEGAN:
    """Rebuild the model saved in ``folder``; raises :class:`CheckpointError` when anything
    is missing, unsafe or does not match."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from aurl.models.model import MusicTransformerVAEGAN

    folder = Path(folder)
    cfg_path, weights = folder / CONFIG, folder / WEIGHTS
    for p in (cfg_path, weights):
        if not p.is_file():
            raise CheckpointError(f"{p} does not exist: point at a folder from save_pretrained")
    try:
        meta = json.loads(cfg_path.read_text())
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{cfg_path}: not an Aurl model config (format {FORMAT!r})")
        model_cfg = build(ModelConfig, meta["model"], prefix="model")
        vocab_cfg = build(VocabConfig, meta["vocab"], prefix="vocab")
    except (json.JSONDecodeError, KeyError, ConfigError, AttributeError) as e:
        raise CheckpointError(f"{cfg_path} is damaged or incompatible: {e}") from None
    _check_safetensors(weights)
    try:
        tensors = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights} cannot be read as safetensors: {e}") from None
    model = MusicTransformerVAEGAN(
        model_cfg, vocab_cfg, auto_balance=bool(meta.get("auto_balance", False))
    ).to(map_location)
    state = model.state_dict()
    fill_tied(tensors, state)
    missing = sorted(set(state) - set(tensors))
    unexpected = sorted(set(tensors) - set(state))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not match its config.json (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}): the folder was mixed from different models"
        )
    for name, t in tensors.items():
        if t.shape != state[name].shape:
            raise CheckpointError(
                f"{weights}: {name} has shape {tuple(t.shape)}, the config needs "
                f"{tuple(state[name].shape)}"
            )
    model.load_state_dict(tensors)
    model.eval()
    return model
