"""The onnx engine: an onnxruntime session over :func:`aurl.models.onnx_export.export_onnx`'s
graphs, numpy only (importing this module, building the engine and generating with it never
import torch).

Duck-typed like the model for the generation loop: :meth:`OnnxEngine.init_state` and
:meth:`OnnxEngine.step` (logits as numpy (B, T, V) float32). The musical-time and grammar-feature
state is computed beside the graph in numpy (:mod:`aurl.engines.features`); the KV cache is a
preallocated (B, H, capacity, hd) array per layer in the state, bound as the graph's ``past``
input and ``present`` output at once, so onnxruntime writes the new entries in place. One-token
steps refill the state's bound input buffers in place: nothing is bound, allocated or copied per
token but the logits returned.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aurl.config import ModelConfig, VocabConfig, build
from aurl.data.vocab import Vocab
from aurl.engines.features import Features, FeatureState, cache_capacity
from aurl.errors import CheckpointError, ConfigError

FORMAT, VERSION = "aurl-onnx", 3  # as aurl.models.onnx_export (held equal by the tests)
READS = (2, 3)  # version 2 graphs split q, k and v before the attention: the same contract
CONFIG = "config.json"


@dataclass
class OnnxState:
    """The decode state of the onnx engine."""

    cache: list[np.ndarray]  # per layer key, value (B, H, capacity, hd), written by the graph
    values: list[Any]  # onnxruntime OrtValues over ``cache`` (the same memory)
    features: FeatureState
    capacity: int
    pos: int = 0  # tokens in the cache
    inputs: dict[str, np.ndarray] | None = None  # one-token inputs, bound while stepping
    engine: Any = field(default=None, repr=False)  # whose graph the caches are bound to

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
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        meta = meta if isinstance(meta, dict) else {}
        raise CheckpointError(
            f"{path} is not an ONNX export (format {meta.get('format')!r}, expected {FORMAT!r}): "
            "for a model folder use --engine torch, or export it with `aurl export --format onnx`"
        )
    if meta.get("version") not in READS:
        raise CheckpointError(
            f"{path}: ONNX export version {meta.get('version')}, this Aurl reads versions "
            f"{', '.join(map(str, READS))}: export the model again (aurl export --format onnx --checkpoint "
            "MODEL_DIR --out DIR, or --model NAME for a shipped model)"
        )
    try:
        vocab_cfg = build(VocabConfig, meta["vocab"], prefix="vocab")
        model_cfg = build(ModelConfig, meta["model"], prefix="model")
    except (KeyError, ConfigError) as e:
        raise CheckpointError(f"{path} is incompatible: {e}; export the model again") from None
    size = Vocab(vocab_cfg).size
    if meta.get("vocab_size") != size:
        raise CheckpointError(
            f"{path}: the graphs were exported for a vocabulary of {meta.get('vocab_size')!r} ids, "
            f"its vocab config gives {size}: the folder mixes exports; export the model again"
        )
    inputs, graphs = meta.get("inputs", []), meta.get("graphs", {})
    if not (isinstance(inputs, list) and all(isinstance(n, str) for n in inputs)) or not (
        isinstance(graphs, dict) and all(isinstance(n, str) for n in graphs.values())
    ):
        raise CheckpointError(
            f"{path} is damaged: 'inputs' must be a list of names and 'graphs' a mapping of "
            "file names; export the model again"
        )
    if not isinstance(graphs.get("decoder"), str):
        raise CheckpointError(
            f"{path} is damaged: 'graphs' names no 'decoder' file; export the model again"
        )
    shape = {"n_layers": model_cfg.n_layers, "n_heads": model_cfg.n_heads,
             "head_dim": model_cfg.d_model // model_cfg.n_heads}  # fmt: skip
    for key, want in shape.items():  # the engine sizes its caches by these
        have = meta.get(key)
        if type(have) is not int or have != want:
            raise CheckpointError(
                f"{path}: {key} is {have!r}, its model config gives {want}: the folder mixes "
                "exports; export the model again"
            )
    if meta["head_dim"] % 8:  # aurl.models.onnx_export.HEAD_MULTIPLE (exports made before it)
        raise CheckpointError(
            f"{path}: heads {meta['head_dim']} wide, which onnxruntime's GroupQueryAttention "
            "does not run (a multiple of 8): use --engine native or torch on the model folder"
        )
    if model_cfg.meter and "phase" in inputs and "bar_beats" not in inputs:
        raise CheckpointError(
            f"{path}: the model has meter conditioning (model.meter) but its graphs take no "
            "bar_beats input: export the model again with this version of Aurl"
        )
    for name in graphs.values():
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder / name} is missing: export the model again")
    meta["_vocab_config"], meta["_model_config"] = vocab_cfg, model_cfg
    return meta


class OnnxEngine:
    """The decoder graph of an ONNX export folder on onnxruntime's CPU provider.

    Each call binds the feature inputs and the state's cache buffers (as the graph's ``past``
    inputs and, the same memory, its ``present`` outputs: the graph writes the new keys and
    values in place) to one IOBinding, so a step copies nothing but its small inputs and the
    logits.

    Args:
        folder: written by ``aurl export --format onnx``.
        threads: intra-op threads (1: token-by-token decoding of a small batch gains little
            from more).

    Raises:
        CheckpointError: see :func:`read_export_config`.
        ConfigError: onnxruntime is not installed.
    """

    name = "onnx"  # what `aurl generate --engine` calls it
    numpy = True
    kind = "onnx"  # what a report names it  # the loop keeps its arrays in numpy

    def __init__(self, folder: str | Path, *, threads: int = 1) -> None:
        meta = read_export_config(folder)
        ort = self._ort = import_onnxruntime()
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
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 4  # its failures are raised (one line each), never logged too
        self.device = "cpu"
        path = self.folder / meta["graphs"]["decoder"]
        try:
            # no "fallback" (to the same CPU provider), which prints a banner of four lines to
            # stdout before failing again
            self.session = ort.InferenceSession(
                str(path), opts, providers=["CPUExecutionProvider"], enable_fallback=0
            )
        except Exception as e:  # onnxruntime raises its own untyped failures
            raise CheckpointError(f"{path} cannot be loaded by onnxruntime: {e}") from None
        self.cache_names = [
            f"{kv}.{i}" for i in range(self.n_layers) for kv in ("key", "value")
        ]  # fmt: skip
        self._check_graph(path)
        self.io = self.session.io_binding()
        self._bound: Any = None  # the state whose one-token inputs the binding holds
        self._logits: dict[int, tuple[np.ndarray, Any]] = {}  # one-token steps' per batch size
        self._prefill_out: Any = None  # the last prefill's logits, which the binding points into
        # one first token (a cache of one position: ~1 ms): a graph whose weights or int8 /
        # int4 scales are NaN or infinite gives no finite logit, and the sampler would draw
        # from NaN pieces that look valid
        first = self.step(np.zeros((1, 1), np.int64), self.init_state(1, capacity=1))
        if not np.isfinite(first).all():
            raise CheckpointError(
                f"{path} gives NaN or infinite logits for a first token (damaged weights or "
                "scales): export the model again"
            )
        self._bound = None

    def _check_graph(self, path: Path) -> None:
        """The graph's own inputs and static sizes agree with its ``config.json`` (a graph
        copied from another export, of another vocabulary or shape, is refused here rather
        than failing inside onnxruntime mid-piece).

        Raises:
            CheckpointError: naming the first size or input that differs.
        """
        have = {x.name: x.shape for x in self.session.get_inputs()}
        have.update({x.name: x.shape for x in self.session.get_outputs()})
        want_inputs = [*self.inputs, "seqlens_k", "total_sequence_length"]
        want_inputs += [f"past_{n}" for n in self.cache_names]
        missing = [n for n in want_inputs if n not in have]
        if missing:
            raise CheckpointError(
                f"{path} takes no input {missing[0]!r} that {self.folder / CONFIG} lists: the "
                "folder mixes exports; export the model again"
            )
        sizes = [("vocabulary ids", "logits", -1, self.vocab.size)]
        sizes += [("attention heads", "past_key.0", 1, self.heads)]
        sizes += [("values per head", "past_key.0", 3, self.head_dim)]
        if "sounding" in self.inputs:
            sizes.append(("pitches", "sounding", -1, self.vocab.n_pitches))
        for what, name, axis, want in sizes:
            got = have.get(name, [None])[axis]
            if isinstance(got, int) and got != want:
                raise CheckpointError(
                    f"{path} was exported with {got} {what} ({name}), its {CONFIG} gives "
                    f"{want}: the folder mixes exports; export the model again"
                )
        if f"past_key.{self.n_layers}" in have:
            raise CheckpointError(
                f"{path} has more layers than the {self.n_layers} of its {CONFIG}: the folder "
                "mixes exports; export the model again"
            )
        unfed = [x.name for x in self.session.get_inputs() if x.name not in want_inputs]
        if unfed:  # onnxruntime would refuse the first step: nothing binds it
            raise CheckpointError(
                f"{path} takes the input {unfed[0]!r}, which {self.folder / CONFIG} does not "
                "list: the folder mixes exports; export the model again"
            )

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
        feats = self.features.start(batch_size, meter, history)
        capacity = cache_capacity(capacity, self.config.max_seq_len)  # the rotary tables' end
        shape = (batch_size, self.heads, capacity, self.head_dim)
        cache = [np.zeros(shape, np.float32) for _ in self.cache_names]
        return self._state(cache, feats, capacity, 0)

    def _state(
        self, cache: list[np.ndarray], feats: FeatureState, capacity: int, pos: int
    ) -> OnnxState:
        values = [self._ort.OrtValue.ortvalue_from_numpy(c) for c in cache]
        return OnnxState(cache, values, feats, capacity, pos, engine=self)

    def _bind_cache(self, state: OnnxState) -> None:
        """Bind ``state``'s buffers as the past inputs and present outputs."""
        io = self.io
        for name, value in zip(self.cache_names, state.values):
            io.bind_ortvalue_input(f"past_{name}", value)
            io.bind_ortvalue_output(f"present_{name}", value)

    def _logits_buffer(self, B: int) -> tuple[np.ndarray, Any]:
        """A reused (B, 1, V) float32 output buffer of one-token steps and its OrtValue."""
        if B not in self._logits:
            buf = np.empty((B, 1, self.vocab.size), np.float32)
            self._logits[B] = (buf, self._ort.OrtValue.ortvalue_from_numpy(buf))
        return self._logits[B]

    def step(self, ids: np.ndarray, state: OnnxState, **_: Any) -> np.ndarray:
        """Feed ``ids`` (B, T) after what ``state`` has seen; returns their logits (B, T, V)
        float32 (a new array) and advances ``state`` in place."""
        ids = np.asarray(ids, dtype=np.int64)
        B, T = ids.shape
        if state.engine is not self:  # its caches fit another graph: some inputs stay unbound
            raise ValueError(
                "a decode state made by another engine: step a state with the engine whose "
                "init_state or reorder made it"
            )
        if state.pos + T > state.capacity:
            raise ValueError(
                f"decode state is full ({state.capacity} positions): start a new state"
            )
        if state.pos > 0 and T > 1:  # later calls feed one token at a time
            return np.concatenate([self.step(ids[:, j : j + 1], state) for j in range(T)], 1)
        if T == 1:
            return self._step_one(ids[:, 0], state)
        io = self.io
        feed, state.features = self.features(ids, state.features)
        for name, value in feed.items():
            io.bind_cpu_input(name, value)
        io.bind_cpu_input("seqlens_k", np.full(B, T - 1, np.int32))
        io.bind_cpu_input("total_sequence_length", np.array(T, np.int32))
        self._bind_cache(state)
        self._bound = None  # the one-token inputs must be bound again
        # a buffer of this call's own, returned as is: prefills come in every length, and one
        # kept per (B, T) held every length's logits for the engine's life (~3 MB a prefill of
        # a chorale); this one is kept only until the next prefill (the binding points into it)
        logits = np.empty((B, T, self.vocab.size), np.float32)
        self._prefill_out = (logits, self._ort.OrtValue.ortvalue_from_numpy(logits))
        io.bind_ortvalue_output("logits", self._prefill_out[1])
        self._run(state)
        state.pos = T
        return logits

    def _step_one(self, ids: np.ndarray, state: OnnxState) -> np.ndarray:
        """One token per row: the state's own input buffers, bound once and refilled in
        place (no binding, allocation or copy of inputs per token)."""
        B = len(ids)
        fresh = self._bound is not state
        if fresh:
            if state.inputs is None:
                state.inputs = self.features.buffers(B)
                state.inputs["seqlens_k"] = np.zeros(B, np.int32)
                state.inputs["total_sequence_length"] = np.zeros((), np.int32)
            io = self.io
            for name, value in state.inputs.items():
                io.bind_cpu_input(name, value)
            for name, value in zip(self.cache_names, state.values):
                io.bind_ortvalue_input(f"past_{name}", value)
                io.bind_ortvalue_output(f"present_{name}", value)
            io.bind_ortvalue_output("logits", self._logits_buffer(B)[1])
            self._bound = state
        inputs = state.inputs
        state.features = self.features.advance_into(ids, state.features, inputs, fresh=fresh)
        inputs["seqlens_k"][:] = state.pos
        inputs["total_sequence_length"][()] = state.pos + 1
        self._run(state)
        state.pos += 1
        return self._logits[B][0].copy()

    def _run(self, state: OnnxState) -> None:
        """Run the bound graph; a failure inside onnxruntime (a graph whose sizes differ from
        its config.json's, as a rotary table shorter than ``model.max_seq_len``) is a
        :class:`CheckpointError` naming the graph, not onnxruntime's own exception."""
        try:
            self.session.run_with_iobinding(self.io)
        except Exception as e:  # onnxruntime raises its own untyped failures
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            why = why.split("Status Message: ")[-1].rstrip(".")  # onnxruntime's own reason
            raise CheckpointError(
                f"{self.folder / self.meta['graphs']['decoder']} failed at position {state.pos} "
                f"({why}): the graph does not match its {CONFIG}; export the model again"
            ) from None

    def grammar_state(self, state: OnnxState) -> Any:
        """The grammar state after every token fed so far (numpy), or None without grammar
        features."""
        return state.features.grammar

    def reorder(self, state: OnnxState, rows: np.ndarray) -> OnnxState:
        """The state of rows ``rows`` (beam search)."""
        cache = [np.ascontiguousarray(c[rows]) for c in state.cache]
        return self._state(cache, state.features.take(rows), state.capacity, state.pos)
