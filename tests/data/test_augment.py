"""Augmentation on token arrays: exact hand-computed results, invariants on real and random
pieces (transpose round trip, notes in range, grammar-valid in -> grammar-valid out), and
reproducibility through the generator state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import symusic
from hypothesis import given, settings
from hypothesis import strategies as st

from aurl.config import AugmentConfig
from aurl.data.augment import (
    Augmenter,
    AugmentParams,
    apply_params,
    jitter,
    random_family_map,
    remap_instruments,
    retime,
    run_end_times,
    scale_velocity,
    stretch,
    transpose,
    transpose_range,
    velocity_map,
)
from aurl.data.grammar import Grammar
from aurl.data.tokenizer import Tokenizer
from aurl.data.vocab import END, START, Kind, Vocab

FIXTURES = Path(__file__).parents[1] / "fixtures" / "midi"
V = Vocab()
GRAMMAR = Grammar(V, polyphony_cap=16)
ALL = AugmentConfig(
    transpose_prob=1.0, stretch_prob=1.0, velocity_prob=1.0, instrument_prob=1.0,
    jitter_prob=1.0, jitter_steps=3,
)  # fmt: skip


def on(p: int) -> int:
    return int(V.note_on_id(p))


def off(p: int) -> int:
    return int(V.note_off_id(p))


def shift(n: int) -> int:
    return int(V.shift_id(n))


def vel(b: int) -> int:
    return V.velocity + b


# START TEMPO piano vel20 C4+E4 | 32 | off C4 E4, vel10 D4 | 612 (512 + 100) | off D4 END
HAND = np.array([
    START, V.tempo + 10, V.instrument, vel(20), on(60), on(64), shift(32), off(60), off(64),
    vel(10), on(62), shift(512), shift(100), off(62), END,
])  # fmt: skip


def score_ids(notes: list[tuple[int, int, int, int, int]]) -> np.ndarray:
    """Ids of a score built from (program, onset tick, duration ticks, pitch, velocity)."""
    score = symusic.Score(480)
    tracks: dict[int, symusic.Track] = {}
    for program, time, dur, pitch, velocity in notes:
        if program not in tracks:
            tracks[program] = symusic.Track(program=program)
        tracks[program].notes.append(symusic.Note(time, dur, pitch, velocity))
    for track in tracks.values():
        score.tracks.append(track)
    return Tokenizer().encode_score(score)


def pieces() -> list[np.ndarray]:
    """Real pieces (chorales, a quartet movement) and a two-family hand-built score."""
    tok = Tokenizer()
    out = [tok.encode_file(p) for p in sorted(FIXTURES.glob("*.mid"))]
    duet = [(0, 480 * i, 480, 60 + i, 90) for i in range(8)]
    duet += [(40, 240 * i, 360, 50 + 2 * i, 40 + 10 * i) for i in range(8)]  # violin overlaps
    duet += [(73, 0, 960, 100, 70), (73, 960, 960, 104, 120)]  # flute, near the top
    out.append(score_ids(duet))
    return out


PIECES = pieces()


def names(ids: np.ndarray) -> list[str]:
    table = V.names()
    return [table[i] for i in ids]


def test_fixtures_are_valid_and_varied() -> None:
    for ids in PIECES:
        assert GRAMMAR.count_violations(ids) == 0
    families = np.unique(V.value[PIECES[-1][V.kind[PIECES[-1]] == Kind.INSTRUMENT]])
    assert families.tolist() == [0, 5, 9]


def test_transpose_exact_and_round_trip() -> None:
    up = transpose(HAND, 3, V)
    assert names(up)[4:6] == ["NOTE_ON_63", "NOTE_ON_67"]
    assert names(up)[-2] == "NOTE_OFF_65"
    np.testing.assert_array_equal(up[V.kind[HAND] != Kind.NOTE_ON], up[V.kind[up] != Kind.NOTE_ON])
    for ids in PIECES:
        for k in range(-6, 7):
            lo, hi = transpose_range(ids, V, 6)
            if lo <= k <= hi:
                np.testing.assert_array_equal(transpose(transpose(ids, k, V), -k, V), ids)


def test_transpose_range_keeps_notes_in_range() -> None:
    duet = PIECES[-1]  # highest pitch 104: at most +4 within 21..108
    assert transpose_range(duet, V, 6) == (-6, 4)
    assert transpose_range(HAND, V, 6) == (-6, 6)
    with pytest.raises(ValueError, match="pitch range"):
        transpose(duet, 5, V)
    aug = Augmenter(AugmentConfig(transpose_prob=1.0, velocity_prob=0.0), V, seed=0)
    shifts = set()
    for _ in range(200):
        out = aug(duet)
        k = int(V.value[out[V.kind[out] == Kind.NOTE_ON]][0] - V.value[duet[V.kind[duet] == 4]][0])
        shifts.add(k)
        pitches = V.value[out[(V.kind[out] == Kind.NOTE_ON) | (V.kind[out] == Kind.NOTE_OFF)]]
        assert pitches.min() >= 21 and pitches.max() <= 108
    assert shifts == {-6, -5, -4, -3, -2, -1, 1, 2, 3, 4}  # every allowed shift but 0


def test_stretch_exact() -> None:
    # run ends at 32 and 644 steps; x1.1 -> 35 and 708 = 35 + 673 = 35 + 512 + 161
    assert names(stretch(HAND, 1.1, V))[6] == "TIME_SHIFT_35"
    assert names(stretch(HAND, 1.1, V))[11:13] == ["TIME_SHIFT_512", "TIME_SHIFT_161"]
    # x0.5 -> 16 and 322: the two shifts of the long gap become one
    half = stretch(HAND, 0.5, V)
    assert len(half) == len(HAND) - 1
    assert names(half)[6] == "TIME_SHIFT_16" and names(half)[11] == "TIME_SHIFT_306"
    np.testing.assert_array_equal(retime(HAND, run_end_times(HAND, V), V), HAND)


def test_retime_keeps_every_gap_and_the_event_order() -> None:
    # asked for times that collapse and run backwards: each run keeps at least one step
    out = retime(HAND, np.array([0, -5]), V)
    assert names(out)[6] == "TIME_SHIFT_1" and names(out)[11] == "TIME_SHIFT_1"
    for ids in PIECES:
        rng = np.random.default_rng(0)
        out = jitter(ids, 4, rng, V)
        keep = V.kind[ids] != Kind.TIME_SHIFT
        np.testing.assert_array_equal(out[V.kind[out] != Kind.TIME_SHIFT], ids[keep])
        assert np.abs(run_end_times(out, V) - run_end_times(ids, V)).max() <= 4 + 4


def test_scale_velocity_exact() -> None:
    # bin 20 decodes to 82, x1.5 = 123 -> (123 - 1) * 32 // 127 = bin 30;
    # bin 10 decodes to 42, x1.5 = 63 -> (63 - 1) * 32 // 127 = bin 15
    out = scale_velocity(HAND, 1.5, V)
    assert names(out)[3] == "VELOCITY_30" and names(out)[9] == "VELOCITY_15"
    # x3: both saturate at 127 -> the second VELOCITY no longer changes anything: dropped
    out = scale_velocity(HAND, 3.0, V)
    assert [n for n in names(out) if n.startswith("VELOCITY")] == ["VELOCITY_31"]
    assert len(out) == len(HAND) - 1
    # the bin map behind it: 20 -> 30, 10 -> 15 at x1.5; the identity at x1
    assert velocity_map(1.5, V)[[20, 10]].tolist() == [30, 15]
    np.testing.assert_array_equal(velocity_map(1.0, V), np.arange(32))
    assert velocity_map(np.array([1.0, 3.0]), V).shape == (2, 32)


def test_remap_instruments_is_one_to_one_and_ordered() -> None:
    duet = PIECES[-1]
    rng = np.random.default_rng(3)
    for _ in range(20):
        fmap = random_family_map(duet, V, rng)
        out = remap_instruments(duet, fmap, V)
        assert fmap[0] < fmap[5] < fmap[9]
        np.testing.assert_array_equal(np.sort(fmap), np.arange(16))  # a permutation
        inverse = np.arange(16)
        inverse[fmap[[0, 5, 9]]] = [0, 5, 9]
        np.testing.assert_array_equal(remap_instruments(out, inverse, V), duet)


def test_augmented_pieces_stay_grammar_valid() -> None:
    aug = Augmenter(ALL, V, seed=1)
    for ids in PIECES:
        for _ in range(5):
            out = aug(ids)
            assert GRAMMAR.count_violations(out) == 0
            assert out[0] == START and out[-1] == END


def test_state_dict_restores_the_stream() -> None:
    aug = Augmenter(ALL, V, seed=7)
    aug(PIECES[0])
    state = aug.state_dict()
    first = [aug(ids) for ids in PIECES]
    aug.load_state_dict(state)
    again = [aug(ids) for ids in PIECES]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    fresh = Augmenter(ALL, V, seed=8)
    assert any(len(a) != len(b) or (a != b).any() for a, b in zip(first, map(fresh, PIECES)))


def test_apply_returns_what_it_drew_and_apply_params_replays_it() -> None:
    aug = Augmenter(ALL, V)
    for seed, ids in enumerate(PIECES):
        out, params = aug.apply(ids, np.random.default_rng(seed))
        np.testing.assert_array_equal(out, aug(ids, np.random.default_rng(seed)))
        assert params.transpose != 0 and 0.8 <= params.velocity <= 1.2
        assert 0.9 <= params.stretch <= 1.1 and params.jitter == 3
        np.testing.assert_array_equal(np.sort(params.family_map), np.arange(16))
        rng = np.random.default_rng(seed)
        assert aug.draw(ids, rng).transpose == params.transpose
        np.testing.assert_array_equal(apply_params(ids, params, V, rng), out)  # jitter: rng
    # without jitter no generator is needed: the transforms one after the other
    steady = AugmentParams(family_map=params.family_map, transpose=params.transpose,
                           velocity=params.velocity, stretch=params.stretch)  # fmt: skip
    by_hand = remap_instruments(ids, params.family_map, V)
    by_hand = scale_velocity(transpose(by_hand, params.transpose, V), params.velocity, V)
    np.testing.assert_array_equal(apply_params(ids, steady, V), stretch(by_hand, params.stretch, V))
    np.testing.assert_array_equal(apply_params(ids, AugmentParams(), V), ids)
    with pytest.raises(ValueError, match="generator"):
        apply_params(ids, params, V)


notes_strategy = st.lists(
    st.tuples(
        st.sampled_from([0, 24, 40, 73]),  # piano, guitar, strings, pipe
        st.integers(0, 40).map(lambda q: q * 120),  # onsets on sixteenths, up to 10 beats
        st.integers(1, 16).map(lambda q: q * 60),
        st.integers(21, 108),
        st.integers(1, 127),
    ),
    min_size=1,
    max_size=30,
)


@settings(max_examples=25, deadline=None)
@given(notes=notes_strategy, seed=st.integers(0, 2**32 - 1))
def test_random_scores_valid_in_valid_out(notes, seed: int) -> None:
    ids = score_ids(notes)
    assert GRAMMAR.count_violations(ids) == 0
    out = Augmenter(ALL, V, seed=seed)(ids)
    assert GRAMMAR.count_violations(out) == 0
    lo, hi = transpose_range(ids, V, 6)
    for k in (lo, hi):
        np.testing.assert_array_equal(transpose(transpose(ids, k, V), -k, V), ids)
