"""Does the VAE's latent carry the piece? Reconstruction and interpolation, as likelihoods.

A VAE whose KL is spent encodes something; whether that something is *the piece* is measured
here without sampling noise, by teacher-forced likelihood of a held-out piece ``x_i`` (its first
``length`` tokens, so every piece's latents have the same units) under three conditionings:

- ``own``: the posterior mean of ``x_i`` itself (reconstruction);
- ``other``: the posterior mean of another held-out piece (``x_{i+1}``, cyclically);
- ``prior``: draws from the prior N(0, I) (``prior_draws`` of them, bits averaged).

A latent that encodes the piece gives ``own`` clearly fewer bits per note than ``other`` and
``prior``; a collapsed posterior gives the three the same number. Bits per note here is the
grammar-masked NLL in bits / notes, as in :mod:`aurl.evaluation.likelihood`.

Interpolation: on the spherical path ``z_t`` from ``A``'s latent to ``B``'s (``steps`` points),
the bits of ``A`` given ``z_t`` should rise and the bits of ``B`` fall as ``t`` goes from 0 to 1.
:func:`interpolation_curves` returns both curves, the largest step against the expected
direction (``0`` for a perfectly monotone path) and the path's *noise*: the spread (standard
deviation) of an end's bits when its latent is redrawn from its own posterior q(z | x) instead of
taken at the mean. Two latents that close are the same piece to the model, so a difference
smaller than that is not a direction: :meth:`Interpolation.monotone` calls a path monotone
when both ends move by more than the tolerance (``2 * noise``, at least 0.01 bits per note) and
no step goes back by more than it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from aurl.evaluation.likelihood import score_sequences


class _Conditioned(nn.Module):
    """``model`` with fixed latents: ``forward(ids)`` decodes ``ids`` given ``latents``."""

    def __init__(self, model: nn.Module, latents: Any) -> None:
        super().__init__()
        self.model, self.latents = model, latents
        self.vocab = getattr(model, "vocab", None)
        self.config = getattr(model, "config", None)

    def forward(self, ids: torch.Tensor, **kw: Any) -> Any:
        return self.model(ids, latents=self.latents, **kw)


@dataclass(frozen=True)
class Reconstruction:
    """Mean bits per note of held-out pieces under each conditioning (see module docstring)."""

    own: float
    other: float
    prior: float
    pieces: int
    length: int
    own_better_than_other: int  # pieces whose own latent beats the other piece's
    own_better_than_prior: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _bits(model: nn.Module, ids: np.ndarray, latents: Any, grammar: Any, meter: Any) -> float:
    meters = None if meter is None else [meter]
    result = score_sequences(
        _Conditioned(model, latents), [ids], window=len(ids), batch_size=1, grammar=grammar,
        vocab=getattr(model, "vocab", None), meters=meters,
    )  # fmt: skip
    return result.bits_per_note


@torch.no_grad()
def encode_mean(model: Any, ids: np.ndarray) -> Any:
    """Posterior-mean latents of one id array (1 row)."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        return model.encode(torch.as_tensor(ids, dtype=torch.long, device=device)[None]).mean()
    finally:
        model.train(was)


def reconstruction(
    model: Any,
    sequences: Sequence[np.ndarray],
    *,
    length: int = 512,
    grammar: Any = None,
    meters: Sequence[Any] | None = None,
    prior_draws: int = 4,
    seed: int = 0,
) -> Reconstruction:
    """Bits per note of each piece's first ``length`` tokens given its own latent, another
    piece's, and prior draws.

    Args:
        model: A ``vae`` / ``vae_gan`` model (``encode``, ``sample_prior``, ``forward(latents=)``).
        sequences: Held-out id arrays (START ...); pieces shorter than ``length`` are skipped.
        length: Tokens per piece (the latents of all pieces then have the same units).
        grammar: Optional grammar for the masked distribution (how the sampler draws).
        meters: Each sequence's time signature, for a model with meter conditioning.
        prior_draws: Prior samples per piece (bits averaged over them).
        seed: Seed of the prior draws.

    Raises:
        ValueError: Fewer than two pieces have ``length`` tokens.
    """
    keep = [i for i, s in enumerate(sequences) if len(s) >= length]
    if len(keep) < 2:
        raise ValueError(
            f"need at least two pieces of >= {length} tokens, got {len(keep)}: lower the length"
        )
    ids = [np.asarray(sequences[i][:length], dtype=np.int64) for i in keep]
    mtr = [None if meters is None else meters[i] for i in keep]
    z = [encode_mean(model, x) for x in ids]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    own, other, prior = [], [], []
    for k, x in enumerate(ids):
        own.append(_bits(model, x, z[k], grammar, mtr[k]))
        other.append(_bits(model, x, z[(k + 1) % len(ids)], grammar, mtr[k]))
        draws = [
            model.sample_prior(1, length=length, generator=gen).to(z[k].levels[0].device)
            for _ in range(prior_draws)
        ]
        prior.append(float(np.mean([_bits(model, x, d, grammar, mtr[k]) for d in draws])))
    own_a, other_a, prior_a = np.array(own), np.array(other), np.array(prior)
    return Reconstruction(
        own=float(own_a.mean()), other=float(other_a.mean()), prior=float(prior_a.mean()),
        pieces=len(ids), length=length,
        own_better_than_other=int((own_a < other_a).sum()),
        own_better_than_prior=int((own_a < prior_a).sum()),
    )  # fmt: skip


@dataclass(frozen=True)
class Interpolation:
    """Bits per note of the two ends along the path from ``a``'s latent to ``b``'s."""

    t: list[float]
    bits_a: list[float]  # should rise with t
    bits_b: list[float]  # should fall with t
    worst_step_against: float  # largest step in the wrong direction, in bits per note
    # spread (sd) of an end's bits over draws from its own posterior (0: not measured)
    noise: float = 0.0

    @property
    def change(self) -> float:
        """The smaller of the two ends' total moves, in the expected direction."""
        return min(self.bits_a[-1] - self.bits_a[0], self.bits_b[0] - self.bits_b[-1])

    @property
    def tolerance(self) -> float:
        """Twice the noise, at least 0.01 bits per note."""
        return max(0.01, 2.0 * self.noise)

    def monotone(self) -> bool:
        """Both ends move by more than the tolerance, and no step goes back by more than it."""
        return self.change > self.tolerance and self.worst_step_against <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self), "change": self.change, "tolerance": self.tolerance,
            "monotone": self.monotone(),
        }  # fmt: skip


@torch.no_grad()
def posterior_noise(
    model: Any, ids: np.ndarray, *, draws: int, grammar: Any = None, meter: Any = None,
    seed: int = 0,
) -> float:  # fmt: skip
    """Standard deviation of the bits per note of ``ids`` given ``draws`` latents drawn from
    its own posterior q(z | ids) (0 for fewer than two draws)."""
    if draws < 2:
        return 0.0
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        post = model.encode(torch.as_tensor(ids, dtype=torch.long, device=device)[None])
    finally:
        model.train(was)
    gen = torch.Generator(device=device).manual_seed(seed)
    bits = [_bits(model, ids, post.sample(gen), grammar, meter) for _ in range(draws)]
    return float(np.std(bits, ddof=1))


def interpolation_curves(
    model: Any,
    a: np.ndarray,
    b: np.ndarray,
    *,
    steps: int = 5,
    grammar: Any = None,
    meter: Any = None,
    noise_draws: int = 0,
    seed: int = 0,
) -> Interpolation:
    """The ends' bits per note along the spherical path between the two pieces' latents
    (``a`` and ``b`` are cut to the shorter one's length so their latents match).
    ``noise_draws``: posterior draws per end for the path's noise (0: not measured)."""
    n = min(len(a), len(b))
    a, b = np.asarray(a[:n], np.int64), np.asarray(b[:n], np.int64)
    za, zb = encode_mean(model, a), encode_mean(model, b)
    path = model.interpolate(za, zb, steps)
    ts = [float(t) for t in np.linspace(0.0, 1.0, steps)]
    bits_a = [_bits(model, a, z, grammar, meter) for z in path]
    bits_b = [_bits(model, b, z, grammar, meter) for z in path]
    against = [0.0]
    for k in range(1, steps):
        against.append(bits_a[k - 1] - bits_a[k])  # a falling is against
        against.append(bits_b[k] - bits_b[k - 1])  # b rising is against
    noise = float(np.mean([
        posterior_noise(model, x, draws=noise_draws, grammar=grammar, meter=meter, seed=seed)
        for x in (a, b)
    ]))  # fmt: skip
    return Interpolation(ts, bits_a, bits_b, max(0.0, max(against)), noise)
