"""Transformer building blocks shared by the decoder and the VAE encoder.

Rotary positions -> attention (fused QKV, SDPA, optional KV cache) -> feed-forward -> block.
Shapes: ``B`` batch, ``T`` tokens, ``D`` width, ``H`` heads, ``hd`` head width.
"""

from __future__ import annotations

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
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None
    ) -> Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim)  # (B, T, 3, H, hd)
        qk = apply_rotary(qkv[:, :, :2], cos, sin)  # (B, T, 2, H, hd)
        q = qk[:, :, 0].transpose(1, 2)  # (B, H, T, hd)
        k = qk[:, :, 1].transpose(1, 2)
        v = qkv[:, :, 2].transpose(1, 2)
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
        causal = mask is None and self.causal and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
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
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None = None
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
