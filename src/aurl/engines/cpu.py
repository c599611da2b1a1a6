"""The CPU's instruction set, from ``/proc/cpuinfo`` (Linux; empty elsewhere), and the int8 path
it favours.

Weight-only int8 in PyTorch (:func:`aurl.models.quantize.quantize_int8`) runs its activations in
bf16, which pays off only where the CPU has bf16 instructions (AVX512-BF16 or AMX): elsewhere the
bf16 arithmetic is emulated and int8 decodes slower than fp32 (measured on an AVX512-VNNI Xeon
without AVX512-BF16, and on AVX2-only EPYC cores). onnxruntime's dynamic int8 uses integer dot
products (VNNI where present, AVX2 otherwise) and has no such cliff.

The onnx engine's default precision follows from that (:func:`onnx_int8_pays`): int8 graphs
where onnxruntime's int8 MatMul has integer dot-product kernels (x86: AVX2, AVX-VNNI,
AVX512-VNNI or AMX-INT8; ARM: the dot-product or int8 matrix extensions), fp32 elsewhere, where
int8 was never measured to pay. Measured on AVX2-only EPYC cores (BENCHMARKS.md, issue 17):
int8 graphs decode 1.7-2.0x faster than fp32 graphs, within 0.02 bits/note of them.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
# integer dot products for onnxruntime's int8 MatMul (MLAS QGEMM): x86 VPMADDUBSW (AVX2) or VNNI
# / AMX, ARM SDOT / UDOT ("asimddp") or SMMLA ("i8mm")
INT8_FLAGS = frozenset({"avx2", "avx_vnni", "avx512_vnni", "amx_int8", "asimddp", "i8mm"})


def flags_of(cpuinfo: str) -> frozenset[str]:
    """The flags of the first CPU in the text of ``/proc/cpuinfo`` (``flags`` on x86,
    ``Features`` on ARM; empty where there is none)."""
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The flags of this machine's first CPU (``/proc/cpuinfo``; empty where there is none)."""
    try:
        return flags_of(Path("/proc/cpuinfo").read_text())
    except OSError:
        return frozenset()


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
