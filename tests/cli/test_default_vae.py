"""``--variations`` / ``--interpolate`` with no ``--model`` / ``--checkpoint`` use the shipped
VAE (:data:`aurl.shipped.VAE_DEFAULT`), say so on stderr, and never replace an explicit model."""

from __future__ import annotations

from pathlib import Path

import pytest

import aurl
from aurl.cli import main
from aurl.shipped import VAE_DEFAULT, shipped_models

CHORALES = Path(aurl.__file__).parent / "data" / "bundled" / "bach-chorales"


@pytest.fixture(scope="module")
def two_chorales() -> list[Path]:
    return sorted(CHORALES.glob("*.mid"))[:2]


def test_the_default_vae_is_a_shipped_vae() -> None:
    import json

    folder = shipped_models()[VAE_DEFAULT]
    assert json.loads((folder / "config.json").read_text())["model"]["mode"] in ("vae", "vae_gan")


def test_variations_use_the_shipped_vae_by_default(two_chorales, tmp_path, capsys) -> None:
    out = tmp_path / "variations"
    args = ["generate", "--variations", str(two_chorales[0]), "--max-tokens", "48",
            "--num-samples", "2", "--out", str(out)]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    assert f"--variations: using the shipped VAE {VAE_DEFAULT!r}" in capsys.readouterr().err
    assert len(list(out.glob("*.mid"))) == 2
    assert "mode: vae" in next(out.glob("*.yaml")).read_text()


def test_interpolation_uses_the_shipped_vae_by_default(two_chorales, tmp_path, capsys) -> None:
    out = tmp_path / "path"
    args = ["generate", "--interpolate", *map(str, two_chorales), "--steps", "3",
            "--max-tokens", "48", "--out", str(out)]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    assert f"--interpolate: using the shipped VAE {VAE_DEFAULT!r}" in capsys.readouterr().err
    assert len(list(out.glob("*.mid"))) == 3


def test_an_explicit_model_is_not_replaced(two_chorales, tmp_path, capsys) -> None:
    # --model chorales (a transformer) with --variations still refuses, naming the need
    args = ["generate", "--model", "chorales", "--variations", str(two_chorales[0]), "--out",
            str(tmp_path / "o")]  # fmt: skip
    assert main(args) != 0
    err = capsys.readouterr().err
    assert "need a VAE model" in err and "using the shipped VAE" not in err


def test_style_uses_the_shipped_style_model_by_default(tmp_path, capsys) -> None:
    from aurl.shipped import STYLES_DEFAULT

    out = tmp_path / "palestrina"
    args = ["generate", "--style", "palestrina", "--max-tokens", "48", "--out", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert f"--style: using the shipped style model {STYLES_DEFAULT!r}" in err
    settings = next(out.glob("*.yaml")).read_text()
    assert "style: palestrina" in settings and "  - palestrina\n" in settings  # model.styles


def test_analyze_style_uses_the_shipped_style_model_by_default(two_chorales, tmp_path,
                                                               capsys) -> None:  # fmt: skip
    from aurl.shipped import STYLES_DEFAULT

    assert main(["analyze", str(two_chorales[0]), "--style", "--out", str(tmp_path / "r")]) == 0
    captured = capsys.readouterr()
    assert f"--style: using the shipped style model {STYLES_DEFAULT!r}" in captured.err
    assert f"{two_chorales[0].name}: style " in captured.out
