"""Continuous batching: each row decodes what `generate` decodes for it alone.

A row alone (sliding window included) gives generate()'s ids exactly; rows that join a running
batch at different steps, one with a primer longer than the batch's position (which rebuilds the
running rows), each give their own generate() ids; the cache moves down when no live row reads
its first positions; a cancelled row frees its slot for a waiting one; streamed notes equal the
decoder's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from aurl.config import GenerationConfig, ModelConfig, VocabConfig
from aurl.data.tokenizer import Tokenizer
from aurl.generation.batching import ContinuousBatcher, NoteStream, cat_state
from aurl.generation.constraints import index_state
from aurl.generation.generate import generate, load_primer
from aurl.models import MusicTransformerVAEGAN

CHORALE = Path(__file__).resolve().parents[1] / "fixtures" / "midi" / "bach_bwv66.6.mid"


@pytest.fixture(scope="module")
def model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # token-by-token decoding of a tiny model: threads only contend
    torch.manual_seed(0)
    config = dataclasses.replace(
        ModelConfig(), d_model=32, n_layers=2, n_heads=2, dropout=0.0, max_seq_len=96
    )
    yield MusicTransformerVAEGAN(config, VocabConfig()).eval()
    torch.set_num_threads(threads)


def alone_logits(model, ids: list[int], window: int, overlap: int) -> torch.Tensor:
    """(V,) logits after ``ids`` as generate() computes them for one row (sliding included)."""
    from aurl.generation.generate import _Context

    buffer = torch.tensor([ids])
    if len(ids) <= window - 1:  # no slide yet: one pass over the ids
        return model.step(buffer, model.init_state(1, capacity=window))[0, -1]
    ctx = _Context(model, None, 1, window, overlap)
    logits = ctx.start(buffer, 1)
    for n in range(2, len(ids) + 1):
        logits = ctx.next(buffer, n)
    return logits[0]


def run(batcher: ContinuousBatcher, arrivals: dict[int, list], check=lambda step: True) -> int:
    """Step until idle, adding ``arrivals[step]`` = [(request, primer), ...] at those steps;
    at the steps ``check`` picks, each row's logits must be those it would have alone."""
    checked = 0
    for step in range(2000):
        for req, primer in arrivals.get(step, []):
            req.row = batcher.add(req.cfg, primer=primer)
        batcher.step()
        if check(step):
            for i, row in enumerate(batcher.rows):
                want = alone_logits(batcher.model, row.ids, batcher.window, batcher.overlap)
                torch.testing.assert_close(batcher.logits[i], want, atol=2e-5, rtol=1e-5)
                checked += 1
        if not batcher.busy and step > max(arrivals):
            return checked
    raise AssertionError("the batch never emptied")


@dataclasses.dataclass
class Req:
    cfg: GenerationConfig
    row: object = None


def test_one_row_alone_equals_generate_across_window_slides(model):
    cfg = GenerationConfig(max_tokens=200, min_tokens=190, seed=3)  # window 96: slides 3 times
    b = ContinuousBatcher(model, slots=4)
    req = Req(cfg)
    # around the slides (window 96, overlap 48) and between them
    picked = {5, 94, 95, 96, 97, 120, 143, 144, 145, 170}
    assert run(b, {0: [(req, None)]}, check=picked.__contains__) == len(picked)
    want = generate(model, cfg)[0].ids
    assert req.row.finished and req.row.ids == want.tolist()


def test_rows_joining_at_different_steps_each_equal_their_own_generate(model):
    tok = Tokenizer(model.vocab_config)
    primer = load_primer(CHORALE, tok)[:40]  # longer than the batch position when it joins
    reqs = [Req(GenerationConfig(max_tokens=30, seed=s, temperature=0.9)) for s in range(4)]
    b = ContinuousBatcher(model, slots=8)
    arrivals = {0: [(reqs[0], None)], 3: [(reqs[1], None), (reqs[2], primer)], 9: [(reqs[3], None)]}
    assert run(b, arrivals) > 60
    assert b.state is None and not b.rows  # finished rows left the batch
    for req, p in zip(reqs, [None, None, primer, None]):
        want = generate(model, req.cfg, primer=p)[0].ids
        assert req.row.ids == want.tolist(), req.cfg.seed


def test_the_cache_moves_down_once_the_first_rows_left(model):
    """A row joins at position 66 of a running batch; once the row before it leaves, no row
    reads positions 0..65: the cache moves down by 66 (keys rotated back), and the row still
    sees what it would alone (logits at every step) and decodes its own generate() ids."""
    from aurl.generation.batching import COMPACT_MIN

    first = Req(GenerationConfig(max_tokens=80, min_tokens=72, seed=1))
    late = Req(GenerationConfig(max_tokens=60, min_tokens=52, seed=2, temperature=0.9))
    b = ContinuousBatcher(model, slots=4, fold_starts=True)  # window 96 (the context)
    positions = []

    def check(step: int) -> bool:
        positions.append(b.state.pos if b.state is not None else None)
        return b.state is not None

    assert COMPACT_MIN <= 66
    assert run(b, {0: [(first, None)], 66: [(late, None)]}, check=check) > 60
    assert max(p for p in positions if p is not None) < b.window  # never slid
    assert any(p is not None and p < 60 for p in positions[80:])  # moved down
    for req in (first, late):
        assert req.row.ids == generate(model, req.cfg)[0].ids.tolist(), req.cfg.seed


def test_a_cancelled_row_frees_its_slot_for_a_waiting_one(model):
    b = ContinuousBatcher(model, slots=2)
    long = [b.add(GenerationConfig(max_tokens=500, min_tokens=490, seed=s)) for s in range(2)]
    waiting = b.add(GenerationConfig(max_tokens=20, seed=9))
    for _ in range(5):
        b.step()
    assert len(b.rows) == 2 and b.pending == [waiting] and len(waiting.ids) == 1
    b.cancel(long[0])
    b.step()
    assert b.rows == [long[1], waiting] and len(waiting.ids) == 2
    assert b.state.k[0].shape[0] == 2 and b.logits.shape[0] == 2  # the cache row went too
    while b.busy and not waiting.finished:
        b.step()
    assert waiting.ids == generate(model, waiting.config)[0].ids.tolist()


def test_beam_search_is_refused(model):
    from aurl.errors import ConstraintError

    with pytest.raises(ConstraintError, match="beam"):
        ContinuousBatcher(model).add(GenerationConfig(beam=2))


def test_cat_state_inverts_index_state(model):
    state = model.init_state(3, capacity=8)
    model.step(torch.tensor([[0], [0], [0]]), state)
    parts = [index_state(state, torch.tensor([i])) for i in range(3)]
    joined = cat_state(parts)
    assert joined.pos == state.pos
    for a, b in zip(joined.k + [joined.grammar[1]], state.k + [state.grammar[1]]):
        assert torch.equal(a, b)
    assert torch.equal(joined.grammar[0].sounding, state.grammar[0].sounding)


@pytest.mark.parametrize("source", ["chorale", "generated"])
def test_note_stream_gives_the_decoders_notes(model, source):
    tok = Tokenizer(model.vocab_config)
    if source == "chorale":
        ids = tok.encode_file(CHORALE)
    else:
        ids = generate(model, GenerationConfig(max_tokens=400, seed=1))[0].ids
    stream = NoteStream(model.vocab)
    got = [n for t in ids.tolist() for n in stream.feed(t)]
    want = tok.decode_to_notes(np.asarray(ids))
    assert len(got) == len(want) > 5
    key = lambda r: (round(r[1], 6), r[0])  # noqa: E731
    got_rows = sorted(((n["pitch"], n["start"], n["end"], n["velocity"]) for n in got), key=key)
    want_rows = sorted(
        ((int(n["pitch"]), float(n["onset_s"]), float(n["onset_s"] + n["duration_s"]),
          int(n["velocity"])) for n in want), key=key,
    )  # fmt: skip
    assert [r[0] for r in got_rows] == [r[0] for r in want_rows]
    assert [r[3] for r in got_rows] == [r[3] for r in want_rows]
    np.testing.assert_allclose([r[1:3] for r in got_rows], [r[1:3] for r in want_rows], atol=1e-9)


def test_note_stream_follows_the_decoders_edge_rules(model):
    """Hand-made ids: a re-strike at the same step (the first strike is nothing), a re-strike
    later (closes the earlier note), a NOTE_OFF of a silent pitch, a tempo change mid-note,
    notes open at END."""
    v = model.vocab
    c = v.config

    on = lambda p: 4 + p - c.pitch_min  # noqa: E731
    off = lambda p: 4 + 88 + p - c.pitch_min  # noqa: E731
    shift = lambda n: 180 + n - 1  # noqa: E731
    tempo = lambda bpm: 726 + int(v.tempo_bin(bpm))  # noqa: E731
    vel, instr = 692 + 20, 758
    ids = [0, tempo(120), instr, vel, on(60), on(60), shift(16), on(60), on(64), shift(8),
           off(67), tempo(60), shift(32), off(64), on(67), shift(4), 1]  # fmt: skip
    tok = Tokenizer(model.vocab_config)
    stream = NoteStream(v)
    got = sorted((n["pitch"], n["start"], n["end"]) for t in ids for n in stream.feed(t))
    want = tok.decode_to_notes(np.asarray(ids))
    want_rows = sorted(
        (int(n["pitch"]), float(n["onset_s"]), float(n["onset_s"] + n["duration_s"])) for n in want
    )
    assert len(got) == len(want_rows) == 4
    np.testing.assert_allclose(np.array(got), np.array(want_rows), atol=1e-9)


@pytest.mark.parametrize("fold_starts", [False, True])
def test_rows_of_different_styles_each_equal_their_own_generate(fold_starts):
    """A model with styles: rows asking for each style, or none, share one batch (each row's
    style id rides in the decode state) and each gives its own generate() ids; a style the
    model lacks is refused when the request is added."""
    from aurl.errors import ConfigError

    torch.manual_seed(0)
    config = dataclasses.replace(
        ModelConfig(), d_model=32, n_layers=2, n_heads=2, dropout=0.0, max_seq_len=96,
        styles=("chorale", "folk"), style_dropout=0.0,
    )  # fmt: skip
    styled = MusicTransformerVAEGAN(config, VocabConfig()).eval()
    with torch.no_grad():  # a trained-looking table: the styles move the logits apart
        styled.style.table.weight.normal_(0.0, 1.0)
    reqs = [Req(GenerationConfig(max_tokens=30, seed=1, style=s)) for s in ("chorale", "folk", "")]
    b = ContinuousBatcher(styled, slots=4, fold_starts=fold_starts)  # True: as the server runs
    arrivals = {0: [(reqs[0], None), (reqs[1], None)], 4: [(reqs[2], None)]}
    run(b, arrivals, check=lambda step: False)  # alone_logits knows no style: ids compared
    got = [r.row.ids for r in reqs]
    for req, ids in zip(reqs, got):
        assert ids == generate(styled, req.cfg)[0].ids.tolist(), req.cfg.style
    assert got[0] != got[1]  # same seed, another style: another piece
    with pytest.raises(ConfigError, match="unknown style; this model knows chorale, folk"):
        b.add(GenerationConfig(style="jazz"))
