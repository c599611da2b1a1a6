"""The instruction set read from /proc/cpuinfo decides the int8 path (aurl.engines.cpu): bf16
activations only where the CPU has bf16 instructions."""

from __future__ import annotations

import pytest

from aurl.engines.cpu import cpu_flags, cpu_summary, flags_of, has_bf16

# /proc/cpuinfo lines of three CPUs, cut to the flags that matter
XEON_VNNI = (
    "processor\t: 0\nmodel name\t: Intel Xeon\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n"
)
SAPPHIRE = "processor\t: 0\nflags\t\t: avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_int8\n"
GRAVITON = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"


@pytest.mark.parametrize(
    "cpuinfo, bf16",
    [(XEON_VNNI, False), (SAPPHIRE, True), (GRAVITON, False), ("", False)],
    ids=["xeon-avx512-vnni", "sapphire-rapids", "arm", "none"],
)
def test_bf16_follows_the_flags(cpuinfo, bf16) -> None:
    """The Xeon of the issue (AVX512-VNNI, no AVX512-BF16 or AMX) gets the onnxruntime int8
    path, as AVX2-only cores do; a CPU with AVX512-BF16/AMX keeps torch's bf16 activations."""
    assert has_bf16(flags_of(cpuinfo)) is bf16


def test_this_machine_is_named_in_benchmark_rows() -> None:
    summary = cpu_summary()
    assert summary and summary.endswith("]")
    assert ("avx2" in summary) == ("avx2" in cpu_flags())
