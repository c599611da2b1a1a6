"""The VAE half: a bidirectional encoder to hierarchical latents, and the decoder's conditioning.

Three levels of latents, each a (B, units, dim) tensor with a standard normal prior:

- ``global``: one vector for the whole sequence (the piece: key, style, texture);
- ``segment``: one per ``segment_len`` tokens (a phrase / bar group);
- ``fine``: one per ``segment_len // 4`` tokens, a quarter of the width (local figuration).

The decoder is conditioned by *added embeddings*: each level is projected to the model width
and added to the input embedding of every token its unit covers. Compared with prefix tokens
it keeps the sequence length, the KV cache and rotary positions unchanged; compared with
cross-attention it costs one small matmul per level and no extra attention, and it maps
segment latents to their positions directly. Incremental decoding reads the same projection
at the new positions, so cached and full passes agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aurl.config import ModelConfig
from aurl.data.vocab import FIM_EOM
from aurl.models.layers import Rotary, make_blocks


def level_spans(config: ModelConfig) -> list[int | None]:
    """Tokens each unit of each level covers (None: the whole sequence)."""
    spans: list[int | None] = [None, config.segment_len, max(1, config.segment_len // 4)]
    return spans[: config.latent_levels]


def level_dims(config: ModelConfig) -> list[int]:
    dims = [config.latent_dim, config.latent_dim, max(1, config.latent_dim // 4)]
    return dims[: config.latent_levels]


def _units(span: int | None, length: int) -> int:
    return 1 if span is None else math.ceil(length / span)


@dataclass
class Latents:
    """Latent codes, one (B, units, dim) tensor per level (global first)."""

    levels: list[Tensor]

    @property
    def batch_size(self) -> int:
        return self.levels[0].shape[0]

    def to(self, device: torch.device | str) -> Latents:
        return Latents([z.to(device) for z in self.levels])

    @staticmethod
    def slerp(a: Latents, b: Latents, t: float) -> Latents:
        """Spherical interpolation per unit vector (linear where the two are parallel)."""
        out = []
        for za, zb in zip(a.levels, b.levels):
            na, nb = za.norm(dim=-1, keepdim=True), zb.norm(dim=-1, keepdim=True)
            cos = ((za * zb).sum(-1, keepdim=True) / (na * nb).clamp_min(1e-8)).clamp(-1, 1)
            omega = torch.arccos(cos)
            so = torch.sin(omega)
            lerp = (1 - t) * za + t * zb
            slerp = (torch.sin((1 - t) * omega) * za + torch.sin(t * omega) * zb) / so.clamp_min(
                1e-8
            )
            out.append(torch.where(so > 1e-4, slerp, lerp))
        return Latents(out)


@dataclass
class Posterior:
    """Diagonal Gaussians q(z | x), one per level: mu and log-variance (B, units, dim)."""

    mu: list[Tensor]
    logvar: list[Tensor]

    def mean(self) -> Latents:
        return Latents(list(self.mu))

    def sample(self, generator: torch.Generator | None = None) -> Latents:
        """Reparameterized sample: mu + sigma * eps, differentiable in mu and sigma."""
        out = []
        for mu, logvar in zip(self.mu, self.logvar):
            eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
            out.append(mu + torch.exp(0.5 * logvar) * eps)
        return Latents(out)

    def kl(self) -> list[Tensor]:
        """KL(q || N(0, I)) per element, per level (B, units, dim); never negative."""
        return [
            0.5 * (mu.square() + logvar.exp() - 1.0 - logvar)
            for mu, logvar in zip(self.mu, self.logvar)
        ]


def _pool(h: Tensor, weight: Tensor, span: int | None) -> Tensor:
    """Masked mean of ``h`` (B, T, D) over each unit of ``span`` tokens -> (B, units, D)."""
    B, T, D = h.shape
    if span is None:
        span = T
    units = _units(span, T)
    pad = units * span - T
    h = F.pad(h * weight[..., None], (0, 0, 0, pad)).view(B, units, span, D)  # (B, U, span, D)
    count = F.pad(weight, (0, pad)).view(B, units, span).sum(-1, keepdim=True)
    return h.sum(2) / count.clamp_min(1.0)


class LatentEncoder(nn.Module):
    """Bidirectional Transformer over the (shared) token embedding -> posterior per level.

    Finer levels see the pooled global summary beside their own, so q(z_seg | x) knows the
    context the piece-level code already carries.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config
        self.spans, self.dims = level_spans(c), level_dims(c)
        self.rotary = Rotary(c.d_model // c.n_heads, c.max_seq_len)
        self.blocks = make_blocks(
            c.encoder_layers, c.d_model, c.n_heads, c.ff_mult, c.dropout, causal=False
        )
        self.norm = nn.LayerNorm(c.d_model)
        self.heads = nn.ModuleList(
            nn.Linear(c.d_model * (1 if i == 0 else 2), 2 * dim) for i, dim in enumerate(self.dims)
        )

    def forward(
        self, ids: Tensor, embed: nn.Embedding, attention_mask: Tensor | None = None
    ) -> Posterior:
        B, T = ids.shape
        x = embed(ids)
        weight = (
            attention_mask.to(x.dtype) if attention_mask is not None else x.new_ones(B, T)
        )  # (B, T)
        mask = None
        if attention_mask is not None:
            mask = attention_mask.bool()[:, None, None, :] | torch.eye(
                T, dtype=torch.bool, device=ids.device
            )  # (B, 1, T, T): padded keys unseen, every row keeps itself
        cos, sin = self.rotary.tables(0, T)
        for block in self.blocks:
            x = block(x, cos, sin, mask)
        h = self.norm(x)
        summary = _pool(h, weight, None)  # (B, 1, D)
        mus, logvars = [], []
        for span, head in zip(self.spans, self.heads):
            pooled = _pool(h, weight, span)  # (B, units, D)
            if span is not None:
                pooled = torch.cat([pooled, summary.expand_as(pooled)], dim=-1)
            mu, logvar = head(pooled).chunk(2, dim=-1)
            mus.append(mu)
            logvars.append(logvar.clamp(-10.0, 10.0))  # keeps exp() finite early in training
        return Posterior(mus, logvars)

    def sample_prior(
        self, n: int, length: int, device: torch.device, generator: torch.Generator | None
    ) -> Latents:
        return Latents(
            [
                torch.randn(n, _units(span, length), dim, generator=generator, device=device)
                for span, dim in zip(self.spans, self.dims)
            ]
        )


def token_drop_mask(ids: Tensor, rate: float) -> Tensor | None:
    """VAE word dropout (Bowman et al. 2016): which positions of ``ids`` (B, T) the decoder
    does not see in training, each music id (below the 774 of the vocabulary) after the first
    position (START) with probability ``rate``; None when ``rate`` is 0. The ids above them,
    fill-in-the-middle sentinels and anticipation controls (:mod:`aurl.data.vocab`), are
    never dropped: they lay out the window, and the latent does not carry them."""
    if rate <= 0.0:
        return None
    drop = (torch.rand(ids.shape, device=ids.device) < rate) & (ids < FIM_EOM)
    drop[:, 0] = False
    return drop


def hide_tokens(
    drop: Tensor, ids: Tensor, unk: int, features: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """The decoder's view of a window with ``drop`` (B, T) hidden: UNK for the id, and the
    previous position's musical-time / grammar ``features`` (B, T, D), the state *before* the
    token, since the state after it (its pitch sounding, its time step taken) would give the
    token away. The encoder, the targets and every other position keep the true ids and
    state; what the decoder cannot see of the token just played it must take from the
    latent, so a strong decoder can no longer ignore it."""
    seen = ids.masked_fill(drop, unk)
    if features is not None:
        before = torch.cat([features[:, :1], features[:, :-1]], dim=1)  # position 0 never drops
        features = torch.where(drop[..., None], before, features)
    return seen, features


class LatentConditioner(nn.Module):
    """Latents -> an embedding added to the decoder input at each position."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.spans = level_spans(config)
        self.proj = nn.ModuleList(nn.Linear(dim, config.d_model) for dim in level_dims(config))

    @torch.no_grad()
    def zero_init(self) -> None:
        """Zero projections (``model.latent_zero_init``): the decoder starts unconditioned.
        Under the default init a prior-scale z reaches the decoder's input at ~5x a token
        embedding's norm, noise that the decoder spends its first hundreds of steps learning
        to ignore (BENCHMARKS.md, "A VAE that encodes")."""
        for proj in self.proj:
            proj.weight.zero_()
            proj.bias.zero_()

    def forward(self, latents: Latents, start: int, length: int) -> Tensor:
        """Conditioning for positions ``start .. start+length-1`` -> (B, length, D). Positions
        past the last unit reuse the last unit (generation longer than the latents)."""
        out = None
        for z, span, proj in zip(latents.levels, self.spans, self.proj):
            e = proj(z)  # (B, units, D)
            if span is None:
                part = e  # (B, 1, D) broadcasts over positions
            else:
                unit = torch.arange(start, start + length, device=z.device) // span
                part = e[:, unit.clamp(max=z.shape[1] - 1)]  # (B, length, D)
            out = part if out is None else out + part
        assert out is not None
        return out.expand(-1, length, -1)
