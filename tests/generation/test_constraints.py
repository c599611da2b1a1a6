"""Constraint masks on the real vocabulary, with hand-computed expectations."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from aurl.config import GenerationConfig
from aurl.data.vocab import Kind, Vocab
from aurl.errors import ConstraintError
from aurl.generation.constraints import (
    build_constraints,
    index_state,
    instrument_bias,
    key_bias,
    pitch_range_bias,
    tempo_bias,
)

VOCAB = Vocab()
NOTE_ON = VOCAB.kind == Kind.NOTE_ON


def on(pitch: int) -> int:
    return int(VOCAB.note_on_id(pitch))


def test_key_mask_d_minor() -> None:
    bias = key_bias(VOCAB, "D minor", 1.0)
    # D natural minor: D E F G A Bb C
    for pitch in (62, 64, 65, 67, 69, 70, 72, 50, 86):
        assert bias[on(pitch)] == 0.0
    for pitch in (61, 63, 66, 68, 71, 73):
        assert bias[on(pitch)] == -math.inf
    assert (bias[~NOTE_ON] == 0).all()  # NOTE_OFFs, shifts, ... untouched
    assert (
        np.isneginf(bias[NOTE_ON]).sum()
        == (~np.isin(VOCAB.value[NOTE_ON] % 12, [2, 4, 5, 7, 9, 10, 0])).sum()
    )


def test_key_strictness_down_weights() -> None:
    assert key_bias(VOCAB, "C major", 0.5)[on(61)] == pytest.approx(math.log(0.5))
    assert key_bias(VOCAB, "C major", 0.0)[on(61)] == 0.0
    assert key_bias(VOCAB, "C major", 0.5)[on(60)] == 0.0


def test_pitch_range() -> None:
    bias = pitch_range_bias(VOCAB, 60, 64)
    allowed = VOCAB.value[NOTE_ON & np.isfinite(bias)]
    assert allowed.tolist() == [60, 61, 62, 63, 64]
    assert np.isfinite(bias[~NOTE_ON]).all()


def test_tempo_fixed_and_range() -> None:
    is_tempo = VOCAB.kind == Kind.TEMPO
    fixed = tempo_bias(VOCAB, 100.0, ())
    kept = VOCAB.value[is_tempo & np.isfinite(fixed)]
    assert kept.tolist() == [int(VOCAB.tempo_bin(100.0))]
    ranged = tempo_bias(VOCAB, 0.0, (90.0, 120.0))
    bpm = VOCAB.bin_tempo[VOCAB.value[is_tempo & np.isfinite(ranged)]]
    expected = VOCAB.bin_tempo[(VOCAB.bin_tempo >= 90) & (VOCAB.bin_tempo <= 120)]
    assert bpm.tolist() == expected.tolist() and len(bpm) >= 2
    assert np.isfinite(tempo_bias(VOCAB, 0.0, ())).all()


def test_instrument_set() -> None:
    bias = instrument_bias(VOCAB, (0, 5))
    is_inst = VOCAB.kind == Kind.INSTRUMENT
    assert VOCAB.value[is_inst & np.isfinite(bias)].tolist() == [0, 5]


def test_build_folds_static_constraints() -> None:
    cfg = GenerationConfig(key="C major", pitch_low=60, pitch_high=72, tempo=120.0)
    cons = build_constraints(VOCAB, cfg)
    allowed = sorted(VOCAB.value[NOTE_ON & np.isfinite(cons.static)].tolist())
    assert allowed == [60, 62, 64, 65, 67, 69, 71, 72]
    assert np.isfinite(cons.static[VOCAB.kind == Kind.TEMPO]).sum() == 1


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"key": "H minor"}, "unknown key"),
        ({"pitch_low": 70, "pitch_high": 60}, "empty"),
        ({"pitch_low": 0, "pitch_high": 10}, "outside the model"),
        ({"key": "C major", "pitch_low": 61, "pitch_high": 61}, "no note can be played"),
        ({"tempo": 300.0}, "outside the model"),
        ({"tempo_range": (121.0, 122.0)}, "holds no tempo"),
        ({"tempo_range": (130.0, 90.0)}, "low <= high"),
        ({"tempo": 100.0, "tempo_range": (90.0, 120.0)}, "not both"),
        ({"instruments": (3, 16)}, "do not exist"),
        ({"max_tokens": 7}, "at least 8"),
    ],
)
def test_impossible_constraints_raise(overrides: dict, message: str) -> None:
    cfg = dataclasses.replace(GenerationConfig(), **overrides)
    with pytest.raises(ConstraintError, match=message):
        build_constraints(VOCAB, cfg)


def test_index_state_reorders_nested_rows() -> None:
    @dataclasses.dataclass
    class Inner:
        a: torch.Tensor
        pos: int

    state = {"x": [torch.tensor([10, 11, 12]), Inner(torch.arange(6).view(3, 2), 7)], "s": 3}
    out = index_state(state, torch.tensor([2, 2, 0]))
    assert out["x"][0].tolist() == [12, 12, 10]
    assert out["x"][1].a.tolist() == [[4, 5], [4, 5], [0, 1]]
    assert out["x"][1].pos == 7 and out["s"] == 3
    assert state["x"][0].tolist() == [10, 11, 12]  # the original is untouched


def masked_after(names: str, config: GenerationConfig) -> torch.Tensor:
    """(V,) bool: the ids ``LogitMasker.apply`` leaves finite after the tokens ``names``."""
    from aurl.data.grammar import Grammar
    from aurl.generation.constraints import LogitMasker

    index = {name: i for i, name in enumerate(VOCAB.names())}
    ids = torch.tensor([[index[n] for n in names.split()]])
    masker = LogitMasker(VOCAB, Grammar(VOCAB), build_constraints(VOCAB, config))
    state = masker.prime(masker.initial_state(1), ids)
    return torch.isfinite(masker.apply(torch.zeros(1, VOCAB.size), state))[0]


def test_no_velocity_where_the_constraints_leave_no_note_to_follow() -> None:
    names = VOCAB.names()
    vel = VOCAB.kind == Kind.VELOCITY
    # NOTE_ON 80 just played: the grammar allows only higher NOTE_ONs at this step (ascending),
    # and a VELOCITY before them; a range up to 76 removes every one of those notes, so a
    # VELOCITY would lead nowhere, while shifts (and END) stay.
    tempo = next(n for n in names if n.startswith("TEMPO"))
    piano = next(n for n in names if n.startswith("INSTRUMENT"))
    velocity = next(n for n in names if n.startswith("VELOCITY"))
    opening = f"START {tempo} {piano} {velocity} {names[on(80)]}"
    free = masked_after(opening, GenerationConfig(pitch_low=21, pitch_high=108))
    assert free[vel].any() and free[on(81)]  # without the range: more notes, velocities too
    capped = masked_after(opening, GenerationConfig(pitch_low=40, pitch_high=76))
    assert not capped[vel].any() and not capped[NOTE_ON].any()
    assert capped[VOCAB.kind == Kind.TIME_SHIFT].all() and capped[1]  # END


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"key": "D minor", "pitch_low": 55, "pitch_high": 76, "density": 2.0},
        {"key": "C major", "key_strictness": 0.5, "instruments": (0, 5), "tempo_range": (80, 140)},
        {"seconds": 6.0, "min_tokens": 40, "max_tokens": 96},
    ],
    ids=["grammar only", "key range density", "soft key instruments tempo", "seconds lengths"],
)
def test_numpy_and_torch_paths_agree(overrides: dict) -> None:
    """The masker combines masks in numpy on the CPU and in torch elsewhere: on every state of
    real pieces (the prefixes of three encoded files) the two give the same keep mask and bias."""
    from pathlib import Path

    from aurl.data import Tokenizer
    from aurl.data.grammar import Grammar
    from aurl.generation.constraints import LogitMasker

    files = sorted((Path(__file__).parents[1] / "fixtures" / "midi").glob("*.mid"))[:3]
    tok = Tokenizer()
    config = GenerationConfig(**{"max_tokens": 1024, **overrides})
    masker = LogitMasker(VOCAB, Grammar(VOCAB), build_constraints(VOCAB, config))
    checked = 0
    for path in files:
        ids = torch.as_tensor(tok.encode_file(path)[:120])[None]
        state = masker.prime(masker.initial_state(1), ids[:, :1])
        for t in range(1, ids.shape[1]):
            allowed = masker.grammar.allowed(state.grammar)
            keep_np, soft_np = masker.constrain(state, allowed.numpy().copy())
            keep_t, soft_t = masker.constrain(state, allowed.clone())
            assert np.array_equal(keep_np, keep_t.numpy())
            assert (soft_np is None) == (soft_t is None)
            if soft_np is not None:
                np.testing.assert_allclose(soft_np, soft_t.numpy(), rtol=1e-6, atol=1e-6)
            state = masker.advance(state, ids[:, t])
            state = dataclasses.replace(state, step=t)  # walk the length limits too
            checked += 1
    assert checked > 300
