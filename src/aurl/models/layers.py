"""Transformer building blocks shared by the decoder and the VAE encoder.

Rotary positions -> attention (fused QKV, SDPA, optional KV cache) -> feed-forward -> block.
Shapes: ``B`` batch, ``T`` tokens, ``D`` width, ``H`` heads, ``hd`` head width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# (k_cache, v_cache, start, keys): the new keys go to cache positions start..start+T-1;
# attention reads the cache positions ``keys`` (a slice, or an index tensor).
KVCache = tuple[Tensor, Tensor, int, "slice | Tensor"]


class Rotary(nn.Module):
    """Rotary position embedding (RoFormer; GPT-NeoX half-rotation layout).

    Relative by construction, so generation may run past the training length: the tables grow
    on demand.
    """

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._build(max_len)

    def _build(self, n: int) -> None:
        t = torch.arange(n, dtype=torch.float32, device=self.inv_freq.device)
        freqs = torch.outer(t, self.inv_freq)  # (n, hd/2)
        self.register_buffer("cos", torch.cat([freqs.cos(), freqs.cos()], -1), persistent=False)
        # sin with the rotation's sign folded in: x * cos + swap_halves(x) * sin
        sin = torch.cat([-freqs.sin(), freqs.sin()], dim=-1)  # (n, hd)
        self.register_buffer("sin", sin, persistent=False)

    def tables(self, start: int, length: int) -> tuple[Tensor, Tensor]:
        """cos, signed sin of positions ``start .. start+length-1``, each (length, 1, 1, hd)
        to broadcast over (B, T, 2, H, hd)."""
        if start + length > self.cos.shape[0]:
            self._build(max(2 * self.cos.shape[0], start + length))
        sl = slice(start, start + length)
        return self.cos[sl, None, None], self.sin[sl, None, None]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` (B, T, ..., hd) by position (half-rotation layout); ``cos`` and the signed
    ``sin`` of :meth:`Rotary.tables` broadcast from (T, 1, .., hd). Three kernels."""
    if cos.dtype != x.dtype:  # autocast: activations in bf16/fp16, tables in fp32
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)  # (x2, x1)
    return torch.addcmul(x * cos, swapped, sin)


def attention_mask_for(q_pos: Tensor, k_pos: Tensor, window: int | None, n_global: int) -> Tensor:
    """Which keys each query sees: causal, and (with a ``window``) only the last ``window``
    positions, itself included, or one of the first ``n_global`` positions. (Tq, Tk) bool."""
    diff = q_pos[:, None] - k_pos[None, :]
    ok = diff >= 0
    if window is not None:
        ok = ok & ((diff < window) | (k_pos[None, :] < n_global))
    return ok


def summary_mask_for(q_pos: Tensor, n: int, length: int, window: int) -> Tensor:
    """Which of ``n`` segment summaries (segment j: positions ``j*length .. (j+1)*length - 1``)
    each query sees: those of segments complete at the query (causal) that begin before its
    window, i.e. ``(j+1)*length - 1 <= q`` and ``j*length <= q - window``. (Tq, n) bool. A
    query whose window reaches back to position 0 sees none, so windowed attention equals full
    attention wherever the window covers the past."""
    start = torch.arange(n, device=q_pos.device) * length  # (n,)
    q = q_pos[:, None]
    return (start[None, :] + length - 1 <= q) & (start[None, :] <= q - window)


def segment_summaries(
    k: Tensor, v: Tensor, n: int, length: int, key_mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Mean key and value of each of the first ``n`` segments of ``length`` positions.

    Compressive Transformer-style mean pooling (Rae et al. 2020): a coarse memory of the far
    past. ``k``, ``v`` (B, H, >= n*length, hd); ``key_mask`` (B, >= n*length) True for real
    tokens (padding is left out of the means). Returns (keys, values (B, H, n, hd), which
    summaries hold at least one real token (B, n) or None when every token is real)."""
    B, H, _, hd = k.shape
    ks = k[:, :, : n * length].unflatten(2, (n, length))  # (B, H, n, L, hd)
    vs = v[:, :, : n * length].unflatten(2, (n, length))
    if key_mask is None:
        return ks.mean(3), vs.mean(3), None
    w = key_mask[:, : n * length].view(B, 1, n, length, 1).to(k.dtype)  # (B, 1, n, L, 1)
    count = w.sum(3)  # (B, 1, n, 1)
    denom = count.clamp_min(1.0)
    return (ks * w).sum(3) / denom, (vs * w).sum(3) / denom, count[:, 0, :, 0] > 0


@dataclass(frozen=True)
class Sparse:
    """A windowed causal attention pattern (``local``/``hierarchical``), in place of a mask.

    Queries see the last ``window`` positions (itself included), the first ``n_global``
    positions, and the mean-pooled summaries of complete ``summary_len`` segments that begin
    before the window (:func:`summary_mask_for`; 0: none).

    Without a KV cache (training, scoring) the queries are all positions 0..T-1 and attention
    runs block-local (:func:`local_attention`). With one (decoding), ``mask`` is the dense
    mask over the keys the cache hands over, and ``key_mask`` covers cache positions from 0.
    """

    window: int
    n_global: int = 0
    summary_len: int = 0
    key_mask: Tensor | None = None  # (B, positions) True for real tokens
    mask: Tensor | None = None  # cached path: (1 or B, 1, Tq, Tk) over the gathered keys
    q_start: int = 0


@dataclass(frozen=True)
class Packing:
    """Where the segments of a packed batch (``data.pack``) lie in the rows the blocks see.

    The model embeds the segments as rows of their own, ``(S, Ts, D)`` padded on the right,
    each from its own start state; :meth:`to_rows` moves them into ``rows`` rows of ``width``
    positions, back to back, for the blocks, and :meth:`to_segments` brings the blocks' output
    back, so the head and the loss read the segments as unpacked rows. Attention is causal
    inside each segment and blind across segments (:meth:`attention`); rotary positions count
    from each segment's start (``pos``), so every segment sees the positions, the keys and the
    rotations it would see alone in a row. (Rotary is relative, so the packed row's own column
    positions would do up to rounding: on the ``tiny`` model at width 256 they moved the logits
    by at most 1.5e-7, the per-segment ones by 1.2e-7; the gather of the tables costs nothing
    next to the blocks.) Build with :meth:`plan`.
    """

    rows: int
    width: int
    src: Tensor  # (rows * width,) each packed position's flat segment position (S*Ts: none)
    back: Tensor  # (S * Ts,) each segment position's flat packed position
    pos: Tensor  # (rows, width) position inside its segment (padding: its column)
    segment: Tensor  # (rows, width) segment number (-1: padding, which sees only padding)

    @classmethod
    def plan(cls, row: Tensor, col: Tensor, length: Tensor, *, rows: int, width: int,
             seg_len: int) -> Packing:  # fmt: skip
        """From each segment's packed ``row``, first ``col`` and real ``length`` (all (S,), on
        the model's device) and the segment rows' length ``seg_len`` (Ts)."""
        S, dev = row.shape[0], row.device
        t = torch.arange(seg_len, device=dev)[None, :].expand(S, seg_len)  # (S, Ts)
        real = t < length[:, None]  # (S, Ts)
        first = row * width + col  # (S,) flat packed position of each segment's start
        flat = first[:, None] + t  # (S, Ts)
        n = rows * width
        dst = torch.where(real, flat, n).flatten()  # (S*Ts,); slot n: padding, dropped below
        src = torch.full((n + 1,), S * seg_len, dtype=torch.long, device=dev)
        src = src.scatter(0, dst, torch.arange(S * seg_len, device=dev))
        pos = torch.cat([torch.arange(width, device=dev).repeat(rows), t.new_zeros(1)])
        pos = pos.scatter(0, dst, t.flatten())
        segment = torch.full((n + 1,), -1, dtype=torch.long, device=dev)
        segment = segment.scatter(0, dst, torch.arange(S, device=dev).repeat_interleave(seg_len))
        last = first + (length - 1).clamp(min=0)  # a segment's padding reads its last token
        back = torch.minimum(flat, last[:, None]).flatten()
        return cls(rows, width, src[:n], back, pos[:n].view(rows, width),
                   segment[:n].view(rows, width))  # fmt: skip

    def to_rows(self, x: Tensor) -> Tensor:
        """Segment rows (S, Ts, D) -> packed rows (rows, width, D), zeros where no segment."""
        D = x.shape[-1]
        flat = torch.cat([x.reshape(-1, D), x.new_zeros(1, D)])  # (S*Ts + 1, D)
        return flat.index_select(0, self.src).view(self.rows, self.width, D)

    def to_segments(self, x: Tensor, seg_len: int) -> Tensor:
        """Packed rows (rows, width, D) -> segment rows (S, Ts, D); a segment's padding holds
        its last real position's vector (read by nothing)."""
        D = x.shape[-1]
        return x.reshape(-1, D).index_select(0, self.back).view(-1, seg_len, D)

    def attention(self) -> Tensor | BlockDiagonal:
        """What the blocks attend under: on CUDA a FlexAttention document mask
        (:class:`BlockDiagonal`; torch >= 2.5), elsewhere the explicit (rows, 1, width, width)
        bool mask for SDPA, True where query and key share a segment and the key is not later.
        The dense mask computes every row's whole width x width square (on the CPU packed rows
        cost more per real token than unpacked ones: BENCHMARKS.md "Packed training rows")."""
        if self.segment.device.type == "cuda" and FLEX_ON_CUDA and has_flex_attention():
            return BlockDiagonal.of(self.segment)
        same = self.segment[:, :, None] == self.segment[:, None, :]  # (rows, width, width)
        return (same & torch.ones_like(same[0]).tril())[:, None]


@dataclass(frozen=True)
class BlockDiagonal:
    """Causal attention inside segments only, as a FlexAttention ``BlockMask`` (CUDA: its
    kernel skips the blocks no segment reaches, where a dense mask costs the whole square)."""

    block_mask: Any  # torch.nn.attention.flex_attention.BlockMask

    @classmethod
    def of(cls, segment: Tensor) -> BlockDiagonal:
        """From the segment number of every packed position (rows, width)."""
        from torch.nn.attention.flex_attention import create_block_mask

        def same_segment_causal(b, h, q, k):  # noqa: ANN001, ANN202 - FlexAttention's mask_mod
            return (segment[b, q] == segment[b, k]) & (k <= q)

        B, W = segment.shape
        return cls(create_block_mask(same_segment_causal, B, None, W, W, device=segment.device))

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """(B, H, T, hd) each -> (B, H, T, hd)."""
        return _flex_attention(q.device)(q, k, v, block_mask=self.block_mask)


# False: packed rows attend under the dense mask on CUDA too (bench_gpu.py's second try when
# FlexAttention fails on a lent GPU, so that its minutes still measure packing)
FLEX_ON_CUDA = True
_FLEX: dict[str, Any] = {}


def has_flex_attention() -> bool:
    """FlexAttention is there (torch >= 2.5; the project allows 2.4)."""
    import importlib.util

    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def _flex_attention(device: torch.device) -> Any:
    """FlexAttention, compiled on CUDA (its fused kernel; eager it materialises the scores)."""
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if "cuda" not in _FLEX:
        _FLEX["cuda"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["cuda"]


def dense_sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, sparse: Sparse, past_k: Tensor,
    past_v: Tensor,
) -> Tensor:  # fmt: skip
    """Reference path: SDPA over the given keys (``mask`` (1|B, 1, Tq, Tk), None: all) plus the
    summaries of ``past_k``/``past_v`` (B, H, positions from 0, hd). q (B, H, Tq, hd)."""
    B, H, Tq, _ = q.shape
    L = sparse.summary_len
    n = 0 if L == 0 else (sparse.q_start + Tq) // L
    if n == 0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ks, vs, valid = segment_summaries(past_k, past_v, n, L, sparse.key_mask)
    q_pos = torch.arange(sparse.q_start, sparse.q_start + Tq, device=q.device)
    smask = summary_mask_for(q_pos, n, L, sparse.window)[None, None]  # (1, 1, Tq, n)
    if valid is not None:
        smask = smask & valid[:, None, None, :]
    if mask is None:
        mask = torch.ones(1, 1, Tq, k.shape[2], dtype=torch.bool, device=q.device)
    mask = torch.cat([mask.expand(smask.shape[0], -1, -1, -1),
                      smask.expand(mask.shape[0], -1, -1, -1)], dim=-1)  # fmt: skip
    return F.scaled_dot_product_attention(
        q, torch.cat([k, ks.to(k.dtype)], 2), torch.cat([v, vs.to(v.dtype)], 2), attn_mask=mask
    )


def local_attention(q: Tensor, k: Tensor, v: Tensor, sparse: Sparse) -> Tensor:
    """Causal windowed attention of positions 0..T-1 over themselves, block by block.

    Queries in blocks of ``W = sparse.window`` attend to the keys of their own block and the
    previous one (which hold every key of their windows), plus the global prefix and the
    segment summaries: one SDPA call over (blocks, W, 2W + globals + summaries) scores, so time
    and memory grow linearly in T (with summaries: plus T * T / summary_len). Equal to SDPA
    with the dense mask of :func:`attention_mask_for` and :func:`summary_mask_for`.
    q, k, v (B, H, T, hd) -> (B, H, T, hd).
    """
    B, H, T, hd = q.shape
    W, G, L = sparse.window, min(sparse.n_global, T), sparse.summary_len
    nb = -(-T // W)
    pad = nb * W - T
    km = sparse.key_mask
    if km is None:
        km = torch.ones(B, T, dtype=torch.bool, device=q.device)
    km = km[:, :T]
    # one block of empty keys in front (the "previous block" of block 0), padding at the end
    kb = F.pad(k, (0, 0, W, pad)).unflatten(2, (nb + 1, W))  # (B, H, nb+1, W, hd)
    vb = F.pad(v, (0, 0, W, pad)).unflatten(2, (nb + 1, W))
    mb = F.pad(km, (W, pad)).unflatten(1, (nb + 1, W))  # (B, nb+1, W)
    keys = torch.cat([kb[:, :, :-1], kb[:, :, 1:]], dim=3)  # (B, H, nb, 2W, hd)
    vals = torch.cat([vb[:, :, :-1], vb[:, :, 1:]], dim=3)
    real = torch.cat([mb[:, :-1], mb[:, 1:]], dim=2)  # (B, nb, 2W)

    blk = torch.arange(nb, device=q.device)[:, None, None]  # (nb, 1, 1)
    a = torch.arange(W, device=q.device)[None, :, None]  # query offset in its block
    b = torch.arange(2 * W, device=q.device)[None, None, :]  # key offset in its pair
    k_pos = (blk - 1) * W + b  # (nb, 1, 2W)
    diff = W + a - b  # q_pos - k_pos, (1, W, 2W)
    band = (diff >= 0) & ((diff < W) | (k_pos < G)) & (k_pos >= 0)  # (nb, W, 2W)
    mask = (band[None] & real[:, :, None, :]) | (diff == 0)  # (B, nb, W, 2W); itself always
    q_pos = (blk[:, :, 0] * W + a[0, :, 0][None]).reshape(-1)  # (nb*W,)

    extra_k, extra_v, extra_m = [], [], []
    if G > 0:  # the global prefix, where it is not already in the block pair
        gm = torch.arange(G, device=q.device)[None, :] < (blk[:, :, 0] - 1) * W  # (nb, G)
        gm = gm[None, :, None, :] & km[:, None, None, :G]  # (B, nb, 1, G)
        extra_k.append(k[:, :, None, :G].expand(-1, -1, nb, -1, -1))  # (B, H, nb, G, hd)
        extra_v.append(v[:, :, None, :G].expand(-1, -1, nb, -1, -1))
        extra_m.append(gm.expand(-1, -1, W, -1))
    n = 0 if L == 0 else T // L
    if n > 0:
        ks, vs, valid = segment_summaries(k, v, n, L, sparse.key_mask)  # (B, H, n, hd)
        sm = summary_mask_for(q_pos, n, L, W).view(1, nb, W, n)
        if valid is not None:
            sm = sm & valid[:, None, None, :]
        extra_k.append(ks[:, :, None].expand(-1, -1, nb, -1, -1))  # (B, H, nb, n, hd)
        extra_v.append(vs[:, :, None].expand(-1, -1, nb, -1, -1))
        extra_m.append(sm.expand(B, -1, -1, -1))
    if extra_k:
        keys = torch.cat([*extra_k, keys], dim=3)  # (B, H, nb, Kb, hd)
        vals = torch.cat([*extra_v, vals], dim=3)
        mask = torch.cat([*extra_m, mask], dim=3)  # (B, nb, W, Kb)
    Kb = keys.shape[3]
    qb = F.pad(q, (0, 0, 0, pad)).unflatten(2, (nb, W))  # (B, H, nb, W, hd)
    # blocks into the batch: (B*nb, H, W, hd) against (B*nb, H, Kb, hd), mask (B*nb, 1, W, Kb)
    y = F.scaled_dot_product_attention(
        qb.transpose(1, 2).reshape(B * nb, H, W, hd),
        keys.transpose(1, 2).reshape(B * nb, H, Kb, hd),
        vals.transpose(1, 2).reshape(B * nb, H, Kb, hd),
        attn_mask=mask.reshape(B * nb, 1, W, Kb),
    )
    y = y.view(B, nb, H, W, hd).transpose(1, 2).reshape(B, H, nb * W, hd)  # (B, H, T+pad, hd)
    return y[:, :, :T]


class Attention(nn.Module):
    """Multi-head self-attention: one fused QKV matmul, rotary on q and k together, SDPA.

    ``mask`` None means plain causal (``causal=True``) or no mask at all (the encoder).
    """

    def __init__(self, d_model: int, n_heads: int, *, causal: bool = True) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"model.d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads, self.head_dim, self.causal = n_heads, d_model // n_heads, causal
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | Sparse | None,
        cache: KVCache | None,
    ) -> Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim)  # (B, T, 3, H, hd)
        qk = apply_rotary(qkv[:, :, :2], cos, sin)  # (B, T, 2, H, hd)
        q = qk[:, :, 0].transpose(1, 2)  # (B, H, T, hd)
        k = qk[:, :, 1].transpose(1, 2)
        v = qkv[:, :, 2].transpose(1, 2)
        if isinstance(mask, BlockDiagonal):  # packed segments (Packing), FlexAttention
            return self._out(mask.attend(q, k, v), x)
        if isinstance(mask, Sparse) and cache is None:
            y = local_attention(q, k, v, mask)
            return self._out(y, x)
        if cache is not None:
            k_cache, v_cache, start, keys = cache
            k_cache[:, :, start : start + T] = k
            v_cache[:, :, start : start + T] = v
            if isinstance(keys, slice):
                k, v = k_cache[:, :, keys], v_cache[:, :, keys]
            else:
                k, v = k_cache.index_select(2, keys), v_cache.index_select(2, keys)
            if q.dtype != k.dtype:
                q = q.to(k.dtype)
        # without a mask: causal when queries and keys are the same positions (T > 1); a single
        # cached query sees every key it was given
        if isinstance(mask, Sparse):  # cached windowed decoding: the dense reference path
            end = start + T
            y = dense_sparse_attention(q, k, v, mask.mask, mask, k_cache[:, :, :end],
                                       v_cache[:, :, :end])  # fmt: skip
            return self._out(y, x)
        causal = mask is None and self.causal and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self._out(y, x)

    def _out(self, y: Tensor, x: Tensor) -> Tensor:
        """(B, H, T, hd) heads -> the output projection (B, T, D), in ``x``'s dtype."""
        B, T, D = x.shape
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.proj(y if y.dtype == x.dtype else y.to(x.dtype))


class FeedForward(nn.Module):
    """Two linear layers with tanh-GELU (one fused kernel) between them."""

    def __init__(self, d_model: int, mult: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, mult * d_model)
        self.proj = nn.Linear(mult * d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        y = self.proj(F.gelu(self.fc(x), approximate="tanh"))
        return self.dropout(y) if self.training and self.dropout.p > 0 else y


class Block(nn.Module):
    """Pre-norm residual block; takes its attention and feed-forward modules as arguments."""

    def __init__(self, d_model: int, attn: Attention, ff: FeedForward, dropout: float) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(d_model), attn
        self.norm2, self.ff = nn.LayerNorm(d_model), ff
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | Sparse | None,
        cache: KVCache | None = None,
    ) -> Tensor:
        a = self.attn(self.norm1(x), cos, sin, mask, cache)
        # skipping the no-op dropout call saves Python time per generated token
        x = x + (self.dropout(a) if self.training and self.dropout.p > 0 else a)
        return x + self.ff(self.norm2(x))


def make_blocks(
    n_layers: int, d_model: int, n_heads: int, ff_mult: int, dropout: float, *, causal: bool
) -> nn.ModuleList:
    """``n_layers`` blocks of the same shape."""
    return nn.ModuleList(
        Block(
            d_model,
            Attention(d_model, n_heads, causal=causal),
            FeedForward(d_model, ff_mult, dropout),
            dropout,
        )
        for _ in range(n_layers)
    )
