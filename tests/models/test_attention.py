"""Block-local and hierarchical attention against a loop-by-loop reference."""

from __future__ import annotations

import math

import pytest
import torch

from aurl.models.layers import Sparse, local_attention


def naive_attention(q, k, v, *, window, n_global, summary_len, key_mask):
    """Each query's visible keys listed one by one, softmax written out (float64)."""
    B, H, T, hd = q.shape
    out = torch.zeros_like(q)
    for b in range(B):
        for t in range(T):
            keys, vals = [], []
            for s in range(t + 1):
                if (t - s < window or s < n_global) and (key_mask[b, s] or s == t):
                    keys.append(k[b, :, s])
                    vals.append(v[b, :, s])
            for j in range(T // summary_len if summary_len else 0):
                lo, hi = j * summary_len, (j + 1) * summary_len
                real = [s for s in range(lo, hi) if key_mask[b, s]]
                if hi - 1 <= t and lo <= t - window and real:
                    keys.append(k[b, :, real].mean(1))
                    vals.append(v[b, :, real].mean(1))
            K, V = torch.stack(keys, 1), torch.stack(vals, 1)  # (H, n, hd)
            att = torch.softmax((K @ q[b, :, t, :, None])[..., 0] / math.sqrt(hd), dim=-1)
            out[b, :, t] = (att[:, None, :] @ V)[:, 0]
    return out


def _qkv(T, *, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    shape = (2, 2, T, 8)
    return [
        torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_(requires_grad)
        for _ in range(3)
    ]


def _key_mask(T):
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[1, :5] = False  # left padding
    mask[1, 17:20] = False  # a hole (a whole summary segment of length 4 at 16..19 is partly gone)
    mask[0, 24:28] = False  # a whole segment of length 4 without real tokens
    return mask


@pytest.mark.parametrize("T", [37, 40, 5])
@pytest.mark.parametrize("n_global", [0, 3, 11])
@pytest.mark.parametrize("summary_len", [0, 4, 5])
@pytest.mark.parametrize("padded", [False, True])
def test_block_local_equals_the_reference(T, n_global, summary_len, padded):
    q, k, v = _qkv(T)
    km = _key_mask(T) if padded else None
    sparse = Sparse(8, n_global, summary_len, km)
    got = local_attention(q, k, v, sparse)
    ref_mask = km if km is not None else torch.ones(2, T, dtype=torch.bool)
    ref = naive_attention(
        q, k, v, window=8, n_global=n_global, summary_len=summary_len, key_mask=ref_mask
    )
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_block_local_gradients_equal_the_reference():
    q, k, v = _qkv(29, requires_grad=True)
    km = _key_mask(29)
    local_attention(q, k, v, Sparse(8, 3, 4, km)).square().sum().backward()
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = naive_attention(q, k, v, window=8, n_global=3, summary_len=4, key_mask=km)
    ref.square().sum().backward()
    for g, t in zip(got, (q, k, v)):
        torch.testing.assert_close(g, t.grad, rtol=1e-10, atol=1e-10)


def _incremental(model, ids, chunks, attention_mask=None):
    state = model.init_state(ids.shape[0])
    outs, pos = [], 0
    for n in chunks:
        m = attention_mask[:, pos : pos + n] if attention_mask is not None else None
        outs.append(model.step(ids[:, pos : pos + n], state, attention_mask=m))
        pos += n
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("attention", ["local", "hierarchical"])
def test_kv_cache_matches_block_local_forward(attention, ids, make_model):
    # window 8, 3 global tokens, summaries of 4 tokens: 40 tokens use all three
    model = make_model(attention=attention, summary_len=4).eval()
    full = model(ids).logits
    for chunks in ([11] + [1] * 15 + [6] + [1] * 8, [40]):
        torch.testing.assert_close(_incremental(model, ids, chunks), full, atol=1e-5, rtol=1e-4)


def test_kv_cache_matches_forward_with_left_padding(ids, make_model):
    model = make_model(attention="hierarchical", summary_len=4).eval()
    mask = torch.ones(3, 40)
    mask[1, :6] = 0
    mask[2, :13] = 0
    full = model(ids, attention_mask=mask).logits
    got = _incremental(model, ids, [17] + [1] * 23, attention_mask=mask)
    torch.testing.assert_close(got[mask.bool()], full[mask.bool()], atol=1e-5, rtol=1e-4)


def test_summaries_reach_past_the_window(ids, make_model):
    # no global tokens: only the summaries carry position 1 to position 30, beyond the reach
    # of 2 layers of 8-token windows
    local = make_model(attention="hierarchical", global_tokens=0, summary_len=0).eval()
    hier = make_model(attention="hierarchical", global_tokens=0, summary_len=4).eval()
    hier.load_state_dict(local.state_dict())
    a, b = ids.clone(), ids.clone()
    a[:, 1], b[:, 1] = 10, 11  # two NOTE_ONs: no musical-time change
    torch.testing.assert_close(local(a).logits[:, 30], local(b).logits[:, 30])
    assert not torch.allclose(hier(a).logits[:, 30], hier(b).logits[:, 30])
    # causal: position 1 only reaches a summary once its segment (0..3) is complete and lies
    # before the window: from position 8 on; the logits of later tokens' changes never leak back
    c = a.clone()
    c[:, 35] = 12
    torch.testing.assert_close(hier(a).logits[:, :35], hier(c).logits[:, :35])
