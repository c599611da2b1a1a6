"""The CPU's instruction set, from ``/proc/cpuinfo`` (Linux) or else numpy's run-time CPU
feature detection (macOS, Windows: :func:`flags_of_numpy`), and the int8 path it favours.

Weight-only int8 in PyTorch (:func:`aurl.models.quantize.quantize_int8`) runs its activations in
bf16, which pays off only where the CPU has bf16 instructions (AVX512-BF16 or AMX): elsewhere the
bf16 arithmetic is emulated and int8 decodes slower than fp32 (measured on an AVX512-VNNI Xeon
without AVX512-BF16, and on AVX2-only EPYC cores). onnxruntime's dynamic int8 uses integer dot
products (VNNI where present, AVX2 otherwise) and has no such cliff.

The onnx engine's default precision follows from that (:func:`onnx_precision`): int4 graphs
(onnxruntime's MatMulNBits, 4-bit weights in blocks of 32, int8 compute) where onnxruntime's
quantized MatMuls have integer dot-product kernels (:func:`onnx_int8_pays`; x86: AVX2,
AVX-VNNI, AVX512-VNNI or AMX-INT8; ARM: the dot-product or int8 matrix extensions), fp32
elsewhere, where neither int8 nor int4 was measured to pay. Measured on AVX2-only EPYC cores
(BENCHMARKS.md, issue 17): int8 graphs decode 1.65x faster than fp32 graphs and int4 1.12x
faster than int8 (6.13x HF ``generate`` idle), grammar-masked bits/note on the test split
within 0.005 of fp32 for both. (Until the eighth pass the default was int8.)
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
# integer dot products for onnxruntime's int8 MatMul (MLAS QGEMM): x86 VPMADDUBSW (AVX2) or VNNI
# / AMX, ARM SDOT / UDOT ("asimddp") or SMMLA ("i8mm")
INT8_FLAGS = frozenset({"avx2", "avx_vnni", "avx512_vnni", "amx_int8", "asimddp", "i8mm"})


# numpy's run-time CPU feature names (``__cpu_features__``, detected on every platform) -> the
# /proc/cpuinfo flag names this module reads (numpy has no AVX-VNNI, AMX or i8mm: an AVX-VNNI
# CPU has AVX2, which already decides the int8 path)
NUMPY_FLAGS = {
    "AVX": "avx", "FMA3": "fma", "AVX2": "avx2", "AVX512F": "avx512f",
    "AVX512VNNI": "avx512_vnni", "AVX512BF16": "avx512_bf16", "ASIMD": "asimd",
    "ASIMDDP": "asimddp",
}  # fmt: skip


def flags_of_numpy(features: dict[str, bool]) -> frozenset[str]:
    """The flags (named as in ``/proc/cpuinfo``) of numpy's ``__cpu_features__`` dict
    ``features`` (name -> present)."""
    return frozenset(flag for name, flag in NUMPY_FLAGS.items() if features.get(name))


def numpy_cpu_features() -> dict[str, bool]:
    """numpy's run-time CPU feature detection of this machine (empty if numpy hides it)."""
    try:  # numpy 2 moved numpy.core to numpy._core
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_features__
        except ImportError:
            return {}
    return dict(__cpu_features__)


def flags_of(cpuinfo: str) -> frozenset[str]:
    """The flags of the first CPU in the text of ``/proc/cpuinfo`` (``flags`` on x86,
    ``Features`` on ARM; empty where there is none)."""
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def machine_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The flags of the first CPU in the file ``cpuinfo``, else (no such file: macOS, Windows)
    numpy's detection of the same instruction sets (:func:`flags_of_numpy`)."""
    try:
        flags = flags_of(cpuinfo.read_text())
    except OSError:
        flags = frozenset()
    return flags or flags_of_numpy(numpy_cpu_features())


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The flags of this machine's first CPU (:func:`machine_flags`)."""
    return machine_flags()


@functools.cache
def cpu_name() -> str:
    """The CPU model name (``/proc/cpuinfo``), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def has_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether the CPU (``flags``, default this machine's) computes in bf16 natively
    (AVX512-BF16 or AMX)."""
    return bool(BF16_FLAGS & (cpu_flags() if flags is None else flags))


def onnx_int8_pays(flags: frozenset[str] | None = None) -> bool:
    """Whether the onnx engine should default to int8 graphs on the CPU with ``flags`` (default
    this machine's): it has integer dot-product instructions (:data:`INT8_FLAGS`)."""
    return bool(INT8_FLAGS & (cpu_flags() if flags is None else flags))


def cpu_summary() -> str:
    """One line for benchmark rows: the model name and the instruction sets that matter."""
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8",
              "asimddp", "i8mm")  # fmt: skip
    have = [f for f in wanted if f in cpu_flags()]
    return f"{cpu_name()} [{' '.join(have) or 'no avx2'}]"


PRECISIONS = ("fp32", "int8", "int4")  # of the onnx engine's graphs (and of its cache folders)


COMPOSING_QUANTIZED = "int8"
"""The quantized graphs the composing commands (``aurl harmonize | infill | accompany``, ``aurl
evaluate --task``) take by default, where ``aurl generate`` takes int4: harmonizing the 41
held-out chorales, int4 reached fewer cadences at phrase ends than int8 in each of 4 seeds (mean
0.110 vs 0.142; BENCHMARKS.md "Issue 17, eighth pass: int4 by default"), for 1.15x less CPU; a
generated piece's cadences were the same on both (0.334 vs 0.329 per 8 beats, 32 seeds)."""


def onnx_precision(flags: frozenset[str] | None = None, *, quantized: str = "int4") -> str:
    """The onnx engine's default precision for a model's cached graphs on the CPU with
    ``flags`` (default this machine's): ``quantized`` (``"int4"`` for ``aurl generate``,
    :data:`COMPOSING_QUANTIZED` for the composing commands) where it has integer dot products
    (:func:`onnx_int8_pays`), else ``"fp32"``."""
    return quantized if onnx_int8_pays(flags) else "fp32"


class DefaultPrecision:
    """The ``--help`` words for the onnx engine's default precision on this CPU, read only when
    the help is printed (``%(default_precision)s`` in a help string, this object set as the
    action's ``default_precision``): building the parser never reads ``/proc/cpuinfo``.
    ``quantized``: the command's default where the CPU has integer dot products."""

    def __init__(self, quantized: str = "int4") -> None:
        self.quantized = quantized

    def __str__(self) -> str:
        flags = sorted(INT8_FLAGS & cpu_flags())
        if flags:
            return f"{self.quantized} on this CPU ({cpu_name()}: integer dot products, {' '.join(flags)})"
        return f"fp32 on this CPU ({cpu_name()}: no integer dot products for int8 / int4)"
