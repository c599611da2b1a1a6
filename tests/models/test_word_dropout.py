"""VAE word dropout (``model.decoder_token_dropout``): the decoder reads UNK where the encoder,
the targets and the musical features read the true ids; off by default and outside training."""

from __future__ import annotations

import torch

from aurl.config import ModelConfig
from aurl.data.vocab import UNK
from aurl.models.pretrained import model_config_dict
from aurl.models.vae import drop_tokens


def test_drop_tokens_replaces_the_share_asked_and_keeps_start(chorale):
    ids = chorale.repeat(8, 1)  # (8, 364) real ids
    torch.manual_seed(0)
    out = drop_tokens(ids, 0.3, UNK)
    dropped = out != ids
    assert (out[dropped] == UNK).all()
    assert not dropped[:, 0].any()  # START stays
    share = dropped[:, 1:].float().mean().item()  # 2,904 Bernoulli(0.3) draws: sd 0.0085
    assert abs(share - 0.3) < 0.03
    assert drop_tokens(ids, 0.0, UNK) is ids


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
