"""The composing commands' default engine (``--engine auto``): Aurl's native step where it runs
the model folder, PyTorch where it does not (a local-attention or VAE model, or a folder the
native reader refuses), each end to end through ``aurl harmonize``."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import symusic

from aurl.cli import main
from aurl.cli.compose import _native_where_it_runs
from aurl.config import ModelConfig, VocabConfig

native = pytest.importorskip("aurl.engines.native_engine")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Tiny random model folders: a plain transformer, one with local attention, a VAE."""
    import torch

    from aurl.models import MusicTransformerVAEGAN
    from aurl.models.pretrained import save_pretrained

    root = tmp_path_factory.mktemp("engines")
    base = dataclasses.replace(
        ModelConfig(), d_model=32, n_layers=2, n_heads=2, dropout=0.0, max_seq_len=256
    )
    shapes = {
        "plain": base,
        "local": dataclasses.replace(base, attention="local", local_window=64),
        "vae": dataclasses.replace(base, mode="vae", latent_dim=8),
    }
    out = {}
    for name, config in shapes.items():
        torch.manual_seed(0)
        model = MusicTransformerVAEGAN(config, VocabConfig()).eval()
        out[name] = save_pretrained(model, root / name)
    return out


@pytest.fixture(scope="module")
def tune(tmp_path_factory) -> Path:
    score = symusic.Score(480)
    track = symusic.Track("tune", 0, False)
    for i in range(12):
        track.notes.append(symusic.Note(i * 480, 480, (67, 69, 71, 72)[i % 4], 80))
    score.tracks.append(track)
    path = tmp_path_factory.mktemp("tune") / "tune.mid"
    score.dump_midi(str(path))
    return path


def _args(folder: Path | None) -> argparse.Namespace:
    return argparse.Namespace(checkpoint=str(folder) if folder else None, model=None)


def test_auto_is_native_for_a_plain_transformer_and_torch_elsewhere(folders) -> None:
    try:
        native.load_library()
    except Exception as e:  # noqa: BLE001  (an install without a C compiler)
        pytest.skip(f"no compiled native step: {e}")
    assert isinstance(_native_where_it_runs(_args(folders["plain"])), native.NativeEngine)
    assert isinstance(_native_where_it_runs(_args(None)), native.NativeEngine)  # shipped
    assert _native_where_it_runs(_args(folders["local"])) is None
    assert _native_where_it_runs(_args(folders["vae"])) is None


@pytest.mark.parametrize("name", ["plain", "local"])
def test_harmonize_runs_by_default_on_either(folders, tune, name, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    rc = main(["harmonize", str(tune), "--out", str(out), "--checkpoint", str(folders[name]),
               "--voices", "3"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    (written,) = out.glob("*.mid")
    names = [t.name for t in symusic.Score(str(written)).tracks]
    assert names[0] == "Soprano" and len(names) == 3
    assert "given notes kept 100%" in capsys.readouterr().out


def test_the_help_says_what_auto_chooses() -> None:
    from aurl.cli import build_parser

    parser = build_parser(["harmonize", "--help"])
    harmonize = parser._subparsers._group_actions[0].choices["harmonize"]
    text = " ".join(harmonize.format_help().split())
    assert "auto (default): native where it runs the model, else torch" in text
