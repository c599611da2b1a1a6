"""Model FLOPs utilization: the share of a device's peak that the training step turns into
model arithmetic.

    MFU = (6 N + 12 L d T) x tokens/s / peak

(PaLM, Chowdhery et al. 2022, appendix B): ``N`` the trained parameters (the tied embedding /
output head once: it is the head's matmul; the grammar features' and musical time's tables
too), so ``6 N`` the matmul FLOPs of forward and backward per token; ``12 L d T`` the
attention scores and their weighted sum, forward and backward, for ``L`` layers of width
``d`` over a context of ``T`` tokens (counted over the whole T x T square, as PaLM does; a
causal kernel skips half of it, so a causal model's MFU reads high by ``6 L d T / (6 N + 12 L
d T)``: 6% for ``full`` at 1024).

``T`` is each sequence's own real length: a token attends only inside its window, whether the
window is a row of its own (right-padded: the padding is no model arithmetic) or a segment of
a packed row (``data.pack``: block-diagonal attention). Over sequences of real lengths
``T_i`` the attention FLOPs are ``sum_i 12 L d T_i^2``, so per real token the context is
:func:`attention_context` ``= sum_i T_i^2 / sum_i T_i``. (Until the packing work the trainer
counted ``T = data.window`` for every real token, which credits unpacked rows with attention
over their padding: the ninth session's 11.4% at 2048 x 32 is in that convention.)
Recomputation (gradient checkpointing) is not model
arithmetic and not counted. ``peak``: the device's dense bf16 (or fp16) tensor throughput, from
:data:`PEAK_TFLOPS` by device name, or ``training.peak_tflops``; unknown devices (and the CPU)
log no MFU unless it is given.
"""

from __future__ import annotations

import torch

# dense bf16 tensor-core TFLOP/s (no sparsity), from the vendors' data sheets; matched in order
# against the lower-cased device name
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("h200", 989.0),
    ("h100", 989.0),  # SXM; the PCIe card: 756
    ("gh200", 989.0),
    ("b200", 2250.0),
    ("a100", 312.0),
    ("l40s", 362.0),
    ("l4", 121.0),
    ("a10", 125.0),
    ("rtx 4090", 165.0),
    ("rtx 3090", 71.0),
)


def peak_tflops(device: torch.device, override: float = 0.0) -> float | None:
    """The device's dense bf16 peak in TFLOP/s: ``override`` when > 0, else from
    :data:`PEAK_TFLOPS` by the CUDA device's name; None where unknown (the CPU)."""
    if override > 0:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    for key, peak in PEAK_TFLOPS:
        if key in name:
            return peak
    return None


def flops_per_token(params: int, n_layers: int, d_model: int, context: int) -> float:
    """``6 N + 12 L d T``: training FLOPs per token (module docstring)."""
    return 6.0 * params + 12.0 * n_layers * d_model * context


def attention_context(token_sq: float, tokens: float) -> float:
    """``sum T_i^2 / sum T_i``: the context per real token of sequences of real lengths ``T_i``
    (module docstring), from the two sums; 0 without tokens."""
    return token_sq / tokens if tokens else 0.0


def mfu(tokens_per_s: float, flops_token: float, peak: float) -> float:
    """Model FLOPs utilization in [0, 1]: ``flops_token x tokens_per_s / (peak TFLOP/s)``."""
    return flops_token * tokens_per_s / (peak * 1e12)
