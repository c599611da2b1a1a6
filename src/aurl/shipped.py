"""The models shipped inside the package, by name: what ``--model NAME`` means everywhere.

One rule: ``aurl/pretrained/`` itself holds the default model (:data:`DEFAULT`, also reachable as
``default``), and each sub-folder of it that holds a ``config.json`` is a shipped model named
after the folder. Nothing is downloaded: a name either is in the package or is refused with the
list of names there are. ``--checkpoint DIR`` stays the way to any other model folder.
"""

from __future__ import annotations

from pathlib import Path

from aurl.errors import CheckpointError

ROOT = Path(__file__).resolve().parent / "pretrained"
DEFAULT = "chorales"  # the transformer trained on the bundled Bach chorales (MODEL_CARD.md)
ALIASES = {"default": DEFAULT}
# the shipped VAE (pretrained/styles-vae/MODEL_CARD.md: chorales among its styles): what
# --variations / --interpolate use when no --model / --checkpoint is given, since the default
# model has no latent
VAE_DEFAULT = "styles-vae"
# the shipped style model (pretrained/styles/MODEL_CARD.md: the default taught five styles):
# what --style uses (generate, analyze) when no --model / --checkpoint is given, since the
# default model has no styles
STYLES_DEFAULT = "styles"


def shipped_models(root: Path = ROOT) -> dict[str, Path]:
    """Name -> folder of every shipped model under ``root`` (the default first)."""
    models = {DEFAULT: root} if (root / "config.json").is_file() else {}
    if root.is_dir():
        for folder in sorted(root.iterdir()):
            if (folder / "config.json").is_file():
                models[folder.name] = folder
    return models


def shipped_model(name: str | None = None, root: Path = ROOT) -> Path:
    """The folder of the shipped model ``name`` (None: the default).

    Raises:
        CheckpointError: no such model (the message lists the shipped ones), or none shipped.
    """
    models = shipped_models(root)
    if not models:
        raise CheckpointError(
            f"no shipped model in {root}: pass --checkpoint DIR (a folder written by aurl train)"
        )
    wanted = ALIASES.get(name or DEFAULT, name or DEFAULT)
    if wanted not in models:
        raise CheckpointError(
            f"--model {name}: no such shipped model; the shipped ones are "
            f"{', '.join(models)} (or give your own with --checkpoint DIR)"
        )
    return models[wanted]
