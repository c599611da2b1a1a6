"""Multi-scale sequence discriminator for the VAE-GAN.

Tokens (ids, or soft one-hots from the decoder) go through one input projection, then each
scale cuts the sequence into windows of its length (``disc_scales``; 0 = the whole sequence:
note-level, phrase-level, piece-level) and runs its own stack of 1-D convolutions over every
window. Every weight layer is spectrally normalized (Miyato et al. 2018), which bounds each
layer's Lipschitz constant by 1 and keeps the adversarial game stable.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from aurl.config import ModelConfig


class ScaleHead(nn.Module):
    """Convolutions over windows of ``window`` tokens (0: the whole sequence) -> one score per
    window, and the pooled activations of each layer (for feature matching)."""

    def __init__(self, width: int, layers: int, window: int) -> None:
        super().__init__()
        self.window = window
        self.convs = nn.ModuleList(
            spectral_norm(nn.Conv1d(width, width, kernel_size=3, padding=1)) for _ in range(layers)
        )
        self.out = spectral_norm(nn.Linear(width, 1, bias=False))  # hinge: a bias cancels

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        B, T, C = x.shape
        w = self.window if 0 < self.window < T else T
        n = T // w  # a tail shorter than the window is left to the other scales
        x = x[:, : n * w].reshape(B * n, w, C).transpose(1, 2)  # (B*n, C, w)
        feats = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.2)
            feats.append(x.mean(dim=2))  # (B*n, C)
        score = self.out(x.mean(dim=2)).view(B, n)  # (B, n)
        return score, feats


class MultiScaleDiscriminator(nn.Module):
    """Scores a sequence at every scale of ``config.disc_scales``."""

    def __init__(self, config: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        width = config.disc_d_model
        self.inp = spectral_norm(nn.Linear(vocab_size, width, bias=False))
        self.scales = nn.ModuleList(
            ScaleHead(width, config.disc_layers, w) for w in config.disc_scales
        )

    def forward(self, ids_or_soft: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """ids (B, T) or soft one-hots (B, T, V) -> (scores per scale, each (B, windows);
        features, each (B * windows, width))."""
        weight = self.inp.weight  # (width, V), spectrally normalized
        if ids_or_soft.dim() == 2:
            x = F.embedding(ids_or_soft, weight.t())  # one-hot @ W^T without the one-hot
        else:
            x = F.linear(ids_or_soft.to(weight.dtype), weight)  # (B, T, width)
        scores, feats = [], []
        for head in self.scales:
            s, f = head(x)
            scores.append(s)
            feats.extend(f)
        return scores, feats
