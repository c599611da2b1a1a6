"""``aurl generate``'s default engine (``--engine auto``): Aurl's native step where it runs the
model and the flags, onnx for an ONNX export folder, torch for what the native step lacks
(beam search, a VAE's latents, a local-attention model); the settings file names the engine
that decoded."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from aurl.cli import main
from aurl.config import ModelConfig, VocabConfig

native = pytest.importorskip("aurl.engines.native_engine")


@pytest.fixture(scope="module", autouse=True)
def _compiled_step() -> None:
    try:
        native.load_library()
    except Exception as e:  # noqa: BLE001  (an install without a C compiler)
        pytest.skip(f"no compiled native step: {e}")


@pytest.fixture(scope="module")
def local_folder(tmp_path_factory) -> Path:
    """A tiny random local-attention model folder: a kind the native step does not run."""
    import torch

    from aurl.models import MusicTransformerVAEGAN
    from aurl.models.pretrained import save_pretrained

    config = dataclasses.replace(
        ModelConfig(), d_model=32, n_layers=2, n_heads=2, dropout=0.0, max_seq_len=256,
        attention="local", local_window=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = MusicTransformerVAEGAN(config, VocabConfig()).eval()
    return save_pretrained(model, tmp_path_factory.mktemp("local") / "model")


def _generate(out: Path, *flags: str) -> tuple[str, bytes]:
    """The settings file's engine line and the first piece's bytes of one short run."""
    rc = main(["generate", "--out", str(out), "--max-tokens", "48", "--seed", "3", *flags])
    assert rc == 0
    engine = (out / "sample_seed3.yaml").read_text().splitlines()[1]
    return engine, (out / "sample_seed3_000.mid").read_bytes()


def test_the_default_is_the_native_engine_and_its_pieces(tmp_path) -> None:
    engine, piece = _generate(tmp_path / "auto")
    assert engine.startswith("# engine: native, int8 weights of "), engine
    assert engine.endswith("pretrained")  # the shipped default
    assert _generate(tmp_path / "native", "--engine", "native") == (engine, piece)
    fp32, _ = _generate(tmp_path / "fp32", "--fp32")
    assert fp32.startswith("# engine: native, fp32 weights of "), fp32


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--beam", "2"], "# engine: torch on cpu"),  # beam search runs on torch
        (["--model", "styles-vae"], "# engine: torch on cpu"),  # a VAE
        (["--style", "folk"], "# engine: native, int8 weights of "),  # the style model
    ],
    ids=["beam", "vae", "style"],
)
def test_auto_goes_to_the_engine_that_runs_the_flags(flags, says, tmp_path) -> None:
    engine, _ = _generate(tmp_path / "out", *flags)
    assert engine.startswith(says), engine


def test_auto_reads_an_export_with_onnx_and_local_attention_with_torch(
    tiny_export, local_folder, tmp_path
) -> None:
    pytest.importorskip("onnxruntime")
    engine, _ = _generate(tmp_path / "export", "--checkpoint", str(tiny_export))
    assert engine == f"# engine: onnx, fp32 graphs in {tiny_export}", engine
    engine, _ = _generate(tmp_path / "local", "--checkpoint", str(local_folder))
    assert engine == "# engine: torch on cpu", engine


def test_the_help_says_what_auto_chooses() -> None:
    from aurl.cli import build_parser

    parser = build_parser(["generate", "--help"])
    generate = parser._subparsers._group_actions[0].choices["generate"]
    text = " ".join(generate.format_help().split())
    assert "auto (default): native where it runs the model and the flags, else torch" in text


def test_int4_goes_to_onnx_and_its_refusals(tmp_path, capsys) -> None:
    """``--int4`` chooses the onnx graphs under auto too: a flag onnx cannot honour is refused
    in one line, not dropped for a torch run without int4."""
    assert main(["generate", "--int4", "--beam", "2", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --engine onnx does not support --beam: beam search runs on --engine "
                   "torch"], err  # fmt: skip
    assert not (tmp_path / "o").exists()
