"""The composing commands and ``aurl evaluate --task`` take the onnx graphs' precision by the
rule of ``aurl generate --engine onnx`` (:func:`aurl.cli.generate.chosen_precision`), with int8
(:data:`aurl.engines.cpu.COMPOSING_QUANTIZED`, where ``aurl generate`` takes int4) where the CPU
has integer dot products, fp32 elsewhere, ``--int8`` / ``--int4`` / ``--fp32`` over the CPU.
The engines built read the shipped model's graphs they say (exported once to the session's
cache), from the cache folder of that precision."""

from __future__ import annotations

import pytest

from aurl.data.notes import make_notes

CASES = [
    (None, [], "default"),  # this machine's CPU decides
    (frozenset(), [], "fp32"),  # no integer dot products: fp32 graphs
    (frozenset({"avx2"}), [], "int8"),  # integer dot products: int8 graphs (generate: int4)
    (frozenset({"avx2"}), ["--fp32"], "fp32"),  # fp32 asked for
    (frozenset({"avx2"}), ["--int8"], "int8"),  # int8 asked for
    (frozenset(), ["--int4"], "int4"),  # int4 asked for
]
IDS = ["this-cpu", "no-dot-products", "avx2", "--fp32", "--int8", "--int4"]


def _weights(monkeypatch, flags, weights: str) -> str:
    from aurl.engines import cpu

    if flags is not None:
        monkeypatch.setattr(cpu, "cpu_flags", lambda: flags)
    if weights == "default":
        return "int8" if cpu.onnx_int8_pays() else "fp32"
    return weights


def _folder(weights: str):
    from aurl.engines.shipped import shipped_onnx_folder
    from aurl.shipped import shipped_model

    return shipped_onnx_folder(shipped_model(), precision=weights)


@pytest.mark.parametrize("flags, extra, weights", CASES, ids=IDS)
def test_harmonize_engine_onnx_follows_generates_rule(monkeypatch, tmp_path, flags, extra, weights):
    from aurl.cli import build_parser
    from aurl.cli.compose import _onnx_engine

    weights = _weights(monkeypatch, flags, weights)
    argv = ["harmonize", "m.mid", "--engine", "onnx", *extra, "--out", str(tmp_path)]
    engine = _onnx_engine(build_parser(argv).parse_args(argv))
    assert engine.weights == weights
    assert engine.folder == _folder(weights)


@pytest.mark.parametrize("flags, extra, weights", CASES, ids=IDS)
def test_evaluate_task_follows_generates_rule(monkeypatch, tmp_path, flags, extra, weights):
    from aurl.cli import build_parser
    from aurl.cli.generate import load_model
    from aurl.evaluation.tasks import task_engine

    weights = _weights(monkeypatch, flags, weights)
    argv = ["evaluate", "--task", "harmonize", "--engine", "onnx", *extra, "--out", str(tmp_path)]
    engine = task_engine(build_parser(argv).parse_args(argv), load_model(None, "cpu"))
    assert engine.weights == weights
    assert engine.folder == _folder(weights)


@pytest.mark.parametrize(
    "argv, line",
    [
        (["harmonize", "m.mid", "--int8"], "--int8 chooses the onnx engine's graphs"),
        (["infill", "m.mid", "--bars", "1-1", "--int4"], "--int4 chooses the onnx engine's graphs"),
        (["generate", "--engine", "torch", "--int4"], "--int4 chooses the onnx engine's graphs: add --engine onnx"),
        (["evaluate", "--data", "d", "--fp32"], "--fp32 chooses --task's onnx graphs"),
        (["evaluate", "--data", "d", "--int4"], "--int4 chooses --task's onnx graphs"),
    ],
    ids=["harmonize-torch", "infill-torch", "generate-torch", "evaluate-no-task", "evaluate-int4"],
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


@pytest.mark.parametrize("command", ["generate", "harmonize", "evaluate"])
@pytest.mark.parametrize("pair", [("--int8", "--int4"), ("--int4", "--fp32"), ("--fp32", "--int8")])
def test_two_precisions_are_an_argparse_error(tmp_path, capsys, command, pair) -> None:
    """Two of --int8 / --int4 / --fp32 in one command line: argparse's usage error (exit 2)
    naming both, before anything loads."""
    from aurl.cli import main

    argv = {"generate": ["generate", "--engine", "onnx"], "harmonize": ["harmonize", "m.mid"],
            "evaluate": ["evaluate", "--task", "harmonize", "--engine", "onnx"]}[command]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        main([*argv, *pair, "--max-tokens", "8", "--out", str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {pair[1]}: not allowed with argument {pair[0]}" in err, err


@pytest.mark.parametrize(
    "argv, words",
    [(["generate", "--help"], "int4 on this CPU"), (["harmonize", "--help"], "int8 on this CPU"),
     (["evaluate", "--help"], "int8 on this CPU")],
)  # fmt: skip
def test_help_names_each_commands_default(monkeypatch, capsys, argv, words) -> None:
    """On a CPU with integer dot products, ``--help`` names the default the command takes:
    int4 for ``aurl generate``, int8 for the composing commands and ``evaluate --task``."""
    from aurl.cli import main
    from aurl.engines import cpu

    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2"}))
    with pytest.raises(SystemExit):
        main(argv)
    assert words in " ".join(capsys.readouterr().out.split())
