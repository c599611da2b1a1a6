"""Infilling with a FIM model (aurl.generation.fim): the engine shows the model the suffix, its
incremental features equal the teacher-forced FIM window's, and infill keeps everything outside
the span while the model's notes stay inside it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import symusic
import torch

from aurl.config import ModelConfig
from aurl.data.fim import MID, PRE, SUF
from aurl.data.notes import notes_from_score
from aurl.data.vocab import Kind
from aurl.generation.compose import (
    ComposeOptions,
    TorchEngine,
    infill,
    infill_regenerated,
    make_plan,
)  # fmt: skip
from aurl.generation.fim import FimEngine, first_event_at, given_stream, supports_fim
from aurl.models.model import MusicTransformerVAEGAN

CHORALE = (
    Path(__file__).resolve().parents[2] / "src/aurl/data/bundled/bach-chorales/bach_bwv10.7.mid"
)
SPB = 32  # steps per beat


@pytest.fixture(scope="module")
def model() -> MusicTransformerVAEGAN:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=512, dropout=0.0, fim=True)
    m = MusicTransformerVAEGAN(cfg).eval()
    with torch.no_grad():  # sentinel rows as large as the music rows, so they matter
        m.fim.weight.normal_(0, 1.0)
    return m


@pytest.fixture(scope="module")
def notes() -> np.ndarray:
    n = notes_from_score(symusic.Score(str(CHORALE)))
    n = n[n["onset"] < 16]
    n["duration"] = np.minimum(n["duration"], 16 - n["onset"])
    return np.sort(n, order=["onset", "pitch"])


def test_fim_engine_sees_the_suffix(model, notes):
    """The logits where the middle starts change with the notes after the span (a left-to-right
    engine's do not)."""
    span = (4.0, 8.0)
    given = notes[~infill_regenerated(notes, span)]
    other = given.copy()
    after = other["onset"] >= 8.0
    other["pitch"][after] = other["pitch"][after] - 5  # another suffix, same prefix
    outs = []
    for g in (given, other):
        plan = make_plan(g, model.vocab, free_span=span, max_free=4)
        stream = given_stream(plan, model.vocab)
        a = first_event_at(stream, model.vocab, plan.free_start)
        for engine in (FimEngine(model, plan), TorchEngine(model)):
            state, logits = engine.init_state(stream[None, :3])
            for tok in stream[3:a]:
                logits = engine.step(np.array([tok]), state)
            outs.append(logits)
    fim_a, plain_a, fim_b, plain_b = outs
    np.testing.assert_array_equal(plain_a, plain_b)
    assert np.abs(fim_a - fim_b).max() > 1e-5  # same inputs give bitwise-equal logits


def test_fim_engine_matches_the_teacher_forced_window(model, notes):
    """Stepping the middle through the engine gives the logits of one forward pass over
    ``[SUF] suffix [PRE] prefix [MID] middle`` with features read in time order."""
    span = (4.0, 8.0)
    regen = infill_regenerated(notes, span)
    given = notes[~regen]
    plan = make_plan(given, model.vocab, free_span=span, max_free=4)
    full = make_plan(notes, model.vocab, free_span=span, max_free=4)  # Bach's middle, closed at 8
    source = given_stream(full, model.vocab)
    vocab = model.vocab
    i = first_event_at(source, vocab, 4 * SPB)
    j = first_event_at(source, vocab, 8 * SPB)
    engine = FimEngine(model, plan)
    # the engine's suffix is the time-order stream's, less the offs closing the middle at 8
    tail = source[j:]
    closing = [
        k
        for k in range(len(tail))
        if vocab.kind[tail[k]] == Kind.NOTE_OFF
        and k < 8
        and int(vocab.value[tail[k]]) not in {int(p) for p in plan.offs.get(8 * SPB, [])}
    ]
    suffix_pos = np.array([j + k for k in range(len(tail)) if k not in closing])
    assert np.array_equal(source[suffix_pos][: len(engine.suffix)], engine.suffix)
    state, logits = engine.init_state(source[None, :3])
    got = [logits]
    for tok in source[3 : j - 1]:
        got.append(engine.step(np.array([tok]), state))
    got = np.concatenate(got[i - 3 :])  # from the step that fed MID: rows predicting i .. j-1
    s = len(engine.suffix)
    fids = np.concatenate([[SUF], engine.suffix, [PRE], source[:i], [MID], source[i : j - 1]])
    pos = np.concatenate([[-1], suffix_pos[:s], [-1], np.arange(i), [-1], np.arange(i, j - 1)])
    with torch.no_grad():
        want = model(
            torch.as_tensor(fids)[None],
            fim=(torch.as_tensor(source)[None], torch.as_tensor(pos)[None]),
        ).logits[0]
    want = want[s + 2 + i :].numpy()  # rows from MID on
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_fim_infill_keeps_everything_outside_the_span(model, notes, playable):
    assert supports_fim(model)
    span = (4.0, 8.0)
    (c,) = infill(model, notes, span, options=ComposeOptions(particles=1, seed=0))
    assert len(c.notes) > 0
    assert (c.notes["onset"] >= 4.0).all() and (c.notes["onset"] < 8.0).all()
    assert (c.notes["onset"] + c.notes["duration"] <= 8.0 + 1e-9).all()  # closed at the join
    kept = notes[~infill_regenerated(notes, span)]
    both = np.concatenate([kept, c.notes])
    both["duration_s"] = np.maximum(both["duration_s"], 1e-6)
    playable(both, polyphony_cap=16)
