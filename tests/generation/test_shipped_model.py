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
    from aurl.cli.generate import load_model
    from aurl.generation.generate import generate

    model = load_model(None, "cpu")
    cfg = GenerationConfig(max_tokens=384, temperature=1.0, seed=0)
    pieces = generate(model, cfg, num_samples=4)
    tokenizer = Tokenizer(model.vocab_config)
    grammar = Grammar(model.vocab, cfg.polyphony_cap)
    for piece in pieces:
        ids = piece.generated
        assert grammar.count_violations(piece.ids) == 0
        assert np.bincount(ids).max() <= 0.25 * len(ids)  # no id above 25% of the tokens
        pitches = model.vocab.value[ids[model.vocab.kind[ids] == Kind.NOTE_ON]]
        assert len(pitches) >= 8
        assert np.bincount(pitches).max() <= 0.5 * len(pitches)  # no pitch repeated throughout
        assert len(np.unique(pitches % 12)) >= 4  # several pitch classes
        notes = tokenizer.decode_to_notes(piece.ids)
        length = (notes["onset"] + notes["duration"]).max()
        assert notes["duration"].max() <= 0.5 * length  # no pitch held for most of the piece
