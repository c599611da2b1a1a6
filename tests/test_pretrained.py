"""The shipped model (src/aurl/pretrained/): trained for real, and it does not collapse.

Skipped until the model is committed; the likelihood bar below is the shipped model's own
measured value plus a small margin, so that a worse model put in its place fails.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import aurl

SHIPPED = Path(aurl.__file__).parent / "pretrained"
CHORALES = Path(aurl.__file__).parent / "data" / "bundled" / "bach-chorales"
# The shipped model scores 2.590 bits per note on the first 8 chorales of the tune-grouped test
# split, meters given as `aurl evaluate` gives them (MODEL_CARD.md; 2.335 on all 43 test files,
# none of which it saw). The bar sits ~1% above that: the scoring is deterministic fp32 on fixed
# tokens, so only summation order moves it (~1e-4 across thread counts and BLAS builds), while a
# retrained or damaged model that is 1% worse fails (the GPU-trained model it was annealed from
# scores 2.697 here, the CPU-trained one before it 3.058). An untrained model scores about 21.
MAX_TEST_BITS_PER_NOTE = 2.62

pytestmark = pytest.mark.skipif(
    not (SHIPPED / "config.json").is_file(), reason="no shipped model in src/aurl/pretrained yet"
)


@pytest.fixture(scope="module")
def model():
    from aurl.models import MusicTransformerVAEGAN

    return MusicTransformerVAEGAN.from_pretrained(SHIPPED).eval()


def test_shipped_model_scores_the_test_split(model, tmp_path):
    from aurl.data.cache import TokenCache, prepare
    from aurl.data.grammar import Grammar
    from aurl.evaluation.likelihood import score_sequences

    prepare(CHORALES, tmp_path / "cache", vocab_config=model.vocab_config, workers=1)
    cache = TokenCache(tmp_path / "cache")
    rows = cache.split_indices("test")[:8]  # the first 8 of the tune-grouped test split
    pieces = [np.asarray(cache.tokens(int(r)), dtype=np.int64) for r in rows]
    meters = [cache.meters[int(r)] for r in rows]  # as aurl evaluate scores them
    result = score_sequences(
        model, pieces, window=512, grammar=Grammar(model.vocab, 16), vocab=model.vocab,
        meters=meters,
    )  # fmt: skip
    assert result.notes > 500
    assert result.bits_per_note < MAX_TEST_BITS_PER_NOTE, result.to_dict()


def test_shipped_model_does_not_collapse(model):
    from aurl.config import GenerationConfig
    from aurl.data.tokenizer import Tokenizer
    from aurl.generation.generate import generate

    # one 1024-token sample: END is masked until the last few tokens (a chorale is ~650)
    cfg = GenerationConfig(max_tokens=1024, min_tokens=1016, temperature=1.0, seed=0)
    ids = generate(model, cfg, num_samples=1)[0].ids[1:]  # without START
    assert len(ids) >= 1016
    share = np.bincount(ids).max() / len(ids)
    assert share <= 0.25, f"one id is {share:.0%} of the sample"
    notes = Tokenizer(model.vocab_config).decode_to_notes(ids)
    assert len(np.unique(notes["pitch"] % 12)) >= 5
    # no single pitch repeated or held for most of the piece
    assert np.bincount(notes["pitch"]).max() / len(notes) < 0.5
    length = (notes["onset_s"] + notes["duration_s"]).max()
    assert notes["duration_s"].max() < 0.5 * length
