"""Style names to ids, without torch (the torch-free engines and the CLI's checks use it;
:mod:`aurl.models.style` re-exports it beside the embedding)."""

from __future__ import annotations

from collections.abc import Sequence

from aurl.errors import ConfigError

NO_STYLE = -1


def style_id(styles: Sequence[str], name: str) -> int:
    """The id of style ``name`` among a model's ``styles``; ``""`` -> :data:`NO_STYLE`.

    Raises:
        ConfigError: the model has no styles, or none called ``name`` (the message lists them).
    """
    if not name:
        return NO_STYLE
    if not styles:
        raise ConfigError(
            f"--style {name}: this model was trained without styles (model.styles is empty); "
            "drop --style or use a model trained with styles"
        )
    if name not in styles:
        raise ConfigError(f"--style {name}: unknown style; this model knows {', '.join(styles)}")
    return list(styles).index(name)
