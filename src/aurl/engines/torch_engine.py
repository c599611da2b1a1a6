"""The torch engine: a ``MusicTransformerVAEGAN`` behind the engine interface (torch tensors)."""

from __future__ import annotations

from typing import Any

import torch


class TorchEngine:
    """The model's own ``init_state`` / ``step`` (KV cache, musical time, grammar features).

    Args:
        model: a ``MusicTransformerVAEGAN`` (or its int8 copy) in eval mode.
    """

    name = "torch"  # what `aurl generate --engine` calls it
    numpy = False

    def __init__(self, model: Any) -> None:
        self.model = model
        self.vocab, self.config = model.vocab, model.config
        self.device = model.embed.weight.device

    def init_state(self, batch_size: int, **kwargs: Any) -> Any:
        return self.model.init_state(batch_size, device=self.device, **kwargs)

    @torch.no_grad()
    def step(self, ids: torch.Tensor, state: Any) -> torch.Tensor:
        return self.model.step(ids, state)

    def reorder(self, state: Any, rows: torch.Tensor) -> Any:
        """The state of rows ``rows`` (beam search, resampling)."""
        from aurl.generation.constraints import index_state

        return index_state(state, rows)

    def grammar_state(self, state: Any) -> Any:
        carried = getattr(state, "grammar", None)
        return carried[0] if carried is not None else None
