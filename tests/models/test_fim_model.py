"""A model with fill-in-the-middle sentinels (``model.fim``): without them nothing changes; with
them the music ids behave as before, and a reordered window's tokens get the musical time and
grammar features of their place in time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from aurl.config import ModelConfig
from aurl.data.fim import EOM, fim_window, step_boundaries
from aurl.data.tokenizer import Tokenizer
from aurl.data.vocab import Vocab
from aurl.models.model import MusicTransformerVAEGAN

CHORALE = Path(__file__).parents[2] / "src/aurl/data/bundled/bach-chorales/bach_bwv10.7.mid"
TINY = dict(d_model=32, n_layers=2, n_heads=2, max_seq_len=512, dropout=0.0, meter=True)
V = Vocab()


@pytest.fixture(scope="module")
def ids() -> np.ndarray:
    return np.asarray(Tokenizer().encode_file(CHORALE), np.int64)[:200]


def build(fim: bool) -> MusicTransformerVAEGAN:
    torch.manual_seed(0)
    return MusicTransformerVAEGAN(ModelConfig(**TINY, fim=fim)).eval()


def test_without_fim_nothing_changes_and_music_ids_behave_alike(ids):
    plain, fim = build(False), build(True)
    assert plain.fim is None and not any(k.startswith("fim") for k in plain.state_dict())
    assert plain.embed.num_embeddings == V.size == 774
    # the sentinel rows are created last: every other parameter draws the same initial values
    fim_state = fim.state_dict()
    for k, v in plain.state_dict().items():
        assert torch.equal(v, fim_state[k]), k
    assert fim_state["fim.weight"].shape == (4, 32)
    x = torch.as_tensor(ids)[None]
    with torch.no_grad():
        a, b = plain(x).logits, fim(x).logits
    assert torch.equal(a, b) and a.shape[-1] == 774  # music logits only, bitwise equal


def test_identity_order_gives_the_plain_features(ids):
    model = build(True)
    x = torch.as_tensor(ids)[None]
    with torch.no_grad():
        plain = model(x).logits
        same = model(x, fim=(x, torch.arange(len(ids))[None])).logits
    torch.testing.assert_close(same, plain, rtol=0, atol=1e-5)


def test_reordered_tokens_get_their_time_order_features(ids):
    """Each music token of a FIM window gets the features of its place in the time-order
    source: its phase, beat and sounding pitches; sentinels get zero."""
    model = build(True)
    cuts = step_boundaries(ids, V)
    w = fim_window(ids, int(cuts[3]), int(cuts[12]), V)
    src, pos = torch.as_tensor(w.source)[None], torch.as_tensor(w.pos)[None]
    with torch.no_grad():
        got = model.fim_features(src, pos)[0]  # (T, D)
        t_emb = model.time(src)[0][0]
        g_emb = model.grammar_features(src)[0][0]
    want = (t_emb + g_emb)[w.pos.clip(0)]
    music = torch.as_tensor(w.pos >= 0)
    torch.testing.assert_close(got[music], want[music])
    assert (got[~music] == 0).all()
    # prefix and middle: the musical time of the original sequence at each token; the suffix
    # starts where the middle ends
    ticks = model.time.positions(torch.as_tensor(ids)[None])[3][0]
    ticks_src = model.time.positions(src)[3][0]
    j = int(cuts[12])
    for p in w.pos[w.pos >= 0]:
        if p < j:
            assert ticks_src[p] == ticks[p]
        else:
            assert ticks_src[p] >= ticks[j - 1]
    # a model fed the FIM order with its features predicts EOM's column from the hidden state
    with torch.no_grad():
        out = model(torch.as_tensor(w.ids)[None], fim=(src, pos))
    full = model.eom_logits(out.logits, out.hidden)
    assert full.shape[-1] == 775 and w.ids[-1] == EOM
    assert torch.equal(full[..., :774], out.logits)
