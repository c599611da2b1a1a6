"""The onnx engine: an onnxruntime session over :func:`aurl.models.onnx_export.export_onnx`'s
graphs, numpy only (importing this module, building the engine and generating with it never
import torch).

Duck-typed like the model for the generation loop: :meth:`OnnxEngine.init_state` and
:meth:`OnnxEngine.step` (logits as numpy (B, T, V) float32). The musical-time and grammar-feature
state is computed beside the graphs in numpy (:mod:`aurl.engines.features`); the KV cache is a
preallocated (B, capacity, D) array per layer in the state: each call passes its filled rows as
the graphs' ``past`` inputs (a view, no copy, at batch 1) and writes the new rows the graphs
return.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aurl.config import ModelConfig, VocabConfig, build
from aurl.data.vocab import Vocab
from aurl.engines.features import Features, FeatureState
from aurl.errors import CheckpointError, ConfigError

FORMAT, VERSION = "aurl-onnx", 1  # as aurl.models.onnx_export (held equal by the tests)
CONFIG = "config.json"


@dataclass
class OnnxState:
    """The decode state of the onnx engine."""

    cache: list[np.ndarray] | None  # per layer key, value (B, capacity, D); None before any token
    features: FeatureState
    capacity: int
    pos: int = 0  # tokens in the cache

    @property
    def grammar(self) -> Any:  # what the loop reads as the model's grammar state
        return self.features.grammar


def import_onnxruntime() -> Any:
    """``onnxruntime``, or a :class:`ConfigError` saying how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(
            "--engine onnx needs onnxruntime, which is not installed: pip install onnxruntime "
            "(or use --engine torch)"
        ) from None
    return onnxruntime


def read_export_config(folder: str | Path) -> dict[str, Any]:
    """The checked ``config.json`` of an ONNX export folder.

    Raises:
        CheckpointError: not an export folder, another format version, or a vocabulary whose
            size differs from the graphs'.
    """
    folder = Path(folder)
    path = folder / CONFIG
    if not path.is_file():
        raise CheckpointError(
            f"{path} does not exist: point --checkpoint at a folder written by "
            "`aurl export --format onnx`"
        )
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is damaged: {e}; export the model again") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not an ONNX export (format {meta.get('format')!r}, expected {FORMAT!r}): "
            "for a model folder use --engine torch, or export it with `aurl export --format onnx`"
        )
    if meta.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: ONNX export version {meta.get('version')}, this Aurl reads version "
            f"{VERSION}: export the model again with this version"
        )
    try:
        vocab_cfg = build(VocabConfig, meta["vocab"], prefix="vocab")
        model_cfg = build(ModelConfig, meta["model"], prefix="model")
    except (KeyError, ConfigError) as e:
        raise CheckpointError(f"{path} is incompatible: {e}; export the model again") from None
    size = Vocab(vocab_cfg).size
    if meta.get("vocab_size") != size:
        raise CheckpointError(
            f"{path}: the graphs were exported for a vocabulary of {meta.get('vocab_size')} ids, "
            f"its vocab config gives {size}: the folder mixes exports; export the model again"
        )
    inputs = meta.get("inputs", [])
    if model_cfg.meter and "phase" in inputs and "bar_beats" not in inputs:
        raise CheckpointError(
            f"{path}: the model has meter conditioning (model.meter) but its graphs take no "
            "bar_beats input: export the model again with this version of Aurl"
        )
    for name in meta.get("graphs", {}).values():
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder / name} is missing: export the model again")
    meta["_vocab_config"], meta["_model_config"] = vocab_cfg, model_cfg
    return meta


class OnnxEngine:
    """Prefill and step graphs of an ONNX export folder on onnxruntime's CPU provider.

    Args:
        folder: written by ``aurl export --format onnx``.
        threads: intra-op threads (1: token-by-token decoding of a small batch gains little
            from more).

    Raises:
        CheckpointError: see :func:`read_export_config`.
        ConfigError: onnxruntime is not installed.
    """

    numpy = True  # the loop keeps its arrays in numpy

    def __init__(self, folder: str | Path, *, threads: int = 1) -> None:
        meta = read_export_config(folder)
        ort = import_onnxruntime()
        self.folder, self.meta = Path(folder), meta
        self.vocab_config, self.config = meta["_vocab_config"], meta["_model_config"]
        self.vocab = Vocab(self.vocab_config)
        self.weights = meta.get("weights", "fp32")
        self.inputs = list(meta["inputs"])
        self.n_layers = int(meta["n_layers"])
        self.heads, self.head_dim = int(meta["n_heads"]), int(meta["head_dim"])
        self.features = Features(
            self.vocab, musical_time="phase" in self.inputs,
            grammar_features="sounding" in self.inputs, meter="bar_beats" in self.inputs,
        )  # fmt: skip
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.device = "cpu"

        def session(name: str) -> Any:
            path = self.folder / meta["graphs"][name]
            try:
                return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            except Exception as e:  # onnxruntime raises its own untyped failures
                raise CheckpointError(f"{path} cannot be loaded by onnxruntime: {e}") from None

        self.prefill, self.step_graph = session("prefill"), session("step")
        self.past_names = [
            f"past_{kv}.{i}" for i in range(self.n_layers) for kv in ("key", "value")
        ]

    def init_state(
        self,
        batch_size: int,
        *,
        capacity: int | None = None,
        history: np.ndarray | None = None,
        latents: Any = None,
        device: Any = None,
        dtype: Any = None,
        meter: np.ndarray | None = None,
    ) -> OnnxState:
        """A fresh state for ``batch_size`` rows (the model's ``init_state``): ``history``
        (B, n) sets the musical time and grammar features without entering the cache;
        ``meter`` (B, 2) the time signatures ``(numerator, denominator)`` the bars follow
        (exports of meter models; default 4/4; ignored by others, as by the model)."""
        if latents is not None:
            raise ConfigError("the onnx engine has no latent conditioning: use --engine torch")
        feats = self.features.initial(batch_size, meter)
        if history is not None and history.shape[1] > 0:
            _, feats = self.features(np.asarray(history, dtype=np.int64), feats)
        return OnnxState(None, feats, capacity or self.config.max_seq_len)

    def _store(self, state: OnnxState, new: list[np.ndarray]) -> None:
        """Write the new tokens' keys and values (B, T, D) after the cached ones."""
        B, T, D = new[0].shape
        if state.cache is None:
            state.cache = [np.empty((B, state.capacity, D), np.float32) for _ in new]
        for buf, rows in zip(state.cache, new):
            buf[:, state.pos : state.pos + T] = rows

    def step(self, ids: np.ndarray, state: OnnxState, **_: Any) -> np.ndarray:
        """Feed ``ids`` (B, T) after what ``state`` has seen; returns their logits (B, T, V)
        float32 and advances ``state`` in place."""
        ids = np.asarray(ids, dtype=np.int64)
        B, T = ids.shape
        if state.pos + T > state.capacity:
            raise ValueError(
                f"decode state is full ({state.capacity} positions): start a new state"
            )
        if state.pos > 0 and T > 1:  # the step graph takes one token at a time
            return np.concatenate([self.step(ids[:, j : j + 1], state) for j in range(T)], 1)
        feed, state.features = self.features(ids, state.features)
        if state.pos == 0:
            out = self.prefill.run(None, feed)
        else:
            L = state.pos
            feed.update(zip(self.past_names, (c[:, :L] for c in state.cache)))
            out = self.step_graph.run(None, feed)
        self._store(state, out[1:])
        state.pos += T
        return out[0]

    def grammar_state(self, state: OnnxState) -> Any:
        """The grammar state after every token fed so far (numpy), or None without grammar
        features."""
        return state.features.grammar

    def reorder(self, state: OnnxState, rows: np.ndarray) -> OnnxState:
        """The state of rows ``rows`` (beam search)."""
        cache = None if state.cache is None else [c[rows] for c in state.cache]
        return OnnxState(cache, state.features.take(rows), state.capacity, state.pos)
