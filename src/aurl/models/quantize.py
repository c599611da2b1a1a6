"""Weight-only int8 for fast batch-small CPU decoding (an opt-in inference mode).

Batch-1 generation reads every weight once per token, so its speed is the memory traffic of the
weights: fp32 caps the ``full`` model at a few hundred tokens/s. :func:`quantize_int8` keeps
per-output-channel int8 weights (4x fewer bytes) and runs everything else in bf16: ATen's
``_weight_int8pack_mm`` CPU kernel is fast with bf16 activations and several times slower than
fp32 with fp32 ones (measured). The logits move by about a percent; the fp32 model stays the
reference (``step`` equals ``forward`` exactly there, and here too within bf16 precision).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from aurl.errors import ConfigError
from aurl.models.model import MusicTransformerVAEGAN


class FloatLinear(nn.Module):
    """A small ``nn.Linear`` kept in fp32 inside a bf16 model (bf16 GEMV is slow on CPU)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear.float()
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.float()).to(x.dtype)


class Int8Linear(nn.Module):
    """A frozen ``nn.Linear`` with int8 weights and one float scale per output channel."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if linear.in_features % 32:  # the kernel reads K in blocks: other widths give garbage
            raise ValueError(
                f"int8 linear needs in_features divisible by 32, got {linear.in_features}"
            )
        w = linear.weight.detach().float()  # (N, K)
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale)
        bias = linear.bias.detach().float().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        y = torch._weight_int8pack_mm(
            x.reshape(-1, self.in_features), self.weight_int8, self.scale
        )  # (M, N), in x's dtype
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)


def quantize_int8(
    model: MusicTransformerVAEGAN, dtype: torch.dtype = torch.bfloat16
) -> MusicTransformerVAEGAN:
    """A copy of ``model`` for inference: backbone linears and output head with int8 weights,
    every other weight, the activations and the KV cache in ``dtype``.

    Raises:
        ConfigError: ``model.d_model`` is not a multiple of 32 (every quantized layer reads
            d_model or ff_mult x d_model inputs, which the int8 kernel takes in blocks of 32).
    """
    d = model.config.d_model
    if d % 32:
        raise ConfigError(
            f"int8 weights on the torch engine need model.d_model a multiple of 32 (the int8 "
            f"kernel reads its inputs in blocks of 32); this model's is {d}: use --engine "
            "native (int8 of its own) or leave out --int8"
        )
    q = copy.deepcopy(model).eval()  # quantized from the fp32 weights
    for block in q.blocks:
        for parent in (block.attn, block.ff):
            for name in ("qkv", "fc", "proj"):
                layer = getattr(parent, name, None)
                if isinstance(layer, nn.Linear):
                    setattr(parent, name, Int8Linear(layer))
    gf = q.grammar_features
    if gf is not None:  # 88 pitches: too narrow for the int8 kernel
        gf.sounding, gf.age = FloatLinear(gf.sounding), FloatLinear(gf.age)
    head = nn.Linear(q.head.in_features, q.head.out_features, bias=False)
    head.weight = nn.Parameter(q.embed.weight.detach().clone(), requires_grad=False)
    q.head = Int8Linear(head)  # untied: the int8 head and the float embedding
    for p in q.parameters():
        p.requires_grad_(False)
    q = q.to(dtype)  # float weights, scales and biases; the int8 weights stay int8
    for layer in q.modules():
        if isinstance(layer, FloatLinear):
            layer.linear.float()
    return q
