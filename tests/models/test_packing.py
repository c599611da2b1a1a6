"""Packed segments (``data.pack``, :class:`aurl.models.layers.Packing`) on real chorale windows
cut from the middle of pieces and augmented, with the ``tiny`` preset's musical features
(musical time with meter, grammar features) and the grammar-masked loss: a packed forward
gives every segment the logits, the loss and the gradients the unpacked forward gives it; no
segment sees another; the CUDA path's FlexAttention mask is the CPU path's dense one."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aurl.config import AugmentConfig, DataConfig, LossConfig, load_config
from aurl.data.augment import Augmenter
from aurl.data.cache import TokenCache, prepare
from aurl.data.dataset import WindowDataset, collate
from aurl.data.grammar import Grammar
from aurl.data.vocab import Vocab
from aurl.data.window_state import TokenTable, window_inputs
from aurl.models import build_model
from aurl.models.layers import BlockDiagonal, Packing
from aurl.models.losses import compute_losses

CHORALES = Path(__file__).parents[2] / "src" / "aurl" / "data" / "bundled" / "bach-chorales"
ALL = AugmentConfig(transpose_prob=1.0, instrument_prob=1.0, velocity_prob=1.0,
                    stretch_prob=1.0)  # fmt: skip
DATA = DataConfig(valid_fraction=0.0, test_fraction=0.0, window=256, augment=ALL)
LENGTHS = [70, 150, 31, 120, 96, 40, 83]  # segments cut to these lengths
PLACES = [(0, 0), (0, 70), (0, 220), (1, 0), (1, 120), (1, 216), (2, 0)]  # (row, column)
ROWS, WIDTH = 3, 256  # row 2 is mostly padding


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    """(model, segment batch with start states, grammar masks, the Packing plan, the cache)."""
    src = tmp_path_factory.mktemp("midi")
    for name in sorted(p.name for p in CHORALES.glob("*.mid"))[:8]:
        shutil.copy(CHORALES / name, src / name)
    out = tmp_path_factory.mktemp("cache")
    prepare(src, out, data_config=DATA, workers=1)
    cache = TokenCache(out)
    config = load_config(preset="tiny", overrides=["model.dropout=0"])
    assert config.model.musical_position and config.model.grammar_features and config.model.meter
    torch.manual_seed(0)
    model = build_model(config).eval()
    model.set_right_padding(True)  # as the trainer runs it
    ds = WindowDataset(cache, "train", window=256, seed=3,
                       augment=Augmenter(ALL, Vocab(cache.vocab_config)))  # fmt: skip
    items = []
    for slot in range(len(ds)):  # windows from the middle of pieces, cut to LENGTHS
        item = ds[(slot, 256, 0)]
        if item["offset"] > 0 and len(items) < len(LENGTHS):
            items.append({**item, "ids": item["ids"][: LENGTHS[len(items)]]})
    batch = collate(items)
    table = TokenTable(cache, cache.split_indices("train"), "cpu")
    grammar = Grammar(model.vocab, config.data.polyphony_cap)
    start, allowed = window_inputs(model, batch, table, grammar)
    assert (batch["offset"] > 0).all() and (start.ticks > 0).all()  # non-trivial start states
    assert start.grammar[0].sounding.flatten(1).any(1).all()  # notes sound at every start
    assert (batch["transpose"] != 0).any()
    row, col = (torch.tensor(x) for x in zip(*PLACES))
    pack = Packing.plan(row, col, batch["attention_mask"].sum(1), rows=ROWS, width=WIDTH,
                        seg_len=batch["ids"].shape[1])  # fmt: skip
    return model, {**batch, "start": start}, allowed, pack, cache


def forward(model, batch, pack=None) -> torch.Tensor:
    return model(batch["ids"], attention_mask=batch["attention_mask"], start=batch["start"],
                 meter=batch["meter"], pack=pack).logits  # fmt: skip


def test_packed_forward_loss_and_gradients_equal_unpacked(setup) -> None:
    model, batch, allowed, pack, _ = setup
    real = batch["attention_mask"]
    with torch.no_grad():
        plain, packed = forward(model, batch), forward(model, batch, pack)
    # fp32: the same arithmetic but for SDPA's masked kernel against its causal one (measured
    # max 1.2e-7 against logits up to 0.61)
    torch.testing.assert_close(packed[real], plain[real], rtol=0, atol=5e-7)

    def loss_and_grads(pack):
        model.zero_grad()
        data = {**batch, "pack": pack} if pack is not None else batch
        loss = compute_losses(model, data, LossConfig(), step=0, allowed=allowed)["total"]
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                               if p.grad is not None}  # fmt: skip

    loss_u, grads_u = loss_and_grads(None)
    loss_p, grads_p = loss_and_grads(pack)
    model.zero_grad()
    torch.testing.assert_close(loss_p, loss_u, rtol=1e-7, atol=0)  # measured: equal
    assert grads_p.keys() == grads_u.keys()
    for name in grads_u:  # measured max 1.5e-8 against gradients up to 0.088
        torch.testing.assert_close(grads_p[name], grads_u[name], rtol=0, atol=1e-7, msg=name)


def test_no_segment_sees_another(setup) -> None:
    model, batch, _, pack, _ = setup
    # the mask, from the places alone: causal inside each segment; a row's padding (its end)
    # sees only padding, so that its outputs stay finite
    expected = torch.zeros(ROWS, WIDTH, WIDTH, dtype=torch.bool)
    ends = [0] * ROWS
    for (r, c), n in zip(PLACES, LENGTHS):
        expected[r, c : c + n, c : c + n] = torch.ones(n, n, dtype=torch.bool).tril()
        ends[r] = c + n
    for r, e in enumerate(ends):
        expected[r, e:, e:] = torch.ones(WIDTH - e, WIDTH - e, dtype=torch.bool).tril()
    assert torch.equal(pack.attention()[:, 0], expected)
    # a change to segment 1's tokens moves its own logits and nobody else's (segment 2 comes
    # after it in row 0)
    changed = batch["ids"].clone()
    changed[1, 5 : LENGTHS[1]] = batch["ids"][3, 5 : LENGTHS[1]]
    with torch.no_grad():
        before = forward(model, batch, pack)
        after = forward(model, {**batch, "ids": changed}, pack)
    real = batch["attention_mask"]
    for s in range(len(LENGTHS)):
        same = torch.equal(before[s][real[s]], after[s][real[s]])
        assert same == (s != 1), s


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_mask_is_the_dense_mask(setup) -> None:
    *_, pack, _ = setup
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(ROWS, 2, WIDTH, 16, generator=g) for _ in range(3))
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=pack.attention())
    flex = BlockDiagonal.of(pack.segment).attend(q, k, v)  # eager FlexAttention on the CPU
    torch.testing.assert_close(flex, dense, rtol=0, atol=1e-5)


def test_packing_plan_layout(setup) -> None:
    _, batch, _, pack, _ = setup
    for s, (r, c) in enumerate(PLACES):
        n = LENGTHS[s]
        assert pack.segment[r, c : c + n].eq(s).all()
        assert torch.equal(pack.pos[r, c : c + n], torch.arange(n))
    taken = np.zeros((ROWS, WIDTH), dtype=bool)
    for (r, c), n in zip(PLACES, LENGTHS):
        taken[r, c : c + n] = True
    assert torch.equal(pack.segment.ge(0), torch.from_numpy(taken))  # padding: -1
    x = torch.randn(*batch["ids"].shape, 4)
    back = pack.to_segments(pack.to_rows(x), batch["ids"].shape[1])
    real = batch["attention_mask"]
    assert torch.equal(back[real], x[real])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's kernel runs on CUDA")
def test_packed_forward_on_cuda_under_flex_attention(setup) -> None:
    # the GPU's path (compiled FlexAttention, a document BlockMask) against the unpacked rows on
    # the same GPU, fp32; the tolerance is a guess made without a GPU (TF32 off by default)
    model, batch, _, _, cache = setup
    dev = torch.device("cuda")
    model = copy.deepcopy(model).to(dev)
    table = TokenTable(cache, cache.split_indices("train"), dev)
    grammar = Grammar(model.vocab, 16)
    start, allowed = window_inputs(model, batch, table, grammar)
    rows = {k: batch[k].to(dev) for k in ("ids", "attention_mask", "meter")}
    row, col = (torch.tensor(x, device=dev) for x in zip(*PLACES))
    pack = Packing.plan(row, col, rows["attention_mask"].sum(1), rows=ROWS, width=WIDTH,
                        seg_len=rows["ids"].shape[1])  # fmt: skip
    assert isinstance(pack.attention(), BlockDiagonal)
    data = {**rows, "start": start}
    with torch.no_grad():
        plain, packed = forward(model, data), forward(model, data, pack)
    real = rows["attention_mask"]
    torch.testing.assert_close(packed[real], plain[real], rtol=0, atol=1e-4)
    losses = []
    for p in (None, pack):
        model.zero_grad()
        loss = compute_losses(model, {**data, "pack": p} if p is not None else data,
                              LossConfig(), step=0, allowed=allowed)["total"]  # fmt: skip
        loss.backward()
        losses.append((loss.item(), [q.grad.clone() for q in model.parameters()
                                     if q.grad is not None]))  # fmt: skip
    assert losses[1][0] == pytest.approx(losses[0][0], rel=1e-5)
    for a, b in zip(losses[0][1], losses[1][1]):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5)
