"""The native engine: Aurl's own decode step in C (:file:`_native.c`), numpy around it, no torch
and no onnxruntime.

It reads a model folder (``config.json`` + ``model.safetensors``: a shipped model or a
checkpoint's ``model/``) directly and quantizes the blocks' and the head's weights to int8 per
output row as it loads them, with keys and values cached as half floats where the CPU converts
them in hardware (``weights="fp32"`` keeps weights and cache in fp32: the torch model's logits
to 1e-5). One C call steps one token for every row of the batch through all blocks, the final
norm and the tied head; one more sums that token's input embedding (token, musical time, meter,
grammar features, style) from the per-token inputs the onnx engine feeds its graph
(:mod:`aurl.engines.features`). A first call of several tokens sums their embeddings in numpy and
steps them one by one.

Why: at one token per step, onnxruntime's int8 MatMul and its GroupQueryAttention read weights
and cache at 40-53% of what one core streams; here every weight row and every cached key and
value row is one contiguous, prefetched stream (BENCHMARKS.md, issue 17, tenth pass).

Duck-typed like the model for the generation loop (:mod:`aurl.engines`): ``init_state``,
``step`` (logits as numpy (B, T, V) float32), ``grammar_state``, ``reorder``. Unlike the onnx
export it takes the model's styles (``init_state(style=...)``).

Supported: ``transformer`` mode with ``full`` attention, as the ONNX export (no latent
conditioning, no windowed attention) and music ids only (no fill-in-the-middle sentinels or
anticipation controls): :func:`check_supported` names what is not.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aurl.config import ModelConfig, VocabConfig, build
from aurl.data.vocab import Vocab
from aurl.engines.features import (
    BEATS_PER_BAR,
    MAX_BEATS,
    PHASE_BINS,
    Features,
    FeatureState,
    cache_capacity,
)
from aurl.errors import CheckpointError, ConfigError
from aurl.safetensors_io import read_arrays

WEIGHTS = ("int8", "fp32")
LIN_F32, LIN_S8 = 0, 1
ROTARY_BASE = 10000.0  # aurl.models.layers.Rotary
#: tokens per row of a prefill call: their products batched, the scratch (~12 KB a token-row
#: for the 26M model) kept small
PREFILL_TOKENS = 64


class _Lin(ctypes.Structure):
    _fields_ = [
        ("w", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p),
        ("n", ctypes.c_int32), ("k", ctypes.c_int32), ("kind", ctypes.c_int32),
        ("pad", ctypes.c_int32), ("wsum", ctypes.c_void_p),
    ]  # fmt: skip


class _Layer(ctypes.Structure):
    _fields_ = [
        ("ln1_w", ctypes.c_void_p), ("ln1_b", ctypes.c_void_p), ("ln2_w", ctypes.c_void_p),
        ("ln2_b", ctypes.c_void_p), ("qkv", _Lin), ("proj", _Lin), ("fc", _Lin), ("out", _Lin),
    ]  # fmt: skip


class _Model(ctypes.Structure):
    _fields_ = [
        ("d", ctypes.c_int32), ("heads", ctypes.c_int32), ("head_dim", ctypes.c_int32),
        ("ff", ctypes.c_int32), ("vocab", ctypes.c_int32), ("layers", ctypes.c_int32),
        ("layer", ctypes.POINTER(_Layer)), ("lnf_w", ctypes.c_void_p), ("lnf_b", ctypes.c_void_p),
        ("head", _Lin), ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p),
        ("rot_len", ctypes.c_int32), ("kv_half", ctypes.c_int32),
    ]  # fmt: skip


class _Embed(ctypes.Structure):
    _fields_ = [
        *[(n, ctypes.c_void_p) for n in ("token", "phase", "beat", "tempo", "meter", "family",
                                         "sounding_t", "age_t", "style")],
        *[(f"n_{n}", ctypes.c_int32) for n in ("token", "phase", "beat", "tempo", "meter",
                                               "family", "style")],
        ("pitches", ctypes.c_int32), ("beats_per_step", ctypes.c_float), ("pad", ctypes.c_int32),
    ]  # fmt: skip


_LIB: Any = None


def load_library() -> Any:
    """The compiled step (``aurl.engines._native``, or the build at ``$AURL_NATIVE_LIBRARY``)
    through ctypes, or a :class:`ConfigError` saying how to build it."""
    global _LIB
    if _LIB is not None:
        return _LIB
    try:
        spec = importlib.util.find_spec("aurl.engines._native")
    except (ImportError, ValueError):  # ValueError: blocked in sys.modules
        spec = None
    other = os.environ.get("AURL_NATIVE_LIBRARY")  # another build of the step (the tests' own)
    if other:
        spec = importlib.util.spec_from_file_location("aurl.engines._native", other)
    if spec is None or not spec.origin:
        raise ConfigError(
            "--engine native needs Aurl's compiled step (aurl.engines._native), which this "
            "installation lacks (no C compiler when it was installed): install a C compiler "
            "(apt-get install gcc) and reinstall Aurl, or use --engine onnx"
        )
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError as e:  # damaged, or built for another machine
        raise ConfigError(
            f"Aurl's compiled step {spec.origin} cannot be loaded ({e}): reinstall Aurl on this "
            "machine, or use --engine onnx"
        ) from None
    p, i32 = ctypes.c_void_p, ctypes.c_int
    lib.aurl_step.argtypes = [p, i32, p, p, p, i32, i32, p, p, p]
    lib.aurl_step.restype = i32
    lib.aurl_prefill.argtypes = [p, i32, i32, p, p, p, i32, i32, p, p, p]
    lib.aurl_prefill.restype = i32
    lib.aurl_scratch_floats.argtypes = [p, i32, i32]
    lib.aurl_scratch_floats.restype = ctypes.c_int64
    lib.aurl_scratch_bytes.argtypes = [p, i32]
    lib.aurl_scratch_bytes.restype = ctypes.c_int64
    lib.aurl_embed.argtypes = [p, p, i32] + [p] * 10
    lib.aurl_embed.restype = i32
    lib.aurl_kernels.argtypes = []
    lib.aurl_kernels.restype = i32
    lib.aurl_set_kernels.argtypes = [i32]
    lib.aurl_set_kernels.restype = i32
    check_layout(lib, spec.origin)
    _LIB = lib
    return lib


def check_layout(lib: Any, origin: str) -> None:
    """Refuse a compiled step whose structures differ from this module's (a build of another
    version: the extension is built in place and is not rebuilt by an update of the source),
    which the C step would read with the wrong layout."""
    want = [ctypes.sizeof(t) for t in (_Lin, _Layer, _Model, _Embed)]
    have = (ctypes.c_int64 * len(want))()
    layout = getattr(lib, "aurl_layout", None)  # missing in builds before it
    if layout is not None:
        layout.argtypes, layout.restype = [ctypes.c_void_p, ctypes.c_int], ctypes.c_int
    if layout is None or layout(have, len(want)) != len(want) or list(have) != want:
        raise ConfigError(
            f"Aurl's compiled step {origin} was built from another version of Aurl (its "
            "structures differ from this one's): rebuild it (pip install -e . in the checkout, "
            "or reinstall Aurl), or use --engine onnx"
        )


#: the step's kernels, as the C library numbers them: portable C (what other CPUs run), AVX2 +
#: FMA, and those with the int8 products on AVX512-VNNI
KERNELS = ("portable", "avx2", "avx512vnni")


def kernels() -> str:
    """Which kernels the step runs (by default the best this CPU has): one of :data:`KERNELS`."""
    return KERNELS[load_library().aurl_kernels()]


def set_kernels(name: str) -> str:
    """Run the step on the kernels ``name`` (one of :data:`KERNELS`), or the best below it
    this CPU has; returns the kernels now in use."""
    if name not in KERNELS:
        raise ValueError(f"kernels are one of {', '.join(KERNELS)}, not {name!r}")
    return KERNELS[load_library().aurl_set_kernels(KERNELS.index(name))]


def quantize_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``w`` (n, k) -> int8 (n, k) and float32 scales (n,) with ``w ~ q * scale[:, None]``:
    symmetric, one scale per output row (a zero row gets scale 0)."""
    w = np.asarray(w, dtype=np.float32)
    m = np.abs(w).max(axis=1)
    scale = (m / 127.0).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = aligned(np.rint(w / safe[:, None]).clip(-127, 127).astype(np.int8))
    return q, scale


def aligned(a: np.ndarray, to: int = 64) -> np.ndarray:
    """A C-contiguous copy of ``a`` starting on a ``to``-byte boundary: rows of a multiple of
    64 bytes then each start a cache line, and the kernels' 64-byte loads never straddle two
    (numpy aligns to 16; a straddling load made the VNNI kernel ~1.4x slower at one row)."""
    buf = np.empty(a.nbytes + to, dtype=np.uint8)
    start = -buf.ctypes.data % to
    out = buf[start : start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def check_supported(config: ModelConfig, where: str = "the model") -> None:
    """Raise :class:`ConfigError` naming the setting of ``config`` the native engine lacks."""
    if config.mode != "transformer":
        raise ConfigError(
            f"--engine native runs model.mode 'transformer'; {where} is {config.mode!r} (latent "
            "conditioning): use --engine torch"
        )
    if config.attention != "full":
        raise ConfigError(
            f"--engine native runs model.attention 'full'; {where} uses {config.attention!r}: "
            "use --engine torch"
        )
    hd = config.d_model // max(config.n_heads, 1)
    if hd % 2 or hd > 512:
        raise ConfigError(
            f"--engine native runs heads of an even width up to 512; {where} has {hd} "
            "(model.d_model / model.n_heads): use --engine torch"
        )
    if config.fim or config.anticipation:
        what = "model.fim" if config.fim else "model.anticipation"
        raise ConfigError(
            f"--engine native runs music ids only; {where} has {what} (ids above the "
            "vocabulary): use --engine torch"
        )


def read_model_folder(folder: str | Path) -> tuple[ModelConfig, VocabConfig, dict]:
    """The model config, vocab config and weights (numpy) of a model folder.

    Raises:
        CheckpointError: not a model folder, or a damaged config or weights file.
    """
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{path} does not exist: --engine native reads a model folder (config.json and "
            "model.safetensors: a checkpoint's model/ or a shipped model)"
        )
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path} is damaged: {e}") from None
    if meta.get("format") != "aurl-model":
        raise CheckpointError(
            f"{path} is not an Aurl model folder (format {meta.get('format')!r}, expected "
            "'aurl-model'); for an ONNX export use --engine onnx"
        )
    try:
        model = build(ModelConfig, meta.get("model", {}), prefix="model")
        vocab = build(VocabConfig, meta.get("vocab", {}), prefix="vocab")
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(
            f"{weights} does not exist: --engine native reads a model folder (config.json and "
            "model.safetensors, as save_pretrained writes it)"
        )
    try:
        tensors = read_arrays(weights)
    except OSError as e:  # unreadable: permissions, a vanished file
        raise CheckpointError(f"{weights} cannot be read ({e.strerror or e})") from None
    check_memory(tensors, weights)
    return model, vocab, tensors


def check_memory(tensors: Any, path: Path) -> None:
    """Refuse, before reading any weight, a file whose tensors as float32 would not fit in this
    machine's memory (loading it would only end in the kernel killing the process)."""
    import math

    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not on this platform: nothing to check
        return
    need = 4 * sum(math.prod(shape) for shape in tensors.shapes().values())
    if need > memory:
        raise CheckpointError(
            f"{path} holds {need / 2**30:.0f} GiB of weights as float32, more than this "
            f"machine's {memory / 2**30:.0f} GiB of memory: choose a smaller model"
        )


@dataclass
class NativeState:
    """The decode state of the native engine."""

    keys: list[np.ndarray]  # per layer (B, H, capacity, hd), rotated keys (float16 with int8
    values: list[np.ndarray]  # weights, else float32); values likewise
    features: FeatureState
    capacity: int
    style: np.ndarray | None = None  # (B,) style ids, -1: none
    pos: int = 0
    inputs: dict[str, np.ndarray] | None = None  # one-token inputs, refilled in place
    pointers: Any = field(default=None, repr=False)  # the caches' addresses for the C step
    x: np.ndarray | None = field(default=None, repr=False)  # (B, D) one token's embeddings
    embed_args: tuple | None = field(default=None, repr=False)  # the C embedding's arguments
    engine: Any = field(default=None, repr=False)  # the engine whose shapes the caches have

    @property
    def grammar(self) -> Any:
        return self.features.grammar


class NativeEngine:
    """A model folder on Aurl's own C decode step.

    Args:
        folder: a model folder (``config.json`` + ``model.safetensors``).
        weights: ``int8`` (the blocks' and the head's weights quantized per output row; the
            embeddings stay float32) or ``fp32``.

    One engine serves any number of states, one call at a time: its scratch buffers are
    shared, so threads that decode at once each need their own engine.

    Raises:
        CheckpointError: not a model folder, damaged, or weights that do not fit the config.
        ConfigError: the compiled step is missing, or the model has a feature the engine lacks
            (:func:`check_supported`).
    """

    name = "native"  # what `aurl generate --engine` calls it
    numpy = True
    kind = "native"  # what a report names it
    takes_style = True  # init_state(style=...): the model's style embedding

    def __init__(self, folder: str | Path, *, weights: str = "int8") -> None:
        if weights not in WEIGHTS:
            raise ConfigError(
                f"native weights must be one of {', '.join(WEIGHTS)}, not {weights!r}"
            )
        self.lib = load_library()
        self.folder, self.weights = Path(folder), weights
        # int8 weights keep keys and values as half floats where the CPU converts them in
        # hardware (F16C, with the AVX2 kernels): half the attention's bytes, a rounding (2^-11)
        # far below the weights'; elsewhere the portable kernels would convert in software,
        # slower than reading floats. fp32 keeps the model's floats exactly.
        half = weights == "int8" and kernels() != "portable"
        self.kv_dtype = np.float16 if half else np.float32
        self.config, self.vocab_config, tensors = read_model_folder(folder)
        check_supported(self.config, where=str(self.folder))
        self.vocab = Vocab(self.vocab_config)
        self.device = "cpu"
        c = self.config
        self.features = Features(
            self.vocab, musical_time=c.musical_position, grammar_features=c.grammar_features,
            meter=c.meter,
        )  # fmt: skip
        try:
            self._load(tensors)
        except KeyError as e:
            raise CheckpointError(
                f"{self.folder / 'model.safetensors'} lacks the tensor {e.args[0]!r} its "
                "config.json implies: the folder mixes models"
            ) from None
        self._scratch: dict[tuple[int, int], tuple] = {}
        # the caches of one state nothing holds any more, for the next reorder to write into
        # (fresh arrays would pay a page fault per 4 KiB written: ~half of a reorder's time)
        self._spare: list[tuple[list[np.ndarray], list[np.ndarray]]] = []
        # one first token (a cache of one position: well under 1 ms): finite weights too large
        # for float32 products (a row of 3e38) give NaN logits, and the sampler would draw
        # pieces from them that look valid
        first = self.step(np.zeros((1, 1), np.int64), self.init_state(1, capacity=1))
        if not np.isfinite(first).all():
            raise CheckpointError(
                f"{self.folder / 'model.safetensors'}: the model's logits for a first token are "
                "NaN or infinite (weights too large for float32): use an earlier checkpoint"
            )
        self._spare.clear()

    # -- weights --------------------------------------------------------------------------

    def _f32(self, t: Any, name: str, shape: tuple[int, ...], keep: bool = True) -> np.ndarray:
        """The tensor ``name`` as contiguous float32, refused if its shape is not ``shape`` (the
        C step indexes it by the config's sizes), if it is stored as integers (the torch loader
        refuses those too) or if it is not finite (as the torch loader refuses a diverged run)."""
        path = self.folder / "model.safetensors"
        have = tuple(t.shapes()[name]) if name in t else None  # from the header: nothing read
        if have is not None and have != shape:
            raise CheckpointError(
                f"{path}: {name} is {list(have)}, its config.json implies {list(shape)}: the "
                "folder mixes models"
            )
        self._used.add(name)
        raw = t[name]
        if raw.dtype.kind != "f":
            raise CheckpointError(
                f"{path}: {name} is stored as {raw.dtype}, the model needs floats: re-save it "
                "with save_pretrained"
            )
        a = np.ascontiguousarray(raw, dtype=np.float32)
        if not np.isfinite(a).all():
            raise CheckpointError(
                f"{path}: {name} holds NaN or infinite values (a diverged run?): use an earlier "
                "checkpoint"
            )
        if keep:  # an array the C step points into
            self._keep.append(a)
        return a

    def _lin(
        self, t: Any, name: str, n: int, k: int, bias: bool = True, w: np.ndarray | None = None
    ) -> _Lin:
        """The C structure of the linear layer ``name`` ((n, k) weight, ``w`` when given: the
        tied head's is the token table); int8 weights keep only their quantized copy."""
        if w is None:
            w = self._f32(t, f"{name}.weight", (n, k), keep=self.weights == "fp32")
        b = self._f32(t, f"{name}.bias", (n,)).ctypes.data if bias else None
        if self.weights == "int8":
            q, scale = quantize_rows(w)
            wsum = q.sum(axis=1, dtype=np.int32)  # the VNNI kernel's offset per row
            self._keep += [q, scale, wsum]
            return _Lin(q.ctypes.data, scale.ctypes.data, b, n, k, LIN_S8, 0, wsum.ctypes.data)
        return _Lin(w.ctypes.data, None, b, n, k, LIN_F32, 0, None)

    def _load(self, t: dict) -> None:
        c, V = self.config, self.vocab.size
        D, H, F = c.d_model, c.n_heads, c.ff_mult * c.d_model
        hd = D // H
        self._keep: list[np.ndarray] = []  # every array the C structures point into
        self._used: set[str] = set()
        f = self._f32
        self.token_table = f(t, "embed.weight", (V, D))
        self.tables: dict[str, np.ndarray] = {}
        if c.musical_position:  # rows as aurl.models.model.MusicalTime's tables
            rows = {"phase": PHASE_BINS, "beat": MAX_BEATS if c.meter else BEATS_PER_BAR,
                    "tempo": self.vocab_config.tempo_bins + 1}  # fmt: skip
            if c.meter:
                rows["meter"] = MAX_BEATS + 1
            for name, n in rows.items():
                self.tables[name] = f(t, f"time.{name}.weight", (n, D))
        if c.grammar_features:
            P = self.vocab.n_pitches
            g = "grammar_features"
            self.sounding_t = np.ascontiguousarray(f(t, f"{g}.sounding.weight", (D, P)).T)
            self.age_t = np.ascontiguousarray(f(t, f"{g}.age.weight", (D, P)).T)
            n = self.vocab_config.num_instruments + 1
            self.tables["family"] = f(t, f"{g}.family.weight", (n, D))
            vc = self.vocab_config
            spb = vc.steps_per_beat if vc.time_unit == "beat" else 1.0 / (2.0 * vc.step_seconds)
            self.beats_per_step = np.float32(1.0 / spb)
        self.styles = tuple(c.styles)
        self.style_table = f(t, "style.table.weight", (len(c.styles), D)) if c.styles else None
        layers = (_Layer * c.n_layers)()
        for i in range(c.n_layers):
            p = f"blocks.{i}"
            layers[i] = _Layer(
                f(t, f"{p}.norm1.weight", (D,)).ctypes.data, f(t, f"{p}.norm1.bias", (D,)).ctypes.data,
                f(t, f"{p}.norm2.weight", (D,)).ctypes.data, f(t, f"{p}.norm2.bias", (D,)).ctypes.data,
                self._lin(t, f"{p}.attn.qkv", 3 * D, D), self._lin(t, f"{p}.attn.proj", D, D),
                self._lin(t, f"{p}.ff.fc", F, D), self._lin(t, f"{p}.ff.proj", D, F),
            )  # fmt: skip
        # rotary tables as aurl.models.layers.Rotary computes them (float32 throughout)
        inv = (1.0 / ROTARY_BASE ** (np.arange(0, hd, 2, dtype=np.float32) / hd)).astype(np.float32)
        freqs = np.outer(np.arange(c.max_seq_len, dtype=np.float32), inv).astype(np.float32)
        self._cos, self._sin = np.cos(freqs), np.sin(freqs)
        self._layers = layers
        self.model = _Model(
            D, H, hd, F, V, c.n_layers, layers,
            f(t, "norm.weight", (D,)).ctypes.data, f(t, "norm.bias", (D,)).ctypes.data,
            self._lin(t, "embed", V, D, bias=False, w=self.token_table),
            self._cos.ctypes.data, self._sin.ctypes.data,
            c.max_seq_len, int(self.kv_dtype == np.float16),
        )  # fmt: skip
        self.heads, self.head_dim = H, hd
        self.embedding = self._embed_struct()
        self._model_ref = ctypes.byref(self.model)
        unused = sorted(set(t) - self._used)
        if unused:
            raise CheckpointError(
                f"{self.folder / 'model.safetensors'} holds tensors its config.json does not use "
                f"({', '.join(unused[:3])}{', ...' if len(unused) > 3 else ''}): the folder mixes "
                "models"
            )

    def _embed_struct(self) -> _Embed:
        """The input layer's tables for the C embedding of one-token steps."""
        e = _Embed()
        e.token, e.n_token = self.token_table.ctypes.data, len(self.token_table)
        for name, table in self.tables.items():
            setattr(e, name, table.ctypes.data)
            setattr(e, f"n_{name}", len(table))
        if "family" in self.tables:
            e.sounding_t, e.age_t = self.sounding_t.ctypes.data, self.age_t.ctypes.data
            e.pitches, e.beats_per_step = self.vocab.n_pitches, float(self.beats_per_step)
        if self.style_table is not None:
            e.style, e.n_style = self.style_table.ctypes.data, len(self.style_table)
        return e

    # -- the loop's calls -----------------------------------------------------------------

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
        style: Any = None,
    ) -> NativeState:
        """A fresh state for ``batch_size`` rows: ``history`` (B, n) sets the musical time and
        grammar features without entering the cache; ``meter`` (B, 2) the time signatures;
        ``style`` (B,) style ids of a model with styles (-1: none)."""
        if latents is not None:
            raise ConfigError("the native engine has no latent conditioning: use --engine torch")
        feats = self.features.start(batch_size, meter, history)
        capacity = cache_capacity(capacity, self.config.max_seq_len)  # the rotary tables' end
        if style is not None:
            style = np.broadcast_to(np.asarray(style, dtype=np.int64), (batch_size,)).copy()
            if self.style_table is None:
                style = None  # as the model: a style given to a model without styles is ignored
            elif (style >= len(self.styles)).any():
                raise ConfigError(
                    f"style id {int(style.max())} is not one of the model's {len(self.styles)} styles"
                )
        shape = (batch_size, self.heads, capacity, self.head_dim)
        keys = [np.zeros(shape, self.kv_dtype) for _ in range(self.config.n_layers)]
        values = [np.zeros(shape, self.kv_dtype) for _ in range(self.config.n_layers)]
        return self._state(keys, values, feats, capacity, style, 0)

    def _state(self, keys: list, values: list, feats: FeatureState, capacity: int,
               style: np.ndarray | None, pos: int) -> NativeState:  # fmt: skip
        n = len(keys)
        ptrs = ((ctypes.c_void_p * n)(*[k.ctypes.data for k in keys]),
                (ctypes.c_void_p * n)(*[v.ctypes.data for v in values]))  # fmt: skip
        state = NativeState(keys, values, feats, capacity, style, pos, pointers=ptrs, engine=self)
        # when the state is gone, its caches become the spare set (one kept: memory stays
        # bounded); a state still held anywhere is never written into
        weakref.finalize(state, _keep_spare, self._spare, keys, values)
        return state

    def embed_inputs(self, feed: dict[str, np.ndarray], style: np.ndarray | None) -> np.ndarray:
        """(B, T, D) float32: the summed input embeddings of the per-token inputs ``feed``
        (:mod:`aurl.engines.features`), as the model's input layer."""
        x = self.token_table[feed["ids"]]
        tb = self.tables
        if "phase" in tb:
            x += tb["phase"][feed["phase"]]
            x += tb["beat"][feed["beat"]]
            x += tb["tempo"][feed["tempo"]]
            if "meter" in tb:
                x += tb["meter"][feed["bar_beats"]][:, None]
        if "family" in tb:
            age = np.log1p(feed["age"] * self.beats_per_step)
            x += feed["sounding"] @ self.sounding_t
            x += age @ self.age_t
            x += tb["family"][feed["family"]]
        if style is not None:
            known = style >= 0
            x += (self.style_table[np.where(known, style, 0)] * known[:, None])[:, None]
        return x

    def _embed_one(self, state: NativeState) -> int:
        """The address of the (B, D) input embeddings of the one-token inputs in
        ``state.inputs``, summed in C into a buffer of the state (the step overwrites it)."""
        if state.embed_args is None:  # addresses taken once per input buffers (.ctypes is slow)
            inputs = state.inputs
            B = inputs["ids"].shape[0]
            state.x = np.empty((B, self.config.d_model), np.float32)
            names = ("ids", "phase", "beat", "tempo", "bar_beats", "sounding", "age", "family")
            state.embed_args = (
                ctypes.byref(self.model), ctypes.byref(self.embedding), B,
                *[inputs[n].ctypes.data if n in inputs else None for n in names],
                state.style.ctypes.data if state.style is not None else None,
                state.x.ctypes.data,
            )  # fmt: skip
        if self.lib.aurl_embed(*state.embed_args) != 0:
            raise ValueError("native embedding: an input index outside its table")
        return state.embed_args[-1]

    def _buffers(self, B: int, capacity: int) -> tuple[np.ndarray, tuple]:
        """The logits buffer (B, V) and the C step's scratch addresses for B rows and a cache
        of ``capacity`` (made once per shape, reused: copy the logits to keep them)."""
        key = (B, capacity)
        if key not in self._scratch:
            floats, qbuf = self._scratch_arrays(B, capacity)
            logits = np.empty((B, self.vocab.size), np.float32)
            addresses = (logits.ctypes.data, floats.ctypes.data, qbuf.ctypes.data)
            self._scratch[key] = (logits, addresses, floats, qbuf)  # the arrays kept alive
        return self._scratch[key][:2]

    def _scratch_arrays(self, rows: int, capacity: int) -> tuple[np.ndarray, np.ndarray]:
        """The C step's float and int8 scratch for ``rows`` token-rows and a cache of
        ``capacity`` positions, as large as the library says."""
        m = ctypes.byref(self.model)
        floats = self.lib.aurl_scratch_floats(m, rows, capacity)
        qbytes = self.lib.aurl_scratch_bytes(m, rows)
        if floats < 0 or qbytes < 0:
            raise ValueError(f"native step refused {rows} rows and a cache of {capacity}")
        return np.empty(floats, np.float32), np.empty(qbytes, np.int8)

    def _run(self, x: int, B: int, state: NativeState) -> np.ndarray:
        """One token per row from the address ``x`` of its input embeddings (B, D) float32,
        contiguous (the C step overwrites them); returns the logits buffer (B, V) (reused: copy
        to keep)."""
        logits, (out, floats, qbuf) = self._buffers(B, state.capacity)
        keys, values = state.pointers
        rc = self.lib.aurl_step(
            self._model_ref, B, x, keys, values, state.capacity, state.pos, out, floats, qbuf
        )
        if rc != 0:
            raise ValueError(f"native step refused position {state.pos} of {state.capacity}")
        state.pos += 1
        return logits

    def _check_ids(self, ids: np.ndarray) -> None:
        low, high = (int(ids.min()), int(ids.max())) if ids.size else (0, 0)
        if low < 0 or high >= self.vocab.size:
            bad = high if high >= self.vocab.size else low
            raise ConfigError(
                f"id {bad} is not one of the vocabulary's {self.vocab.size} music ids: the native "
                "engine runs music ids only (use --engine torch)"
            )

    def step(self, ids: np.ndarray, state: NativeState, **_: Any) -> np.ndarray:
        """Feed ``ids`` (B, T) after what ``state`` has seen; returns their logits (B, T, V)
        float32 (a new array) and advances ``state`` in place."""
        ids = np.asarray(ids, dtype=np.int64)
        B, T = ids.shape
        if state.engine is not self or state.keys[0].shape[2] != state.capacity:
            # the C step writes and reads the caches by this engine's sizes (layers, heads,
            # head width, cache dtype) up to state.capacity: another's would be overrun
            raise ValueError(
                "a decode state made by another engine (or with its capacity changed): step a "
                "state with the engine whose init_state or reorder made it"
            )
        if state.keys[0].shape[0] != B:  # the C step writes B rows of the state's cache
            raise ValueError(f"{B} rows of ids for a state of {state.keys[0].shape[0]} rows")
        if state.pos + T > state.capacity:
            raise ValueError(
                f"decode state is full ({state.capacity} positions): start a new state"
            )
        self._check_ids(ids)
        if T == 1:
            fresh = state.inputs is None
            if fresh:
                state.inputs, state.embed_args = self.features.buffers(B), None
            state.features = self.features.advance_into(
                ids[:, 0], state.features, state.inputs, fresh=fresh
            )
            return self._run(self._embed_one(state), B, state)[:, None].copy()
        feed, state.features = self.features(ids, state.features)
        state.inputs = None  # the one-token buffers must be refilled whole
        x = self.embed_inputs(feed, state.style)
        out = np.empty((B, T, self.vocab.size), np.float32)
        for j in range(0, T, PREFILL_TOKENS):
            t = min(PREFILL_TOKENS, T - j)
            xj = np.ascontiguousarray(x[:, j : j + t])  # alive through the call
            out[:, j : j + t] = self._prefill(xj.ctypes.data, B, t, state)
        return out

    def _prefill(self, x: int, B: int, T: int, state: NativeState) -> np.ndarray:
        """``T`` tokens per row from the address ``x`` of their input embeddings (B, T, D)
        float32, contiguous (overwritten), in one C call: their products batched over the
        B * T rows, the logits of T single steps bit for bit; returns them (B, T, V)."""
        floats, qbuf = self._scratch_arrays(B * T, state.capacity)  # its own: many sizes
        logits = np.empty((B, T, self.vocab.size), np.float32)
        keys, values = state.pointers
        rc = self.lib.aurl_prefill(
            self._model_ref, B, T, x, keys, values, state.capacity, state.pos,
            logits.ctypes.data, floats.ctypes.data, qbuf.ctypes.data,
        )  # fmt: skip
        if rc != 0:
            raise ValueError(
                f"native prefill refused positions {state.pos}..{state.pos + T - 1} of "
                f"{state.capacity}"
            )
        state.pos += T
        return logits

    def grammar_state(self, state: NativeState) -> Any:
        """The grammar state after every token fed so far (numpy), or None without grammar
        features."""
        return state.features.grammar

    def reorder(self, state: NativeState, rows: np.ndarray) -> NativeState:
        """The state of rows ``rows`` (beam search, SMC resampling): a new state; only the
        cache positions written so far are copied (the step reads none past them)."""
        rows, pos = np.asarray(rows), state.pos
        shape = (len(rows), *state.keys[0].shape[1:])
        spare = self._spare.pop() if self._spare else None
        if spare is not None and (spare[0][0].shape, spare[0][0].dtype) != (shape, self.kv_dtype):
            spare = None  # another shape: dropped
        keys, values = [], []
        for j, (old, new) in enumerate(((state.keys, keys), (state.values, values))):
            for layer, a in enumerate(old):
                b = spare[j][layer] if spare is not None else np.empty(shape, a.dtype)
                for i, r in enumerate(rows.tolist()):  # one copy each (a[rows] makes two)
                    b[i, :, :pos] = a[r, :, :pos]
                new.append(b)
        style = state.style[rows] if state.style is not None else None
        return self._state(
            keys, values, state.features.take(rows), state.capacity, style, state.pos
        )


def _keep_spare(spare: list, keys: list[np.ndarray], values: list[np.ndarray]) -> None:
    """A dead state's caches become the engine's one spare set (a finalizer: holds no state)."""
    spare[:] = [(keys, values)]


def native_where_it_runs(folder: str | Path, *, weights: str = "int8") -> NativeEngine | None:
    """The native engine of ``folder``, or None where it does not run it: no compiled step on
    this installation, a model the step lacks (a VAE, local attention, ids above the
    vocabulary), or not a model folder (the caller's torch path then speaks for it). What
    ``--engine auto`` and the server's composing endpoints decode with."""
    try:
        return NativeEngine(folder, weights=weights)
    except (ConfigError, CheckpointError):
        return None
