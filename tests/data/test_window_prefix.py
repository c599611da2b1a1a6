"""Training windows with their past, on real chorales: every window cut from the middle of a
piece (and augmented) gets the musical time, grammar features and meter that the whole piece
gives at the same positions, as evaluation and generation compute them incrementally; and the
cache's time signatures reach the bars (3/4 chorales counted in 3). The prefix checkpoints the
trainer keeps (:class:`PrefixCheckpoints`) give those start states bitwise: offsets at the
piece's start, before the first checkpoint, on one, between two, augmented loader batches."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import symusic
import torch

from aurl.config import AugmentConfig, DataConfig, ModelConfig
from aurl.data import cache as cache_module
from aurl.data.augment import remap_instruments, transpose, velocity_map
from aurl.data.cache import TokenCache, prepare
from aurl.data.dataset import build_loader
from aurl.data.vocab import Kind, Vocab
from aurl.data.window_state import TokenTable, window_start
from aurl.errors import DataError
from aurl.models.model import MusicTransformerVAEGAN

CHORALES = Path(__file__).parents[2] / "src" / "aurl" / "data" / "bundled" / "bach-chorales"
NAMES = ["bach_bwv10.7.mid", "bach_bwv11.6.mid", "bach_bwv122.6.mid", "bach_bwv13.6.mid",
         "bach_bwv14.5.mid", "bach_bwv145.5.mid"]  # fmt: skip  # 11.6, 122.6, 145.5: 3/4
V = Vocab()
ALL = AugmentConfig(
    transpose_prob=1.0, instrument_prob=1.0, velocity_prob=1.0, stretch_prob=1.0,
    jitter_prob=1.0, jitter_steps=2,
)  # fmt: skip
DATA = DataConfig(valid_fraction=0.0, test_fraction=0.0, window=96, batch_size=6, augment=ALL)
TINY = ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=512, dropout=0.0, meter=True)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> TokenCache:
    src = tmp_path_factory.mktemp("midi")
    for name in NAMES:
        shutil.copy(CHORALES / name, src / name)
    for name in NAMES[:2]:  # each voice its own family, so that family maps matter
        score = symusic.Score(str(CHORALES / name))
        for track, program in zip(score.tracks, (0, 40, 56, 73)):
            track.program = program
        score.dump_midi(str(src / f"families_{name}"))
    out = tmp_path_factory.mktemp("cache")
    prepare(src, out, data_config=DATA, workers=1)
    return TokenCache(out)


@pytest.fixture(scope="module")
def model() -> MusicTransformerVAEGAN:
    torch.manual_seed(0)
    return MusicTransformerVAEGAN(TINY).eval()


def augmented_prefix(prefix: np.ndarray, batch: dict, b: int) -> np.ndarray:
    """The prefix put through row ``b``'s augmentation as tokens: families, transposition and
    velocity bins; no retiming (stretch and jitter move the window only)."""
    out = remap_instruments(prefix, batch["family_map"][b].numpy(), V)
    out = transpose(out, int(batch["transpose"][b]), V)
    vel = V.kind[out] == Kind.VELOCITY
    factor = float(batch["velocity_factor"][b])
    out[vel] = V.velocity + velocity_map(factor, V)[V.value[out[vel]]]
    return out


def batches(cache: TokenCache, n: int, seed: int, augment: bool = True) -> list[dict]:
    stream = iter(build_loader(cache, DATA, seed=seed, augment=augment))
    return [next(stream) for _ in range(n)]


def test_cache_index_holds_each_files_time_signature(cache: TokenCache) -> None:
    meters = {cache.relpath(i): tuple(cache.meters[i]) for i in range(len(cache))}
    assert meters["bach_bwv11.6.mid"] == meters["bach_bwv145.5.mid"] == (3, 4)
    assert meters["bach_bwv10.7.mid"] == (4, 4)


def test_an_old_cache_asks_to_prepare_again(cache: TokenCache, tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(cache.path, old)
    index = cache_module._Index.load(old / "index.npz")
    index.meta["format"] = 1  # what an Aurl before time signatures wrote
    index.save(old / "index.npz")
    with pytest.raises(DataError, match=r"format 1.*run 'aurl data prepare .*' again"):
        TokenCache(old)
    src = tmp_path / "midi"  # and prepare rebuilds it
    src.mkdir()
    shutil.copy(CHORALES / NAMES[1], src / NAMES[1])
    report = prepare(src, old, data_config=DATA, workers=1)
    assert report.tokenized == 1 and tuple(TokenCache(old).meters[0]) == (3, 4)


def test_training_features_equal_the_whole_pieces_at_every_position(
    cache: TokenCache, model: MusicTransformerVAEGAN
) -> None:
    """Augmented windows from the middle of pieces: time positions, grammar features and the
    logits of forward(start=...) equal those computed over the augmented prefix and the window
    read as one piece (init_state(history=) + step, as evaluation does)."""
    compared = inside = moved = 0
    for batch in batches(cache, 3, seed=0):
        ids, real, meter = batch["ids"], batch["attention_mask"], batch["meter"]
        start = window_start(model, batch, cache)
        with torch.no_grad():
            logits = model(ids, attention_mask=real, start=start, meter=meter).logits
        phase, beat, tempo, _ = model.time.positions(ids, start.ticks, start.tempo, meter)
        snd, age, fam, _ = model.grammar_features.features(ids, start.grammar)
        for b in range(len(ids)):
            off, n = int(batch["offset"][b]), int(real[b].sum())
            prefix = np.asarray(cache.tokens(int(batch["index"][b]))[:off], np.int64)
            past = torch.from_numpy(augmented_prefix(prefix, batch, b))[None]  # (1, off)
            joint = torch.cat([past, ids[b : b + 1, :n]], dim=1)  # (1, off + n)
            m = meter[b : b + 1]
            p2, b2, t2, _ = model.time.positions(joint, meter=m)
            assert torch.equal(phase[b, :n], p2[0, off:]) and torch.equal(beat[b, :n], b2[0, off:])
            assert torch.equal(tempo[b, :n], t2[0, off:])
            s2, a2, f2, _ = model.grammar_features.features(joint)
            assert torch.equal(snd[b, :n], s2[0, off:]) and torch.equal(age[b, :n], a2[0, off:])
            assert torch.equal(fam[b, :n], f2[0, off:])
            state = model.init_state(1, history=past, meter=m, capacity=n)
            stepped = model.step(ids[b : b + 1, :n], state)
            torch.testing.assert_close(logits[b, :n], stepped[0], atol=1e-5, rtol=1e-5)
            compared += 1
            inside += off > 0
        assert (batch["transpose"] != 0).all()
        moved += int((batch["family_map"] != torch.arange(16)).any(1).sum())
    assert compared == 3 * DATA.batch_size and inside >= 0.8 * compared and moved >= 2


def test_without_the_past_the_features_were_wrong(
    cache: TokenCache, model: MusicTransformerVAEGAN
) -> None:
    """The signal the test above guards: windows started from an empty state (the forward pass
    before) see another beat and other sounding notes at many positions."""
    wrong_beat = wrong_notes = total = 0
    for batch in batches(cache, 3, seed=1, augment=False):
        ids, real, meter = batch["ids"], batch["attention_mask"], batch["meter"]
        start = window_start(model, batch, cache)
        _, beat, _, _ = model.time.positions(ids, start.ticks, start.tempo, meter)
        _, beat0, _, _ = model.time.positions(ids, meter=meter)
        snd, _, _, _ = model.grammar_features.features(ids, start.grammar)
        snd0, _, _, _ = model.grammar_features.features(ids)
        wrong_beat += int(((beat != beat0) & real).sum())
        wrong_notes += int(((snd != snd0).any(-1) & real).sum())
        total += int(real.sum())
    assert wrong_beat > 0.2 * total and wrong_notes > 0.05 * total


def test_three_four_chorales_are_counted_in_three(
    cache: TokenCache, model: MusicTransformerVAEGAN
) -> None:
    row = [cache.relpath(i) for i in range(len(cache))].index("bach_bwv11.6.mid")
    ids = torch.from_numpy(np.asarray(cache.tokens(row), np.int64))[None]  # (1, L)
    three = torch.tensor([[3, 4]])
    phase, beat, _, ticks = model.time.positions(ids, meter=three)
    assert set(beat[0].tolist()) == {0, 1, 2}
    beats = ticks[0] // model.time.ticks_per_beat  # quarter notes from the start
    assert torch.equal(beat[0], beats % 3)
    # a model without meter conditioning counts 4 beats whatever it is given (old models)
    old = MusicTransformerVAEGAN(ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=512))
    assert torch.equal(old.time.positions(ids, meter=three)[1][0], beats % 4)
    assert "time.meter.weight" not in old.state_dict() and old.time.beat.num_embeddings == 4


def test_the_start_state_gives_the_window_masks(cache: TokenCache, model) -> None:
    """The trainer builds the grammar masks from the start state's grammar part (one scan of
    the prefixes, not two): the same masks as :func:`window_masks`."""
    from aurl.data.grammar import Grammar
    from aurl.data.window_state import window_masks

    grammar = Grammar(V, DATA.polyphony_cap)
    for batch in batches(cache, 2, seed=3):
        start = window_start(model, batch, cache)
        expected = window_masks(grammar, batch, cache)
        assert torch.equal(grammar.sequence_masks(batch["ids"], start.grammar[0]), expected)


# --- prefix checkpoints -------------------------------------------------------------------


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
