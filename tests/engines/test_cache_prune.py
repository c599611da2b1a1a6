"""The ONNX cache does not pile up (:func:`aurl.engines.shipped.prune_stale`): a run that writes
a new export of a model folder removes the exports it makes stale (the folder's older weights,
older export versions, folders gone) and nothing else: not another live model folder's export,
not another precision of the current key, not a folder the cache did not write, not one a run
is loading. Real exports of the tiny model (dim 32, 2 layers) in a temporary cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from aurl.engines import shipped
from aurl.engines.shipped import ensure_shipped_onnx, load_shipped_onnx

SRC = Path(__file__).resolve().parents[2] / "src"


def _flip(weights: Path) -> None:
    """Retrain, as far as the cache can tell: one bit of the last weight changed."""
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))


def _copy(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to)
    _flip(to / "model.safetensors")  # other weights: another key
    return to


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("AURL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(shipped, "SETTLED_NS", 0)  # remember every weights hash at once
    return tmp_path / "cache" / "onnx"


def test_a_new_export_removes_what_it_makes_stale_and_nothing_else(
    tiny_model, tmp_path, cache
) -> None:
    quiet = {"log": lambda _: None}
    a = tiny_model.save_pretrained(tmp_path / "a")
    old = ensure_shipped_onnx(a, **quiet)
    old_int8 = ensure_shipped_onnx(a, precision="int8", **quiet)
    b = _copy(a, tmp_path / "b")  # another model folder, still there: its export stays
    live = ensure_shipped_onnx(b, **quiet)
    c = _copy(b, tmp_path / "c")  # a model folder deleted since: its export goes
    gone = ensure_shipped_onnx(c, **quiet)
    shutil.rmtree(c)
    older = cache / "model-00000000000000aa"  # an older export version, of the live b
    shutil.copytree(live, older)
    meta = json.loads((older / "config.json").read_text())
    (older / "config.json").write_text(json.dumps({**meta, "version": 2}))
    # not the cache's own: written half (config.json comes last), another format, a link out
    # of the cache to an export, and a name of another pattern
    (cache / "model-00000000000000bb").mkdir()
    (cache / "model-00000000000000bb" / "decoder.onnx").write_bytes(b"half")
    foreign = cache / "model-00000000000000cc"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"format": "other"}')
    outside = shutil.copytree(gone, tmp_path / "outside")
    (cache / "model-00000000000000dd").symlink_to(outside, target_is_directory=True)
    shutil.copytree(gone, cache / "model-keep-me")
    leftover = cache / ".stale-model-0000000000000000-1-2"  # a pruner stopped midway
    shutil.copytree(gone, leftover)
    before = set(cache.iterdir())
    memo = json.loads((cache / "digests.json").read_text())
    assert str((c / "model.safetensors").resolve()) in memo

    _flip(a / "model.safetensors")  # a retrained: the next export has a new key
    new_int8 = ensure_shipped_onnx(a, precision="int8", **quiet)
    new = ensure_shipped_onnx(a, **quiet)  # another precision of the current key: kept

    assert new.name == new_int8.name.removesuffix("-int8") != old.name
    assert set(cache.iterdir()) == (before - {old, old_int8, gone, older, leftover}) | {
        new,
        new_int8,
    }
    assert (outside / "config.json").is_file()
    assert (cache / "model-00000000000000bb" / "decoder.onnx").read_bytes() == b"half"
    memo = json.loads((cache / "digests.json").read_text())
    assert set(memo) == {str((x / "model.safetensors").resolve()) for x in (a, b)}


def test_an_export_being_loaded_is_not_removed(tiny_model, tmp_path, cache) -> None:
    """Another process holds the lock :func:`load_shipped_onnx` holds while it loads a stale
    export: the run that writes the new one leaves it; once released, the next prune removes
    it. The new export then loads as usual."""
    quiet = {"log": lambda _: None}
    a = tiny_model.save_pretrained(tmp_path / "a")
    stale = ensure_shipped_onnx(a, **quiet)
    code = (
        "import sys\nfrom pathlib import Path\nfrom aurl.engines.shipped import _held\n"
        f"with _held(Path({str(stale / 'config.json')!r}), exclusive=False) as held:\n"
        "    print(held, flush=True)\n"
        "    sys.stdin.readline()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    reader = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env=env,
    )  # fmt: skip
    try:
        assert reader.stdout.readline().strip() == "True"
        _flip(a / "model.safetensors")
        new = ensure_shipped_onnx(a, **quiet)
        assert stale.is_dir() and new.is_dir()
    finally:
        reader.communicate("\n", timeout=60)
    assert shipped.prune_stale(new, a) == [stale]
    assert not stale.exists() and [p.name for p in cache.iterdir() if p.is_dir()] == [new.name]
    assert load_shipped_onnx(a, **quiet).folder == new
