"""The shipped model at temperature 1.0 does not collapse (runs once the model is shipped)."""

from __future__ import annotations

import numpy as np
import pytest

from aurl.cli.generate import SHIPPED
from aurl.config import GenerationConfig
from aurl.data.grammar import Grammar
from aurl.data.tokenizer import Tokenizer
from aurl.data.vocab import Kind

pytestmark = pytest.mark.skipif(
    not (SHIPPED / "config.json").is_file(), reason="no shipped model in src/aurl/pretrained yet"
)


def test_no_collapse_at_temperature_one() -> None:
    """16 pieces of 384 tokens at temperature 1: each is grammatical, no id or pitch dominates,
    several pitch classes sound. Held notes are judged as a rate: a healthy sampler draws the
    odd piece that holds one note long (the shipped model's 64 pieces of seeds 0-15 x 4 have one
    piece holding a note 23 of its 41 beats, 0.56), a collapsing one holds notes in most. At most
    1 of the 16 pieces holds a note past half its length, and the median piece's longest note
    stays under 0.12 of it (measured: none past half, median 0.064; seed 1: 0.083)."""
    from aurl.cli.generate import load_model
    from aurl.generation.generate import generate

    model = load_model(None, "cpu")
    cfg = GenerationConfig(max_tokens=384, temperature=1.0, seed=0)
    pieces = generate(model, cfg, num_samples=16)
    tokenizer = Tokenizer(model.vocab_config)
    grammar = Grammar(model.vocab, cfg.polyphony_cap)
    held = []  # each piece's longest note over its length
    for piece in pieces:
        ids = piece.generated
        assert grammar.count_violations(piece.ids) == 0
        assert np.bincount(ids).max() <= 0.25 * len(ids)  # no id above 25% of the tokens
        pitches = model.vocab.value[ids[model.vocab.kind[ids] == Kind.NOTE_ON]]
        assert len(pitches) >= 8
        assert np.bincount(pitches).max() <= 0.5 * len(pitches)  # no pitch repeated throughout
        assert len(np.unique(pitches % 12)) >= 4  # several pitch classes
        notes = tokenizer.decode_to_notes(piece.ids)
        held.append(notes["duration"].max() / (notes["onset"] + notes["duration"]).max())
    held = np.array(held)
    assert (held > 0.5).sum() <= 1, np.round(held, 3)
    assert np.median(held) < 0.12, np.round(held, 3)
