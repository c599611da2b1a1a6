"""Named losses: masked CE by hand, grammar mass, KL >= 0 and free bits, the GAN split."""

from __future__ import annotations

import math

import torch

from aurl.config import LossConfig
from aurl.models.losses import compute_losses, kl_free_bits, kl_weight_at, masked_cross_entropy
from aurl.models.vae import Posterior


def test_masked_cross_entropy_by_hand():
    logits = torch.tensor([[[0.0, 1.0, 2.0, 3.0]]])
    target = torch.tensor([[1]])
    allowed = torch.tensor([[[True, False, True, False]]])  # target forced allowed: {0, 1, 2}
    got = masked_cross_entropy(logits, target, allowed, 0.0)
    expected = -(1.0 - math.log(math.exp(0) + math.exp(1) + math.exp(2)))
    assert abs(got.item() - expected) < 1e-6
    unmasked = masked_cross_entropy(logits, target, None, 0.0)
    assert abs(unmasked.item() - (-(1.0 - math.log(sum(math.exp(i) for i in range(4)))))) < 1e-6
    # smoothing 0.5: half the nll, half the mean -log p over the three allowed ids
    logp = [i - math.log(math.exp(0) + math.exp(1) + math.exp(2)) for i in range(3)]
    smooth = masked_cross_entropy(logits, target, allowed, 0.5).item()
    assert abs(smooth - (0.5 * -logp[1] + 0.5 * -sum(logp) / 3)) < 1e-6


def test_grammar_loss_is_forbidden_probability_mass(make_model, ids):
    model = make_model().eval()
    allowed = torch.zeros(3, 40, 774, dtype=torch.bool)
    allowed[..., :100] = True
    losses = compute_losses(model, ids, LossConfig(grammar_weight=1.0), step=0, allowed=allowed)
    p = torch.softmax(model(ids).logits[:, :-1], -1)
    assert torch.allclose(losses["grammar"], p[..., 100:].sum(-1).mean(), atol=1e-6)
    everything = torch.ones_like(allowed)
    none_forbidden = compute_losses(model, ids, LossConfig(), step=0, allowed=everything)
    assert none_forbidden["grammar"].item() == 0.0
    # all ids allowed: the masked CE is the plain CE
    plain = compute_losses(model, ids, LossConfig(), step=0)
    assert torch.allclose(none_forbidden["ce"], plain["ce"])
    assert losses["ce"] < plain["ce"]  # scoring over 100 ids (+ target) only


def test_pad_targets_do_not_count(make_model, ids):
    model = make_model().eval()
    padded = torch.cat([ids, torch.full((3, 10), 2)], dim=1)
    a = compute_losses(model, ids, LossConfig(), step=0)["ce"]
    b = compute_losses(model, padded, LossConfig(), step=0)["ce"]
    assert torch.allclose(a, b, atol=1e-6)


def test_kl_nonnegative_and_free_bits_honoured():
    g = torch.Generator().manual_seed(0)
    mu = [torch.randn(4, 1, 8, generator=g), torch.randn(4, 3, 8, generator=g)]
    logvar = [torch.randn(4, 1, 8, generator=g), torch.randn(4, 3, 8, generator=g)]
    post = Posterior(mu, logvar)
    assert all((k >= 0).all() for k in post.kl())
    # at the prior the KL is 0, and free bits charge exactly free_bits per latent dimension
    prior = Posterior([torch.zeros(4, 1, 8, requires_grad=True)], [torch.zeros(4, 1, 8)])
    assert prior.kl()[0].abs().max() == 0
    fb = kl_free_bits(prior.kl(), 0.25, tokens=2)
    assert abs(fb.item() - 0.25 * 8 / 2) < 1e-6
    fb.backward()  # below the floor: no gradient pushes the posterior further to the prior
    assert prior.mu[0].grad.abs().max() == 0
    assert kl_weight_at(0, LossConfig(kl_anneal_steps=100)) == 0.0
    assert kl_weight_at(50, LossConfig(kl_anneal_steps=100, kl_weight=0.5)) == 0.25
    assert kl_weight_at(500, LossConfig(kl_anneal_steps=100, kl_weight=0.5)) == 0.5


def test_vae_losses_and_gan_split(make_model, ids):
    model = make_model(mode="vae_gan")
    model.train()
    losses = compute_losses(model, ids, LossConfig(), step=5)
    assert losses["kl_raw"] >= 0 and losses["kl"] >= losses["kl_raw"] - 1e-6
    # total (generator) never reaches the discriminator; disc never reaches the generator
    losses["total"].backward(retain_graph=True)
    assert all(p.grad is None for p in model.discriminator.parameters())
    model.zero_grad()
    losses["disc"].backward()
    assert all(p.grad is None for p in model.generator_parameters())
    assert any(p.grad is not None for p in model.discriminator.parameters())


def test_auto_balance_uses_learned_log_variances(make_model, ids):
    from aurl.config import VocabConfig
    from aurl.models import MusicTransformerVAEGAN

    torch.manual_seed(0)
    base = make_model()
    model = MusicTransformerVAEGAN(base.config, VocabConfig(), auto_balance=True).eval()
    with torch.no_grad():
        model.loss_log_vars[0] = math.log(2.0)
    losses = compute_losses(model, ids, LossConfig(), step=0)
    assert torch.allclose(losses["total"], losses["ce"] / 2 + math.log(2.0))


def test_grammar_masked_losses_on_a_real_chorale(make_model, chorale):
    from aurl.data.grammar import Grammar
    from aurl.data.vocab import Vocab

    model = make_model().eval()
    allowed = Grammar(Vocab()).sequence_masks(chorale)  # (1, T, V)
    targets_allowed = allowed[0, :-1].gather(1, chorale[0, 1:, None])
    assert bool(targets_allowed.all())  # the tokenizer's output obeys the grammar
    masked = compute_losses(model, chorale, LossConfig(), step=0, allowed=allowed)
    plain = compute_losses(
        model, chorale, LossConfig(grammar_masked=False), step=0, allowed=allowed
    )
    logits, allow, target = model(chorale).logits[0, :-1], allowed[0, :-1], chorale[0, 1:]
    lse = torch.logsumexp(logits.masked_fill(~allow, float("-inf")), dim=-1)
    manual = (lse - logits.gather(1, target[:, None])[:, 0]).mean()
    torch.testing.assert_close(masked["ce"], manual)
    assert masked["ce"] < plain["ce"]
    assert 0.0 < masked["grammar"] < 1.0


def test_a_few_steps_of_training_lower_the_loss(make_model, chorale):
    torch.manual_seed(0)
    model = make_model(mode="vae")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    window = chorale[:, :128]
    first = None
    for step in range(40):
        losses = compute_losses(model, window, LossConfig(kl_anneal_steps=40), step=step)
        opt.zero_grad()
        losses["total"].backward()
        opt.step()
        first = first if first is not None else losses["ce"].item()
    assert losses["ce"].item() < first - 2.0  # from about ln(774) = 6.65 nats


def test_hard_fakes_are_exact_one_hots_with_a_soft_gradient(make_model, chorale):
    from aurl.data.grammar import Grammar
    from aurl.data.vocab import Vocab
    from aurl.models.losses import soft_fakes

    model = make_model().eval()
    ids = chorale[:, :64]
    allowed = Grammar(Vocab()).sequence_masks(ids)
    logits = model(ids).logits.detach().requires_grad_(True)
    torch.manual_seed(0)
    fake = soft_fakes(ids, logits, allowed)
    # every row one exact 1.0, the rest exact zeros, as in a real one-hot
    assert bool((fake.max(-1).values == 1.0).all())
    assert bool(((fake == 0.0) | (fake == 1.0)).all())
    assert bool((fake.sum(-1) == 1.0).all())
    # the sampled ids obey the grammar
    picked = fake[:, 1:].argmax(-1)
    assert bool(allowed[:, :-1].gather(-1, picked[..., None]).all())
    # the Gumbel-softmax gradient reaches the logits
    weights = torch.randn(fake.shape, generator=torch.Generator().manual_seed(1))
    (fake * weights).sum().backward()
    assert logits.grad is not None and logits.grad[:, :-1].abs().sum() > 0
    # the relaxed samples are what the old default fed the discriminator: soft, max < 1
    torch.manual_seed(0)
    relaxed = soft_fakes(ids, logits.detach(), allowed, hard=False)
    assert relaxed[:, 1:].max(-1).values.mean() < 0.99
    assert bool((relaxed[:, 1:].argmax(-1) == picked).all())  # same draw, hardened


def test_non_saturating_and_hinge_by_hand():
    from aurl.models.losses import discriminator_objective, generator_objective

    real = [torch.tensor([[0.0, 2.0]]), torch.tensor([[-1.0]])]
    fake = [torch.tensor([[-1.0, 1.0]]), torch.tensor([[0.5]])]

    def sp(x):  # softplus
        return math.log1p(math.exp(x))

    d_ns = ((sp(0.0) + sp(-2.0)) / 2 + (sp(-1.0) + sp(1.0)) / 2 + sp(1.0) + sp(0.5)) / 2
    g_ns = ((sp(1.0) + sp(-1.0)) / 2 + sp(-0.5)) / 2
    d_hinge = ((1.0 + 0.0) / 2 + (0.0 + 2.0) / 2 + 2.0 + 1.5) / 2
    g_hinge = -((-1.0 + 1.0) / 2 + 0.5) / 2
    assert abs(discriminator_objective(real, fake, "non_saturating").item() - d_ns) < 1e-6
    assert abs(generator_objective(fake, "non_saturating").item() - g_ns) < 1e-6
    assert abs(discriminator_objective(real, fake, "hinge").item() - d_hinge) < 1e-6
    assert abs(generator_objective(fake, "hinge").item() - g_hinge) < 1e-6


def test_non_saturating_losses_in_compute_losses(make_model, ids):
    from aurl.models.losses import soft_fakes

    model = make_model(mode="vae_gan").eval()  # posterior mean: the fakes are the only draw
    config = LossConfig(gan_loss="non_saturating")
    torch.manual_seed(3)
    losses = compute_losses(model, ids, config, step=0)
    torch.manual_seed(3)
    fake = soft_fakes(ids, model(ids).logits)
    fake_scores, _ = model.discriminate(fake)
    real_scores, _ = model.discriminate(ids)
    adv = sum(torch.nn.functional.softplus(-s).mean() for s in fake_scores) / len(fake_scores)
    disc = sum(
        torch.nn.functional.softplus(-r).mean() + torch.nn.functional.softplus(f).mean()
        for r, f in zip(real_scores, fake_scores)
    ) / len(real_scores)
    torch.testing.assert_close(losses["adv"], adv)
    torch.testing.assert_close(losses["disc"], disc)
    # the generator's gradient flows through the hard fakes into the decoder
    model.zero_grad()
    losses["adv"].backward()
    assert model.embed.weight.grad is not None and model.embed.weight.grad.abs().sum() > 0
