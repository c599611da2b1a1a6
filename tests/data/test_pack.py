"""Packed batches (``data.pack``) over a real cache of chorales: the packing rule on hand-made
lengths; every segment is the window the unpacked loader makes for its key (augmentation
included), laid back to back with PAD only at a row's end; the rows are mostly real tokens;
a resumed loader and the ranks of a DDP run see the batches one process sees."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from aurl.config import AugmentConfig, DataConfig
from aurl.data.augment import Augmenter
from aurl.data.cache import TokenCache
from aurl.data.dataset import (
    PackedBatchSampler,
    WindowDataset,
    build_loader,
    collate,
    pack_batches,
)
from aurl.data.vocab import Vocab
from aurl.errors import ConfigError, DataError
from tests.data.conftest import first_chorales_cache

ALL = AugmentConfig(
    transpose_prob=1.0, instrument_prob=1.0, velocity_prob=1.0, stretch_prob=1.0,
    jitter_prob=1.0, jitter_steps=2,
)  # fmt: skip
# whole chorales (300-1000 tokens) are one window each: about three of them fill a row
DATA = DataConfig(valid_fraction=0.2, test_fraction=0.0, window=2048, batch_size=2, pack=True,
                  augment=ALL)  # fmt: skip


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> TokenCache:
    return first_chorales_cache(tmp_path_factory, 60, DATA)


def test_packing_rule_on_hand_made_lengths() -> None:
    lengths = np.array([7, 7, 7, 2, 1, 6])
    # batch 1 considers slots 0-2 (21 >= 2 x 8 tokens): 0 and 1 fill a row each, 2 waits;
    # batch 2 considers 2, 3, 4, 5, placed longest first: 2 -> row 0, 5 -> row 1, 3 -> row 1
    # (1 + 6 + 2 would not fit row 0's 1 token left), 4 -> row 0
    assert pack_batches(np.arange(6), lengths, rows=2, width=8, lookahead=1) == [
        [(0, 0), (1, 1)],
        [(2, 0), (5, 1), (3, 1), (4, 0)],
    ]
    # fewer than a batch's tokens left over: dropped for the epoch
    assert pack_batches(np.arange(3), np.array([5, 3, 2]), rows=2, width=8, lookahead=1) == []
    assert pack_batches(np.arange(4), np.array([5, 3, 8, 2]), rows=2, width=8, lookahead=1) == [
        [(2, 0), (0, 1), (1, 1)]
    ]


def epoch(loader, n: int) -> list[dict[str, torch.Tensor]]:
    stream = iter(loader)
    return [next(stream) for _ in range(n)]


def test_segments_are_the_unpacked_windows_back_to_back(cache: TokenCache) -> None:
    loader = build_loader(cache, DATA, seed=1)
    sampler = loader.sampler
    assert isinstance(sampler, PackedBatchSampler)
    plan = sampler.epoch_batches()
    batches = epoch(loader, len(plan))
    # the unpacked dataset, same seed and augmentation: the window of a key
    plain = WindowDataset(cache, "train", window=2048, seed=1,
                          augment=Augmenter(ALL, Vocab(cache.vocab_config)))  # fmt: skip
    real = positions = segments = 0
    for batch, keys in zip(batches, plan):
        assert len(keys) == len(batch["ids"])
        lengths = batch["attention_mask"].sum(1)
        for s, (slot, row) in enumerate(keys):
            one = collate([plain[(slot, 2048, 0)]])
            n = int(one["attention_mask"].sum())
            assert int(lengths[s]) == n and int(batch["pack_row"][s]) == row
            assert torch.equal(batch["ids"][s, :n], one["ids"][0])
            for key in ("index", "offset", "meter", "transpose", "family_map",
                        "velocity_factor", "stretch_factor"):  # fmt: skip
                assert torch.equal(batch[key][s], one[key][0]), key
        width, longest = int(batch["pack_width"]), 0
        for row in range(DATA.batch_size):  # back to back from column 0, in the sampler's order
            mine = [s for s in range(len(keys)) if keys[s][1] == row]
            cols = batch["pack_col"][mine].tolist()
            ends = (batch["pack_col"][mine] + lengths[mine]).tolist()
            assert cols == [0, *ends[:-1]]
            longest = max(longest, ends[-1])
        assert width == max(2048, longest)  # rows of the window, longer only to hold a row
        real += int(lengths.sum())
        positions += DATA.batch_size * width
        segments += len(keys)
    assert segments > 2 * DATA.batch_size * len(plan)  # several windows per row
    # the rows are real tokens but for their ends (measured 0.946 on these 52 chorales); the
    # unpacked loader's rows of 2048 hold one window each (0.323)
    unpacked = build_loader(cache, dataclasses.replace(DATA, pack=False), seed=1)
    rows = epoch(unpacked, len(unpacked.sampler))
    unpacked_share = sum(int(b["attention_mask"].sum()) for b in rows) / (len(rows) * 2 * 2048)
    assert real / positions > 0.93 > 0.5 > unpacked_share, (real / positions, unpacked_share)


def test_packed_loader_resumes_exactly(cache: TokenCache) -> None:
    loader = build_loader(cache, DATA, seed=1)
    n_epoch = len(loader.sampler)
    straight = epoch(loader, n_epoch + 3)  # crosses an epoch boundary
    assert loader.state_dict()["epoch"] == 1
    for at in (2, n_epoch + 1):
        first = build_loader(cache, DATA, seed=1)
        stream = iter(first)
        for _ in range(at):
            next(stream)
        resumed = build_loader(cache, DATA, seed=1)
        resumed.load_state_dict(first.state_dict())
        for expected, got in zip(straight[at : at + 2], epoch(resumed, 2)):
            assert got.keys() == expected.keys()
            assert all(torch.equal(got[k], expected[k]) for k in expected)
    # another epoch is another packing
    assert not torch.equal(straight[0]["index"], straight[n_epoch]["index"])


def test_ranks_share_out_the_packed_batches(cache: TokenCache) -> None:
    ds = WindowDataset(cache, "train", window=2048, seed=5)
    one = PackedBatchSampler(ds, 2, seed=5).epoch_batches()
    ranks = [PackedBatchSampler(ds, 2, seed=5, rank=r, world=2).epoch_batches() for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(one) // 2  # same steps on every rank
    # rank r takes batches r, r + 2, ...: N processes see what one sees with N micro-batches
    assert ranks[0] == one[0 : 2 * len(ranks[0]) : 2] and ranks[1] == one[1 : 2 * len(ranks[1]) : 2]
    with pytest.raises(DataError, match="data.batch_size or data.window"):
        PackedBatchSampler(ds, 400, seed=5)


def test_pack_with_a_curriculum_is_refused(cache: TokenCache) -> None:
    data = dataclasses.replace(DATA, curriculum=((0, 256),))
    with pytest.raises(ConfigError, match="data.curriculum"):
        build_loader(cache, data, seed=1)
