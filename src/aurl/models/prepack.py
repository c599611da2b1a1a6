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
``with prepacked.rows(n):`` (the batcher's decode call); training, prefixes and every other
caller see the plain modules. A weight changed in place since it was packed (its version moved)
is packed again when the next such block starts.
"""

from __future__ import annotations

import weakref
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_SHARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its PrepackedLinears


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

    ``with prepacked.rows(n):`` around a decode call of ``n`` rows: inside it the layers whose
    packed call was checked equal to ``F.linear`` at ``n`` rows (and the current thread count)
    take it; the others, and every call of another shape or with gradients, stay plain. One
    thread enters it at a time (another thread calling the model meanwhile gets equal results).
    The packs take 25.6 MB of memory for the shipped model (12.9 MB of Linear weights: MKL's
    packed layout is about twice their size).
    """

    @classmethod
    def of(cls, model: nn.Module) -> PrepackedLinears:
        """The model's one instance: every batcher of a model (the server's warm-up batcher and
        the one that serves) shares its packs, so they are made, and held in memory, once."""
        have = _SHARED.get(model)
        if have is None:
            have = _SHARED[model] = cls(model)
        return have

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
        self._plain: set[tuple[int, int]] = set()  # (rows, threads) where no layer is exact
        self._rows = 0
        self._patched: list[nn.Linear] = []
        self.calls = 0  # packed calls made (the rest went to F.linear)

    def rows(self, n: int) -> AbstractContextManager:
        """The context for a decode call of ``n`` rows: this object, or a no-op where every
        layer stays plain (one row: MKL's gemv, which copies nothing; row counts where the
        packed kernel rounds differently)."""
        if n < 2 or (n, torch.get_num_threads()) in self._plain:
            return nullcontext()
        self._rows = n
        return self

    def __enter__(self) -> PrepackedLinears:
        rows, threads = self._rows, torch.get_num_threads()
        for m in self.layers:
            if not m.weight.is_cpu or m.weight.dtype != torch.float32:  # moved or cast since
                continue
            packed = self._pack(m)
            if self._checked(m, packed, rows, threads):
                m.__dict__["forward"] = self._forward_of(m, packed, rows)  # shadows the class's
                self._patched.append(m)
        if not self._patched:
            self._plain.add((rows, threads))
        return self

    def __exit__(self, *exc: Any) -> None:
        for m in self._patched:
            m.__dict__.pop("forward", None)
        self._patched.clear()

    def _forward_of(self, layer: nn.Linear, packed: Tensor, rows: int) -> Any:
        w, b, size = layer.weight, layer.bias, rows * layer.in_features

        def forward(x: Tensor) -> Tensor:
            if x.numel() != size or torch.is_grad_enabled() or not x.is_contiguous():
                return F.linear(x, w, b)  # another caller's shape, or training
            self.calls += 1
            return torch.ops.mkl._mkl_linear(x, packed, w, b, rows)

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
        self._plain.clear()
        return packed

    def _checked(self, layer: nn.Linear, packed: Tensor, rows: int, threads: int) -> bool:
        key = (layer, rows, threads)
        exact = self._exact.get(key)
        if exact is None:
            g = torch.Generator().manual_seed(rows)
            probe = torch.randn(rows, layer.in_features, generator=g)
            got = torch.ops.mkl._mkl_linear(probe, packed, layer.weight, layer.bias, rows)
            exact = self._exact[key] = torch.equal(got, F.linear(probe, layer.weight, layer.bias))
        return exact


__all__ = ["PrepackedLinears", "available"]
