"""ONNX export of the decoder: a prefill graph and a one-token step graph with its KV cache.

What goes into the graphs and what stays outside. The model's musical time
(:class:`aurl.models.model.MusicalTime`) and grammar features
(:class:`aurl.models.model.GrammarFeatures`) follow a data-dependent state machine (the
grammar, with a Python scan over families), which ONNX cannot express and which the generation
loop already steps token by token. So the caller computes that state (in numpy:
:mod:`aurl.engines.features`) and feeds each position's *indices* and *feature vectors*; the
graphs hold every weight: the token, phase, beat, tempo and family embeddings, the sounding and
age projections, the blocks, the final norm and the tied head.

Inputs of both graphs (``B`` batch, ``T`` new tokens, ``P`` pitches, ``L`` cached positions):

- ``ids`` (B, T) int64: token ids;
- ``phase``, ``beat``, ``tempo`` (B, T) int64: position in the beat (0..31), beat in the bar
  (0..3, with meter conditioning 0..bar length - 1), tempo bin + 1 (0: no TEMPO yet), after each
  token (models with musical time);
- ``bar_beats`` (B,) int64: each row's bar length in quarter-note beats, rounded up (1..12; 4
  for 4/4), the index of the bar-length embedding (models with musical time and
  ``model.meter``; the caller counts ``beat`` in that row's meter);
- ``sounding`` (B, T, P) float32 (0/1), ``age`` (B, T, P) float32 in TIME_SHIFT steps, ``family``
  (B, T) int64 (F = none yet), after each token (models with grammar features);
- step graph only: ``past_key.{i}``, ``past_value.{i}`` (B, L, D) float32 per layer: the cached
  keys (rotated) and values, heads side by side (D = H * hd).

Outputs: ``logits`` (B, T, V) float32 and the new tokens' cache entries ``key.{i}``,
``value.{i}`` (B, T, D). The caller owns the cache: a preallocated (B, capacity, D) array per
layer whose first L rows it passes as ``past`` (a zero-copy view at batch 1) and into which it
writes the new entries, so no step copies the cache (an in-graph Concat would, every step).
The prefill graph has no past (causal attention over its T tokens); the step graph takes T = 1
and attends to every cached key and its own, with per-head dot products as one MatMul against a
block-diagonal copy of the query. Rotary positions start at L (read from the past's shape).
Batch, T (prefill) and L (step) are dynamic axes. Opset :data:`OPSET`.

``config.json`` beside the graphs records the model and vocab config, the input names, the
weights (``fp32`` or ``int8``: onnxruntime dynamic quantization of the MatMul weights) and a
format version that the onnx engine checks. Supported: ``transformer`` mode with ``full``
attention (latent conditioning and windowed attention are not exported), with or without meter
conditioning (exports of meter-less models have no ``bar_beats`` input, as before it existed).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aurl.config import to_dict
from aurl.errors import CheckpointError
from aurl.fileio import atomic_write, atomic_write_text
from aurl.models.layers import apply_rotary
from aurl.models.model import MusicTransformerVAEGAN

FORMAT = "aurl-onnx"
VERSION = 1
OPSET = 17
PREFILL = "prefill.onnx"
STEP = "decoder_step.onnx"
CONFIG = "config.json"


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


class _Decoder(nn.Module):
    """The backbone over explicit feature inputs; ``with_past``: the one-token step graph."""

    def __init__(self, model: MusicTransformerVAEGAN, with_past: bool) -> None:
        super().__init__()
        self.m, self.with_past = model, with_past
        self.names = input_names(model)
        H, D = model.config.n_heads, model.config.d_model
        # sel[h * hd + d, h] = 1: sums each head's block of a (.., D) vector
        sel = torch.zeros(D, H)
        sel[torch.arange(D), torch.arange(D) // (D // H)] = 1.0
        self.register_buffer("sel", sel, persistent=False)

    def _attend_cached(
        self, q: Tensor, k: Tensor, v: Tensor, past_k: Tensor, past_v: Tensor
    ) -> Tensor:
        """One query per row over the cache and its own key, reading the cache once in place:
        q, k, v (B, D) (heads side by side), past (B, L, D) -> (B, D). The per-head dot
        products are one MatMul against a block-diagonal copy of q (H columns), so the cache
        is never transposed or concatenated (which would copy it every step)."""
        B, D = q.shape
        q = q * (1.0 / math.sqrt(D // self.sel.shape[1]))
        s_past = torch.matmul(past_k, q[:, :, None] * self.sel)  # (B, L, H)
        s_new = torch.matmul(q * k, self.sel)[:, None]  # (B, 1, H)
        p = torch.softmax(torch.cat([s_past, s_new], dim=1), dim=1)  # (B, L + 1, H)
        r = torch.matmul(p[:, :-1].transpose(1, 2), past_v)  # (B, H, D)
        y = (r * self.sel.t()).sum(1)  # (B, D): head h's block from row h
        return y + torch.matmul(p[:, -1], self.sel.t()) * v

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        m = self.m
        feats = dict(zip(self.names, inputs))
        past = inputs[len(self.names) :]
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
        start = past[0].shape[1] if self.with_past else 0
        pos = (torch.arange(T, device=ids.device) + start).float()
        freqs = pos[:, None] * m.rotary.inv_freq[None, :]  # (T, hd/2)
        cos = torch.cat([freqs.cos(), freqs.cos()], -1)[:, None, None]  # (T, 1, 1, hd)
        sin = torch.cat([-freqs.sin(), freqs.sin()], -1)[:, None, None]
        present = []
        for i, block in enumerate(m.blocks):
            a = block.attn
            H, hd = a.n_heads, a.head_dim
            qkv = a.qkv(block.norm1(x)).view(B, T, 3, H, hd)  # (B, T, 3, H, hd)
            qk = apply_rotary(qkv[:, :, :2], cos, sin)  # (B, T, 2, H, hd)
            k_flat = qk[:, :, 1].reshape(B, T, H * hd)  # (B, T, D): the cache's layout
            v_flat = qkv[:, :, 2].reshape(B, T, H * hd)
            present += [k_flat, v_flat]
            if self.with_past:  # T == 1
                y = self._attend_cached(
                    qk[:, 0, 0].reshape(B, H * hd), k_flat[:, 0], v_flat[:, 0],
                    past[2 * i], past[2 * i + 1],
                )[:, None]  # fmt: skip
            else:
                q = qk[:, :, 0].transpose(1, 2)  # (B, H, T, hd)
                k = qk[:, :, 1].transpose(1, 2)
                v = qkv[:, :, 2].transpose(1, 2)
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                y = y.transpose(1, 2).reshape(B, T, H * hd)  # (B, T, D)
            x = x + a.proj(y)
            x = x + block.ff(block.norm2(x))
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


def export_graph(model: MusicTransformerVAEGAN, path: Path, *, with_past: bool) -> None:
    """Write one graph (prefill or step) of ``model`` to ``path``."""
    names = input_names(model)
    n = len(model.blocks)
    H, hd = model.config.n_heads, model.config.d_model // model.config.n_heads
    T = 1 if with_past else 3
    args = _example(model, 2, T)
    tok_axes = {0: "batch"} if with_past else {0: "batch", 1: "tokens"}
    dynamic: dict[str, dict[int, str]] = {name: dict(tok_axes) for name in names}
    if "bar_beats" in dynamic:  # one per row
        dynamic["bar_beats"] = {0: "batch"}
    past_names = [f"past_{kv}.{i}" for i in range(n) for kv in ("key", "value")]
    present_names = [f"{kv}.{i}" for i in range(n) for kv in ("key", "value")]
    if with_past:
        args += [torch.zeros(2, 5, H * hd) for _ in past_names]
        dynamic.update({p: {0: "batch", 1: "past"} for p in past_names})
    dynamic["logits"] = dict(tok_axes)
    dynamic.update({p: dict(tok_axes) for p in present_names})
    wrapper = _Decoder(model, with_past).eval()

    def write(tmp: Path) -> None:
        import warnings

        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                wrapper, tuple(args), str(tmp), dynamo=False, opset_version=OPSET,
                input_names=names + (past_names if with_past else []),
                output_names=["logits", *present_names], dynamic_axes=dynamic,
            )  # fmt: skip

    atomic_write(path, write)


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
            reduce_range=reduce,
        ),
    )  # fmt: skip


def export_onnx(
    model: MusicTransformerVAEGAN,
    out: str | Path,
    *,
    int8: bool = False,
    source: dict[str, Any] | None = None,
) -> Path:
    """Write ``prefill.onnx``, ``decoder_step.onnx`` and ``config.json`` for ``model`` into
    ``out`` (created if needed). ``source``: extra provenance recorded in the config.

    Raises:
        CheckpointError: the model has a feature the graphs cannot express.
    """
    check_exportable(model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    for name, with_past in ((PREFILL, False), (STEP, True)):
        export_graph(model, out / name, with_past=with_past)
        if int8:
            quantize_graph(out / name)
    c = model.config
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "opset": OPSET,
        "weights": "int8" if int8 else "fp32",
        "vocab_size": model.vocab.size,
        "n_layers": len(model.blocks),
        "n_heads": c.n_heads,
        "head_dim": c.d_model // c.n_heads,
        "inputs": input_names(model),
        "graphs": {"prefill": PREFILL, "step": STEP},
        "model": to_dict(c),
        "vocab": to_dict(model.vocab_config),
        "source": source or {},
    }
    atomic_write_text(out / CONFIG, json.dumps(meta, indent=2))
    return out
