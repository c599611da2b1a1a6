"""benchmarks/bench_onnx.py's ratio summary: each variant's piece against the two HF pieces
around it, the median of those per-round ratios with its spread."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[2] / "benchmarks" / "bench_onnx.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_onnx", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_piece_is_compared_with_the_hf_pieces_around_it(bench) -> None:
    """HF at 100, 400, 100 tokens/s (the machine's weather), ours at 200 and 800 in between:
    both rounds give 200 / sqrt(100 * 400) = 1 and 800 / 200 = 4; a drift that moves HF and
    ours alike cancels."""
    assert bench.bracketed([100.0, 400.0, 100.0], [200.0, 800.0]) == [1.0, 4.0]
    drift = [1.0, 1.5, 1.2, 0.8]
    hf = [100.0 * d for d in drift]
    ours = [500.0 * (a * b) ** 0.5 for a, b in zip(drift, drift[1:])]
    assert bench.bracketed(hf, ours) == pytest.approx([5.0, 5.0, 5.0])


def test_ratio_summary_is_the_median_with_its_spread(bench) -> None:
    """Ratios 1..9: median 5, quartiles 3 and 7; the bootstrap interval of the median lies
    inside the data and around 5, and one wild round does not move the median."""
    st = bench.ratio_stats([float(x) for x in range(1, 10)])
    assert (st["median"], st["q1"], st["q3"], st["n"]) == (5.0, 3.0, 7.0, 9)
    assert 1.0 <= st["lo"] <= 5.0 <= st["hi"] <= 9.0
    wild = bench.ratio_stats([5.0, 5.1, 4.9, 5.0, 50.0])
    assert wild["median"] == 5.0
    assert bench.fmt_ratio(st) == f"5.00x [IQR 3.00-7.00; 95% {st['lo']:.2f}-{st['hi']:.2f}]"


def test_the_cold_start_checks_which_graphs_the_default_command_read(bench, tmp_path) -> None:
    """The default command's rows time the export of this CPU's default precision (int4 on
    AVX2): the bench reads the precision of every folder its warm-up wrote to each cache and
    stops when this tree's is not that one (e.g. the int8 graphs, the old default)."""
    import json

    from aurl.engines.cpu import onnx_precision

    def wrote(cache: str, name: str, weights: str) -> None:
        folder = tmp_path / cache / "onnx" / name
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"weights": weights}))

    default = onnx_precision()
    wrote("cache", "shipped-0123456789abcdef-x", default)
    wrote("base-cache", "shipped-0123456789abcdef-int8", "int8")
    said = bench.default_graphs(tmp_path, "eead5bc")
    assert said == (
        f"the default command's graphs: this tree: shipped-0123456789abcdef-x ({default}); "
        "eead5bc: shipped-0123456789abcdef-int8 (int8)"
    )
    wrote("cache", "shipped-0123456789abcdef-y", "int8" if default != "int8" else "fp32")
    with pytest.raises(SystemExit, match="the default command read"):
        bench.default_graphs(tmp_path, None)
