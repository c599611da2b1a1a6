"""Weight-only int8 decoding stays close to the float model and keeps step == forward."""

from __future__ import annotations

import torch

from aurl.models.quantize import Int8Linear, quantize_int8


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


def test_int8_model_close_to_float_and_cached(make_model, ids):
    model = make_model(attention="hierarchical").eval()
    q = quantize_int8(model)
    ref, got = model(ids).logits, q(ids).logits
    assert got.dtype == torch.bfloat16
    assert (ref.softmax(-1) - got.float().softmax(-1)).abs().max() < 1e-3
    assert model.head.weight is model.embed.weight  # the original stays tied and float
    state = q.init_state(3)
    steps = torch.cat(
        [q.step(ids[:, :9], state)] + [q.step(ids[:, t : t + 1], state) for t in range(9, 40)], 1
    )
    assert (steps.float() - got.float()).abs().max() < 1e-2  # bf16 rounding, two orders


def test_int8_linear_refuses_widths_the_kernel_cannot_read():
    import pytest

    with pytest.raises(ValueError, match="divisible by 32"):
        Int8Linear(torch.nn.Linear(88, 32))
