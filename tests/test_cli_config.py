"""``aurl config show``: the resolved config as YAML, and bad keys or values in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from aurl.cli import main
from aurl.config import load_config


def test_show_prints_the_resolved_config(tmp_path: Path, capsys) -> None:
    base = tmp_path / "base.yaml"
    base.write_text("model:\n  d_model: 48\ntraining:\n  lr: 0.002\n")
    args = ["config", "show", "--preset", "tiny", "--config", str(base), "training.lr=5e-3"]
    assert main(args) == 0
    out = capsys.readouterr().out
    shown = yaml.safe_load(out)
    # defaults < preset < file < key=value, in that order
    assert shown["training"]["lr"] == 0.005  # the override beats the file
    assert shown["model"]["d_model"] == 48  # the file beats the preset (tiny: 32)
    assert shown["model"]["n_layers"] == load_config(preset="tiny").model.n_layers
    # what is printed is the config itself: read back, it is the same Config
    (tmp_path / "shown.yaml").write_text(out)
    expected = load_config(base, preset="tiny", overrides=["training.lr=5e-3"])
    assert load_config(tmp_path / "shown.yaml") == expected


@pytest.mark.parametrize(
    "extra, message",
    [
        (["training.nope=1"], "unknown config key 'training.nope'"),
        (["training.lr=abc"], "training.lr: expected a number, got 'abc'"),
        (["--config", "/nonexistent/aurl.yaml"], "/nonexistent/aurl.yaml does not exist"),
        (["--preset", "huge"], "huge"),
    ],
)
def test_show_refuses_bad_input_in_one_line(extra, message, capsys) -> None:
    assert main(["config", "show", *extra]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("error: ") and message in out.err
    assert out.err.count("\n") == 1
