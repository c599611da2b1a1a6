"""Weight-only int8 decoding stays close to the float model and keeps step == forward."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import aurl
from aurl.models.quantize import Int8Linear, quantize_int8

SHIPPED = Path(aurl.__file__).parent / "pretrained"


def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position, from log-probabilities (..., V)."""
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def test_int8_linear_by_hand():
    lin = torch.nn.Linear(32, 2)  # the kernel reads the input width in blocks of 32
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[:, :4] = torch.tensor([[1.0, -0.5, 0.25, 0.0], [0.1, 0.2, -0.3, 0.4]])
        lin.bias.copy_(torch.tensor([0.5, -1.0]))
    q = Int8Linear(lin)
    assert q.weight_int8[0, :4].tolist() == [127, -64, 32, 0]  # round(w / (1 / 127))
    assert q.weight_int8[1, :4].tolist() == [32, 64, -95, 127]  # scale 0.4 / 127
    x = torch.ones(1, 32)  # fp32 activations work too (slowly)
    expected = (q.weight_int8.float() * q.scale[:, None]).sum(1) + lin.bias
    torch.testing.assert_close(q(x)[0], expected.detach())


@pytest.fixture(scope="module")
def shipped():
    """The shipped (trained) model: its next-token distributions are far from uniform, so a
    broken kernel cannot hide inside the tolerance as it could on an untrained model."""
    from aurl.models import MusicTransformerVAEGAN

    if not (SHIPPED / "config.json").is_file():
        pytest.skip("no shipped model in src/aurl/pretrained")
    return MusicTransformerVAEGAN.from_pretrained(SHIPPED).eval()


def test_int8_log_probs_match_the_trained_float_model(shipped, chorale):
    ids = chorale[:, :128]
    q = quantize_int8(shipped)
    with torch.no_grad():
        ref = shipped(ids).logits.log_softmax(-1)  # (1, T, V)
        got = q(ids).logits
    assert got.dtype == torch.bfloat16
    got = got.float().log_softmax(-1)
    # the float model is sharp: 3.8 nats from uniform on average (a constant or garbage
    # output is that far off too)
    uniform = torch.full_like(ref, -math.log(ref.shape[-1]))
    assert kl(ref, uniform).mean() > 3.0
    # int8 moves each next-token distribution by < 0.005 nats (measured: 0.0008 at most) and the
    # log-probability of each real next token by < 0.15 (measured: 0.05)
    assert kl(ref, got).max() < 5e-3
    target = ids[:, 1:, None]
    moved = ref[:, :-1].gather(2, target) - got[:, :-1].gather(2, target)
    assert moved.abs().max() < 0.15
    assert shipped.head.weight is shipped.embed.weight  # the original stays tied and float


def test_int8_model_step_equals_its_forward(make_model, ids):
    model = make_model(attention="hierarchical").eval()
    q = quantize_int8(model)
    got = q(ids).logits
    state = q.init_state(3)
    steps = torch.cat(
        [q.step(ids[:, :9], state)] + [q.step(ids[:, t : t + 1], state) for t in range(9, 40)], 1
    )
    assert (steps.float() - got.float()).abs().max() < 1e-2  # bf16 rounding, two orders


def test_int8_linear_refuses_widths_the_kernel_cannot_read():
    with pytest.raises(ValueError, match="divisible by 32"):
        Int8Linear(torch.nn.Linear(88, 32))
