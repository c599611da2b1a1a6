"""ONNX export of the decoder: one graph for the first tokens and every step, over a KV cache
that onnxruntime updates in place.

What goes into the graphs and what stays outside. The model's musical time
(:class:`aurl.models.model.MusicalTime`) and grammar features
(:class:`aurl.models.model.GrammarFeatures`) follow a data-dependent state machine (the
grammar, with a Python scan over families), which ONNX cannot express and which the generation
loop already steps token by token. So the caller computes that state (in numpy:
:mod:`aurl.engines.features`) and feeds each position's *indices* and *feature vectors*; the
graphs hold every weight: the token, phase, beat, tempo and family embeddings, the sounding and
age projections, the blocks, the final norm and the tied head.

Inputs of the graph (``B`` batch, ``T`` new tokens, ``P`` pitches, ``C`` cache capacity, ``H``
heads of ``hd`` dimensions):

- ``ids`` (B, T) int64: token ids;
- ``phase``, ``beat``, ``tempo`` (B, T) int64: position in the beat (0..31), beat in the bar
  (0..3, with meter conditioning 0..bar length - 1), tempo bin + 1 (0: no TEMPO yet), after each
  token (models with musical time);
- ``bar_beats`` (B,) int64: each row's bar length in quarter-note beats, rounded up (1..12; 4
  for 4/4), the index of the bar-length embedding (models with musical time and
  ``model.meter``; the caller counts ``beat`` in that row's meter);
- ``sounding`` (B, T, P) float32 (0/1), ``age`` (B, T, P) float32 in TIME_SHIFT steps, ``family``
  (B, T) int64 (F = none yet), after each token (models with grammar features);
- ``past_key.{i}``, ``past_value.{i}`` (B, H, C, hd) float32 per layer: the cache buffers (keys
  unrotated: the kernel rotates);
- ``seqlens_k`` (B,) int32: cached tokens + T - 1; ``total_sequence_length`` () int32: cached
  tokens + T.

Outputs: ``logits`` (B, T, V) float32 and ``present_key.{i}``, ``present_value.{i}``: the cache
buffers with the new tokens' entries. Each layer's attention is onnxruntime's
``com.microsoft.GroupQueryAttention`` (CPU kernel: rotary positions from the cached length,
causal attention, the new keys and values written into the cache), fed the block's q|k|v
projection packed in its ``query`` input (:func:`pack_qkv`, version 3); the caller binds the same
buffer as ``past`` and ``present`` (IOBinding), so the kernel updates the cache in place and no
step copies it. tanh-GELU is ``com.microsoft.FastGelu``. Batch, T and C are dynamic axes; C is at
most the model's ``max_seq_len`` (the rotary tables' length). Opset :data:`OPSET` plus the
``com.microsoft`` domain: the graphs run on onnxruntime (its CPU provider), not on every ONNX
runtime.

``config.json`` beside the graphs records the model and vocab config, the input names, the
weights (``fp32``, ``int8``: onnxruntime dynamic quantization of the MatMul weights, or
``int4``: its MatMulNBits) and a format version that the onnx engine checks. Supported:
``transformer`` mode with ``full`` attention (latent conditioning and windowed attention are not
exported), with or without meter conditioning (exports of meter-less models have no
``bar_beats`` input, as before it existed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aurl.config import to_dict
from aurl.errors import CheckpointError
from aurl.fileio import atomic_write, atomic_write_text
from aurl.models.model import MusicTransformerVAEGAN
from aurl.models.pretrained import model_config_dict

FORMAT = "aurl-onnx"
# 1: separate prefill and step graphs, the caller writing the cache; 2: one graph on
# GroupQueryAttention; 3: its q, k and v packed in one input (the same inputs and outputs:
# the engine reads 2 and 3)
VERSION = 3
OPSET = 17
DECODER = "decoder.onnx"
CONFIG = "config.json"


#: onnxruntime's GroupQueryAttention runs only heads whose width is a multiple of this
HEAD_MULTIPLE = 8


def check_exportable(model: MusicTransformerVAEGAN) -> None:
    """Raise :class:`CheckpointError` naming the setting the ONNX graphs cannot express."""
    c = model.config
    if c.mode != "transformer":
        raise CheckpointError(
            f"ONNX export supports model.mode 'transformer', this model is {c.mode!r} (its "
            "latent conditioning is not exported): use the torch engine"
        )
    if c.attention != "full":
        raise CheckpointError(
            f"ONNX export supports model.attention 'full', this model uses {c.attention!r}: "
            "use the torch engine"
        )
    hd = c.d_model // c.n_heads
    if hd % HEAD_MULTIPLE:
        raise CheckpointError(
            f"ONNX export needs heads of a width that is a multiple of {HEAD_MULTIPLE} "
            f"(onnxruntime's GroupQueryAttention), this model's are {hd} (model.d_model / "
            "model.n_heads): use --engine native or the torch engine"
        )


def input_names(model: MusicTransformerVAEGAN) -> list[str]:
    """The per-token inputs of both graphs, in order (without the cache)."""
    names = ["ids"]
    if model.time is not None:
        names += ["phase", "beat", "tempo"]
        if model.time.meter is not None:
            names.append("bar_beats")
    if model.grammar_features is not None:
        names += ["sounding", "age", "family"]
    return names


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Half-rotation rotary of ``x`` (B, H, T, hd) by tables (T, hd/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    c, s = cos[None, None], sin[None, None]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


class _GroupQueryAttention(torch.autograd.Function):
    """onnxruntime's ``com.microsoft.GroupQueryAttention`` (CPU kernel) in the exported graph:
    rotary positions and causal attention of T new tokens over a KV cache that the kernel
    updates in place (the caller binds each layer's cache buffer as both its ``past`` input and
    its ``present`` output). ``forward`` computes the same in torch, which the exporter traces
    for shapes only; the parity tests hold the graphs to the model."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, past_k: Tensor, past_v: Tensor,
                seqlens: Tensor, total: Tensor, cos: Tensor, sin: Tensor,
                heads: int) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        B, T, D = q.shape
        hd, start = D // heads, int(total) - T
        split = lambda x: x.view(B, T, heads, hd).transpose(1, 2)  # noqa: E731
        c, s = cos[start : start + T], sin[start : start + T]
        q, k = _rotate(split(q), c, s), _rotate(split(k), c, s)
        pk, pv = past_k.clone(), past_v.clone()
        pk[:, :, start : start + T], pv[:, :, start : start + T] = k, split(v)
        keys, values = pk[:, :, : start + T], pv[:, :, : start + T]
        mask = torch.arange(start + T)[None, :] <= (torch.arange(T) + start)[:, None]
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return y.transpose(1, 2).reshape(B, T, D), pk, pv

    @staticmethod
    def symbolic(g: Any, q: Any, k: Any, v: Any, past_k: Any, past_v: Any, seqlens: Any,
                 total: Any, cos: Any, sin: Any, heads: int) -> Any:  # fmt: skip
        out = g.op(
            "com.microsoft::GroupQueryAttention", q, k, v, past_k, past_v, seqlens, total, cos,
            sin, num_heads_i=heads, kv_num_heads_i=heads, do_rotary_i=1,
            rotary_interleaved_i=0, outputs=3,
        )  # fmt: skip
        for o, like in zip(out, (q, past_k, past_v)):
            o.setType(like.type())
        return out


class _FastGelu(torch.autograd.Function):
    """tanh-GELU as onnxruntime's one ``com.microsoft.FastGelu`` kernel (opset 17 has no Gelu:
    the exporter would write it as eight elementwise nodes)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return F.gelu(x, approximate="tanh")

    @staticmethod
    def symbolic(g: Any, x: Any) -> Any:
        out = g.op("com.microsoft::FastGelu", x)
        out.setType(x.type())
        return out


class _Decoder(nn.Module):
    """The backbone over explicit feature inputs, the KV cache and its fill (one graph for the
    first tokens and every step)."""

    def __init__(self, model: MusicTransformerVAEGAN) -> None:
        super().__init__()
        self.m = model
        self.names = input_names(model)
        # rotary tables of every position a cache can hold (the model's context)
        pos = torch.arange(model.config.max_seq_len, dtype=torch.float32)
        freqs = pos[:, None] * model.rotary.inv_freq[None, :]  # (context, hd/2)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        m = self.m
        n = len(self.names)
        feats = dict(zip(self.names, inputs))
        past, (seqlens, total) = inputs[n:-2], inputs[-2:]
        ids = feats["ids"]
        B, T = ids.shape
        x = m.embed(ids)
        if m.time is not None:
            t = m.time
            emb = t.phase(feats["phase"]) + t.beat(feats["beat"]) + t.tempo(feats["tempo"])
            if t.meter is not None:  # the bar length's embedding, one per row
                emb = emb + t.meter(feats["bar_beats"])[:, None]
            x = x + emb
        if m.grammar_features is not None:
            g = m.grammar_features
            age = torch.log1p(feats["age"] * g.beats_per_step)
            x = x + (g.sounding(feats["sounding"]) + g.age(age) + g.family(feats["family"]))
        present = []
        for i, block in enumerate(m.blocks):
            a = block.attn
            q, k, v = a.qkv(block.norm1(x)).split(a.n_heads * a.head_dim, dim=-1)
            y, k_cache, v_cache = _GroupQueryAttention.apply(
                q, k, v, past[2 * i], past[2 * i + 1], seqlens, total, self.cos, self.sin,
                a.n_heads,
            )  # fmt: skip
            present += [k_cache, v_cache]
            x = x + a.proj(y)
            ff = block.ff
            x = x + ff.proj(_FastGelu.apply(ff.fc(block.norm2(x))))
        return (m.head(m.norm(x)), *present)


def _example(model: MusicTransformerVAEGAN, B: int, T: int) -> list[Tensor]:
    P = model.vocab.n_pitches
    shapes = {"sounding": (B, T, P), "age": (B, T, P)}
    out = []
    for name in input_names(model):
        if name in shapes:
            out.append(torch.zeros(shapes[name]))
        elif name == "bar_beats":
            out.append(torch.full((B,), 4, dtype=torch.long))
        else:
            out.append(torch.zeros(B, T, dtype=torch.long))
    return out


def export_graph(model: MusicTransformerVAEGAN, path: Path) -> None:
    """Write the decoder graph of ``model`` to ``path``."""
    names = input_names(model)
    n = len(model.blocks)
    H, hd = model.config.n_heads, model.config.d_model // model.config.n_heads
    B, T, C = 2, 3, 8
    args = _example(model, B, T)
    dynamic: dict[str, dict[int, str]] = {name: {0: "batch", 1: "tokens"} for name in names}
    if "bar_beats" in dynamic:  # one per row
        dynamic["bar_beats"] = {0: "batch"}
    past_names = [f"past_{kv}.{i}" for i in range(n) for kv in ("key", "value")]
    present_names = [f"present_{kv}.{i}" for i in range(n) for kv in ("key", "value")]
    args += [torch.zeros(B, H, C, hd) for _ in past_names]
    args += [torch.full((B,), T - 1, dtype=torch.int32), torch.tensor(T, dtype=torch.int32)]
    dynamic.update({p: {0: "batch", 2: "capacity"} for p in past_names + present_names})
    dynamic["seqlens_k"] = {0: "batch"}
    dynamic["logits"] = {0: "batch", 1: "tokens"}
    wrapper = _Decoder(model).eval()

    def write(tmp: Path) -> None:
        import warnings

        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                wrapper, tuple(args), str(tmp), dynamo=False, opset_version=OPSET,
                input_names=[*names, *past_names, "seqlens_k", "total_sequence_length"],
                output_names=["logits", *present_names], dynamic_axes=dynamic,
                custom_opsets={"com.microsoft": 1},
            )  # fmt: skip

    atomic_write(path, write)
    pack_qkv(path)


def pack_qkv(path: Path) -> None:
    """Give each GroupQueryAttention of the graph at ``path`` the block's q|k|v projection
    whole, as its packed ``query`` input (``key`` and ``value`` left empty), instead of the
    three outputs of a Split node: the kernel reads q, k and v from the packed rows itself, and
    the step skips four Split kernels and their copies (same logits; the step
    1.01-1.26x faster at 16-960 cached tokens in three runs at load ~3, BENCHMARKS.md). The exporter cannot leave an
    optional input empty, hence this rewrite of its graph.

    Raises:
        RuntimeError: an attention node not fed by a Split of one tensor (an exporter change).
    """
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    made_by = {out: node for node in graph.node for out in node.output}
    splits = []
    for node in graph.node:
        if node.op_type != "GroupQueryAttention":
            continue
        split = made_by.get(node.input[0])
        if split is None or split.op_type != "Split" or list(split.output) != list(node.input[:3]):
            raise RuntimeError(f"{path}: {node.name} is not fed by one Split of q, k and v")
        node.input[0], node.input[1], node.input[2] = split.input[0], "", ""
        splits.append(split)
    for split in splits:
        graph.node.remove(split)
    used = {name for node in graph.node for name in node.input}
    used |= {out.name for out in graph.output}
    unused = [n for n in graph.node if n.op_type == "Constant" and not set(n.output) & used]
    for node in unused:  # the splits' sizes
        graph.node.remove(node)
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    atomic_write(path, lambda tmp: onnx.save(model, str(tmp)))


def quantize_graph(path: Path) -> None:
    """Replace the graph at ``path`` by its onnxruntime dynamic int8 quantization (int8 MatMul
    weights per output channel, uint8 activations quantized per call)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from aurl.engines.cpu import cpu_flags

    # without VNNI, u8s8 products can saturate in AVX2's VPMADDUBSW: 7-bit weights avoid it
    reduce = not ({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags())
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic's advice to pre-process, on every call
    try:
        _quantize(path, quantize_dynamic, QuantType, reduce)
    finally:
        root.setLevel(level)


def _quantize(path: Path, quantize_dynamic: Any, QuantType: Any, reduce: bool) -> None:
    atomic_write(
        path,
        lambda tmp: quantize_dynamic(
            str(path), str(tmp), weight_type=QuantType.QInt8, per_channel=True,
            reduce_range=reduce, op_types_to_quantize=["MatMul"],  # embeddings stay fp32
        ),
    )  # fmt: skip


INT4_BLOCK = 32  # weights per fp32 scale along the input axis (MatMulNBits' block_size)


def quantize_graph_int4(path: Path, block_size: int = INT4_BLOCK) -> None:
    """Replace the graph at ``path`` by its 4-bit weight-only quantization: each MatMul on a
    weight becomes onnxruntime's ``com.microsoft.MatMulNBits`` (symmetric int4 weights, one
    scale per ``block_size`` inputs of each output, activations quantized to int8 per block
    inside the kernel: ``accuracy_level`` 4): ``aurl export --int4``, and the onnx engine's
    default precision where the CPU has integer dot products (:func:`aurl.engines.cpu.
    onnx_precision`): 0.64x the weight bytes of int8, 1.12x its decoding speed on AVX2, within
    0.005 grammar-masked bits/note of fp32 (BENCHMARKS.md, issue 17, seventh and eighth pass).

    Raises:
        CheckpointError: onnxruntime has no 4-bit quantizer (onnxruntime < 1.17).
    """
    import logging

    import onnx

    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            MatMulNBitsQuantizer,
        )
    except ImportError as e:  # an old onnxruntime, or the quantizer's own imports (onnx-ir)
        raise CheckpointError(
            f"--int4 needs onnxruntime's MatMulNBits quantizer ({e}): pip install -U onnxruntime "
            "onnx-ir (both come with pip install 'aurl[torch]')"
        ) from None
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs every node it quantizes
    try:
        config = DefaultWeightOnlyQuantConfig(
            block_size=block_size, is_symmetric=True, accuracy_level=4
        )
        quantizer = MatMulNBitsQuantizer(onnx.load(str(path)), algo_config=config)
        quantizer.process()
    finally:
        root.setLevel(level)
    atomic_write(path, lambda tmp: quantizer.model.save_model_to_file(str(tmp), False))


def export_onnx(
    model: MusicTransformerVAEGAN,
    out: str | Path,
    *,
    int8: bool = False,
    int4: bool = False,
    source: dict[str, Any] | None = None,
) -> Path:
    """Write ``decoder.onnx`` and ``config.json`` for ``model`` into
    ``out`` (created if needed). ``int8`` / ``int4``: quantized MatMul weights
    (:func:`quantize_graph`, :func:`quantize_graph_int4`; not both). ``source``: extra
    provenance recorded in the config.

    Raises:
        CheckpointError: the model has a feature the graphs cannot express, or both int8 and
            int4 are asked.
    """
    if int8 and int4:
        raise CheckpointError("give one of --int8 and --int4, not both")
    check_exportable(model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    export_graph(model, out / DECODER)
    if int8:
        quantize_graph(out / DECODER)
    if int4:
        quantize_graph_int4(out / DECODER)
    c = model.config
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "opset": OPSET,
        "weights": "int8" if int8 else "int4" if int4 else "fp32",
        "vocab_size": model.vocab.size,
        "n_layers": len(model.blocks),
        "n_heads": c.n_heads,
        "head_dim": c.d_model // c.n_heads,
        "inputs": input_names(model),
        "graphs": {"decoder": DECODER},
        "model": model_config_dict(c),
        "vocab": to_dict(model.vocab_config),
        "source": source or {},
    }
    atomic_write_text(out / CONFIG, json.dumps(meta, indent=2))
    return out
