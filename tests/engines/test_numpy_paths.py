"""The numpy paths the onnx engine's loop runs on equal the torch paths: sampling filters, the
masker on numpy states (priming, advancing, masking) along real pieces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aurl.config import GenerationConfig
from aurl.data.tokenizer import Tokenizer
from aurl.data.vocab import Vocab
from aurl.generation.generate import make_masker
from aurl.generation.sampling import (
    SamplingOptions,
    filter_logits,
    filter_logits_numpy,
    sample_numpy,
)

VOCAB = Vocab()


@pytest.mark.parametrize(
    "options",
    [
        SamplingOptions(temperature=0.7, top_k=20),
        SamplingOptions(top_p=0.8, min_p=0.05),
        SamplingOptions(temperature=1.3, top_k=50, top_p=0.95, repetition_penalty=1.3),
        SamplingOptions(temperature=0.0, repetition_penalty=1.5),
    ],
)
def test_numpy_filters_keep_what_torch_keeps(options) -> None:
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((6, VOCAB.size)) * 3).astype(np.float32)
    seen = rng.random((6, VOCAB.size)) < 0.1
    want = filter_logits(torch.from_numpy(logits), options, torch.from_numpy(seen)).numpy()
    got = filter_logits_numpy(logits, options, seen)
    assert np.array_equal(np.isneginf(got), np.isneginf(want))
    np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-6)


def test_numpy_sampler_follows_the_distribution() -> None:
    with np.errstate(divide="ignore"):
        logits = np.log(np.array([[0.5, 0.0, 0.3, 0.2]], dtype=np.float32))  # id 1: never
    rng = np.random.default_rng(1)
    draws = np.concatenate([sample_numpy(logits, SamplingOptions(), rng) for _ in range(20000)])
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, [0.5, 0.0, 0.3, 0.2], atol=0.015)


@pytest.mark.parametrize(
    "overrides",
    [
        {"key": "D minor", "key_strictness": 0.7, "pitch_low": 48, "pitch_high": 80},
        {"instruments": (0,), "density": 3.0, "seconds": 5.0, "max_tokens": 10_000},
        {"min_tokens": 40, "max_tokens": 60, "tempo_range": (90.0, 140.0)},
    ],
)
def test_numpy_masker_equals_torch_masker(overrides, fixtures_dir) -> None:
    """Primed on a real piece's first tokens and advanced along the rest, the numpy masker
    (device None) masks random logits exactly as the torch masker does."""
    cfg = GenerationConfig(**overrides)
    ids = np.asarray(Tokenizer().encode_file(fixtures_dir / "midi" / "bach_bwv66.6.mid"))[:120]
    rows = np.stack([ids, ids])  # (2, T)
    m_np, m_t = make_masker(VOCAB, cfg, None), make_masker(VOCAB, cfg, "cpu")
    s_np = m_np.prime(m_np.initial_state(2), rows[:, :20])
    s_t = m_t.prime(m_t.initial_state(2), torch.from_numpy(rows[:, :20]))
    rng = np.random.default_rng(2)
    for j in range(20, rows.shape[1]):
        logits = rng.standard_normal((2, VOCAB.size)).astype(np.float32)
        got = m_np.apply_numpy(logits, s_np)
        want = m_t.apply(torch.from_numpy(logits), s_t).numpy()
        np.testing.assert_array_equal(got, want)
        s_np = m_np.advance(s_np, rows[:, j])
        s_t = m_t.advance(s_t, torch.from_numpy(rows[:, j]))
        assert isinstance(s_np.grammar.family, np.ndarray)
