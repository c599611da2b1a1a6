"""The instruction set read from /proc/cpuinfo decides the int8 path (aurl.engines.cpu): bf16
activations only where the CPU has bf16 instructions."""

from __future__ import annotations

import pytest

from aurl.engines.cpu import cpu_flags, cpu_summary, flags_of, has_bf16, onnx_int8_pays

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


EPYC_AVX2 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse4_2 avx fma avx2\n"
OLD_X86 = "processor\t: 0\nflags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx\n"
ARM_DOTPROD = "processor\t: 0\nFeatures\t: fp asimd asimddp\n"
ARM_PLAIN = "processor\t: 0\nFeatures\t: fp asimd\n"


@pytest.mark.parametrize(
    "cpuinfo, int8",
    [
        (EPYC_AVX2, True), (XEON_VNNI, True), (SAPPHIRE, True), (GRAVITON, True),
        (ARM_DOTPROD, True), (OLD_X86, False), (ARM_PLAIN, False), ("", False),
    ],
    ids=["epyc-avx2", "xeon-avx512-vnni", "sapphire-rapids", "arm-i8mm", "arm-dotprod",
         "x86-avx-only", "arm-plain", "none"],
)  # fmt: skip
def test_onnx_int8_follows_integer_dot_products(cpuinfo, int8) -> None:
    """The onnx engine defaults to int8 graphs where onnxruntime's int8 MatMul has integer
    dot-product kernels (AVX2, VNNI, AMX; ARM dotprod / i8mm), fp32 elsewhere."""
    assert onnx_int8_pays(flags_of(cpuinfo)) is int8


def test_this_machine_is_named_in_benchmark_rows() -> None:
    summary = cpu_summary()
    assert summary and summary.endswith("]")
    assert ("avx2" in summary) == ("avx2" in cpu_flags())


def test_numpy_names_this_machines_instruction_sets_as_cpuinfo_does() -> None:
    """Where /proc/cpuinfo exists, numpy's detection of this machine gives the same answer for
    every flag both can name (the fallback of macOS and Windows, checked on this CPU)."""
    from aurl.engines.cpu import NUMPY_FLAGS, flags_of_numpy, numpy_cpu_features

    features = numpy_cpu_features()
    assert features, "numpy no longer exposes __cpu_features__"
    cpuinfo = cpu_flags()
    if not cpuinfo:
        pytest.skip("no /proc/cpuinfo on this machine to compare with")
    from_numpy = flags_of_numpy(features)
    for flag in NUMPY_FLAGS.values():
        if flag in ("asimd", "asimddp") and "asimd" not in cpuinfo:  # x86: ARM names absent
            assert flag not in from_numpy
            continue
        assert (flag in from_numpy) == (flag in cpuinfo), flag


def test_without_cpuinfo_the_flags_come_from_numpy(tmp_path) -> None:
    """No /proc/cpuinfo (macOS, Windows): the int8 default follows numpy's detection, not a
    blanket fp32."""
    from aurl.engines.cpu import flags_of_numpy, machine_flags, numpy_cpu_features

    flags = machine_flags(tmp_path / "no-cpuinfo")
    assert flags and flags == flags_of_numpy(numpy_cpu_features())
    assert onnx_int8_pays(flags) is onnx_int8_pays(cpu_flags())


@pytest.mark.parametrize(
    "features, int8, bf16",
    [
        ({"AVX": True, "FMA3": True, "AVX2": True, "AVX512F": False}, True, False),
        ({"AVX512F": True, "AVX2": True, "AVX512VNNI": True, "AVX512BF16": True}, True, True),
        ({"ASIMD": True, "ASIMDDP": True}, True, False),  # Apple M1 and later
        ({"AVX": True, "AVX2": False}, False, False),
        ({"ASIMD": True, "ASIMDDP": False}, False, False),
    ],
    ids=["avx2", "avx512-bf16", "apple-m1", "avx-only", "arm-plain"],
)
def test_numpy_features_decide_like_cpuinfo_flags(features, int8, bf16) -> None:
    from aurl.engines.cpu import flags_of_numpy

    flags = flags_of_numpy(features)
    assert onnx_int8_pays(flags) is int8 and has_bf16(flags) is bf16
