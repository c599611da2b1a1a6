"""Harmonizing with an anticipation model (aurl.generation.anticipation): the engine shows the
model the melody ahead of its time exactly as one teacher-forced pass over the interleaved piece
does, the controls change what it predicts, and the composing loop still keeps the melody."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from aurl.config import ModelConfig
from aurl.data.tokenizer import Tokenizer
from aurl.data.vocab import ANTICIPATION_BASE
from aurl.evaluation.tasks import _encode_notes, chorale_voices
from aurl.generation.anticipation import (
    AnticipationEngine,
    delta_steps,
    plan_controls,
    score_anticipated,
)
from aurl.generation.compose import (
    ComposeOptions,
    harmonize,
    make_plan,
    melody_kept,
    melody_line,
    score_plan,
)
from aurl.models.model import MusicTransformerVAEGAN

CHORALE = Path(__file__).parents[2] / "src/aurl/data/bundled/bach-chorales/bach_bwv342.mid"
METER = (3, 4)
BEATS = 15
TINY = dict(d_model=32, n_layers=2, n_heads=2, max_seq_len=1024, dropout=0.0, meter=True)


@pytest.fixture(scope="module")
def model() -> MusicTransformerVAEGAN:
    torch.manual_seed(0)
    m = MusicTransformerVAEGAN(ModelConfig(**TINY, anticipation=2)).eval()
    with torch.no_grad():  # control rows as large as music rows, so that they matter
        m.controls.weight.normal_(0.0, 1.0)
    return m


@pytest.fixture(scope="module")
def piece(model):
    voices = []
    for v in chorale_voices(CHORALE):
        v = v[v["onset"] < BEATS]
        v["duration"] = np.minimum(v["duration"], BEATS - v["onset"])
        voices.append(v)
    line = melody_line(voices[0])
    plan = make_plan(line, model.vocab, ceiling=True, max_free=3)
    bach = np.sort(np.concatenate(voices), order=["onset", "pitch"])
    ids = _encode_notes(bach, Tokenizer(model.vocab_config), CHORALE)
    return line, plan, ids, voices


def test_engine_equals_one_teacher_forced_pass(model, piece) -> None:
    """Fed Bach's tokens one by one, the engine inserts the controls where training puts them
    and its logits equal the interleaved forward pass's."""
    from aurl.data.anticipation import interleave

    _, plan, ids, _ = piece
    due, ctrl = plan_controls(plan, model.vocab, delta_steps(model))
    inter, pos = interleave(ids, due, ctrl, model.vocab)
    with torch.no_grad():
        full = model(torch.as_tensor(inter)[None], meter=torch.tensor([METER]),
                     fim=(torch.as_tensor(ids)[None], torch.as_tensor(pos)[None])).logits[0]  # fmt: skip
    at = np.flatnonzero(pos >= 0)
    engine = AnticipationEngine(model, plan, meter=METER)
    state, logits = engine.init_state(ids[None, :3])
    got = [logits[0]]
    for tok in ids[3:-1]:
        got.append(engine.step(np.array([tok]), state)[0])
    want = full[at[3:] - 1].numpy()  # the row before each music token from the fourth on
    np.testing.assert_allclose(np.stack(got), want, rtol=0, atol=1e-4)
    assert state["model"].pos == len(inter) - 1  # every control was fed (END not)
    # the evaluation's scoring reads the same logits for each token
    rows = np.concatenate([np.zeros((2, got[0].shape[0])), np.stack(got), got[-1][None]])
    engine_score = score_plan(model, plan, ids, meter=METER, logits=rows)
    scored = score_anticipated(model, plan, ids, meter=METER)
    assert scored.conditional_bits == pytest.approx(engine_score.conditional_bits, rel=1e-5)
    assert scored.given_bits == pytest.approx(engine_score.given_bits, rel=1e-5)
    assert (inter >= ANTICIPATION_BASE).sum() == len(plan.ons)


def test_controls_change_the_prediction(model, piece) -> None:
    """Two melodies alike for their first beat and different after it: at the start the
    anticipation engine already predicts differently (a left-to-right engine cannot)."""
    line, plan, ids, _ = piece
    other = line.copy()
    other["pitch"][other["onset"] >= 1] -= 2
    plan2 = make_plan(other, model.vocab, ceiling=True, max_free=3)
    a = AnticipationEngine(model, plan, meter=METER).init_state(ids[None, :3])[1]
    b = AnticipationEngine(model, plan2, meter=METER).init_state(ids[None, :3])[1]
    assert np.abs(a - b).max() > 1e-3


def test_scoring_counts_the_same_notes_as_forcing(model, piece) -> None:
    _, plan, ids, voices = piece
    with_controls = score_anticipated(model, plan, ids, meter=METER)
    forcing = score_plan(model, plan, ids, meter=METER)
    assert with_controls.outside == 0 == forcing.outside
    assert with_controls.free_notes == forcing.free_notes  # (a unison with the soprano merges)
    assert forcing.free_notes >= sum(len(v) for v in voices[1:]) - 1
    assert with_controls.conditional_bits != forcing.conditional_bits


def test_harmonize_keeps_the_melody_with_several_rows(model, piece) -> None:
    """Two particles per sample and two samples: rows whose controls fall due at different
    tokens (masked gaps) still end, keep the melody and stay under it."""
    line = piece[0]
    results = harmonize(model, line, options=ComposeOptions(num_samples=2, particles=2, seed=1),
                        meter=METER)  # fmt: skip
    for c in results:
        soprano = next(t for t in c.score.tracks if t.name == "Soprano")
        import symusic

        from aurl.data.notes import notes_from_score

        one = symusic.Score(c.score.tpq)
        one.tracks.append(soprano.copy())
        assert melody_kept(notes_from_score(one), line) == 1.0
        assert c.stats["fallbacks"] == 0
        assert c.stats["engine"] == "anticipation"
        assert len(c.notes) > 0
