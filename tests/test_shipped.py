"""Shipped models by name (``--model NAME``): the rule of :mod:`aurl.shipped` and the commands."""

from __future__ import annotations

import shutil

import pytest

from aurl.cli import main
from aurl.errors import CheckpointError
from aurl.shipped import DEFAULT, ROOT, shipped_model, shipped_models


def test_the_default_is_the_package_root_and_has_an_alias() -> None:
    assert DEFAULT == "chorales" and shipped_models()[DEFAULT] == ROOT
    assert shipped_model() == shipped_model("default") == shipped_model("chorales") == ROOT


def test_sub_folders_with_a_config_are_models_and_unknown_names_list_them(tmp_path) -> None:
    root = tmp_path / "pretrained"
    (root / "styles").mkdir(parents=True)
    (root / "notes").mkdir()  # no config.json: not a model
    shutil.copy(ROOT / "config.json", root / "config.json")
    shutil.copy(ROOT / "config.json", root / "styles" / "config.json")
    assert list(shipped_models(root)) == ["chorales", "styles"]
    assert shipped_model("styles", root) == root / "styles"
    with pytest.raises(CheckpointError, match="--model notes: .*chorales, styles"):
        shipped_model("notes", root)
    with pytest.raises(CheckpointError, match="no shipped model in .*--checkpoint"):
        shipped_model(None, tmp_path / "empty")


@pytest.mark.parametrize("command", ["generate", "export", "evaluate", "harmonize"])
def test_commands_refuse_an_unknown_name_in_one_line(
    command, tmp_path, capsys, fixtures_dir
) -> None:
    extra = {
        "export": ["--format", "onnx"],
        "evaluate": ["--data", str(tmp_path)],
        "harmonize": [str(fixtures_dir / "midi" / "bach_bwv66.6.mid")],
    }.get(command, [])
    code = main([command, *extra, "--model", "nope", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err and "no such shipped model" in err and "chorales" in err
    assert not (tmp_path / "o").exists()


def test_model_and_checkpoint_together_are_refused(tmp_path, capsys) -> None:
    code = main(
        ["generate", "--model", "chorales", "--checkpoint", str(ROOT), "--out", str(tmp_path)]
    )
    assert code == 2 and "not both" in capsys.readouterr().err
