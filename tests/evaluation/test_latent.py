"""The latent measurements (aurl.evaluation.latent) on a tiny VAE.

That a trained VAE's own latent reconstructs a held-out piece better than another's or the
prior's is a property of trained weights: it is measured by ``aurl evaluate`` on a VAE model
(the "latent" section of its report). Here: the three conditionings really reach the decoder
(different latents, different scores), and a latent projection that carries nothing scores all
three exactly alike, which is what the measurement reports for a collapsed posterior.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from aurl.config import load_config
from aurl.data.corpus import BUNDLED_DIR
from aurl.data.tokenizer import Tokenizer
from aurl.evaluation.latent import interpolation_curves, reconstruction
from aurl.models.model import build_model

LENGTH = 48


@pytest.fixture(scope="module")
def vae_and_pieces():
    torch.manual_seed(0)
    config = load_config(preset="tiny", overrides=["model.mode=vae", "model.dropout=0"])
    tokenizer = Tokenizer(config.vocab)
    files = sorted((BUNDLED_DIR / "bach-chorales").glob("*.mid"))[:3]
    pieces = [np.asarray(tokenizer.encode_file(f), np.int64)[:LENGTH] for f in files]
    model = build_model(config).eval()
    with torch.no_grad():  # latents that matter: a strong projection into the decoder input
        for proj in model.conditioner.proj:
            proj.weight.mul_(20.0)
    return model, pieces


def test_each_conditioning_reaches_the_decoder(vae_and_pieces):
    model, pieces = vae_and_pieces
    r = reconstruction(model, pieces, length=LENGTH, prior_draws=1)
    assert r.pieces == 3 and r.length == LENGTH
    assert len({round(r.own, 6), round(r.other, 6), round(r.prior, 6)}) == 3
    path = interpolation_curves(model, pieces[0], pieces[1], steps=3)
    assert path.t == [0.0, 0.5, 1.0]
    # the path's ends are the pieces' own latents: its first point is A's reconstruction
    alone = reconstruction(model, [pieces[0], pieces[1]], length=LENGTH, prior_draws=1)
    assert (path.bits_a[0] + path.bits_b[-1]) / 2 == pytest.approx(alone.own, rel=1e-6)


def test_a_latent_that_carries_nothing_scores_alike(vae_and_pieces):
    model, pieces = vae_and_pieces
    blind = copy.deepcopy(model)
    with torch.no_grad():
        for proj in blind.conditioner.proj:
            proj.weight.zero_()
    r = reconstruction(blind, pieces, length=LENGTH, prior_draws=1)
    assert r.own == pytest.approx(r.other, abs=1e-9) and r.own == pytest.approx(r.prior, abs=1e-9)
    assert r.own_better_than_other == 0


def test_too_short_pieces_are_refused(vae_and_pieces):
    model, pieces = vae_and_pieces
    with pytest.raises(ValueError, match="at least two pieces"):
        reconstruction(model, pieces, length=10_000)


def test_monotone_within_the_noise_by_hand():
    from aurl.evaluation.latent import Interpolation

    t = [0.0, 0.5, 1.0]
    # A rises 4.0 -> 4.5, B falls 5.0 -> 4.6; one step back of 0.05 on A's curve
    path = Interpolation(t, [4.0, 4.3, 4.5], [5.0, 4.7, 4.6], 0.0, noise=0.03)
    assert path.change == pytest.approx(0.4) and path.tolerance == pytest.approx(0.06)
    assert path.monotone()
    back = Interpolation(t, [4.0, 4.55, 4.5], [5.0, 4.7, 4.6], 0.05, noise=0.03)
    assert back.monotone()  # 0.05 back is within 2 x 0.03 of noise
    assert not Interpolation(t, [4.0, 4.55, 4.5], [5.0, 4.7, 4.6], 0.05, noise=0.02).monotone()
    # ends that move less than the noise are no path
    assert not Interpolation(t, [4.0, 4.02, 4.04], [5.0, 4.99, 4.97], 0.0, noise=0.02).monotone()


def test_path_noise_is_the_posteriors_spread(vae_and_pieces):
    model, pieces = vae_and_pieces
    path = interpolation_curves(model, pieces[0], pieces[1], steps=3, noise_draws=3)
    assert path.noise > 0  # draws from q(z | x) decode differently
    blind = copy.deepcopy(model)
    with torch.no_grad():
        for proj in blind.conditioner.proj:
            proj.weight.zero_()
    flat = interpolation_curves(blind, pieces[0], pieces[1], steps=3, noise_draws=3)
    assert flat.noise == pytest.approx(0, abs=1e-9) and flat.change == 0
    assert not flat.monotone()
