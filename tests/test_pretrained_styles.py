"""The shipped style model `styles` (src/aurl/pretrained/styles/): the default chorale model taught
five styles. It keeps the chorales (issue 15's goal: its chorale bits/note no worse than the
chorale-only model's), it knows the other styles, and its classifier tells them apart.

Skipped until the model is committed. Every bar below is the shipped model's own measured value
(MODEL_CARD.md) plus a small margin, so that a worse model put in its place fails. Scoring is
deterministic fp32 on fixed tokens (only summation order moves it, ~1e-4 bits per note).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import aurl
from aurl.cli import main

SHIPPED = Path(aurl.__file__).parent / "pretrained"
MODEL = SHIPPED / "styles"
CHORALES = SHIPPED.parent / "data" / "bundled" / "bach-chorales"
STYLES = ("chorale", "classical", "folk", "palestrina", "renaissance")
# the first 8 chorales of the tune-grouped test split (as tests/test_pretrained.py scores the
# default): measured 2.485 under `chorale` (2.486 with no style), the default model 2.590 on the
# same notes; the first taught step alone (300 steps, MODEL_CARD.md) 2.526
CHORALE_BITS = 2.485
# each style's 3 held-out openings of 512 tokens (tests/fixtures/styles/) under their own style,
# measured (MODEL_CARD.md); bars ~1% above
MEASURED = {
    "chorale": 2.067,
    "classical": 8.157,
    "folk": 5.140,
    "palestrina": 3.638,
    "renaissance": 5.102,
}
MIN_RIGHT = 14  # of the 15 pieces the shipped classifier names (measured: 15)

pytestmark = pytest.mark.skipif(
    not (MODEL / "config.json").is_file(), reason="no shipped styles model yet"
)


@pytest.fixture(scope="module")
def model():
    from aurl.models import MusicTransformerVAEGAN

    return MusicTransformerVAEGAN.from_pretrained(MODEL).eval()


@pytest.fixture(scope="module")
def pieces(model, style_pieces) -> list[tuple[str, Path, np.ndarray, tuple[int, int]]]:
    """(style, file, ids, meter) of the 15 held-out pieces, by style then name."""
    return style_pieces(model.vocab_config)


def test_the_styles_model_is_the_default_taught_five_styles(model):
    from aurl.models import MusicTransformerVAEGAN

    default = MusicTransformerVAEGAN.from_pretrained(SHIPPED).config
    assert model.config.mode == "transformer" and model.config.styles == STYLES
    shape = ("d_model", "n_layers", "n_heads", "ff_mult", "meter", "grammar_features")
    assert all(getattr(model.config, k) == getattr(default, k) for k in shape)


def test_it_scores_the_chorales_no_worse_than_the_chorale_model(model, tmp_path):
    from aurl.data.cache import TokenCache, prepare
    from aurl.data.grammar import Grammar
    from aurl.evaluation.likelihood import score_sequences
    from aurl.models import MusicTransformerVAEGAN

    prepare(CHORALES, tmp_path / "cache", vocab_config=model.vocab_config, workers=1)
    cache = TokenCache(tmp_path / "cache")
    rows = cache.split_indices("test")[:8]  # the first 8 of the tune-grouped test split
    pieces = [np.asarray(cache.tokens(int(r)), dtype=np.int64) for r in rows]
    common = dict(window=512, grammar=Grammar(model.vocab, 16), vocab=model.vocab,
                  meters=[cache.meters[int(r)] for r in rows])  # fmt: skip
    ours = score_sequences(model, pieces, styles=[0] * len(pieces), **common).bits_per_note
    default = MusicTransformerVAEGAN.from_pretrained(SHIPPED).eval()
    theirs = score_sequences(default, pieces, **common).bits_per_note
    assert ours <= theirs and ours < CHORALE_BITS * 1.01, (ours, theirs)


def test_held_out_pieces_score_as_the_card_says(model, pieces):
    from aurl.data.grammar import Grammar
    from aurl.evaluation.likelihood import score_sequences

    grammar, got = Grammar(model.vocab), {}
    for k, style in enumerate(STYLES):
        mine = [p for p in pieces if p[0] == style]
        r = score_sequences(model, [ids[:512] for _, _, ids, _ in mine], window=512,
                            grammar=grammar, meters=[m for *_, m in mine],
                            styles=[k] * len(mine))  # fmt: skip
        got[style] = round(r.bits_per_note, 3)
    assert all(got[s] < MEASURED[s] * 1.01 for s in STYLES), got


def test_the_shipped_classifier_names_the_styles(model, pieces):
    from aurl.data.tokenizer import Tokenizer
    from aurl.evaluation.style import classify_style, load_style_classifier

    clf = load_style_classifier(MODEL, STYLES)
    assert clf is not None and clf.max_tokens == 512
    tok = Tokenizer(model.vocab_config)
    guesses = [classify_style(model, ids, classifier=clf, tokenizer=tok, window=512,
                              meter=meter).style for _, _, ids, meter in pieces]  # fmt: skip
    right = sum(g == s for g, (s, *_) in zip(guesses, pieces))
    assert right >= MIN_RIGHT, list(zip([p[0] for p in pieces], guesses))


def test_generate_names_the_styles_of_the_model(tmp_path, capsys):
    args = ["generate", "--model", "styles", "--max-tokens", "20", "--out", str(tmp_path)]
    assert main([*args, "--style", "jazz"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.endswith("unknown style; this model knows " + ", ".join(STYLES))
    assert "\n" not in err
