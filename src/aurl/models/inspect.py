"""Looking inside a trained model: the attention weights of each decoder block.

The attention modules call ``F.scaled_dot_product_attention``, which never materialises the
weights. :func:`attention_maps` recomputes them beside an ordinary forward pass: a forward
pre-hook on each block's attention reads the input it is given (normed hidden states, rotary
tables, mask) and applies the module's own ``qkv`` projection and rotary embedding, then
``softmax(q k^T / sqrt(hd))`` under the same mask. The forward pass itself is untouched, so the
maps belong to exactly the computation that produced the logits.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from aurl.models.layers import Sparse, apply_rotary, attention_mask_for


def _dense_mask(attn: nn.Module, mask: Tensor | Sparse | None, T: int, device: Any) -> Tensor:
    """The (1 | B, 1, T, T) bool mask the module applied to a full pass over ``T`` tokens."""
    pos = torch.arange(T, device=device)
    if mask is None:  # what the module does without a mask: causal or nothing
        full = torch.ones(T, T, dtype=torch.bool, device=device)
        return (torch.tril(full) if attn.causal and T > 1 else full)[None, None]
    if isinstance(mask, Sparse):
        if mask.summary_len and T // mask.summary_len > 0:
            raise ValueError(
                f"attention_maps: {T} tokens reach the segment summaries of hierarchical "
                f"attention (summary_len {mask.summary_len}), whose weights fall outside a "
                f"(T, T) map; pass at most {mask.summary_len - 1} tokens"
            )
        dense = attention_mask_for(pos, pos, mask.window, mask.n_global)[None, None]
        if mask.key_mask is not None:  # padding, but each query always sees itself
            dense = (dense & mask.key_mask[:, None, None, :T]) | torch.eye(
                T, dtype=torch.bool, device=device
            )
        return dense
    return mask.bool()


def _weights(attn: nn.Module, x: Tensor, cos: Tensor, sin: Tensor, mask: Any) -> Tensor:
    """softmax(q k^T / sqrt(hd)) of one attention module on its input ``x`` (B, T, D)."""
    B, T, _ = x.shape
    qkv = attn.qkv(x).view(B, T, 3, attn.n_heads, attn.head_dim)  # (B, T, 3, H, hd)
    qk = apply_rotary(qkv[:, :, :2], cos, sin)  # (B, T, 2, H, hd)
    q = qk[:, :, 0].transpose(1, 2).float()  # (B, H, T, hd)
    k = qk[:, :, 1].transpose(1, 2).float()
    scores = q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)  # (B, H, T, T)
    scores = scores.masked_fill(~_dense_mask(attn, mask, T, x.device), float("-inf"))
    return scores.softmax(-1)


@torch.no_grad()
def attention_maps(
    model: nn.Module, ids: np.ndarray | Tensor, *, attention_mask: Tensor | None = None
) -> list[Tensor]:
    """The attention weights of every decoder block of ``model`` over one piece's ``ids``.

    Args:
        model: a ``MusicTransformerVAEGAN`` (any mode; a VAE decodes from its posterior mean).
            Run in eval mode for the duration of the call.
        ids: token ids, (T,) or (1, T); at most ``model.config.max_seq_len`` of them.
        attention_mask: optional (1, T) mask, True / 1 for real tokens.

    Returns:
        One (heads, T, T) float tensor per block, on the CPU: row ``i`` of head ``h`` is how
        query position ``i`` distributes its attention over the key positions (rows sum to 1;
        zero above the diagonal, since the decoder is causal).

    Raises:
        ValueError: ``ids`` is not one sequence, or (hierarchical attention) reaches the
            segment summaries, whose weights are not a (T, T) map.
    """
    ids_t = torch.as_tensor(np.asarray(ids) if not isinstance(ids, Tensor) else ids)
    if ids_t.dim() == 1:
        ids_t = ids_t[None]
    if ids_t.dim() != 2 or ids_t.shape[0] != 1:
        raise ValueError(f"attention_maps: ids of shape {tuple(ids_t.shape)}: give one (T,) piece")
    device = next(model.parameters()).device
    ids_t = ids_t.to(device=device, dtype=torch.long)

    maps: list[Tensor] = []

    def hook(attn: nn.Module, args: tuple) -> None:
        x, cos, sin, mask, cache = args
        if cache is not None:  # decoding step: not a full pass
            raise ValueError("attention_maps: the model ran with a KV cache; call it on ids")
        maps.append(_weights(attn, x, cos, sin, mask)[0].cpu())  # (H, T, T)

    handles = [block.attn.register_forward_pre_hook(hook) for block in model.blocks]
    was_training = model.training
    try:
        model.eval()
        model(ids_t, attention_mask=attention_mask)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return maps
