"""The VAE's KL floor per latent group, and the KL per level and active units it logs."""

from __future__ import annotations

import torch

from aurl.config import LossConfig
from aurl.models.losses import active_units, compute_losses, kl_free_bits_grouped
from aurl.models.vae import Posterior


def test_free_bits_per_group_by_hand():
    # level 0: 1 unit of 2 dims, KL per dim 0.05 and 0.1 -> the unit's 0.15 is floored to 0.25;
    # level 1: 2 units of 1 dim, KL 0.5 and 0.0 -> 0.5 and 0.25. Sum 1.0 over 4 tokens: 0.25
    kl = [torch.tensor([[[0.05, 0.1]]]), torch.tensor([[[0.5], [0.0]]])]
    assert torch.isclose(kl_free_bits_grouped(kl, 0.25, tokens=4), torch.tensor(0.25))
    # at the prior, the floor charges free_bits per unit (not per dimension), with no gradient
    mu = torch.zeros(4, 3, 8, requires_grad=True)
    fb = kl_free_bits_grouped(Posterior([mu], [torch.zeros(4, 3, 8)]).kl(), 0.25, tokens=2)
    assert torch.isclose(fb, torch.tensor(0.25 * 3 / 2))
    fb.backward()
    assert mu.grad.abs().max() == 0


def test_active_units_by_hand():
    # batch of 3, one unit, 3 dims: dim 0 varies (var 1.0), dim 1 barely (var 0.0001), dim 2 not
    mu = torch.tensor([[[0.0, 0.0, 5.0]], [[1.0, 0.01, 5.0]], [[2.0, 0.02, 5.0]]])
    assert active_units([mu]).item() == 1
    # a level with 2 units per piece: the variance runs over the 2 * 2 unit vectors
    seg = torch.tensor([[[0.0], [1.0]], [[0.0], [1.0]]])  # var 1/3
    assert active_units([mu, seg]).item() == 2


def test_vae_losses_log_kl_per_level_and_active_units(make_model, ids):
    model = make_model(mode="vae").train()
    losses = compute_losses(model, ids, LossConfig(), step=0)
    levels = [losses[f"kl_level{i}"] for i in range(3)]
    torch.testing.assert_close(sum(levels), losses["kl_raw"])
    assert 0 <= losses["active_units"].item() <= 8 + 8 + 2  # latent dims of the 3 levels
