"""Spectral normalization keeps every discriminator layer's top singular value near 1."""

from __future__ import annotations

import torch


def test_spectral_norm_top_singular_value_near_one(make_model, ids):
    model = make_model(mode="vae_gan")
    model.train()
    layers = [m for m in model.discriminator.modules() if hasattr(m, "parametrizations")]
    with torch.no_grad():
        for layer in layers:  # raw weights far from norm 1, so the normalization must act
            layer.parametrizations.weight.original.mul_(7.0)
        for _ in range(30):  # power iteration: one step per training forward
            model.discriminate(ids)
    model.eval()
    assert len(layers) == 1 + 3 * (1 + 1)  # input projection; per scale one conv + output
    for layer in layers:
        w = layer.weight.detach()
        sigma = torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), ord=2)
        assert abs(sigma.item() - 1.0) < 0.05
        raw = layer.parametrizations.weight.original.detach()
        assert torch.linalg.matrix_norm(raw.reshape(raw.shape[0], -1), ord=2) > 2.0
