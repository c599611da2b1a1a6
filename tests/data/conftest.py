"""Helpers shared by the data tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from aurl.config import DataConfig
from aurl.data.cache import TokenCache, prepare

CHORALES = Path(__file__).parents[2] / "src" / "aurl" / "data" / "bundled" / "bach-chorales"


def first_chorales_cache(
    tmp_path_factory: pytest.TempPathFactory, count: int, data_config: DataConfig
) -> TokenCache:
    """A cache of the first ``count`` bundled chorales (by file name), prepared with
    ``data_config`` (its split fractions and tokenizer settings)."""
    src = tmp_path_factory.mktemp("midi")
    for name in sorted(p.name for p in CHORALES.glob("*.mid"))[:count]:
        shutil.copy(CHORALES / name, src / name)
    out = tmp_path_factory.mktemp("cache")
    prepare(src, out, data_config=data_config, workers=1)
    return TokenCache(out)
