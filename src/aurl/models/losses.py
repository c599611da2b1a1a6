"""The named losses of every mode, in one function returning a dict.

- ``ce``: next-token cross-entropy (optional label smoothing). With ``loss.grammar_masked`` and
  a grammar mask it is computed over the allowed ids only: the model is scored as it will be
  sampled, and never pays for probability it would put on impossible ids.
- ``grammar``: the probability mass the unmasked distribution gives to forbidden ids.
- ``kl`` (VAE modes): KL(q(z|x) || N(0, I)) with free bits (Kingma et al. 2016: each latent
  group's batch-mean KL counts at least ``free_bits`` nats, so the gradient leaves the groups
  below it alone and the posterior does not collapse), per token, weighted by ``kl_weight``
  ramped linearly over ``kl_anneal_steps`` (Bowman et al. 2016). A group (``loss.free_bits_per
  = "group"``, the default) is one unit's latent vector of one level: the floor then frees about
  ``free_bits * units / tokens`` nats per token (0.02 for ``small``), where a floor per
  dimension (``"dim"``) freed ``dim`` times as much (0.5 for ``small``: about the whole CE, so
  the latents could carry the sequence for free). ``kl_raw`` is the plain KL per token;
  ``kl_level0..`` the plain KL per token of each level (global, segment, fine);
  ``active_units`` the latent dimensions whose posterior mean varies over the batch (variance
  > 0.01, Burda et al. 2016), summed over levels.
- ``adv``, ``fm`` (``vae_gan``): the generator's adversarial loss on Gumbel samples of the
  decoder fed through the discriminator, and L1 feature matching on its pooled layer
  activations (Salimans et al. 2016). ``disc``: the discriminator's loss on real ids and
  detached fakes (:func:`discriminator_loss`). Fakes (``loss.gan_fakes``) are by default
  straight-through hard Gumbel samples (Jang et al. 2017): exact one-hots forward, like real
  ids, so the discriminator cannot win on softness alone, with the Gumbel-softmax gradient
  backward; ``soft`` keeps the relaxed samples (largest entry ~0.75 at tau 1). The objective
  (``loss.gan_loss``): ``hinge`` (D: relu(1 - D(real)) + relu(1 + D(fake)), G: -D(fake)) or
  ``non_saturating`` (Goodfellow et al. 2014; D: softplus(-D(real)) + softplus(D(fake)),
  G: softplus(-D(fake)) = -log sigmoid(D(fake))), each a mean over windows and scales. The generator terms are computed with the
  discriminator's weights frozen, so ``total`` never puts gradients into the discriminator and
  ``disc`` never into the generator. The trainer alternates: a discriminator step on
  :func:`discriminator_loss` of :func:`soft_fakes` drawn without gradient, then a generator
  step on ``compute_losses(..., disc=False)`` through the updated discriminator.
- ``total``: the weighted sum; with ``loss.auto_balance`` the learned uncertainty weighting of
  Kendall et al. 2018 (``exp(-s_i) * w_i * L_i + s_i``, ``s_i`` the model's ``loss_log_vars``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aurl.config import LossConfig
from aurl.data.vocab import FIM_EOM, PAD
from aurl.models.model import MusicTransformerVAEGAN

GUMBEL_TAU = 1.0


@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Parameters of ``module`` need no gradient inside the block (restored after)."""
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)


def kl_weight_at(step: int, loss_config: LossConfig) -> float:
    """beta ramped linearly from 0 over ``kl_anneal_steps`` (constant beta when 0)."""
    n = loss_config.kl_anneal_steps
    return loss_config.kl_weight * (1.0 if n == 0 else min(1.0, step / n))


def kl_free_bits(kl_per_element: list[Tensor], free_bits: float, tokens: int) -> Tensor:
    """Sum over levels, units and dims of max(free_bits, batch-mean KL), per token."""
    total = sum(k.mean(dim=0).clamp(min=free_bits).sum() for k in kl_per_element)
    return total / max(tokens, 1)


def kl_free_bits_grouped(kl_per_element: list[Tensor], free_bits: float, tokens: int) -> Tensor:
    """Sum over levels and units of max(free_bits, batch-mean KL of the unit's whole latent
    vector), per token. ``kl_per_element``: per level (B, units, dim)."""
    total = sum(k.sum(dim=-1).mean(dim=0).clamp(min=free_bits).sum() for k in kl_per_element)
    return total / max(tokens, 1)


def active_units(mu: list[Tensor], threshold: float = 0.01) -> Tensor:
    """Latent dimensions whose posterior mean varies over the data (Burda et al. 2016):
    ``sum over levels and dims of [Var_x E[z_d | x] > threshold]``, the variance taken over
    the batch and the level's units (B * units samples; 0 with fewer than 2)."""
    count = mu[0].new_zeros(())
    for m in mu:
        flat = m.detach().reshape(-1, m.shape[-1])  # (B * units, dim)
        if flat.shape[0] >= 2:
            count = count + (flat.float().var(dim=0) > threshold).sum()
    return count


def masked_cross_entropy(
    logits: Tensor, targets: Tensor, allowed: Tensor | None, smoothing: float
) -> Tensor:
    """Per-position CE (B, T) over the ``allowed`` ids (all when None), label-smoothed
    uniformly over the same ids. The target always counts as allowed, so a sequence the
    grammar would reject still gives a finite loss."""
    if allowed is not None:
        allowed = allowed.scatter(-1, targets[..., None], True)
        logits = logits.masked_fill(~allowed, float("-inf"))
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    nll = -logp.gather(-1, targets[..., None]).squeeze(-1)
    if smoothing == 0.0:
        return nll
    if allowed is None:
        smooth = -logp.mean(dim=-1)
    else:
        smooth = -logp.masked_fill(~allowed, 0.0).sum(-1) / allowed.sum(-1)
    return (1.0 - smoothing) * nll + smoothing * smooth


def _mean(x: Tensor, valid: Tensor) -> Tensor:
    return (x * valid).sum() / valid.sum().clamp_min(1)


def compute_losses(
    model: MusicTransformerVAEGAN,
    batch: Tensor | dict[str, Tensor],
    loss_config: LossConfig,
    *,
    step: int,
    allowed: Tensor | None = None,
    disc: bool = True,
) -> dict[str, Tensor]:
    """All named losses for one batch.

    Args:
        model: the model, in any mode.
        batch: ids (B, T), or a dict with ``ids`` and optionally ``attention_mask`` (B, T)
            (1 for real tokens). PAD targets never count.
        loss_config: weights and schedules.
        step: the optimizer step (for the KL schedule).
        allowed: (B, T, V) bool grammar mask, row t = ids allowed after ``ids[:, :t+1]``;
            (B, T, V + 1) for FIM windows (``batch["fim"]``: :func:`aurl.data.fim.fim_allowed`,
            whose last column is EOM).
        disc: also compute the discriminator's loss (vae_gan); without it the discriminator
            runs only frozen, for the generator's terms.

    Returns:
        ``total`` (generator objective), ``ce``, ``grammar``, ``kl``, ``kl_raw``, ``adv``,
        ``fm``, ``disc`` (0 where the mode has no such part), ``kl_weight``; in VAE modes also
        ``kl_level0..`` and ``active_units`` (detached: for the log).
    """
    context = {}  # where the windows start in their pieces, and the pieces' meters
    if isinstance(batch, dict):
        ids, attention_mask = batch["ids"], batch.get("attention_mask")
        keys = ("start", "meter", "style", "fim", "pack")  # pack: data.pack's Packing plan
        context = {k: batch[k] for k in keys if batch.get(k) is not None}
    else:
        ids, attention_mask = batch, None
    out = model(ids, attention_mask=attention_mask, **context)
    logits, targets = out.logits[:, :-1], ids[:, 1:]  # position t predicts token t+1
    if "fim" in context:  # FIM windows (aurl.data.fim): EOM is a target, placed sentinels not
        if _core(model).fim is not None:
            logits = _core(model).eom_logits(out.logits, out.hidden)[:, :-1]  # (B, T-1, V+1)
        elif allowed is not None:  # anticipated windows (aurl.data.anticipation): no EOM
            allowed = allowed[..., : logits.shape[-1]]
        targets = targets.masked_fill(targets > FIM_EOM, PAD)  # controls are never targets
    valid = targets != PAD
    if attention_mask is not None:
        valid = valid & attention_mask[:, 1:].bool()
    valid = valid.float()
    allow = allowed[:, :-1] if allowed is not None else None
    zero = logits.new_zeros(())

    ce_mask = allow if loss_config.grammar_masked else None
    ce = _mean(masked_cross_entropy(logits, targets, ce_mask, loss_config.label_smoothing), valid)
    grammar = zero
    if allow is not None:
        forbidden = F.softmax(logits.float(), dim=-1).masked_fill(allow, 0.0).sum(-1)
        grammar = _mean(forbidden, valid)

    kl = kl_raw = zero
    vae_log: dict[str, Tensor] = {}
    if out.posterior is not None:
        per_elem = out.posterior.kl()
        tokens = ids.shape[1]
        kl_raw = sum(k.sum() for k in per_elem) / (ids.shape[0] * tokens)
        floor = kl_free_bits_grouped if loss_config.free_bits_per == "group" else kl_free_bits
        kl = floor(per_elem, loss_config.free_bits, tokens)
        for i, k in enumerate(per_elem):
            vae_log[f"kl_level{i}"] = k.detach().sum() / (ids.shape[0] * tokens)
        vae_log["active_units"] = active_units(out.posterior.mu)

    adv = fm = disc_loss = zero
    if model.discriminator is not None:
        adv, fm, disc_loss = _gan_losses(
            model, ids, out.logits, allowed, disc=disc, hard=loss_config.gan_fakes == "hard",
            kind=loss_config.gan_loss,
        )  # fmt: skip

    beta = kl_weight_at(step, loss_config)
    weighted = {
        "ce": (1.0, ce),
        "kl": (beta, kl),
        "adv": (loss_config.adv_weight, adv),
        "fm": (loss_config.feature_matching_weight, fm),
        "grammar": (loss_config.grammar_weight, grammar),
    }
    total = zero
    log_vars = model.loss_log_vars
    for i, name in enumerate(model.LOSS_TERMS):
        w, value = weighted[name]
        if w == 0.0 or (name != "ce" and value is zero):
            continue
        if log_vars is not None:
            total = total + torch.exp(-log_vars[i]) * w * value + log_vars[i]
        else:
            total = total + w * value
    return {
        "total": total,
        "ce": ce,
        "grammar": grammar,
        "kl": kl,
        "kl_raw": kl_raw,
        "adv": adv,
        "fm": fm,
        "disc": disc_loss,
        "kl_weight": torch.tensor(beta),
        **vae_log,
    }


def _core(model: nn.Module) -> MusicTransformerVAEGAN:
    """The model inside a DDP / compile wrapper."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def soft_fakes(
    ids: Tensor, logits: Tensor, allowed: Tensor | None = None, *, hard: bool = True
) -> Tensor:
    """Generated sequences as one-hots (B, T, V), aligned with ``ids`` (B, T): position 0 is
    the real first token, position t + 1 a Gumbel sample of the decoder's distribution at t
    (``logits`` (B, T, V); grammar-masked where ``allowed`` is given).

    ``hard``: straight-through: the forward value is the exact one-hot of the sampled id (every
    entry exactly 0.0 or 1.0), the gradient that of the Gumbel-softmax relaxation. Otherwise
    the relaxed sample itself."""
    gen_logits = logits[:, :-1]
    if allowed is not None:  # fakes drawn from the grammar-masked distribution
        gen_logits = gen_logits.masked_fill(~allowed[:, :-1], float("-inf"))
    # hard: one_hot - soft.detach() + soft, whose forward value is the exact one-hot
    soft = F.gumbel_softmax(gen_logits.float(), tau=GUMBEL_TAU, hard=hard, dim=-1)  # (B,T-1,V)
    first = F.one_hot(ids[:, :1], soft.shape[-1]).to(soft.dtype)  # the prompt token is real
    return torch.cat([first, soft], dim=1)  # (B, T, V)


def discriminator_objective(
    real_scores: list[Tensor], fake_scores: list[Tensor], kind: str = "hinge"
) -> Tensor:
    """The discriminator's loss, mean over scales (each score tensor (B, windows)).

    hinge: ``mean relu(1 - D(real)) + mean relu(1 + D(fake))``; non_saturating: ``mean
    softplus(-D(real)) + mean softplus(D(fake))`` (= -log sigmoid(D(real)) - log(1 -
    sigmoid(D(fake)))).
    """
    if kind == "hinge":
        terms = [F.relu(1.0 - r).mean() + F.relu(1.0 + f).mean() for r, f in zip(real_scores, fake_scores)]  # fmt: skip
    elif kind == "non_saturating":
        terms = [F.softplus(-r).mean() + F.softplus(f).mean() for r, f in zip(real_scores, fake_scores)]  # fmt: skip
    else:
        raise ValueError(f"loss.gan_loss must be 'hinge' or 'non_saturating', not {kind!r}")
    return torch.stack(terms).mean()


def generator_objective(fake_scores: list[Tensor], kind: str = "hinge") -> Tensor:
    """The generator's adversarial loss, mean over scales: hinge ``-mean D(fake)``;
    non_saturating ``mean softplus(-D(fake))`` (= -log sigmoid(D(fake)), whose gradient does
    not vanish while the discriminator rejects the fakes)."""
    if kind == "hinge":
        return -torch.stack([s.mean() for s in fake_scores]).mean()
    if kind == "non_saturating":
        return torch.stack([F.softplus(-s).mean() for s in fake_scores]).mean()
    raise ValueError(f"loss.gan_loss must be 'hinge' or 'non_saturating', not {kind!r}")


def discriminator_loss(
    model: MusicTransformerVAEGAN, ids: Tensor, fake: Tensor, kind: str = "hinge"
) -> Tensor:
    """The discriminator's loss (:func:`discriminator_objective`) on real ``ids`` (B, T) and
    ``fake`` one-hots (B, T, V), detached here: its gradient reaches the discriminator only.

    Real and fake go through the discriminator together, as one batch of one-hots, so that in
    training mode its spectral norms make one power iteration per call, not one per half."""
    B = ids.shape[0]
    real = F.one_hot(ids, fake.shape[-1]).to(fake.dtype)  # (B, T, V)
    scores, _ = model.discriminate(torch.cat([real, fake.detach()]))  # each (2B, windows)
    return discriminator_objective([s[:B] for s in scores], [s[B:] for s in scores], kind)


def _gan_losses(
    model: MusicTransformerVAEGAN, ids: Tensor, logits: Tensor, allowed: Tensor | None, *,
    disc: bool = True, hard: bool = True, kind: str = "hinge",
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(generator adversarial loss, feature matching, discriminator loss or 0 without
    ``disc``)."""
    fake = soft_fakes(ids, logits, allowed, hard=hard)
    if disc:  # the real scores serve the discriminator's loss too
        real_scores, real_feats = model.discriminate(ids)
    else:
        with _frozen(model.discriminator):
            real_scores, real_feats = model.discriminate(ids)
    with _frozen(model.discriminator):
        fake_scores, fake_feats = model.discriminate(fake)
    adv = generator_objective(fake_scores, kind)
    fm = torch.stack(
        [(f.mean(0) - r.detach().mean(0)).abs().mean() for f, r in zip(fake_feats, real_feats)]
    ).mean()
    if not disc:
        return adv, fm, adv.new_zeros(())
    fake_now = model.discriminate(fake.detach())[0]
    return adv, fm, discriminator_objective(real_scores, fake_now, kind)
