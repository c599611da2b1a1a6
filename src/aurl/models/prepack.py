"""Linear layers with their weights packed once, for decode steps of several rows on the CPU.

A decode step of a few rows (the server's continuous batch) multiplies a handful of activation
rows by every weight matrix. MKL's ``sgemm`` first copies the whole weight matrix into its own
blocked layout on *every* call; for a few rows that copy is most of the call (py-spy, the shipped
model at 8 rows on an AMD EPYC: 38% of the decode thread in ``sgemm_scopy``, 11% in the kernel).
MKL's packed API does the copy once (``cblas_sgemm_pack``, exposed by PyTorch as
``torch.ops.mkl._mkl_reorder_linear_weight`` / ``_mkl_linear``, the ops Inductor's CPU backend
uses) and then runs the same kernel on the packed weights.

Exact or not used: for the row counts where MKL picks the same kernel for both calls (4 rows and
more on this project's machines; 1-3 rows take other kernels and round differently), the
packed call gives the plain call's results bit for bit. That is a property of the MKL build and
the CPU, not a promise, so each (layer, rows, threads) is checked once, on random input, against
``F.linear``; where the two differ the layer stays on ``F.linear``. Either way a row's logits are
those of the plain model, so batching does not change what a request generates.

:class:`PrepackedLinears` routes a model's ``nn.Linear`` layers through their packs only inside
``with prepacked:`` (the batcher's decode call); training, prefixes and every other caller see
the plain modules. A weight changed in place after packing (its version moves) is packed again.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def available() -> bool:
    """Whether this PyTorch has MKL's packed sgemm ops (x86 builds with MKL and oneDNN)."""
    try:
        torch.ops.mkl._mkl_linear  # noqa: B018 - resolving the op is the check
        torch.ops.mkl._mkl_reorder_linear_weight  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return torch.backends.mkl.is_available()


class PrepackedLinears:
    """The fp32 ``nn.Linear`` layers of ``model`` (on the CPU), packed on first use.

    Use as a context manager around a decode call: inside it each layer takes its packed path
    for the row counts where that path was checked equal to ``F.linear``. Not reentrant; one
    thread enters it (other threads calling the model meanwhile get equal results too).
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = [
            m for m in model.modules()
            if type(m) is nn.Linear and m.weight.dtype == torch.float32
            and m.weight.device.type == "cpu"
        ]  # fmt: skip
        # layer -> (weight version, weight data pointer, packed weight)
        self._packs: dict[nn.Linear, tuple[int, int, Tensor]] = {}
        # (layer, rows, threads) -> whether the packed call equals F.linear there
        self._exact: dict[tuple[nn.Linear, int, int], bool] = {}
        self._forwards = {m: self._forward_of(m) for m in self.layers}
        self.calls = 0  # packed calls made (the rest went to F.linear)

    def __enter__(self) -> PrepackedLinears:
        for m, forward in self._forwards.items():
            m.__dict__["forward"] = forward  # shadows nn.Linear.forward for this instance
        return self

    def __exit__(self, *exc: Any) -> None:
        for m in self._forwards:
            m.__dict__.pop("forward", None)

    def _forward_of(self, layer: nn.Linear) -> Any:
        def forward(x: Tensor) -> Tensor:
            rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
            plain = rows < 2 or torch.is_grad_enabled() or x.dtype != torch.float32
            if plain or not x.is_contiguous():  # one row: MKL's gemv, which copies nothing
                return F.linear(x, layer.weight, layer.bias)
            packed = self._pack(layer)
            if not self._checked(layer, packed, rows):
                return F.linear(x, layer.weight, layer.bias)
            self.calls += 1
            return torch.ops.mkl._mkl_linear(x, packed, layer.weight, layer.bias, rows)

        return forward

    def _pack(self, layer: nn.Linear) -> Tensor:
        w = layer.weight
        have = self._packs.get(layer)
        if have is not None and have[0] == w._version and have[1] == w.data_ptr():
            return have[2]
        packed = torch.ops.mkl._mkl_reorder_linear_weight(w.detach(), 8)  # any rows: one layout
        self._packs[layer] = (w._version, w.data_ptr(), packed)
        for key in [k for k in self._exact if k[0] is layer]:  # new weights: check again
            del self._exact[key]
        return packed

    def _checked(self, layer: nn.Linear, packed: Tensor, rows: int) -> bool:
        key = (layer, rows, torch.get_num_threads())
        exact = self._exact.get(key)
        if exact is None:
            g = torch.Generator().manual_seed(rows)
            probe = torch.randn(rows, layer.in_features, generator=g)
            got = torch.ops.mkl._mkl_linear(probe, packed, layer.weight, layer.bias, rows)
            exact = self._exact[key] = torch.equal(got, F.linear(probe, layer.weight, layer.bias))
        return exact


__all__ = ["PrepackedLinears", "available"]
