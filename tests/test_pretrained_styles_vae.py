"""The shipped multi-style VAE (src/aurl/pretrained/styles-vae/): trained for real, it knows its
styles, its classifier tells them apart, and its latent carries the piece.

Skipped until the model is committed. Every bar below is the shipped model's own measured value
on the 15 held-out pieces of tests/fixtures/styles/ (3 per style, test split: MODEL_CARD.md)
plus a small margin, so that a worse model put in its place fails. Scoring is deterministic
fp32 on fixed tokens (only summation order moves it, ~1e-4 bits per note).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import aurl
from aurl.cli import main

MODEL = Path(aurl.__file__).parent / "pretrained" / "styles-vae"
PIECES = Path(__file__).parent / "fixtures" / "styles"
STYLES = ("chorale", "classical", "folk", "palestrina", "renaissance")
LENGTH = 256  # the opening scored and encoded (the model's training window)
# bits per note of each style's 3 openings under their own style, measured 4.053, 6.645, 4.960,
# 4.005, 5.091 (MODEL_CARD.md), bars ~1% above
MAX_BITS = {
    "chorale": 4.09,
    "classical": 6.71,
    "folk": 5.01,
    "palestrina": 4.05,
    "renaissance": 5.14,
}
MIN_RIGHT = 13  # of the 15 pieces the shipped classifier names (measured: 14)
# reconstruction, bits per note of the 15 openings given their own posterior-mean latent vs
# another piece's: measured 5.051 vs 5.333 (-0.282; prior draws 5.343); a collapsed latent
# gives 0
MAX_OWN_MINUS_OTHER = -0.23

pytestmark = pytest.mark.skipif(
    not (MODEL / "config.json").is_file(), reason="no shipped styles-vae model yet"
)


@pytest.fixture(scope="module")
def model():
    from aurl.models import MusicTransformerVAEGAN

    return MusicTransformerVAEGAN.from_pretrained(MODEL).eval()


@pytest.fixture(scope="module")
def pieces(model, style_pieces) -> list[tuple[str, Path, np.ndarray, tuple[int, int]]]:
    """(style, file, ids, meter) of the 15 held-out pieces, by style then name."""
    return style_pieces(model.vocab_config)


def test_the_styles_model_is_a_vae_with_five_styles(model, pieces):
    assert model.config.mode == "vae" and model.config.styles == STYLES
    assert len(pieces) == 15 and all(len(ids) >= LENGTH for *_, ids, _ in pieces)


def test_held_out_pieces_score_as_the_card_says(model, pieces):
    from aurl.data.grammar import Grammar
    from aurl.evaluation.likelihood import score_sequences

    grammar, got = Grammar(model.vocab), {}
    for k, style in enumerate(STYLES):
        mine = [p for p in pieces if p[0] == style]
        r = score_sequences(model, [ids[:LENGTH] for _, _, ids, _ in mine], window=LENGTH,
                            grammar=grammar, meters=[m for *_, m in mine],
                            styles=[k] * len(mine))  # fmt: skip
        got[style] = round(r.bits_per_note, 3)
    assert all(got[s] < MAX_BITS[s] for s in STYLES), got


def test_the_shipped_classifier_names_the_styles(model, pieces):
    from aurl.data.tokenizer import Tokenizer
    from aurl.evaluation.style import classify_style, load_style_classifier

    clf = load_style_classifier(MODEL, STYLES)
    assert clf is not None and clf.max_tokens == 512
    tok = Tokenizer(model.vocab_config)
    guesses = [classify_style(model, ids, classifier=clf, tokenizer=tok, window=LENGTH,
                              meter=meter).style for _, _, ids, meter in pieces]  # fmt: skip
    right = sum(g == s for g, (s, *_) in zip(guesses, pieces))
    assert right >= MIN_RIGHT, list(zip([p[0] for p in pieces], guesses))


def test_the_latent_carries_the_piece(model, pieces):
    from aurl.data.grammar import Grammar
    from aurl.evaluation.latent import reconstruction

    r = reconstruction(model, [ids for *_, ids, _ in pieces], length=LENGTH,
                       grammar=Grammar(model.vocab), meters=[m for *_, m in pieces],
                       prior_draws=2)  # fmt: skip
    assert r.own - r.other < MAX_OWN_MINUS_OTHER and r.own < r.prior, r


def test_generate_names_the_styles_of_the_model(tmp_path, capsys):
    args = ["generate", "--model", "styles-vae", "--max-tokens", "20", "--out", str(tmp_path)]
    assert main([*args, "--style", "jazz"]) != 0
    err = capsys.readouterr().err.strip()
    assert (
        "unknown style; this model knows chorale, classical, folk, palestrina, renaissance" in err
    )
    assert "\n" not in err


def test_style_transfer_runs_from_the_command_line(tmp_path, capsys):
    # the path only: how far transfer moves a piece is measured by benchmarks/bench_transfer.py
    # (BENCHMARKS.md: the target style, yes; the source's rhythm and contour, hardly)
    source = PIECES / "chorale" / "bach_bwv421.mid"
    out = tmp_path / "folk"
    args = ["generate", "--model", "styles-vae", "--variations", str(source), "--style", "folk",
            "--max-tokens", "64", "--num-samples", "2", "--out", str(out)]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    assert len(list(out.glob("*.mid"))) == 2
    assert "style: folk" in next(out.glob("*.yaml")).read_text()
