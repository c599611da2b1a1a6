"""The numpy feature inputs of the onnx engine equal what the torch model computes itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aurl.config import ModelConfig, VocabConfig
from aurl.data.tokenizer import Tokenizer
from aurl.data.vocab import Vocab
from aurl.engines import features as F
from aurl.models import MusicTransformerVAEGAN
from aurl.models import model as M


def test_constants_match_the_model() -> None:
    assert (F.PHASE_BINS, F.BEATS_PER_BAR, F.MAX_BEATS) == (
        M.PHASE_BINS, M.BEATS_PER_BAR, M.MAX_BEATS
    )  # fmt: skip


@pytest.mark.parametrize("time_unit", ["beat", "seconds"])
def test_features_equal_the_models_own(time_unit, fixtures_dir) -> None:
    """On real pieces, fed in two calls (a prefix, then token by token, as generation does),
    the indices and vectors equal MusicalTime.positions and GrammarFeatures.features over the
    whole sequence."""
    vcfg = VocabConfig(time_unit=time_unit)
    model = MusicTransformerVAEGAN(ModelConfig(d_model=32, n_layers=1, n_heads=2), vcfg)
    tok = Tokenizer(vcfg)
    files = sorted((fixtures_dir / "midi").glob("*.mid"))[:3]
    assert files
    feats = F.Features(model.vocab, musical_time=True, grammar_features=True)
    for path in files:
        ids = np.asarray(tok.encode_file(path), dtype=np.int64)[None, :300]  # (1, T)
        state = feats.initial(1)
        parts, state = feats(ids[:, :100], state)
        got = {k: [v] for k, v in parts.items()}
        for j in range(100, ids.shape[1]):
            parts, state = feats(ids[:, j : j + 1], state)
            for k, v in parts.items():
                got[k].append(v)
        got = {k: np.concatenate(v, axis=1) for k, v in got.items()}
        t = torch.from_numpy(ids)
        phase, beat, tempo, _ = model.time.positions(t)
        snd, age, family, _ = model.grammar_features.features(t)
        assert np.array_equal(got["phase"], phase.numpy())
        assert np.array_equal(got["beat"], beat.numpy())
        assert np.array_equal(got["tempo"], tempo.numpy() + 1)
        assert np.array_equal(got["sounding"], snd.numpy().astype(np.float32))
        assert np.array_equal(got["age"], age.numpy().astype(np.float32))
        assert np.array_equal(got["family"], family.numpy())


METERS = [(3, 4), (6, 8), (4, 4), (5, 8), (12, 8), (3, 2), (7, 4), (2, 4)]


@pytest.mark.parametrize("time_unit", ["beat", "seconds"])
def test_beats_follow_each_rows_meter_as_the_model_counts_them(time_unit, fixtures_dir) -> None:
    """A meter model: one real piece in eight rows, each in another time signature, fed as a
    prefix and then token by token; beat in bar and the bar length equal the model's own for
    that row's meter (and a meter-less model's features ignore a meter, as the model does)."""
    vcfg = VocabConfig(time_unit=time_unit)
    model = MusicTransformerVAEGAN(ModelConfig(d_model=32, n_layers=1, n_heads=2, meter=True), vcfg)
    path = fixtures_dir / "midi" / "bach_bwv66.6.mid"
    ids = np.asarray(Tokenizer(vcfg).encode_file(path), dtype=np.int64)[:300]
    rows = np.tile(ids, (len(METERS), 1))  # (B, T)
    meter = np.asarray(METERS, dtype=np.int64)
    feats = F.Features(model.vocab, musical_time=True, grammar_features=False, meter=True)
    state = feats.initial(len(METERS), meter)
    first, state = feats(rows[:, :100], state)
    beats, bar_beats = [first["beat"]], {tuple(first["bar_beats"])}
    for j in range(100, rows.shape[1]):
        parts, state = feats(rows[:, j : j + 1], state)
        beats.append(parts["beat"])
        bar_beats.add(tuple(parts["bar_beats"]))
    got = np.concatenate(beats, axis=1)
    _, want, _, cum = model.time.positions(torch.from_numpy(rows), meter=torch.from_numpy(meter))
    assert np.array_equal(got, want.numpy())
    assert not np.array_equal(got[0], got[2])  # 3/4 counts other beats than 4/4 ...
    assert np.array_equal(got[0], got[1])  # ... and the same as 6/8 (3 quarter notes)
    assert bar_beats == {(3, 3, 4, 3, 6, 6, 7, 2)}  # 5/8: 2.5 beats, rounded up
    r = model.time.ticks_per_beat
    assert np.array_equal(-(-M.bar_ticks(torch.from_numpy(meter), r) // r).numpy(),
                          first["bar_beats"])  # fmt: skip
    plain = F.Features(model.vocab, musical_time=True, grammar_features=False)
    parts, _ = plain(rows, plain.initial(len(METERS), meter))
    assert "bar_beats" not in parts
    assert np.array_equal(parts["beat"], (cum.numpy() // r) % 4)


@pytest.mark.parametrize("time_unit", ["beat", "seconds"])
def test_one_token_buffers_equal_the_general_path(time_unit, fixtures_dir) -> None:
    """advance_into (the engine's per-token path: Python scalars, buffers refilled in place,
    sounding and age rewritten only after notes and shifts) writes, after every token of real
    pieces in three rows with three meters, the inputs that __call__ returns, and carries the
    same state."""
    vcfg = VocabConfig(time_unit=time_unit)
    model = MusicTransformerVAEGAN(ModelConfig(d_model=32, n_layers=1, n_heads=2), vcfg)
    tok = Tokenizer(vcfg)
    files = sorted((fixtures_dir / "midi").glob("*.mid"))[:3]
    pieces = [np.asarray(tok.encode_file(p), dtype=np.int64) for p in files]
    T = min(min(len(p) for p in pieces), 400)
    ids = np.stack([p[:T] for p in pieces])  # (3, T)
    feats = F.Features(model.vocab, musical_time=True, grammar_features=True, meter=True)
    meter = np.array([(3, 4), (6, 8), (4, 4)])
    want, got = feats.initial(3, meter), feats.initial(3, meter)
    buffers = feats.buffers(3)
    for j in range(T):
        inputs, want = feats(ids[:, j : j + 1], want)
        # fresh at the start and now and then (a new binding), else incremental
        got = feats.advance_into(ids[:, j], got, buffers, fresh=j % 97 == 0)
        for name, value in inputs.items():
            assert np.array_equal(buffers[name], value), (name, j)
    for name in ("ticks", "tempo", "sounding", "onset", "bar"):
        assert np.array_equal(getattr(got, name), getattr(want, name)), name


@pytest.mark.parametrize("cuts", [(1,), (37, 38, 200), (150, 151, 152, 390)])
def test_calls_of_any_length_equal_one_call(cuts, fixtures_dir) -> None:
    """Real pieces in three rows fed in pieces of any length, each call starting from the state
    the one before left (notes sounding across the cut, as a window's history and its prefill
    are fed): every input and the final state equal one call over the whole sequence."""
    vocab = Vocab()
    tok = Tokenizer(vocab.config)
    files = sorted((fixtures_dir / "midi").glob("*.mid"))[:3]
    ids = np.stack([np.asarray(tok.encode_file(p), dtype=np.int64)[:400] for p in files])
    feats = F.Features(vocab, musical_time=True, grammar_features=True, meter=True)
    meter = np.array([(3, 4), (6, 8), (4, 4)])
    want, whole = feats(ids, feats.initial(3, meter))
    state, parts = feats.initial(3, meter), []
    for a, b in zip((0, *cuts), (*cuts, ids.shape[1])):
        got, state = feats(ids[:, a:b], state)
        parts.append(got)
    for name, value in want.items():
        if name == "bar_beats":  # (B,): one per call
            continue
        assert np.array_equal(np.concatenate([p[name] for p in parts], axis=1), value), name
    assert want["age"].max() > 0  # notes did sound for a while across the cuts
    for name in ("ticks", "tempo", "sounding", "onset", "bar"):
        assert np.array_equal(getattr(state, name), getattr(whole, name)), name
