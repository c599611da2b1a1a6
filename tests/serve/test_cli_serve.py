"""`aurl serve` refuses what it cannot serve safely, before loading anything."""

from __future__ import annotations

import pytest

from aurl.cli import main
from aurl.cli.serve import is_loopback


def test_another_address_needs_a_token(monkeypatch, capsys):
    monkeypatch.delenv("AURL_TOKEN", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "AURL_TOKEN" in err and "0.0.0.0" in err


def test_unknown_model_or_checkpoint_is_one_clear_line(tmp_path, capsys):
    assert main(["serve", "--model", "nope"]) == 1
    assert "no such shipped model; the shipped ones are chorales" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(tmp_path / "missing")]) == 1
    assert "is not a folder" in capsys.readouterr().err


def test_limits_must_be_positive(capsys):
    assert main(["serve", "--slots", "0"]) == 2
    assert "--slots 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("host", "loop"),
    [("127.0.0.1", True), ("localhost", True), ("::1", True), ("[::1]", True),
     ("127.0.0.2", True), ("0.0.0.0", False), ("192.168.1.5", False), ("example.org", False)],
)  # fmt: skip
def test_loopback_addresses(host, loop):
    assert is_loopback(host) is loop
