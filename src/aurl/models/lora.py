"""Low-rank adapters (LoRA) on the transformer blocks' linear layers, and the adapter folder.

Training wraps the model with PEFT's LoRA (:func:`add_lora`): every ``blocks.N.attn.qkv``,
``blocks.N.attn.proj``, ``blocks.N.ff.fc`` and ``blocks.N.ff.proj`` (plain ``nn.Linear``
called through their ``forward``) gets ``W x + (alpha / r) B A x`` with ``A`` (r, in) random and
``B`` (out, r) zero, so the wrapped model starts equal to the base; every other parameter is
frozen. PEFT is imported only here, and only to train: it pulls in ``transformers`` (~9 s).

Inference merges instead (:func:`merge_adapter`): ``W <- W + (alpha / r) B A`` on the plain
model, one matmul per layer, no PEFT import; the tests hold the merged model's logits equal to
PEFT's unmerged ones. The folder (:func:`save_adapter`):

- ``adapter.safetensors``: ``<module>.lora_A.weight`` (r, in) and ``<module>.lora_B.weight``
  (out, r) per adapted module (PEFT's ``get_peft_model_state_dict`` names);
- ``adapter.json``: format, rank, alpha, target modules, and the base: ``name`` (a shipped
  model's name or the folder it was read from) and ``sha256`` of its weights file. An adapter
  applies to that exact file only (:func:`check_base`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aurl.errors import CheckpointError
from aurl.fileio import atomic_write, atomic_write_text, file_sha256

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"
FORMAT = "aurl-lora-adapter"
VERSION = 1
# PEFT full-matches a string target against each module's name: the decoder blocks' projections
TARGETS = r"blocks\.\d+\.(attn\.(qkv|proj)|ff\.(fc|proj))"


@dataclass(frozen=True)
class AdapterInfo:
    """What an adapter folder's ``adapter.json`` says."""

    rank: int
    alpha: float
    target_modules: str
    base_name: str  # shipped model name or folder of the base
    base_sha256: str  # of the base's weights file

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def add_lora(model: nn.Module, rank: int, alpha: float | None = None) -> nn.Module:
    """Wrap ``model``'s block projections with PEFT LoRA adapters of ``rank`` (in place).

    Args:
        model: a transformer-mode model (its parameters are frozen; only the adapters train).
        rank: r, the adapters' inner width (>= 1).
        alpha: scale numerator (``alpha / rank`` multiplies ``B A``); default ``2 * rank``.

    Returns:
        ``model`` itself, its targeted ``nn.Linear`` replaced by PEFT ``lora.Linear`` modules.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise CheckpointError(f"--lora {rank}: the rank must be at least 1 (e.g. 8)")
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank if alpha is None else alpha, target_modules=TARGETS,
        lora_dropout=0.0, bias="none",
    )  # fmt: skip
    inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():  # the loss weights too: only adapters learn
        p.requires_grad = ".lora_A." in name or ".lora_B." in name
    return model


def lora_settings(model: nn.Module) -> tuple[int, float]:
    """``(rank, alpha)`` of a model wrapped by :func:`add_lora`."""
    for module in model.modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "r", {}):
            return int(module.r["default"]), float(module.lora_alpha["default"])
    raise CheckpointError("the model carries no LoRA adapter")


def adapter_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter weights of a LoRA-wrapped model's state dict, under the folder's names
    (``blocks.0.attn.qkv.lora_A.weight``)."""
    out = {}
    for k, v in state.items():
        if ".lora_A." in k or ".lora_B." in k:
            out[k.replace(".default.", ".")] = v.detach().contiguous()
    return out


def base_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base model's weights of a LoRA-wrapped model's state dict, under the plain names."""
    return {
        k.replace(".base_layer.", "."): v
        for k, v in state.items()
        if ".lora_A." not in k and ".lora_B." not in k
    }


def save_adapter(
    folder: str | Path, tensors: dict[str, torch.Tensor], *, rank: int, alpha: float,
    base_name: str, base_sha256: str,
) -> Path:  # fmt: skip
    """Write ``adapter.safetensors`` + ``adapter.json`` into ``folder`` (atomically each)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    if not tensors:
        raise CheckpointError(f"{folder}: no LoRA tensors to save")
    atomic_write(
        folder / ADAPTER_WEIGHTS,
        lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}),
    )
    meta = {
        "format": FORMAT, "version": VERSION, "rank": rank, "alpha": alpha,
        "target_modules": TARGETS, "base": {"name": base_name, "sha256": base_sha256},
    }  # fmt: skip
    atomic_write_text(folder / ADAPTER_CONFIG, json.dumps(meta, indent=2) + "\n")
    return folder


def read_adapter(folder: str | Path) -> tuple[AdapterInfo, dict[str, torch.Tensor]]:
    """The adapter folder's settings and tensors (safetensors only: nothing is unpickled).

    Raises:
        CheckpointError: missing files, a damaged config, or tensors that do not pair up.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path, weights = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    for p in (cfg_path, weights):
        if not p.is_file():
            raise CheckpointError(
                f"--adapter {folder}: {p.name} is missing; give a folder written by "
                "'aurl train --lora' (RUN/adapter)"
            )
    try:
        meta = json.loads(cfg_path.read_text())
        if not isinstance(meta, dict):
            raise ValueError(f"a {type(meta).__name__}, not a mapping")
        if meta.get("format") != FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}, not {FORMAT!r}")
        rank, alpha = meta["rank"], meta["alpha"]
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise ValueError(f"rank is {rank!r}, not a whole number")
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, int | float)
            or not math.isfinite(alpha)
            or alpha <= 0  # 'aurl train --lora-alpha' gives at least 0.001
        ):
            raise ValueError(f"alpha is {alpha!r}, not a finite positive number")
        info = AdapterInfo(
            rank=rank, alpha=float(alpha),
            target_modules=str(meta["target_modules"]), base_name=str(meta["base"]["name"]),
            base_sha256=str(meta["base"]["sha256"]),
        )  # fmt: skip
        if info.rank < 1:
            raise ValueError(f"rank {info.rank}")
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{cfg_path} is damaged or not an Aurl adapter ({e})") from None
    from aurl.models.pretrained import _check_safetensors

    _check_safetensors(weights)
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights} cannot be read as safetensors: {e}") from None
    return info, tensors


def check_base(info: AdapterInfo, weights: str | Path, folder: str | Path) -> None:
    """Refuse to apply an adapter to any weights file but the one it was trained on."""
    digest = file_sha256(weights)
    if digest != info.base_sha256:
        raise CheckpointError(
            f"--adapter {folder} was trained on {info.base_name} (weights sha256 "
            f"{info.base_sha256[:12]}), not on {weights} (sha256 {digest[:12]}): pass the "
            "adapter's base with --model NAME or --checkpoint DIR"
        )


def merge_adapter(model: nn.Module, info: AdapterInfo, tensors: dict[str, Any]) -> nn.Module:
    """Add ``(alpha / r) B A`` to each adapted linear layer of the plain ``model`` (in place).

    Raises:
        CheckpointError: an adapted module the model lacks, or shapes that do not fit.
    """
    modules = dict(model.named_modules())
    names = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
    with torch.no_grad():
        for name in names:
            a, b = tensors.get(f"{name}.lora_A.weight"), tensors.get(f"{name}.lora_B.weight")
            layer = modules.get(name)
            if a is None or b is None or not isinstance(layer, nn.Linear):
                raise CheckpointError(
                    f"adapter tensor {name}: no matching lora_A/lora_B pair or no linear layer "
                    "of that name in the model: the adapter belongs to another architecture"
                )
            w = layer.weight
            if a.shape != (info.rank, w.shape[1]) or b.shape != (w.shape[0], info.rank):
                raise CheckpointError(
                    f"adapter tensor {name}: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit "
                    f"the layer's weight {tuple(w.shape)} at rank {info.rank}"
                )
            delta = (b.to(torch.float32) @ a.to(torch.float32)) * info.scaling  # (out, in)
            w.add_(delta.to(device=w.device, dtype=w.dtype))
    return model


def apply_adapter(model: nn.Module, folder: str | Path, weights: str | Path) -> nn.Module:
    """Check that ``weights`` (the file ``model`` was loaded from) is the adapter's base, then
    merge the adapter in ``folder`` into ``model``."""
    info, tensors = read_adapter(folder)
    check_base(info, weights, folder)
    return merge_adapter(model, info, tensors)
