"""benchmarks/bench_gpu.py's plumbing on the CPU (``--smoke``: tiny preset, 30 chorales, a
few seconds of race): every row of the table is there and finite, each decoding path ran."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

BENCH = Path(__file__).parents[2] / "benchmarks" / "bench_gpu.py"


def test_bench_gpu_smoke(tmp_path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.main(["--smoke", "--work", str(tmp_path), "--device", "cpu"])
    printed = capsys.readouterr().out
    aurl = results["aurl"]
    assert aurl["steps"] >= 1 and aurl["tok_per_s"] > 0 and math.isfinite(aurl["bits_per_note"])
    assert aurl["mfu"] is None  # no peak known for the CPU
    # --select 8 (the default): validated inside the budget, the best state scored too
    assert math.isfinite(aurl["bits_per_note_best"]) and 1 <= aurl["best_step"] <= aurl["steps"]
    if results["baseline_tokens"] != "absent":  # transformers installed: GPT-2 raced too
        gpt2 = results["gpt2"]
        assert gpt2["steps"] >= 1 and math.isfinite(gpt2["bits_per_note"])
        assert math.isfinite(gpt2["bits_per_note_best"]) and gpt2["best_step"] <= gpt2["steps"]
    for b in (1, 3):
        d = results["decode"][b]
        assert all(d[k] > 0 for k in ("graphed", "static", "eager"))
    assert printed.count("| decode batch") == 2 and "| test bits/note, last step |" in printed
    assert "| test bits/note, best of the validations (its step) |" in printed


def test_bench_gpu_decode_only(tmp_path, capsys) -> None:
    """``--decode-only``: no race, every decoding path on untrained models of the same shapes
    (what a lent GPU's short budget measures when the race is not the question)."""
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.main(["--smoke", "--decode-only", "--work", str(tmp_path), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert results["aurl"] is None and "aurl:" not in printed  # nothing trained
    for b in (1, 3):
        d = results["decode"][b]
        assert all(d[k] > 0 for k in ("graphed", "static", "eager"))
        if results["baseline_tokens"] != "absent":
            assert d["hf"] > 0
    assert printed.count("| decode batch") == 2 and "untrained weights" in printed
