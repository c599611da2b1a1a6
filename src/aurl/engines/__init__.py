"""Engines: what the generation loop calls to get logits, below generation and above models.

An engine is duck-typed: ``init_state(batch, *, capacity, history, latents, meter)`` -> state,
``step(ids, state)`` -> logits (B, T, V) advancing the state, ``grammar_state(state)`` (the
grammar state after the tokens fed, when the engine keeps one, else None), plus ``vocab``, ``config`` (the model config: ``max_seq_len``, ``mode``),
``device``, ``name`` (``aurl generate --engine``'s word for it) and ``numpy`` (True: ids, logits and states are numpy arrays and nothing imports
torch).

- :class:`aurl.engines.torch_engine.TorchEngine` wraps a ``MusicTransformerVAEGAN``;
- :class:`aurl.engines.onnx_engine.OnnxEngine` runs an ONNX export on onnxruntime, numpy only;
- :class:`aurl.engines.native_engine.NativeEngine` runs a model folder on Aurl's own compiled
  decode step (``_native.c``), numpy only, neither torch nor onnxruntime.

This package imports neither torch, onnxruntime nor the compiled step at import time.
"""

from __future__ import annotations

from typing import Any

ENGINES = ("torch", "onnx", "native")


def as_engine(model: Any) -> Any:
    """``model`` itself when it is an engine (it has ``numpy``), else a
    :class:`~aurl.engines.torch_engine.TorchEngine` around it (a torch model)."""
    if hasattr(model, "numpy") and hasattr(model, "grammar_state"):
        return model
    from aurl.engines.torch_engine import TorchEngine

    return TorchEngine(model)


__all__ = ["ENGINES", "as_engine"]
