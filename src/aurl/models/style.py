"""Style conditioning outside the vocabulary: one learned vector per style, added at every
position (like the meter's embedding), so the 774 music ids stay as they are.

Why an embedding at every position rather than a style token at the start: a prefix token
would have to live in the vocabulary (or beside it, in a second embedding table the loss must
skip), it leaves the window once generation slides past it, and a training window cut from the
middle of a piece would need it prepended. An added vector is in every window and every
decoding step, costs one (B, 1, D) add, and "no style" is simply the zero vector, which is
what makes style dropout possible: during training each sequence's style is dropped with
probability ``model.style_dropout`` so that the same model also scores and generates
unconditioned (style id -1).

Styles are named in ``model.styles`` (the model config, saved with every checkpoint); an
empty list builds no embedding at all, so models from before style conditioning load and
compute exactly as before.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from aurl.config import ModelConfig
from aurl.style_ids import NO_STYLE, style_id  # noqa: F401  (re-exported)


class StyleEmbedding(nn.Module):
    """(B,) style ids -> (B, 1, D) vectors; id :data:`NO_STYLE` (-1) -> zeros.

    Args:
        n_styles: how many styles (``len(model.styles)``).
        d_model: the embedding width.
        dropout: probability, in training mode, of replacing a sequence's style by none.
    """

    def __init__(self, n_styles: int, d_model: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.table = nn.Embedding(n_styles, d_model)
        self.dropout = dropout

    def forward(self, style: Tensor) -> Tensor:
        style = style.long().reshape(-1)  # (B,)
        if self.training and self.dropout > 0:
            dropped = torch.rand(style.shape, device=style.device) < self.dropout
            style = style.masked_fill(dropped, NO_STYLE)
        known = (style >= 0).to(self.table.weight.dtype)  # (B,)
        return (self.table(style.clamp(min=0)) * known[:, None])[:, None, :]  # (B, 1, D)


def style_embedding(config: ModelConfig) -> StyleEmbedding | None:
    """The style embedding ``config.styles`` asks for, or None (no styles)."""
    if not config.styles:
        return None
    return StyleEmbedding(len(config.styles), config.d_model, dropout=config.style_dropout)
