"""What lets the VAE's latent carry the piece: word dropout (``model.decoder_token_dropout``:
the decoder reads UNK and the state before the token where the encoder, the targets and the
other positions read the true ids; only in training) and a zero-initialized latent projection
(``model.latent_zero_init``); both off by default and absent from config.json when off."""

from __future__ import annotations

import torch

from aurl.config import ModelConfig
from aurl.data.vocab import UNK
from aurl.models.pretrained import model_config_dict
from aurl.models.vae import hide_tokens, token_drop_mask


def test_drop_mask_takes_the_share_asked_and_keeps_start(chorale):
    ids = chorale.repeat(8, 1)  # (8, 364) real ids
    torch.manual_seed(0)
    drop = token_drop_mask(ids, 0.3)
    assert not drop[:, 0].any()  # START stays
    share = drop[:, 1:].float().mean().item()  # 2,904 Bernoulli(0.3) draws: sd 0.0085
    assert abs(share - 0.3) < 0.03
    assert token_drop_mask(ids, 0.0) is None


def test_drop_mask_drops_music_ids_only_in_a_fim_and_anticipation_batch(chorale):
    """FIM sentinels (SUF PRE MID EOM) and anticipation controls lay out the window: at rate 1
    every music id after position 0 is dropped, no id above the 774 music ids is."""
    import numpy as np

    from aurl.data.anticipation import control_ids
    from aurl.data.fim import collate_fim, fim_window, plain_window, step_boundaries
    from aurl.data.vocab import FIM_EOM, Vocab

    vocab, ids = Vocab(), chorale[0, :120].numpy()
    cuts = step_boundaries(ids, vocab)
    windows = [fim_window(ids, int(cuts[3]), int(cuts[9]), vocab), plain_window(ids)]
    T = max(len(w.ids) for w in windows)
    batch = torch.full((2, T), 2, dtype=torch.long)  # PAD
    for b, w in enumerate(windows):
        batch[b, : len(w.ids)] = torch.from_numpy(w.ids)
    assert collate_fim(windows)["fim_middle"].any()  # a real FIM window beside a plain one
    controls = torch.from_numpy(control_ids(np.array([60, 67, 72]), vocab))
    batch[1, 5:8] = controls  # anticipated melody notes inside the window
    above = batch >= FIM_EOM
    assert above[0].sum() == 4 and above[1].sum() == 3
    drop = token_drop_mask(batch, 1.0)
    assert not drop[above].any()
    below = ~above
    below[:, 0] = False
    assert drop[below].all()


def test_hidden_position_sees_unk_and_the_state_before_its_token():
    ids = torch.tensor([[0, 10, 11, 12, 13]])
    features = torch.arange(5.0)[None, :, None].expand(1, 5, 2)  # position t carries t
    drop = torch.tensor([[False, True, True, False, True]])
    seen, hidden = hide_tokens(drop, ids, 3, features)
    assert seen.tolist() == [[0, 3, 3, 12, 3]]
    assert hidden[0, :, 0].tolist() == [0.0, 0.0, 1.0, 3.0, 3.0]  # the previous position's


def _embedded_ids(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """The id tensors the shared embedding table is called with during one forward."""
    seen: list[torch.Tensor] = []
    hook = model.embed.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    try:
        model(ids)
    finally:
        hook.remove()
    return seen


def test_decoder_reads_unk_the_encoder_the_true_ids(make_model, chorale):
    ids = chorale[:, :128]
    model = make_model(mode="vae", decoder_token_dropout=1.0).train()
    encoder_ids, decoder_ids = _embedded_ids(model, ids)
    assert torch.equal(encoder_ids, ids)
    assert decoder_ids[0, 0] == ids[0, 0] and (decoder_ids[0, 1:] == UNK).all()
    # evaluation, scoring and generation decode the true ids
    encoder_ids, decoder_ids = _embedded_ids(model.eval(), ids)
    assert torch.equal(decoder_ids, ids)


def test_off_by_default_and_not_written_when_off():
    assert ModelConfig().decoder_token_dropout == 0.0
    assert "decoder_token_dropout" not in model_config_dict(ModelConfig(mode="vae"))
    on = model_config_dict(ModelConfig(mode="vae", decoder_token_dropout=0.25))
    assert on["decoder_token_dropout"] == 0.25


def test_forward_hides_each_dropped_tokens_own_state(make_model, chorale):
    ids = chorale[:, :96]
    model = make_model(mode="vae", decoder_token_dropout=1.0, dropout=0.0).train()
    inputs: list[torch.Tensor] = []
    hook = model.drop.register_forward_hook(lambda _m, args, _out: inputs.append(args[0]))
    try:
        out = model(ids)
    finally:
        hook.remove()
    with torch.no_grad():
        state = model.time(ids)[0] + model.grammar_features(ids)[0]  # after each true token
        cond = model.conditioner(out.latents, 0, ids.shape[1])
        expected = model.embed(torch.full_like(ids, UNK)) + cond
        expected[:, 0] = model.embed(ids[:, :1])[:, 0] + cond[:, 0] + state[:, 0]
        expected[:, 1:] += state[:, :-1]  # each hidden position: the state before its token
    torch.testing.assert_close(inputs[0], expected)


def test_latent_zero_init_starts_the_decoder_unconditioned(make_model, chorale):
    ids = chorale[:, :64]
    plain, zero = make_model(mode="vae"), make_model(mode="vae", latent_zero_init=True)
    for (name, a), (_, b) in zip(plain.named_parameters(), zero.named_parameters()):
        if name.startswith("conditioner."):
            assert not b.any(), name
        else:  # the same draws: every other weight as before
            assert torch.equal(a, b), name
    with torch.no_grad():  # any latent decodes the same: the transformer it starts as
        gen = torch.Generator().manual_seed(0)
        z1, z2 = (zero.sample_prior(1, length=64, generator=gen) for _ in range(2))
        out1 = zero.eval()(ids, latents=z1).logits
        assert torch.equal(out1, zero(ids, latents=z2).logits)
    assert "latent_zero_init" not in model_config_dict(ModelConfig(mode="vae"))
