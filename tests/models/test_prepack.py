"""Prepacked Linear weights (aurl.models.prepack): the batcher's decode call gives the plain
model's logits bit for bit at every batch size (1-3 rows, where MKL's packed kernel rounds
differently, stay on F.linear) and runs packed where it is exact; a weight changed in place is
packed again; calls of another shape, with gradients, or on a layer cast since stay plain."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aurl.config import GenerationConfig
from aurl.generation.batching import ContinuousBatcher
from aurl.models.prepack import PrepackedLinears, available
from tests.models.conftest import tiny_model

needs_mkl = pytest.mark.skipif(not available(), reason="no MKL packed sgemm in this PyTorch")


@pytest.fixture(scope="module")
def model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_model(seed=1).eval()
    torch.set_num_threads(threads)


def test_batched_decode_equals_the_plain_model_bit_for_bit(model):
    """Rows join one or two at a time (1, 2, 3, ... 8 rows) and leave at their own lengths:
    every step's logits and every row's ids are those of a batcher without packs."""
    lanes = [ContinuousBatcher(model, slots=8, fold_starts=True, prepack=p) for p in (True, False)]
    rows: list[list] = [[], []]
    sizes = set()
    for step in range(120):
        if step % 3 == 0 and step < 24:
            for lane, b in zip(rows, lanes):
                cfg = GenerationConfig(max_tokens=40 + 7 * len(lane), seed=len(lane),
                                       temperature=0.9)  # fmt: skip
                lane.append(b.add(cfg))
        for b in lanes:
            b.step()
        packed, plain = lanes
        assert packed.busy == plain.busy
        if not packed.rows:
            continue
        sizes.add(len(packed.rows))
        assert torch.equal(packed.logits, plain.logits), (step, len(packed.rows))
    assert {1, 2, 3, 4, 8} <= sizes
    assert [r.ids for r in rows[0]] == [r.ids for r in rows[1]]
    assert all(r.finished for r in rows[0])


@needs_mkl
def test_the_packed_path_runs_where_it_is_exact(model):
    b = ContinuousBatcher(model, slots=8)
    assert b._linears is PrepackedLinears.of(model)  # one set of packs per model
    before = b._linears.calls
    for seed in range(8):
        b.add(GenerationConfig(max_tokens=30, min_tokens=20, seed=seed))
    for _ in range(10):
        b.step()
    # every Linear (2 blocks x 4, the head, the grammar features' 2) of each 8-row decode call
    assert b._linears.calls - before == 10 * len(b._linears.layers) == 10 * 11


@needs_mkl
def test_a_weight_changed_in_place_is_packed_again():
    layer = torch.nn.Linear(32, 64)
    packs = PrepackedLinears(torch.nn.Sequential(layer))
    x = torch.randn(8, 1, 32)
    with torch.no_grad():
        with packs.rows(8):
            assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        layer.weight.mul_(1.5)  # in place: the version moves, the storage stays
        with packs.rows(8):
            assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert packs.calls == 2
    assert "forward" not in layer.__dict__  # the plain module again outside the block


@needs_mkl
def test_other_shapes_and_training_stay_plain_inside_the_block():
    layer = torch.nn.Linear(32, 64)
    packs = PrepackedLinears(torch.nn.Sequential(layer))
    with packs.rows(8):
        y = layer(torch.randn(8, 32, requires_grad=True))  # grad mode: the plain call
        assert y.grad_fn is not None
        with torch.no_grad():
            layer(torch.randn(5, 32))  # another caller's row count
            layer(torch.randn(32, 8).t())  # not contiguous
    assert packs.calls == 0
    with torch.no_grad(), packs.rows(1):  # one row: nothing is patched
        assert "forward" not in layer.__dict__


@needs_mkl
def test_a_layer_cast_since_it_was_listed_stays_plain():
    layer = torch.nn.Linear(32, 64)
    packs = PrepackedLinears(torch.nn.Sequential(layer))
    layer.to(torch.float64)
    x = torch.randn(8, 32, dtype=torch.float64)
    with torch.no_grad(), packs.rows(8):
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert packs.calls == 0
