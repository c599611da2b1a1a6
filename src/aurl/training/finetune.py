"""Fine-tuning: a new run that starts from another model's weights (``aurl train --init-from``).

The base is a shipped model (``shipped`` = the default, or its name), a model folder
(``save_pretrained`` / ``RUN/model``), a training checkpoint, or a run folder (its best
checkpoint, else its latest). :func:`load_base` reads it, checked and hashed; the run's config
takes the base's model and vocabulary configs (:func:`finetune_config`): the shape and the ids
are the base's, whatever the preset says, and an explicit ``model.*`` / ``vocab.*`` override
that contradicts the base is refused (``model.dropout`` and ``model.style_dropout`` are
training choices and may differ). One addition is allowed: ``model.styles=[...]`` on a base
trained without styles gives it a style table (:data:`ADDABLE_MODEL_KEYS`), zero at the start,
so the run starts computing exactly what the base computes and learns what each style adds
(teaching the chorale model the other corpora's styles without losing what it knows).
Everything else -- optimizer, schedule, data, steps -- is the new run's own, from step 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from aurl.config import Config, ModelConfig, VocabConfig, to_dict
from aurl.errors import CheckpointError, ConfigError

# model keys a fine-tune may set differently from its base
FREE_MODEL_KEYS = ("dropout", "style_dropout")
# model keys a fine-tune may set where the base has none (an empty value): new conditioning
ADDABLE_MODEL_KEYS = ("styles",)
SHIPPED = "shipped"  # --init-from shipped: the default shipped model


@dataclass
class Base:
    """A model to start from, read and checked."""

    name: str  # a shipped model's name, or the folder it was read from
    weights: Path  # its weights file (what an adapter's hash names)
    sha256: str
    model: ModelConfig
    vocab: VocabConfig
    tensors: dict[str, torch.Tensor]  # state dict (tied tensors filled in)


def resolve_base(spec: str | Path) -> tuple[str, Path]:
    """``(name, folder)`` of ``--init-from SPEC``: an existing path, ``shipped``, or a shipped
    model's name.

    Raises:
        CheckpointError: neither a path nor a shipped model (the message lists the names).
    """
    from aurl.shipped import DEFAULT, shipped_model, shipped_models

    path = Path(spec)
    if path.exists():
        return str(path), path
    name = DEFAULT if str(spec) == SHIPPED else str(spec)
    if name not in shipped_models() and name != "default":
        raise CheckpointError(
            f"--init-from {spec}: no such folder and no shipped model of that name; give "
            f"'{SHIPPED}', one of {', '.join(shipped_models()) or '(none shipped)'}, or a "
            "model / checkpoint / run folder"
        )
    return name, shipped_model(name)


def load_base(spec: str | Path) -> Base:
    """Read the base model ``spec`` names (see :func:`resolve_base`), verified.

    Raises:
        CheckpointError: missing, damaged or unsafe files.
    """
    from safetensors.torch import load_file

    from aurl.fileio import file_sha256
    from aurl.training import checkpoint as ckpt

    name, folder = resolve_base(spec)
    if (folder / "config.json").is_file():  # a model folder
        from aurl.models.pretrained import load_pretrained

        model = load_pretrained(folder)
        weights = folder / "model.safetensors"
        tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return Base(name, weights, file_sha256(weights), model.config, model.vocab_config,
                    tensors)  # fmt: skip
    c = ckpt.load_checkpoint(ckpt.export_source(folder))  # verifies every hash
    weights = c.path / "model.safetensors"
    tensors = load_file(str(weights))
    if any(".lora_A." in k for k in tensors):
        raise CheckpointError(
            f"--init-from {spec}: {c.path} is a LoRA run's checkpoint; start from its base "
            "model and apply the adapter with --adapter instead"
        )
    return Base(str(c.path), weights, file_sha256(weights), c.config.model, c.config.vocab,
                tensors)  # fmt: skip


def finetune_config(config: Config, base: Base, explicit: Iterable[str] = ()) -> Config:
    """``config`` with the base's model and vocabulary configs.

    Args:
        config: the run's config (preset, YAML, overrides).
        base: the model to start from.
        explicit: the keys the user set on the command line (``model.d_model``, ...): one that
            differs from the base's value is an error, not silently replaced.

    Raises:
        ConfigError: an explicit override contradicts the base's shape or vocabulary.
    """
    explicit = set(explicit)
    for key in sorted(explicit):
        section, _, field = key.partition(".")
        if section not in ("model", "vocab") or field in FREE_MODEL_KEYS:
            continue
        mine, theirs = (
            getattr(getattr(config, section), field),
            getattr(getattr(base, section), field),
        )
        if section == "model" and field in ADDABLE_MODEL_KEYS and not theirs:
            continue
        if mine != theirs:
            raise ConfigError(
                f"{key}={mine!r}: the base model {base.name} has {key}={theirs!r} and "
                "--init-from keeps the base's shape and vocabulary; drop the override, or train "
                "from scratch without --init-from"
            )
    model = base.model
    for field in (*FREE_MODEL_KEYS, *ADDABLE_MODEL_KEYS):
        if f"model.{field}" in explicit:
            model = dataclasses.replace(model, **{field: getattr(config.model, field)})
    return dataclasses.replace(config, model=model, vocab=base.vocab)


def check_fits(config: Config, base: Base) -> None:
    """The run's model and vocabulary configs must be the base's (``mode``, the free keys and
    an addable key the base leaves empty aside: a later stage may add a VAE to a transformer
    base, a fine-tune styles to a base without them).

    Raises:
        ConfigError: naming the first key that differs and what to do.
    """
    for section in ("vocab", "model"):
        a, b = to_dict(getattr(base, section)), to_dict(getattr(config, section))
        for k in a:
            added = section == "model" and k in ADDABLE_MODEL_KEYS and not a[k]
            if a[k] != b.get(k) and k not in ("mode", *FREE_MODEL_KEYS) and not added:
                raise ConfigError(
                    f"{section}.{k}: the run's config says {b.get(k)!r}, the base model "
                    f"{base.name} has {a[k]!r}; build the config with finetune_config (the CLI "
                    "does) or set it to the base's value"
                )


def load_base_weights(model: torch.nn.Module, base: Base) -> list[str]:
    """Copy the base's tensors into ``model``; returns the model's tensors the base lacks (a
    stage of another mode: they keep their fresh initialization; a style table added to a
    base without styles starts at zero, so the model starts as the base: "no style" is the
    zero vector, and each new style starts from it).

    Raises:
        CheckpointError: a base tensor the model lacks, or of another shape.
    """
    from aurl.models.pretrained import fill_tied

    own = model.state_dict()
    tensors = fill_tied(dict(base.tensors), own)
    skip = {"loss_log_vars"}  # learned loss weights: a training choice of the new run
    for k, v in tensors.items():
        if k in skip:
            continue
        if k not in own or own[k].shape != v.shape:
            have = "absent" if k not in own else f"shape {tuple(own[k].shape)}"
            raise CheckpointError(
                f"base {base.name}: tensor {k} {tuple(v.shape)} does not fit the run's model "
                f"({have}); the run's model config must be the base's"
            )
    fit = {k: v for k, v in tensors.items() if k not in skip}
    model.load_state_dict(fit, strict=False)
    fresh = sorted(k for k in own if k not in fit and k not in skip)
    style = getattr(model, "style", None)
    if style is not None and "style.table.weight" in fresh:
        with torch.no_grad():
            style.table.weight.zero_()
    return fresh


def explicit_keys(overrides: Iterable[str]) -> list[str]:
    """The keys of ``key=value`` command-line overrides."""
    return [o.split("=", 1)[0].strip() for o in overrides if "=" in o]


def lora_info(rank: int, alpha: float | None) -> dict[str, float]:
    """What a LoRA run records in its checkpoints: rank and alpha (default ``2 * rank``)."""
    if rank < 1:
        raise ConfigError(f"--lora {rank}: the rank must be at least 1 (e.g. 8)")
    return {"rank": int(rank), "alpha": float(2 * rank if alpha is None else alpha)}
