"""The GPU path of a training batch's grammar masks and features, held equal to the host path
on real chorale windows (augmented, most cut from the middle of a piece): the dense grammar scan
(one tensor over every family x pitch slot, no host synchronisation) equals the per-family scan
bitwise, the prefixes gathered from a :class:`TokenTable` equal those copied row by row, and
:func:`window_inputs` (one scan for masks and features) gives the masks, the features and the
training loss of the path it replaces, bitwise."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import symusic
import torch

from aurl.config import AugmentConfig, DataConfig, LossConfig, ModelConfig
from aurl.data.cache import TokenCache, prepare
from aurl.data.dataset import build_loader
from aurl.data.grammar import Grammar, SequenceScan
from aurl.data.vocab import Vocab
from aurl.data.window_state import (
    TokenTable,
    prefix_ids,
    window_inputs,
    window_start,
)
from aurl.models.losses import compute_losses
from aurl.models.model import MusicTransformerVAEGAN

CHORALES = Path(__file__).parents[2] / "src" / "aurl" / "data" / "bundled" / "bach-chorales"
NAMES = ["bach_bwv10.7.mid", "bach_bwv11.6.mid", "bach_bwv122.6.mid", "bach_bwv13.6.mid"]
ALL = AugmentConfig(
    transpose_prob=1.0, instrument_prob=1.0, velocity_prob=1.0, stretch_prob=1.0,
    jitter_prob=1.0, jitter_steps=2,
)  # fmt: skip
DATA = DataConfig(valid_fraction=0.0, test_fraction=0.0, window=96, batch_size=6, augment=ALL)
TINY = ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=512, dropout=0.0, meter=True)
GRAMMAR = Grammar(Vocab(), polyphony_cap=8)  # the loss's cap differs from the features' 16


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> TokenCache:
    src = tmp_path_factory.mktemp("midi")
    for name in NAMES:
        shutil.copy(CHORALES / name, src / name)
    for name in NAMES[:2]:  # each voice its own family, so that several families sound at once
        score = symusic.Score(str(CHORALES / name))
        for track, program in zip(score.tracks, (0, 40, 56, 73)):
            track.program = program
        score.dump_midi(str(src / f"families_{name}"))
    out = tmp_path_factory.mktemp("cache")
    prepare(src, out, data_config=DATA, workers=1)
    return TokenCache(out)


@pytest.fixture(scope="module")
def batches(cache: TokenCache) -> list[dict[str, torch.Tensor]]:
    stream = iter(build_loader(cache, DATA, seed=3))
    return [next(stream) for _ in range(3)]


@pytest.fixture(scope="module")
def model() -> MusicTransformerVAEGAN:
    torch.manual_seed(0)
    return MusicTransformerVAEGAN(TINY).eval()


def scans(grammar: Grammar, ids: torch.Tensor, state=None) -> tuple[SequenceScan, SequenceScan]:
    """(dense scan, per-family scan) of the same input."""
    out = []
    for dense in (True, False):
        grammar.dense = dense
        try:
            out.append(grammar.scan(ids, state))
        finally:
            grammar.dense = None
    return out[0], out[1]


def assert_scans_equal(a: SequenceScan, b: SequenceScan) -> None:
    for f in dataclasses.fields(SequenceScan):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, dict):
            assert x.keys() == y.keys()
            for name in x:
                assert x[name].dtype == y[name].dtype, name
                assert torch.equal(x[name], y[name]), name
        else:
            assert x.dtype == y.dtype and torch.equal(x, y), f.name


def test_the_dense_scan_equals_the_per_family_scan_on_windows_and_prefixes(
    cache: TokenCache, batches: list, model: MusicTransformerVAEGAN
) -> None:
    """Windows from their augmented prefix states, and the prefixes themselves from the
    initial state: every field, every position, bitwise."""
    g = model.grammar_features.grammar
    several = 0
    for batch in batches:
        start = window_start(model, batch, cache)
        dense, per_family = scans(g, batch["ids"], start.grammar[0])
        assert_scans_equal(dense, per_family)
        several += int((dense.final_sounding.any(-1).sum(-1) >= 2).sum())
        prefix = prefix_ids(batch, cache)
        assert_scans_equal(*scans(g, prefix))
        # the masks of a cap of 8 (the loss's) from either scan
        assert torch.equal(GRAMMAR.masks_of(dense), GRAMMAR.masks_of(per_family))
    assert several >= 2  # windows that end with several families sounding were compared


def test_the_token_table_gathers_the_host_prefixes(cache: TokenCache, batches: list) -> None:
    table = TokenTable(cache, cache.split_indices("train"), "cpu")
    assert table.flat.dtype == torch.int16
    inside = 0
    for batch in batches:
        host = prefix_ids(batch, cache)
        assert torch.equal(prefix_ids(batch, table), host)
        inside += int((batch["offset"] > 0).sum())
    assert inside >= len(batches) * DATA.batch_size // 2  # mid-piece windows were compared


def test_window_inputs_give_the_host_paths_masks_features_and_loss(
    cache: TokenCache, batches: list, model: MusicTransformerVAEGAN
) -> None:
    """The trainer's batch inputs (start state, features and masks from one dense scan, the
    prefix from a TokenTable) against the path it replaced (host prefixes, per-family scans,
    masks and forward each scanning the window): masks, features, logits and loss equal."""
    g = model.grammar_features
    table = TokenTable(cache, cache.split_indices("train"), "cpu")
    loss_cfg = LossConfig(grammar_masked=True, label_smoothing=0.1)
    for batch in batches:
        ids, real, meter = batch["ids"], batch["attention_mask"], batch["meter"]
        g.grammar.dense = GRAMMAR.dense = False  # the host path
        try:
            old_start = window_start(model, batch, cache)
            old_masks = GRAMMAR.sequence_masks(ids, old_start.grammar[0])
            old_features = g.features(ids, old_start.grammar)[:3]
            old = {"ids": ids, "attention_mask": real, "start": old_start, "meter": meter}
            old_losses = compute_losses(model, old, loss_cfg, step=0, allowed=old_masks)
        finally:
            g.grammar.dense = GRAMMAR.dense = None
        g.grammar.dense = True  # the device path, here on the CPU
        try:
            start, masks = window_inputs(model, batch, table, GRAMMAR)
        finally:
            g.grammar.dense = None
        assert torch.equal(masks, old_masks)
        for new_f, old_f in zip(start.features, old_features):
            assert new_f.dtype == old_f.dtype and torch.equal(new_f, old_f)
        new = {"ids": ids, "attention_mask": real, "start": start, "meter": meter}
        new_losses = compute_losses(model, new, loss_cfg, step=0, allowed=masks)
        assert torch.equal(new_losses["total"], old_losses["total"])
        assert torch.equal(new_losses["ce"], old_losses["ce"])


def test_the_device_path_traces_as_one_graph_the_host_path_does_not(
    batches: list, model: MusicTransformerVAEGAN
) -> None:
    """What a GPU needs: the window scan, its masks and features trace (TorchDynamo) as one
    graph, with no data-dependent host work (no nonzero, no reading a tensor back); the
    per-family scan breaks the graph where it reads the batch's families on the host."""
    dynamo = pytest.importorskip("torch._dynamo")
    g = model.grammar_features
    ids = batches[0]["ids"]
    carry = g.initial(len(ids), "cpu")

    def inputs(ids, carry):
        scan = g.grammar.scan(ids, carry[0])
        return GRAMMAR.masks_of(scan), g.from_scan(ids, scan, carry)

    breaks = {}
    for dense in (True, False):
        g.grammar.dense = dense
        dynamo.reset()
        try:
            breaks[dense] = dynamo.explain(inputs)(ids, carry).graph_break_count
        finally:
            g.grammar.dense = None
    assert breaks[True] == 0 and breaks[False] > 0


def test_a_long_past_scanned_in_parts_gives_the_same_start(
    cache: TokenCache, batches: list, model: MusicTransformerVAEGAN
) -> None:
    """``start_after`` scans a window's past in parts (bounded memory on a GPU): the state
    equals one scan's, bitwise, with parts far shorter than the prefixes."""
    for batch in batches[:2]:
        whole = window_start(model, batch, cache)
        model.prefix_part = 7
        try:
            parts = window_start(model, batch, cache)
        finally:
            del model.prefix_part
        assert int(batch["offset"].max()) > 7 * 10
        assert torch.equal(parts.ticks, whole.ticks) and torch.equal(parts.tempo, whole.tempo)
        for f in dataclasses.fields(whole.grammar[0]):
            assert torch.equal(getattr(parts.grammar[0], f.name), getattr(whole.grammar[0], f.name))
        assert torch.equal(parts.grammar[1], whole.grammar[1])


def test_prefix_states_in_parts_equal_one_scan(
    cache: TokenCache, batches: list, monkeypatch
) -> None:
    """The grammar-only path (a model without grammar features): prefix states scanned in
    parts equal one scan's, bitwise."""
    from aurl.data import window_state

    whole = [window_state.window_states(GRAMMAR, b, cache) for b in batches]
    monkeypatch.setattr(window_state, "PREFIX_PART", 5)
    for batch, want in zip(batches, whole):
        got = window_state.window_states(GRAMMAR, batch, cache)
        for f in dataclasses.fields(want):
            assert torch.equal(getattr(got, f.name), getattr(want, f.name)), f.name
