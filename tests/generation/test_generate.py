"""The generation loop with a tiny untrained model (seeded): validity of every strategy over 100
batched samples, constraints end to end, determinism, equivalences, sliding window, primers and
VAE conditioning."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import symusic
import torch

from aurl.config import GenerationConfig, load_config
from aurl.data.grammar import Grammar
from aurl.data.tokenizer import Tokenizer
from aurl.data.vocab import END, START, Kind, Vocab
from aurl.errors import ConstraintError, MidiReadError
from aurl.generation.generate import (
    _beam_search,
    file_latents,
    generate,
    interpolation_latents,
    load_primer,
    make_masker,
    token_seconds,
)
from aurl.models import build_model

N = 100  # samples per strategy
TOKENS = 40
VOCAB = Vocab()
POLY = GenerationConfig().polyphony_cap


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(load_config(preset="tiny")).eval()


@pytest.fixture(scope="module")
def vae_model():
    torch.manual_seed(0)
    return build_model(load_config(preset="tiny", overrides=["model.mode=vae"])).eval()


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer()


@pytest.fixture(scope="module")
def grammar() -> Grammar:
    return Grammar(VOCAB, POLY)


@pytest.fixture(scope="module")
def primers(model) -> np.ndarray:
    """(N, 6) distinct valid prefixes (START TEMPO INSTRUMENT VELOCITY NOTE_ON ...), so that
    deterministic strategies still produce N different pieces."""
    pieces = generate(model, GenerationConfig(max_tokens=12, seed=99), num_samples=N)
    return np.stack([p.ids[:6] for p in pieces])


def assert_valid(pieces, tokenizer: Tokenizer, grammar: Grammar, playable, cap: int = POLY) -> None:
    """Every piece: ends with END, no grammar violation, notes that are playable by their
    times alone (``playable``, tests/conftest.py: independent of the grammar), decodes to MIDI
    that symusic parses back with notes."""
    for piece in pieces:
        ids = piece.ids
        assert ids[0] == START and ids[-1] == END and (ids[:-1] != END).all()
        assert grammar.count_violations(ids) == 0
        playable(tokenizer.decode_to_notes(ids), polyphony_cap=cap, ids=ids)
        data = tokenizer.decode_to_bytes(ids)
        assert tokenizer.last_decode_unknown == 0
        score = symusic.Score.from_midi(data)
        assert score.note_num() > 0


STRATEGIES = {
    "sample": {},
    "greedy": {"temperature": 0.0},
    "top_k": {"top_k": 8, "temperature": 0.9},
    "top_p": {"top_p": 0.5},
    "min_p": {"min_p": 0.5},
    "repetition_penalty": {"repetition_penalty": 1.5},
}


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_gives_valid_pieces(
    name, model, tokenizer, grammar, primers, playable
) -> None:
    cfg = GenerationConfig(max_tokens=TOKENS, seed=1, **STRATEGIES[name])
    deterministic = cfg.temperature == 0.0
    pieces = generate(model, cfg, num_samples=N, primer=primers if deterministic else None)
    assert len(pieces) == N
    assert_valid(pieces, tokenizer, grammar, playable)
    assert all(len(p.generated) <= TOKENS for p in pieces)
    distinct = {p.ids.tobytes() for p in pieces}
    assert len(distinct) > N // 2  # batched rows are independent samples, not copies


def test_beam_search_gives_valid_pieces(model, tokenizer, grammar, primers, playable) -> None:
    cfg = GenerationConfig(max_tokens=32, beam=3, window=64, window_overlap=16)
    pieces = generate(model, cfg, num_samples=N, primer=primers)
    assert_valid(pieces, tokenizer, grammar, playable)
    assert all(np.array_equal(p.ids[:6], q) for p, q in zip(pieces, primers))


def test_beam_of_one_equals_greedy(model) -> None:
    cfg = GenerationConfig(max_tokens=40, temperature=0.0, beam=1)
    greedy = generate(model, cfg, num_samples=2)
    masker = make_masker(VOCAB, cfg)
    prefix = torch.full((2, 1), START)
    beam = _beam_search(model, masker, prefix, None, cfg, 512, 128, lambda x, **k: x)
    for piece, row in zip(greedy, beam.numpy()):
        assert np.array_equal(piece.ids, row[: len(piece.ids)])


def test_batched_equals_single(model) -> None:
    cfg = GenerationConfig(max_tokens=48, temperature=0.0)
    single = generate(model, cfg, num_samples=1)[0]
    batch = generate(model, cfg, num_samples=5)
    assert all(np.array_equal(single.ids, p.ids) for p in batch)


def test_same_seed_same_piece(model) -> None:
    cfg = GenerationConfig(max_tokens=48, seed=7, top_p=0.9)
    a = generate(model, cfg, num_samples=3)
    b = generate(model, cfg, num_samples=3)
    c = generate(model, dataclasses.replace(cfg, seed=8), num_samples=3)
    assert all(np.array_equal(x.ids, y.ids) for x, y in zip(a, b))
    assert any(not np.array_equal(x.ids, y.ids) for x, y in zip(a, c))


def test_sliding_window_stays_valid(model, tokenizer, grammar, playable) -> None:
    # The tiny model's KV cache is sized to the window, so feeding it more would raise.
    cfg = GenerationConfig(max_tokens=200, window=32, window_overlap=8, seed=3)
    pieces = generate(model, cfg, num_samples=4)
    assert_valid(pieces, tokenizer, grammar, playable)
    assert max(len(p.ids) for p in pieces) > 3 * 32


# -- constraints end to end ---------------------------------------------------------------------


def note_on_pitches(pieces) -> np.ndarray:
    ids = np.concatenate([p.generated for p in pieces])
    return VOCAB.value[ids[VOCAB.kind[ids] == Kind.NOTE_ON]]


def test_key_and_range_hold(model, tokenizer, grammar, playable) -> None:
    cfg = GenerationConfig(max_tokens=TOKENS, key="D minor", pitch_low=55, pitch_high=76)
    pieces = generate(model, cfg, num_samples=20)
    assert_valid(pieces, tokenizer, grammar, playable)
    pitches = note_on_pitches(pieces)
    assert len(pitches) > 20
    assert np.isin(pitches % 12, [2, 4, 5, 7, 9, 10, 0]).all()
    assert pitches.min() >= 55 and pitches.max() <= 76


def test_a_low_polyphony_cap_holds_in_the_notes(model, tokenizer, playable) -> None:
    pieces = generate(model, GenerationConfig(max_tokens=TOKENS, polyphony_cap=2), num_samples=40)
    assert_valid(pieces, tokenizer, Grammar(VOCAB, 2), playable, cap=2)
    # the cap is what holds the pieces down: without it, the untrained model stacks notes
    most = []
    for p in pieces:
        notes = tokenizer.decode_to_notes(p.ids)
        onset, end = notes["onset"], notes["onset"] + notes["duration"]
        most.append(max(int(((onset <= t) & (end > t)).sum()) for t in onset))
    assert max(most) == 2


def test_key_strictness_is_graded(model) -> None:
    def out_of_key(strictness: float) -> float:
        cfg = GenerationConfig(max_tokens=TOKENS, key="C major", key_strictness=strictness)
        p = note_on_pitches(generate(model, cfg, num_samples=40))
        return float(np.mean(~np.isin(p % 12, [0, 2, 4, 5, 7, 9, 11])))

    free, half, strict = out_of_key(0.0), out_of_key(0.9), out_of_key(1.0)
    assert strict == 0.0 < half < free


def test_tempo_and_instruments_hold(model, tokenizer, grammar, playable) -> None:
    cfg = GenerationConfig(max_tokens=TOKENS, tempo=100.0, instruments=(5, 7))
    pieces = generate(model, cfg, num_samples=20)
    assert_valid(pieces, tokenizer, grammar, playable)
    ids = np.concatenate([p.ids for p in pieces])
    assert set(VOCAB.value[ids[VOCAB.kind[ids] == Kind.TEMPO]]) == {int(VOCAB.tempo_bin(100.0))}
    for p in pieces:
        programs = set(tokenizer.decode_to_notes(p.ids)["program"].tolist())
        assert programs and programs <= {40, 56}  # first program of families 5 and 7


def test_tempo_range_holds(model) -> None:
    cfg = GenerationConfig(max_tokens=TOKENS, tempo_range=(90.0, 120.0))
    ids = np.concatenate([p.ids for p in generate(model, cfg, num_samples=20)])
    bpm = VOCAB.bin_tempo[VOCAB.value[ids[VOCAB.kind[ids] == Kind.TEMPO]]]
    assert len(bpm) >= 20 and bpm.min() >= 90 and bpm.max() <= 120


def test_seconds_limit(model, tokenizer, grammar, playable) -> None:
    cfg = GenerationConfig(max_tokens=100_000, seconds=6.0)
    pieces = generate(model, cfg, num_samples=20)
    assert_valid(pieces, tokenizer, grammar, playable)
    for p in pieces:
        assert token_seconds(p.ids, VOCAB)[-1] <= 6.0 + 1e-9
        notes = tokenizer.decode_to_notes(p.ids)
        assert (notes["onset_s"] + notes["duration_s"]).max() <= 6.0 + 1e-3


def test_max_tokens_holds_and_ends_cleanly(model, tokenizer, grammar, playable) -> None:
    for n in (8, 9, 33):
        pieces = generate(model, GenerationConfig(max_tokens=n), num_samples=30)
        assert_valid(
            pieces, tokenizer, grammar, playable
        )  # a note even in 8 tokens, and a clean END
        lengths = [len(p.generated) for p in pieces]
        assert max(lengths) <= n
    assert max(lengths) == 33  # the untrained model rarely ends on its own: the limit does


def test_min_tokens_masks_end_until_reached() -> None:
    on, off = int(VOCAB.note_on_id(60)), int(VOCAB.note_off_id(60))
    on2, off2 = int(VOCAB.note_on_id(62)), int(VOCAB.note_off_id(62))
    piece = [START, VOCAB.tempo + 10, VOCAB.instrument, VOCAB.velocity + 20, on, off, on2, off2]

    def end_allowed(min_tokens: int) -> list[bool]:
        masker = make_masker(VOCAB, GenerationConfig(max_tokens=64, min_tokens=min_tokens))
        state, out = masker.initial_state(1), []
        for tok in piece:
            state = masker.advance(state, torch.tensor([tok]))
            out.append(
                bool(torch.isfinite(masker.apply(torch.zeros(1, VOCAB.size), state)[0, END]))
            )
        return out

    # once the first note has started the grammar allows END (it closes sounding notes)
    assert end_allowed(0) == [False] * 4 + [True] * 4
    assert end_allowed(7) == [False] * 6 + [True] * 2
    with pytest.raises(ConstraintError, match="min tokens"):
        make_masker(VOCAB, GenerationConfig(max_tokens=16, min_tokens=10))


def test_density_target_moves_density(model) -> None:
    def notes_per_step(density: float) -> float:
        cfg = GenerationConfig(max_tokens=TOKENS, density=density, polyphony_cap=16)
        ids = np.concatenate([p.ids for p in generate(model, cfg, num_samples=30)])
        steps = VOCAB.value[ids[VOCAB.kind[ids] == Kind.TIME_SHIFT]].sum()
        return (VOCAB.kind[ids] == Kind.NOTE_ON).sum() / max(steps, 1)

    assert notes_per_step(0.01) < notes_per_step(0.0) < notes_per_step(4.0)


def test_bad_requests_fail_before_generating(model) -> None:
    with pytest.raises(ConstraintError, match="unknown key"):
        generate(model, GenerationConfig(key="X dorian"))
    with pytest.raises(ConstraintError, match="no note can be played"):
        generate(model, GenerationConfig(key="C major", pitch_low=61, pitch_high=61))
    with pytest.raises(ConstraintError, match="breaks the grammar at token 1"):
        generate(model, GenerationConfig(), primer=np.array([START, int(VOCAB.note_off_id(60))]))
    with pytest.raises(ConstraintError, match="primers for"):
        generate(model, GenerationConfig(), num_samples=3, primer=np.zeros((2, 4), np.int64))


# -- conditioning -------------------------------------------------------------------------------


def test_token_seconds_hand_computed() -> None:
    t100 = int(VOCAB.tempo_bin(120.0))
    ids = np.array(
        [START, VOCAB.tempo + t100, int(VOCAB.shift_id(32)), int(VOCAB.shift_id(16)), END]
    )
    spb = 60.0 / float(VOCAB.bin_tempo[t100])  # seconds per beat at that bin
    expected = [0.0, 0.0, 0.0, spb, 1.5 * spb]
    assert np.allclose(token_seconds(ids, VOCAB), expected)


def test_primer_continuation(model, tokenizer, grammar, fixtures_dir, playable) -> None:
    path = fixtures_dir / "midi" / "bach_bwv66.6.mid"
    full = Tokenizer(data_config=None)
    primer = load_primer(path, Tokenizer(), seconds=4.0)
    assert primer[0] == START and END not in primer
    assert token_seconds(primer, VOCAB)[-1] < 4.0
    assert len(primer) < len(full.encode_file(path)) - 1
    pieces = generate(model, GenerationConfig(max_tokens=48), num_samples=3, primer=primer)
    assert_valid(pieces, tokenizer, grammar, playable)
    assert all(np.array_equal(p.ids[: len(primer)], primer) for p in pieces)


def test_primer_that_is_not_midi(tmp_path) -> None:
    bad = tmp_path / "notes.mid"
    bad.write_text("this is not a MIDI file")
    with pytest.raises(MidiReadError):
        load_primer(bad, Tokenizer())


def test_vae_prior_variations_interpolation(
    vae_model, tokenizer, grammar, fixtures_dir, playable
) -> None:
    a = fixtures_dir / "midi" / "bach_bwv66.6.mid"
    b = fixtures_dir / "midi" / "bach_bwv269.mid"
    cfg = GenerationConfig(max_tokens=48)
    gen = torch.Generator().manual_seed(0)
    for latents in (
        vae_model.sample_prior(4, generator=gen),
        file_latents(vae_model, a, tokenizer, n=4, generator=gen),
        interpolation_latents(vae_model, a, b, tokenizer, steps=4),
    ):
        pieces = generate(vae_model, cfg, num_samples=4, latents=latents)
        assert_valid(pieces, tokenizer, grammar, playable)
    # the interpolation path starts at a's latents: its first piece is a's reconstruction
    path = interpolation_latents(vae_model, a, b, tokenizer, steps=3)
    ends = interpolation_latents(vae_model, a, b, tokenizer, steps=2)
    greedy = dataclasses.replace(cfg, temperature=0.0)
    first = generate(vae_model, greedy, num_samples=3, latents=path)[0]
    same = generate(vae_model, greedy, num_samples=2, latents=ends)[0]
    assert np.array_equal(first.ids, same.ids)


def test_pieces_round_trip_through_midi_files(model, tokenizer, tmp_path) -> None:
    pieces = generate(model, GenerationConfig(max_tokens=TOKENS, seed=5), num_samples=4)
    for i, p in enumerate(pieces):
        path = tokenizer.decode_to_midi(p.ids, tmp_path / f"{i}.mid")
        back = symusic.Score(str(path))
        notes = tokenizer.decode_to_notes(p.ids)
        assert back.note_num() == len(notes) > 0


def test_long_limits_grow_the_buffer(model, monkeypatch) -> None:
    import aurl.generation.generate as gen

    monkeypatch.setattr(gen, "CHUNK", 16)  # a small chunk: the growth path runs within 40 tokens
    small = generate(model, GenerationConfig(max_tokens=40, seed=2), num_samples=3)
    monkeypatch.setattr(gen, "CHUNK", 4096)
    large = generate(model, GenerationConfig(max_tokens=40, seed=2), num_samples=3)
    assert all(np.array_equal(a.ids, b.ids) for a, b in zip(small, large))
    assert max(len(p.ids) for p in small) > 16


@pytest.mark.parametrize(
    "primer, message",
    [(np.array([0, 774]), "outside the vocabulary's 0..773"), (np.array([0, -1]), "outside"),
     (np.array([], np.int64), "of shape (0,)"), (np.zeros((1, 1, 1), np.int64), "of shape"),
     (np.array([0.0, 4.0]), "outside"), (np.array([5, 4]), "must start with START")],
)  # fmt: skip
def test_a_primer_of_ids_the_model_lacks_is_refused(model, primer, message) -> None:
    """A library caller's primer: an id past the vocabulary was an IndexError, an empty one an
    IndexError, -1 read as INSTRUMENT_15 (numpy wraps it); each is one ConstraintError."""
    with pytest.raises(ConstraintError, match=re.escape(message)):
        generate(model, GenerationConfig(max_tokens=20), primer=primer)
