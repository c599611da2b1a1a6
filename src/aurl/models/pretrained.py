"""Weights I/O: safetensors + ``config.json``. Loading never unpickles anything.

A folder holds ``model.safetensors`` (tensors only, by construction of the format) and
``config.json`` with the model config, the vocab config and the format version, so the model
rebuilds from the folder alone.

Loading checks before it touches memory: the safetensors header is read and checked in Python
(its length, every tensor's dtype, shape and byte range inside the file); the config's width and
depth are compared with it; then the model is built without initialization (its parameters are
address space no page of which is written) and compared with the header tensor by tensor.
Only when every tensor matches are the weights read into it. A damaged file or a config with
absurd sizes fails with :class:`CheckpointError` having touched a few MB. (The ``meta`` device
would avoid even the address space, but building this model there imports torch._dynamo: 3-16 s
on every cold start.)
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from aurl.config import ModelConfig, VocabConfig, build, to_dict
from aurl.errors import CheckpointError, ConfigError
from aurl.fileio import atomic_write, atomic_write_text
from aurl.safetensors_io import (  # noqa: F401  (read_header: part of this module's API)
    FLOAT_DTYPES,
    read_header,
)
from aurl.safetensors_io import check_safetensors as _check_safetensors

if TYPE_CHECKING:
    from aurl.models.model import MusicTransformerVAEGAN

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT = "aurl-model"
VERSION = 1
# Model keys added after the first release whose default means "the feature is absent, as before
# the key existed". They are written only when they differ from that default, so an older Aurl
# still reads a folder that does not use them (it refuses keys it does not know). Their defaults
# must never change.
OPTIONAL_MODEL_KEYS = (
    "meter", "styles", "style_dropout", "fim", "anticipation", "decoder_token_dropout",
    "latent_zero_init",
)  # fmt: skip


def model_config_dict(config: ModelConfig) -> dict:
    """``config`` as written into a ``config.json``: every key, except the
    :data:`OPTIONAL_MODEL_KEYS` still at their defaults (a missing key reads back as its
    default)."""
    out = to_dict(config)
    defaults = to_dict(ModelConfig())
    for key in OPTIONAL_MODEL_KEYS:
        if out[key] == defaults[key]:
            out.pop(key)
    return out


def save_pretrained(
    model: MusicTransformerVAEGAN,
    folder: str | Path,
    *,
    window: int | None = None,
    voices: int = 0,
) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``folder`` (created if needed).

    ``window``: the training windows' length (``data.window``), recorded so that evaluation
    scores the model in windows of the length it learned (read by :func:`trained_window`).
    ``voices``: the voices the model's music is written in (``aurl checkpoint export
    --voices``), ``aurl generate``'s default ``--voices`` (``cli.generate.model_voices``);
    0: not recorded.
    """
    from safetensors.torch import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model": model_config_dict(model.config),
        "vocab": to_dict(model.vocab_config),
        "auto_balance": model.auto_balance,
    }
    if window is not None:
        meta["window"] = int(window)
    if voices:
        meta["voices"] = int(voices)
    # shared (tied) tensors stored once
    atomic_write(
        folder / WEIGHTS, lambda tmp: save_model(model, str(tmp), metadata={"format": "pt"})
    )
    atomic_write_text(folder / CONFIG, json.dumps(meta, indent=2))
    return folder


def trained_window(folder: str | Path) -> int | None:
    """The training window a model folder records (None: written before it was recorded, or
    unreadable: the caller keeps its default)."""
    try:
        window = json.loads((Path(folder) / CONFIG).read_text()).get("window")
    except (OSError, ValueError, AttributeError):
        return None
    ok = isinstance(window, int) and not isinstance(window, bool) and window > 0
    return window if ok else None


def _dtype_name(t: torch.Tensor) -> str:
    return {
        torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
        torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
        torch.uint8: "U8", torch.bool: "BOOL",
    }.get(t.dtype, str(t.dtype))  # fmt: skip


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """``torch.nn.init`` functions as no-ops (meta tensors have no values to initialize; on the
    meta device they cost ~10x a real init). The same device as Hugging Face's
    ``no_init_weights``."""
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


def implied_sizes(header: dict) -> dict[str, int | str]:
    """The config fields that make a model big, read off the header's names and shapes (a
    field is absent when its tensor is): mode, width, depth, MLP ratio, VAE and
    discriminator sizes."""

    def shape(name: str) -> tuple[int, ...]:
        return header[name][1] if name in header else ()

    def count(prefix: str) -> int:
        return len({k[len(prefix) :].split(".")[0] for k in header if k.startswith(prefix)})

    out: dict[str, int | str] = {"n_layers": count("blocks.")}
    has_disc, has_encoder = count("discriminator.") > 0, count("encoder.") > 0
    out["mode"] = "vae_gan" if has_disc else "vae" if has_encoder else "transformer"
    if len(s := shape("embed.weight")) == 2:
        out["d_model"] = s[1]
    if len(s := shape("blocks.0.ff.fc.weight")) == 2 and s[1]:
        out["ff_mult"] = s[0] // s[1]
    if has_encoder:
        out["encoder_layers"] = count("encoder.blocks.")
    if len(s := shape("conditioner.proj.0.weight")) == 2:
        out["latent_dim"] = s[1]
    if len(s := shape("discriminator.inp.parametrizations.weight.original")) == 2:
        out["disc_d_model"] = s[0]
    if has_disc:
        out["disc_layers"] = count("discriminator.scales.0.convs.")
    return out


def check_sizes(weights: Path, header: dict, model_cfg: ModelConfig) -> None:
    """The sizes that make a model big (:func:`implied_sizes`) against the config, before any
    model is built; raises CheckpointError on the first difference."""
    for key, value in implied_sizes(header).items():
        if getattr(model_cfg, key) != value:
            raise CheckpointError(
                f"{weights} holds a model with {key}={value} (by its tensor shapes), config.json asks for "
                f"{key}={getattr(model_cfg, key)}: the config does not belong to these weights"
            )


def check_state(weights: Path, header: dict, state: dict[str, torch.Tensor]) -> None:
    """Every tensor of the model's ``state`` against the header: names, shapes, dtypes."""
    names = set(header)
    for a, b in (("head.weight", "embed.weight"), ("embed.weight", "head.weight")):
        if a in state and a not in names and b in names:  # tied: stored once
            names.add(a)
            header = {**header, a: header[b]}
    missing, unexpected = sorted(set(state) - names), sorted(names - set(state))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not match its config.json (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}): the folder was mixed from different models"
        )
    for name, t in state.items():
        dtype, shape = header[name]
        if shape != tuple(t.shape):
            raise CheckpointError(
                f"{weights}: {name} has shape {shape}, the config needs {tuple(t.shape)}"
            )
        if (dtype in FLOAT_DTYPES) != t.is_floating_point() or (
            not t.is_floating_point() and dtype != _dtype_name(t)
        ):
            raise CheckpointError(
                f"{weights}: {name} is stored as {dtype}, the model needs {_dtype_name(t)}"
            )


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
    except PermissionError:  # not damaged: the caller's one line names the file (cli.denied)
        raise
    except (ValueError, OSError) as e:  # not JSON, not UTF-8, unreadable
        raise CheckpointError(f"{cfg_path} is damaged (not JSON text: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_path}: not an Aurl model config (format {FORMAT!r})")
    for section in ("model", "vocab"):
        if not isinstance(meta.get(section), dict):
            raise CheckpointError(
                f"{cfg_path}: '{section}' is missing or not a mapping of {section} settings: "
                "re-save the model with save_pretrained"
            )
    try:
        model_cfg = build(ModelConfig, meta["model"], prefix="model")
        vocab_cfg = build(VocabConfig, meta["vocab"], prefix="vocab")
    except ConfigError as e:
        raise CheckpointError(f"{cfg_path} is damaged or incompatible: {e}") from None
    _check_safetensors(weights)
    header = read_header(weights)
    check_sizes(weights, header, model_cfg)
    with _no_init():  # parameters allocated but never written: no page touched until loading
        try:
            model = MusicTransformerVAEGAN(
                model_cfg, vocab_cfg, auto_balance=bool(meta.get("auto_balance", False))
            )
        except ConfigError as e:  # too big for this machine
            raise CheckpointError(f"{cfg_path}: {e}") from None
    check_state(weights, header, model.state_dict())
    model.to(map_location)
    try:
        tensors = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights} cannot be read as safetensors: {e}") from None
    check_finite(weights, tensors)
    model.load_state_dict(fill_tied(tensors, model.state_dict()))
    model.eval()
    check_first_logits(weights, model)
    return model


def check_first_logits(weights: Path, model: MusicTransformerVAEGAN) -> None:
    """Refuse finite weights whose products overflow float32 (a row of 3e38): the logits of a
    piece's first tokens are NaN or infinite, and sampling from them stopped in
    ``torch.multinomial`` with a traceback. Six tokens (two notes struck, time moving on, one
    released: attention over several keys, where an overflowing query first shows) through the
    model, ~2 ms for the shipped one; the numpy engines check one token at load."""
    from aurl.data.vocab import START, Vocab

    vocab = Vocab(model.vocab_config)
    low = vocab.config.pitch_min
    phrase = [START, vocab.velocity + vocab.config.velocity_bins // 2, vocab.note_on_id(low + 39),
              vocab.note_on_id(low + 43), vocab.shift_id(vocab.config.max_shift_steps // 16),
              vocab.note_off_id(low + 39)]  # fmt: skip
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(torch.tensor([phrase], dtype=torch.long, device=device)).logits
    if not bool(torch.isfinite(logits).all()):
        raise CheckpointError(
            f"{weights}: the model's logits for a piece's first tokens are NaN or infinite "
            "(weights too large for float32 products?): use an earlier checkpoint"
        )


def check_finite(weights: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse weights holding NaN or infinity (a diverged run saved): every logit of such a
    model is NaN, which no sampler can draw from. One pass over the weights (~10 ms for the
    shipped model)."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(
                f"{weights}: {name} holds NaN or infinite values (a diverged run?): "
                "use an earlier checkpoint"
            )
