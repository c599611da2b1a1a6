"""Shared fixtures. Data fixtures live in tests/fixtures/ and are found relative to this file."""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(autouse=True, scope="session")
def _aurl_cache(tmp_path_factory):
    """ONNX exports cached by ``aurl generate`` go to a temporary folder, never the home."""
    import os

    old = os.environ.get("AURL_CACHE")
    os.environ["AURL_CACHE"] = str(tmp_path_factory.mktemp("aurl-cache"))
    yield
    if old is None:
        os.environ.pop("AURL_CACHE", None)
    else:
        os.environ["AURL_CACHE"] = old
