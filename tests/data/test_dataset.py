"""Windows, batches and evaluation over a real cache of chorales: windows are slices of the
cache, seeded and resumable; batches group lengths, follow the curriculum, split over ranks and
workers; evaluation covers every token once."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pytest
import torch

from aurl.config import AugmentConfig, DataConfig, VocabConfig
from aurl.data.augment import Augmenter, AugmentParams, apply_params
from aurl.data.cache import TokenCache
from aurl.data.dataset import (
    LengthGroupedBatchSampler,
    WindowDataset,
    augment_fields,
    build_loader,
    collate,
    eval_batches,
    iter_pieces,
    window_at,
)
from aurl.data.vocab import PAD, Kind, Vocab
from aurl.errors import DataError
from tests.data.conftest import first_chorales_cache

DATA = DataConfig(valid_fraction=0.2, test_fraction=0.0)
V = Vocab()


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> TokenCache:
    return first_chorales_cache(tmp_path_factory, 16, DATA)


def test_window_at_follows_the_schedule() -> None:
    schedule = ((0, 256), (1000, 512), (2000, 1024))
    assert [window_at(s, 128, schedule) for s in (0, 999, 1000, 1999, 2000, 10**6)] == [
        256, 256, 512, 512, 1024, 1024,
    ]  # fmt: skip
    assert window_at(5, 128, ()) == 128


def test_windows_are_seeded_slices_on_event_boundaries(cache: TokenCache) -> None:
    ds = WindowDataset(cache, "train", window=64, seed=3)
    lengths = cache.lengths[cache.split_indices("train")]
    assert len(ds) == int(np.sum(-(-lengths // 64)))
    at_boundary = 0
    for slot in range(len(ds)):
        item = ds[slot]
        tokens = np.asarray(cache.tokens(item["index"]))
        assert len(item["ids"]) == 64
        np.testing.assert_array_equal(item["ids"], tokens[item["offset"] : item["offset"] + 64])
        if item["offset"] > 0:
            prev, first = V.kind[tokens[item["offset"] - 1]], V.kind[item["ids"][0]]
            at_boundary += prev == Kind.TIME_SHIFT and first != Kind.TIME_SHIFT
    assert at_boundary >= 0.9 * len(ds)  # chorales have a time step every few tokens
    again = WindowDataset(cache, "train", window=64, seed=3)
    assert all(ds[s]["offset"] == again[s]["offset"] for s in range(len(ds)))
    ds.set_epoch(1)
    assert any(ds[s]["offset"] != again[s]["offset"] for s in range(len(ds)))
    # an explicit key carries the window and epoch: the curriculum's path into workers
    item = again[(0, 200, 1)]
    assert len(item["ids"]) == 200 and item["offset"] == ds[(0, 200, 1)]["offset"]


def test_short_pieces_come_whole(cache: TokenCache) -> None:
    ds = WindowDataset(cache, "valid", window=4096)
    assert len(ds) == len(cache.split_indices("valid"))
    for slot in range(len(ds)):
        item = ds[slot]
        assert item["offset"] == 0
        np.testing.assert_array_equal(item["ids"], cache.tokens(item["index"]))


def test_collate_pads_and_masks() -> None:
    items = [
        {"ids": np.array([0, 5, 6]), "index": 4, "offset": 0},
        {"ids": np.array([7]), "index": 2, "offset": 9},
    ]
    batch = collate(items)
    assert batch["ids"].tolist() == [[0, 5, 6], [7, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[True, True, True], [True, False, False]]
    assert batch["index"].tolist() == [4, 2] and batch["offset"].tolist() == [0, 9]
    assert batch["ids"].dtype == torch.long
    assert "family_map" not in batch  # no augmentation records: none in the batch
    # augmentation records stack; a transform that did not fire reads as the identity
    drawn = [
        AugmentParams(transpose=-3, velocity=1.1),
        AugmentParams(family_map=np.arange(16)[::-1]),
    ]
    batch = collate([{**it, **augment_fields(p, 16)} for it, p in zip(items, drawn)])
    assert batch["transpose"].tolist() == [-3, 0]
    assert batch["family_map"].tolist() == [list(range(16)), list(range(15, -1, -1))]
    assert batch["velocity_factor"].tolist() == [1.1, 1.0]
    assert batch["stretch_factor"].tolist() == [1.0, 1.0]
    assert batch["velocity_factor"].dtype == torch.float64


def test_length_grouping_cuts_padding(cache: TokenCache) -> None:
    ds = WindowDataset(cache, "train", window=1024)
    lengths = ds.slot_lengths()
    assert len(np.unique(lengths)) > len(lengths) // 2  # whole chorales, of many lengths

    def padding(sampler: LengthGroupedBatchSampler) -> int:
        b = sampler.epoch_batches()
        return int((lengths[b].max(axis=1, keepdims=True) - lengths[b]).sum())

    grouped = LengthGroupedBatchSampler(ds, 4, seed=0, group=8)
    plain = LengthGroupedBatchSampler(ds, 4, seed=0, length_grouped=False)
    assert padding(grouped) < padding(plain)
    # an epoch visits distinct slots; another epoch another order
    first = grouped.epoch_batches()
    assert len(np.unique(first)) == first.size == len(grouped) * 4
    grouped.set_epoch(1)
    assert not np.array_equal(grouped.epoch_batches(), first)


def test_ranks_share_out_one_epoch(cache: TokenCache) -> None:
    ds = WindowDataset(cache, "train", window=128)
    ranks = [LengthGroupedBatchSampler(ds, 3, seed=5, rank=r, world=3) for r in range(3)]
    batches = [s.epoch_batches() for s in ranks]
    assert len({len(b) for b in batches}) == 1  # same number of steps on every rank
    flat = np.concatenate([b.ravel() for b in batches])
    assert len(np.unique(flat)) == len(flat)  # disjoint
    assert len(flat) == 3 * 3 * len(ranks[0]) == 3 * 3 * (len(ds) // 9)


def test_curriculum_windows_travel_with_batches(cache: TokenCache) -> None:
    data = DataConfig(
        window=64, batch_size=2, curriculum=((0, 32), (3, 96)), valid_fraction=0.2,
        test_fraction=0.0,
    )  # fmt: skip
    loader = build_loader(cache, data, augment=False)
    got = []
    for n, batch in enumerate(loader):
        got.append(batch["ids"].shape[1])
        if n == 5:
            break
    assert got[:3] == [32, 32, 32] and got[3:] == [96, 96, 96]
    # with two batches per optimizer step the switch comes at batch 6
    loader = build_loader(cache, data, augment=False, batches_per_step=2)
    assert [loader.sampler.window_of(b) for b in (5, 6)] == [32, 96]


def test_loader_resumes_exactly_and_workers_agree(cache: TokenCache) -> None:
    data = DataConfig(
        window=48, batch_size=3, valid_fraction=0.2, test_fraction=0.0,
        augment=AugmentConfig(transpose_prob=1.0, stretch_prob=0.5, jitter_prob=0.5),
    )  # fmt: skip
    loader = build_loader(cache, data, seed=1)
    n_epoch = len(loader.sampler)
    stream = iter(loader)
    run = [next(stream) for _ in range(n_epoch + 4)]  # crosses an epoch boundary
    assert loader.state_dict()["epoch"] == 1

    for at in (5, n_epoch + 1):  # mid-epoch, and in the next epoch
        resumed = build_loader(cache, data, seed=1)
        resumed.load_state_dict(state_after(cache, data, at))
        stream = iter(resumed)
        for expected in run[at : at + 3]:
            got = next(stream)
            assert got.keys() == expected.keys()
            for key in expected:  # ids, mask, and what augmentation drew
                assert torch.equal(got[key], expected[key])

    two = build_loader(cache, dataclasses.replace(data, num_workers=2), seed=1)
    stream = iter(two)
    for expected in run:  # workers that persist across the epoch boundary read the same
        assert torch.equal(next(stream)["ids"], expected["ids"])
    stream.close()
    with pytest.raises(DataError, match="seed"):
        build_loader(cache, data, seed=2).load_state_dict(loader.state_dict())


def state_after(cache: TokenCache, data: DataConfig, batches: int) -> dict[str, int]:
    """The state a fresh loader saves after handing out ``batches`` batches."""
    loader = build_loader(cache, data, seed=1)
    stream = iter(loader)
    for _ in range(batches):
        next(stream)
    return loader.state_dict()


def test_works_with_distributed_sampler(cache: TokenCache) -> None:
    """Two ranks under torch's DistributedSampler read disjoint windows that together are the
    epoch: every window the dataset holds, each once (a window = its piece, offset and ids;
    compared as multisets, since two slots of a piece can draw the same window)."""
    ds = WindowDataset(cache, "train", window=32, seed=5)  # 292 windows: no sampler padding

    def key(row: int, offset: int, ids: np.ndarray) -> tuple:
        return row, offset, ids[ids != PAD].tobytes()

    epoch = collections.Counter(
        key(it["index"], it["offset"], it["ids"]) for it in map(ds.__getitem__, range(len(ds)))
    )
    assert len(ds) % 2 == 0  # the sampler pads nothing: each slot is read once
    ranks = []
    for rank in range(2):
        sampler = torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=rank, seed=1)
        sampler.set_epoch(3)
        dl = torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler, collate_fn=collate)
        seen = collections.Counter()
        for batch in dl:
            assert batch["ids"].shape[1] <= 32
            rows, offsets = batch["index"].tolist(), batch["offset"].tolist()
            seen.update(key(r, o, ids.numpy()) for r, o, ids in zip(rows, offsets, batch["ids"]))
        ranks.append(seen)
    assert sum(ranks[0].values()) == sum(ranks[1].values()) == len(ds) // 2
    unique = {k for k, n in epoch.items() if n == 1}  # a few slots snap to the same offset
    assert len(unique) > 0.6 * len(ds) and not set(ranks[0]) & set(ranks[1]) & unique  # disjoint
    assert ranks[0] + ranks[1] == epoch  # together: the whole epoch, nothing twice
    # ... and the epoch is every piece of the split, ceil(length / window) windows each, each a
    # slice of its piece
    rows = cache.split_indices("train")
    expected = {int(r): max(1, -(-int(cache.lengths[r]) // 32)) for r in rows}
    read = collections.Counter(row for rank in ranks for row, _, _ in rank.elements())
    assert read == expected
    for row, offset, ids in (ranks[0] + ranks[1]).elements():
        piece = np.asarray(cache.tokens(row), dtype=np.int64)[offset : offset + 32]
        assert piece.tobytes() == ids


def test_augmented_windows_are_deterministic_and_in_range(cache: TokenCache) -> None:
    aug = Augmenter(AugmentConfig(transpose_prob=1.0, transpose_max=6), V)
    a = WindowDataset(cache, "train", window=64, seed=2, augment=aug)
    b = WindowDataset(cache, "train", window=64, seed=2, augment=aug)
    plain = WindowDataset(cache, "train", window=64, seed=2)
    moved = 0
    for slot in range(len(a)):
        x, y, p = a[slot]["ids"], b[slot]["ids"], plain[slot]["ids"]
        np.testing.assert_array_equal(x, y)
        notes = (V.kind[x] == Kind.NOTE_ON) | (V.kind[x] == Kind.NOTE_OFF)
        assert V.value[x[notes]].min() >= 21 and V.value[x[notes]].max() <= 108
        moved += not np.array_equal(x, p)
    assert moved > 0.9 * len(a)


def test_augmented_windows_record_what_was_drawn(cache: TokenCache) -> None:
    config = AugmentConfig(
        transpose_prob=1.0, instrument_prob=1.0, velocity_prob=0.5, stretch_prob=0.5
    )
    ds = WindowDataset(cache, "train", window=64, seed=4, augment=Augmenter(config, V))
    for slot in range(len(ds)):
        item = ds[slot]
        drawn = AugmentParams(
            family_map=item["family_map"], transpose=item["transpose"],
            velocity=None if item["velocity_factor"] == 1.0 else item["velocity_factor"],
            stretch=None if item["stretch_factor"] == 1.0 else item["stretch_factor"],
        )  # fmt: skip
        tokens = np.asarray(cache.tokens(item["index"]), dtype=np.int64)
        source = tokens[item["offset"] : item["offset"] + 64 + 16]  # the window and its slack
        np.testing.assert_array_equal(item["ids"], apply_params(source, drawn, V)[:64])
        assert item["transpose"] != 0
    batch = collate([ds[s] for s in range(4)])
    assert batch["family_map"].shape == (4, V.config.num_instruments)
    # a plain function augments too, but records nothing
    plain = WindowDataset(cache, "train", window=64, augment=lambda ids, rng: ids)
    assert "family_map" not in plain[0]


def test_eval_batches_score_every_token_once(cache: TokenCache) -> None:
    scored: dict[int, list[int]] = {}
    for batch in eval_batches(cache, "train", window=100, batch_size=5, stride=60):
        assert batch["ids"].shape[1] <= 100
        assert not (batch["score_mask"] & ~batch["attention_mask"]).any()
        for b in range(batch["ids"].shape[0]):
            row, start = int(batch["index"][b]), int(batch["offset"][b])
            pos = torch.nonzero(batch["score_mask"][b]).ravel() + start
            scored.setdefault(row, []).extend(pos.tolist())
            tokens = np.asarray(cache.tokens(row))
            n = int(batch["attention_mask"][b].sum())
            np.testing.assert_array_equal(batch["ids"][b, :n].numpy(), tokens[start : start + n])
    pieces = dict(iter_pieces(cache, "train"))
    assert sorted(scored) == sorted(pieces)
    for row, ids in pieces.items():
        assert sorted(scored[row]) == list(
            range(1, len(ids))
        )  # each once; the first has no context
    # the same batches every time
    a = [b["ids"] for b in eval_batches(cache, "train", window=100, batch_size=5)]
    b = [b["ids"] for b in eval_batches(cache, "train", window=100, batch_size=5)]
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)


def test_errors(cache: TokenCache) -> None:
    with pytest.raises(DataError, match="no 'test' pieces"):
        WindowDataset(cache, "test")
    with pytest.raises(DataError, match="another vocabulary"):
        WindowDataset(cache, "train", vocab_config=VocabConfig(max_shift_steps=64))
    ds = WindowDataset(cache, "valid", window=4096)
    with pytest.raises(DataError, match="cannot fill one batch"):
        LengthGroupedBatchSampler(ds, len(ds) + 1)
