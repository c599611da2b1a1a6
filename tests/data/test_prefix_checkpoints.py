"""A window's start state from the prefix checkpoints (:class:`PrefixCheckpoints`) equals the
state of the whole prefix scanned from the piece's start, bitwise, on real chorales: musical time,
the grammar features' state and the pitch onsets, for offsets at the piece's start, before the
first checkpoint, exactly on one and between two, with augmentation carried as the trainer does."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from aurl.config import DataConfig, ModelConfig
from aurl.data.cache import TokenCache, prepare
from aurl.data.dataset import build_loader
from aurl.data.window_state import TokenTable, window_start
from aurl.models.model import MusicTransformerVAEGAN

FIXTURES = Path(__file__).parents[1] / "fixtures" / "midi"
DATA = DataConfig(valid_fraction=0.0, test_fraction=0.0, window=64, batch_size=8)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> TokenCache:
    out = tmp_path_factory.mktemp("cache")
    prepare(FIXTURES, out, data_config=DATA, workers=1)
    return TokenCache(out)


@pytest.fixture(scope="module")
def model() -> MusicTransformerVAEGAN:
    torch.manual_seed(0)
    config = ModelConfig(d_model=32, n_layers=1, n_heads=2, dropout=0.0, meter=True)
    return MusicTransformerVAEGAN(config).eval()


def tensors(start) -> dict[str, torch.Tensor]:
    state, onset = start.grammar
    out = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    return {**out, "onset": onset, "ticks": start.ticks, "tempo": start.tempo}


def assert_same(a, b) -> None:
    ta, tb = tensors(a), tensors(b)
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name


@pytest.mark.parametrize("every", [37, 128])
def test_checkpointed_starts_equal_whole_prefix_scans(cache, model, every) -> None:
    rows = cache.split_indices("train")
    plain = TokenTable(cache, rows, "cpu")
    fast = TokenTable(cache, rows, "cpu")
    fast.add_checkpoints(model, every=every)
    assert fast.checkpoints.total == int((plain.lengths // every).sum()) > 0
    lengths = {int(r): int(n) for r, n in zip(rows, plain.lengths)}
    # hand-made offsets: start, before the first checkpoint, on one, between, the last token
    index, offset = [], []
    for r, n in list(lengths.items())[:4]:
        for off in (0, every - 1, every, every + 1, 2 * every, n - 1):
            if off < n:
                index.append(r)
                offset.append(off)
    batch = {"index": torch.tensor(index), "offset": torch.tensor(offset)}
    with torch.no_grad():
        assert_same(window_start(model, batch, fast), window_start(model, batch, plain))
    # the loader's own augmented batches (transposition and the rest carried after the start)
    stream = iter(build_loader(cache, DATA, seed=3, augment=True))
    for _ in range(4):
        b = next(stream)
        with torch.no_grad():
            assert_same(window_start(model, b, fast), window_start(model, b, plain))


def test_no_piece_long_enough_keeps_no_checkpoint(cache, model) -> None:
    rows = cache.split_indices("train")
    table = TokenTable(cache, rows, "cpu")
    table.add_checkpoints(model, every=int(np.max(table.lengths)) + 1)
    batch = {"index": torch.tensor([int(rows[0])] * 2), "offset": torch.tensor([0, 5])}
    plain = TokenTable(cache, rows, "cpu")
    assert table.checkpoints.total == 0
    with torch.no_grad():
        assert_same(window_start(model, batch, table), window_start(model, batch, plain))


def test_a_batch_mixing_pieces_with_and_without_checkpoints(cache, model) -> None:
    """The table's last piece has none (it is the shortest and ``every`` passes its length):
    its rows take the piece's start while the others take their checkpoints."""
    rows = cache.split_indices("train")
    lengths = np.array([len(cache.tokens(int(r))) for r in rows])
    rows = rows[np.argsort(-lengths, kind="stable")]  # the shortest last
    shortest, longest = int(lengths.min()), int(lengths.max())
    assert shortest < longest
    table = TokenTable(cache, rows, "cpu")
    table.add_checkpoints(model, every=shortest + 1)
    plain = TokenTable(cache, rows, "cpu")
    batch = {"index": torch.tensor([int(rows[-1]), int(rows[0]), int(rows[-1])]),
             "offset": torch.tensor([3, shortest + 5, 0])}  # fmt: skip
    with torch.no_grad():
        assert_same(window_start(model, batch, table), window_start(model, batch, plain))
