"""aurl.models.inspect.attention_maps against the attention the model really computed.

Each block's attention module runs ``F.scaled_dot_product_attention`` and projects the result;
a forward hook records that output. The maps are right when ``proj(maps @ v)`` rebuilds it,
with ``v`` from the module's own input: scaling, rotary, causal / windowed / padding masks and
head layout all have to match for that to hold.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aurl.config import load_config
from aurl.data.corpus import BUNDLED_DIR
from aurl.data.tokenizer import Tokenizer
from aurl.models.inspect import attention_maps
from aurl.models.model import build_model

T = 40


def _model(*overrides: str):
    torch.manual_seed(0)
    config = load_config(preset="tiny", overrides=["model.dropout=0", *overrides])
    return build_model(config).eval(), config


@pytest.fixture(scope="module")
def chorale_ids() -> np.ndarray:
    path = sorted((BUNDLED_DIR / "bach-chorales").glob("*.mid"))[0]
    config = load_config(preset="tiny")
    return np.asarray(Tokenizer(config.vocab).encode_file(path), np.int64)[:T]


def _rebuilt_outputs(model, ids, maps, attention_mask=None):
    """(recorded SDPA-path outputs, proj(maps @ v)) of every block."""
    seen = []

    def record(attn, args, out):
        seen.append((attn, args[0], out))

    handles = [b.attn.register_forward_hook(record) for b in model.blocks]
    with torch.no_grad():
        model(torch.as_tensor(ids)[None], attention_mask=attention_mask)
    for h in handles:
        h.remove()
    pairs = []
    for (attn, x, out), w in zip(seen, maps):
        B, Tn, D = x.shape
        v = attn.qkv(x).view(B, Tn, 3, attn.n_heads, attn.head_dim)[:, :, 2].transpose(1, 2)
        y = (w[None] @ v).transpose(1, 2).reshape(B, Tn, D)  # (B, T, D)
        with torch.no_grad():
            pairs.append((out, attn.proj(y)))
    return pairs


@pytest.mark.parametrize(
    "overrides",
    [
        (),  # full causal attention: SDPA with is_causal
        ("model.attention=local", "model.local_window=8"),  # block-local windowed SDPA
        (
            "model.attention=hierarchical",
            "model.local_window=8",
            "model.global_tokens=4",
            "model.summary_len=64",
        ),  # windows plus a global prefix  # fmt: skip
        ("model.mode=vae",),  # the decoder conditioned on the posterior mean
    ],
)
def test_maps_rebuild_the_attention_output(chorale_ids, overrides):
    model, config = _model(*overrides)
    maps = attention_maps(model, chorale_ids)
    assert len(maps) == config.model.n_layers
    for w in maps:
        assert w.shape == (config.model.n_heads, T, T)
        assert torch.allclose(w.sum(-1), torch.ones(config.model.n_heads, T), atol=1e-5)
        assert (torch.triu(w, diagonal=1) == 0).all()  # causal: no weight on the future
    for out, rebuilt in _rebuilt_outputs(model, chorale_ids, maps):
        assert torch.allclose(out, rebuilt, atol=1e-5), (out - rebuilt).abs().max()


def test_windowed_maps_see_only_the_window(chorale_ids):
    model, _ = _model("model.attention=local", "model.local_window=8")
    w = attention_maps(model, chorale_ids)[0]
    i, j = torch.meshgrid(torch.arange(T), torch.arange(T), indexing="ij")
    assert (w[:, (i - j) >= 8] == 0).all()
    assert (w[:, ((i - j) >= 0) & ((i - j) < 8)] > 0).all()


def test_padding_mask_is_applied(chorale_ids):
    model, _ = _model()
    mask = torch.ones(1, T, dtype=torch.bool)
    mask[0, 5:10] = False  # keys 5..9 hidden from every other query
    maps = attention_maps(model, chorale_ids, attention_mask=mask)
    for w in maps:
        off = w[:, 10:, 5:10]
        assert (off == 0).all()
    for out, rebuilt in _rebuilt_outputs(model, chorale_ids, maps, attention_mask=mask):
        assert torch.allclose(out, rebuilt, atol=1e-5)


def test_summaries_and_batches_are_refused(chorale_ids):
    model, _ = _model("model.attention=hierarchical", "model.local_window=8",
                      "model.summary_len=16")  # fmt: skip
    with pytest.raises(ValueError, match="segment summaries"):
        attention_maps(model, chorale_ids)
    with pytest.raises(ValueError, match="one"):
        attention_maps(model, np.stack([chorale_ids, chorale_ids]))
