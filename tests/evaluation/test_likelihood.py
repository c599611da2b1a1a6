"""score_sequences against direct full-sequence cross-entropy on a tiny real model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aurl.config import ModelConfig, VocabConfig
from aurl.data.tokenizer import Tokenizer
from aurl.data.vocab import Vocab
from aurl.errors import DataError
from aurl.evaluation.likelihood import LikelihoodResult, plan_windows, score_sequences
from aurl.models.model import MusicTransformerVAEGAN

VOCAB = Vocab(VocabConfig())


def tiny_model(**kw) -> MusicTransformerVAEGAN:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, dropout=0.0, max_seq_len=512, **kw)
    return MusicTransformerVAEGAN(cfg, VocabConfig()).eval()


def random_sequences(lengths: list[int], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        np.concatenate([[0], rng.integers(4, VOCAB.size, n - 2), [1]]).astype(np.int64)
        for n in lengths
    ]


def direct_nll(model, seq: np.ndarray) -> float:
    """The reference: one forward pass over the whole sequence."""
    ids = torch.from_numpy(seq)[None]
    with torch.no_grad():
        logits = model(ids).logits[0, :-1]
    return float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))


def test_plan_windows_scores_each_position_once() -> None:
    plan = plan_windows(10, window=4, context=2)
    assert plan == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    scored = [t for _, end, first in plan for t in range(first, end)]
    assert scored == list(range(1, 10))
    assert plan_windows(3, window=8, context=4) == [(0, 3, 1)]
    assert plan_windows(1, window=8, context=4) == []


def test_rates_from_totals() -> None:
    r = LikelihoodResult(nll=10 * math.log(2), tokens=20, notes=5)
    assert r.bits_per_note == pytest.approx(2.0)
    assert r.bits_per_token == pytest.approx(0.5)
    assert r.perplexity == pytest.approx(math.sqrt(2))


def test_matches_direct_cross_entropy_when_the_window_fits() -> None:
    model = tiny_model()
    seqs = random_sequences([40, 17, 33])
    r = score_sequences(model, seqs, window=64, batch_size=2)
    assert r.nll == pytest.approx(sum(direct_nll(model, s) for s in seqs), rel=1e-5)
    assert r.tokens == 39 + 16 + 32
    note_on = VOCAB.kind == 4
    assert r.notes == sum(int(note_on[s[1:]].sum()) for s in seqs)
    assert r.loss == pytest.approx(r.nll / r.tokens)


def test_windows_equal_the_full_pass_for_a_local_model(fixtures_dir) -> None:
    # Two layers of 8-token local attention see 14 tokens back and rotary is relative; musical
    # time and grammar features are carried over the history, so windows with 32 tokens of
    # context give the logits of one full pass.
    model = tiny_model(attention="local", local_window=8)
    tok = Tokenizer()
    seqs = [tok.encode_file(fixtures_dir / "midi" / "bach_bwv66.6.mid")[:150]]
    seqs += random_sequences([90])
    windowed = score_sequences(model, seqs, window=48, context=32, batch_size=3)
    full = sum(direct_nll(model, s) for s in seqs)
    # A freshly initialised model barely uses context (too little context is off by ~2e-5
    # relative here), so the tolerance is tight.
    assert windowed.nll == pytest.approx(full, rel=2e-6)
    assert windowed.tokens == 149 + 89
    assert model.grammar_features is not None and model.time is not None


def test_batched_equals_single() -> None:
    model = tiny_model()
    seqs = random_sequences([70, 25, 50, 9])
    one = score_sequences(model, seqs, window=32, batch_size=1)
    many = score_sequences(model, seqs, window=32, batch_size=5)
    assert many.nll == pytest.approx(one.nll, rel=1e-5)
    assert (many.tokens, many.notes) == (one.tokens, one.notes)


class EveryOtherIdGrammar:
    """A stand-in grammar (the real one lives in aurl.data.grammar): even ids and END allowed."""

    def sequence_masks(self, ids: torch.Tensor) -> torch.Tensor:
        B, T = ids.shape
        allowed = torch.zeros(B, T, VOCAB.size, dtype=torch.bool)
        allowed[..., ::2] = True
        allowed[..., 1] = True
        return allowed


def test_grammar_renormalises_over_allowed_ids() -> None:
    model = tiny_model()
    seq = random_sequences([30], seed=3)[0]
    r = score_sequences(model, [seq], window=64, grammar=EveryOtherIdGrammar())
    ids = torch.from_numpy(seq)[None]
    with torch.no_grad():
        logits = model(ids).logits[0, :-1]
    target = ids[0, 1:]
    allowed = torch.zeros(VOCAB.size, dtype=torch.bool)
    allowed[::2] = True
    allowed[1] = True
    masked = torch.log_softmax(logits.masked_fill(~allowed, -math.inf), -1)
    full = torch.log_softmax(logits, -1)
    ok = allowed[target]
    expected = -torch.where(
        ok, masked.gather(1, target[:, None])[:, 0], full.gather(1, target[:, None])[:, 0]
    )
    assert r.nll == pytest.approx(float(expected.sum()), rel=1e-5)
    assert r.grammar_violations == int((~ok).sum()) > 0
    plain = score_sequences(model, [seq], window=64)
    assert r.nll < plain.nll  # renormalising over fewer ids only raises probabilities


def test_restores_training_mode_and_rejects_foreign_ids() -> None:
    model = tiny_model().train()
    score_sequences(model, random_sequences([10]), window=16)
    assert model.training
    with pytest.raises(DataError, match="vocabulary"):
        score_sequences(model, [np.array([0, 5, VOCAB.size + 3, 1])], window=16)


def test_a_vaes_later_windows_start_from_their_prefix_state(fixtures_dir) -> None:
    # a VAE cannot carry its state through step() (its latents come from forward), so its later
    # windows must get the state after their prefix through forward(start=): the reference
    # scores each window alone that way, given its own posterior mean (what eval mode uses)
    model = tiny_model(mode="vae", latent_levels=2, latent_dim=8, segment_len=32,
                       encoder_layers=1)  # fmt: skip
    tok = Tokenizer()
    seqs = [
        tok.encode_file(fixtures_dir / "midi" / "bach_bwv66.6.mid")[:300],
        tok.encode_file(fixtures_dir / "midi" / "bach_bwv66.6.mid")[40:180],
    ]
    reference = 0.0
    for seq in seqs:
        full = torch.from_numpy(seq)[None]
        for start, end, first in plan_windows(len(seq), 96, 48):
            begin = model.start_after(full[:, :start]) if start > 0 else None
            with torch.no_grad():
                logits = model(full[:, start:end], start=begin).logits[0]
            rows = slice(first - 1 - start, end - 1 - start)
            target = full[0, first:end]
            reference += float(
                torch.nn.functional.cross_entropy(logits[rows], target, reduction="sum")
            )
    got = score_sequences(model, seqs, window=96, context=48, batch_size=8)
    assert got.nll == pytest.approx(reference, rel=1e-5)


def test_evaluate_samples_of_a_vae_decode_prior_draws() -> None:
    # `aurl evaluate --samples` on a VAE: each batch k decodes the prior draws of seed + k, as
    # `aurl generate --seed` does, not the decoder with no latent at all (never trained so)
    from aurl.cli.evaluate import generate_samples
    from aurl.config import GenerationConfig
    from aurl.generation.generate import generate

    model = tiny_model(mode="vae", latent_levels=2, latent_dim=8, segment_len=32,
                       encoder_layers=1)  # fmt: skip
    got = generate_samples(model, 3, max_tokens=40, seed=5, batch=2)
    want = []
    for seed, rows in ((5, 2), (6, 1)):
        z = model.sample_prior(rows, generator=torch.Generator().manual_seed(seed))
        config = GenerationConfig(max_tokens=40, seed=seed)
        want += [p.ids for p in generate(model, config, num_samples=rows, latents=z)]
    assert len(got) == 3 and all(np.array_equal(a, b) for a, b in zip(got, want))
    plain = generate(model, GenerationConfig(max_tokens=40, seed=5), num_samples=2)
    assert not all(np.array_equal(a, b.ids) for a, b in zip(got, plain))  # the latent matters
