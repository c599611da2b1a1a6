"""The composing commands and ``aurl evaluate --task`` take the onnx graphs' precision by the
rule of ``aurl generate --engine onnx`` (:func:`aurl.cli.generate.onnx_int8`): int8 where the CPU
has integer dot products, fp32 elsewhere, ``--int8`` / ``--fp32`` over the CPU. The engines built
read the shipped model's graphs they say (exported once to the session's cache)."""

from __future__ import annotations

import pytest

from aurl.data.notes import make_notes

CASES = [
    (None, [], "default"),  # this machine's CPU decides
    (frozenset(), [], "fp32"),  # no integer dot products: fp32 graphs
    (frozenset({"avx2"}), [], "int8"),  # integer dot products: int8 graphs
    (frozenset({"avx2"}), ["--fp32"], "fp32"),  # fp32 asked for
    (frozenset(), ["--int8"], "int8"),  # int8 asked for
]
IDS = ["this-cpu", "no-dot-products", "avx2", "--fp32", "--int8"]


def _weights(monkeypatch, flags, weights: str) -> str:
    from aurl.engines import cpu

    if flags is not None:
        monkeypatch.setattr(cpu, "cpu_flags", lambda: flags)
    if weights == "default":
        return "int8" if cpu.onnx_int8_pays() else "fp32"
    return weights


@pytest.mark.parametrize("flags, extra, weights", CASES, ids=IDS)
def test_harmonize_engine_onnx_follows_generates_rule(monkeypatch, tmp_path, flags, extra, weights):
    from aurl.cli import build_parser
    from aurl.cli.compose import _onnx_engine

    weights = _weights(monkeypatch, flags, weights)
    argv = ["harmonize", "m.mid", "--engine", "onnx", *extra, "--out", str(tmp_path)]
    engine = _onnx_engine(build_parser(argv).parse_args(argv))
    assert engine.weights == weights
    assert engine.folder.name.endswith("-int8") == (weights == "int8")


@pytest.mark.parametrize("flags, extra, weights", CASES, ids=IDS)
def test_evaluate_task_follows_generates_rule(monkeypatch, tmp_path, flags, extra, weights):
    from aurl.cli import build_parser
    from aurl.cli.generate import load_model
    from aurl.evaluation.tasks import task_engine

    weights = _weights(monkeypatch, flags, weights)
    argv = ["evaluate", "--task", "harmonize", *extra, "--out", str(tmp_path)]
    engine = task_engine(build_parser(argv).parse_args(argv), load_model(None, "cpu"))
    assert engine.weights == weights
    assert engine.folder.name.endswith("-int8") == (weights == "int8")


@pytest.mark.parametrize(
    "argv, line",
    [
        (["harmonize", "m.mid", "--int8"], "--int8 chooses the onnx engine's graphs"),
        (["evaluate", "--data", "d", "--fp32"], "--fp32 chooses --task's onnx graphs"),
    ],
    ids=["harmonize-torch", "evaluate-no-task"],
)
def test_precision_without_onnx_is_one_line(tmp_path, capsys, argv, line) -> None:
    from aurl.cli import main
    from aurl.generation.compose import parts_score
    from aurl.generation.export import write_midi

    write_midi(parts_score([("Melody", make_notes([0, 1], 1, [67, 69]))]), tmp_path / "m.mid")
    argv = [str(tmp_path / a) if a.endswith(".mid") else a for a in argv]
    assert main([*argv, "--out", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and line in err[0], err
