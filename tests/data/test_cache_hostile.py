"""A damaged token cache given to ``aurl data prepare`` and to what reads it (``aurl train``,
``evaluate``): each once escaped as a traceback deep in training, was kept as it was by
"prepare again", or cost the user files (docs/design.md, "Hostile inputs, session 19
(commands)")."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from aurl.cli import main
from aurl.data.cache import TokenCache, prepare
from aurl.errors import DataError

FIXTURES = Path(__file__).parents[1] / "fixtures" / "midi"


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, Path]:
    """(a folder of three chorales, its cache)."""
    d = tmp_path_factory.mktemp("cache")
    (d / "midi").mkdir()
    for name in ("bach_bwv269.mid", "bach_bwv347.mid", "bach_bwv66.6.mid"):
        shutil.copy(FIXTURES / name, d / "midi" / name)
    prepare(d / "midi", d / "cache", workers=1)
    return d / "midi", d / "cache"


def _copy(made, tmp_path) -> Path:
    return Path(shutil.copytree(made[1], tmp_path / "cache"))


def _shard(cache: Path) -> Path:
    return next((cache / "shards").iterdir())


def _edit_index(cache: Path, change) -> None:
    z = dict(np.load(cache / "index.npz", allow_pickle=False))
    meta = json.loads(str(z["meta"]))
    change(z, meta)
    z["meta"] = np.array(json.dumps(meta))
    with open(cache / "index.npz", "wb") as f:
        np.savez(f, **z)


def _set(key, value):
    return lambda z, meta: z.__setitem__(key, value(z[key]))


# what the index says -> the damage named; before: AttributeError, KeyError, IndexError in
# training or prepare, FileNotFoundError for a shard named ../../../../etc/passwd
DAMAGED = {
    "meta a list": (None, "its meta is not a mapping"),
    "no shards": (lambda z, meta: meta.pop("shards"), "its meta lists no shards"),
    "hashes short": (_set("hash", lambda v: v[:1]), "its columns have different lengths"),
    "shard past the list": (_set("shard", lambda v: v + 5), "a file in a shard it does not list"),
    "negative length": (_set("length", lambda v: -v), "a negative offset or length"),
    "split 7": (_set("split", lambda v: v + 7), "a split past test"),
    "shard outside": (lambda z, meta: meta.__setitem__("shards", ["../../../../etc/passwd"]),
                      "a shard name that is not one this cache writes"),
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_a_damaged_index_is_one_line_naming_it(case, made, tmp_path, capsys) -> None:
    cache = _copy(made, tmp_path)
    change, why = DAMAGED[case]
    if change is None:  # the meta a JSON list
        z = dict(np.load(cache / "index.npz", allow_pickle=False))
        z["meta"] = np.array("[1, 2]")
        with open(cache / "index.npz", "wb") as f:
            np.savez(f, **z)
    else:
        _edit_index(cache, change)
    with pytest.raises(DataError, match=f"index.npz is damaged \\({why}\\)"):
        TokenCache(cache)
    assert main(["data", "prepare", str(made[0]), "--out", str(cache), "--workers", "1"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and f"{cache / 'index.npz'} is damaged ({why})" in lines[0], lines


@pytest.mark.parametrize("damage", ["cut short", "missing", "offsets past the end"])
def test_a_shard_cut_short_is_said_and_prepare_again_mends_it(damage, made, tmp_path) -> None:
    """A shard cut short (or gone, or an index whose offsets run past it) was an IndexError in
    training, and ``aurl data prepare`` again kept its files' rows as they were (the files had
    not changed): the advice 'prepare again' did nothing. Now the cache says which shard, and
    prepare tokenizes those files again."""
    cache = _copy(made, tmp_path)
    whole = TokenCache(cache).total_tokens()
    shard = _shard(cache)
    if damage == "cut short":
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "missing":
        shard.unlink()
    else:
        _edit_index(cache, lambda z, meta: z.__setitem__("offset", z["offset"] + 10**9))
    with pytest.raises(DataError, match=f"{shard} is missing or cut short.*prepare"):
        TokenCache(cache)
    report = prepare(made[0], cache, workers=1)
    assert report.tokenized == 3
    mended = TokenCache(cache)
    assert mended.total_tokens() == whole
    assert all(len(mended.tokens(i)) == mended.lengths[i] for i in range(len(mended)))


def test_token_ids_past_the_vocabulary_are_refused_when_read(made, tmp_path) -> None:
    """A shard of ids past the cache's vocabulary (another build's, or bytes) was an IndexError
    in the training data's grammar: now reading it says so."""
    cache = _copy(made, tmp_path)
    shard = _shard(cache)
    ids = np.fromfile(shard, "<u2")
    ids[:] = 65535
    ids.tofile(shard)
    with pytest.raises(DataError, match="holds token id 65535, past the 774"):
        TokenCache(cache).tokens(0)


@pytest.mark.parametrize("name", [".lock", "index.npz", "shards"])
def test_a_cache_part_of_the_wrong_kind_is_one_line(name, made, tmp_path, capsys) -> None:
    """``.lock`` or ``index.npz`` a folder, ``shards`` a file: IsADirectoryError or
    FileExistsError after the work."""
    cache = _copy(made, tmp_path)
    part = cache / name
    shutil.rmtree(part) if part.is_dir() else part.unlink()
    part.write_text("x") if name == "shards" else part.mkdir()
    assert main(["data", "prepare", str(made[0]), "--out", str(cache), "--workers", "1"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and f"cache {cache} is damaged ({name} is not" in lines[0], lines


def test_prepare_into_a_folder_of_the_users_files_keeps_them(made, tmp_path) -> None:
    """``--out`` a folder already holding files: prepare deleted its ``*.tmp`` and ``.*.tmp.*``
    files and everything under ``shards/`` as a crash's leftovers. Now it deletes only names it
    writes (a shard of a crashed run still goes)."""
    out = tmp_path / "mine"
    (out / "shards").mkdir(parents=True)
    mine = [out / "notes.tmp", out / ".draft.tmp.txt", out / "shards" / "precious.txt"]
    for p in mine:
        p.write_text("mine")
    leftover = out / "shards" / "20260101000000-0123abcd-00000.u16"
    leftover.write_bytes(b"\0\0")
    prepare(made[0], out, workers=1)
    assert all(p.read_text() == "mine" for p in mine)
    assert not leftover.exists()
    assert len(TokenCache(out)) == 3 and os.path.isfile(out / "index.npz")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs")
def test_a_fifo_or_a_device_named_mid_fails_at_once(made, tmp_path, monkeypatch) -> None:
    """A FIFO named ``x.mid`` (its hash's open blocks) or a link to ``/dev/zero`` (the hash never
    ends) cost prepare the whole time bound each, as 'reader timed out'; now each is a failed
    file, said as what it is, at once (the bound is cut to 2 s here: a timeout would show)."""
    from aurl.data import isolate

    monkeypatch.setattr(isolate, "TIME_BOUND_S", 2.0)
    folder = Path(shutil.copytree(made[0], tmp_path / "midi"))
    os.mkfifo(folder / "fifo.mid")
    os.symlink("/dev/zero", folder / "zero.mid")
    report = prepare(folder, tmp_path / "cache", workers=1)
    assert report.tokenized == 3
    assert dict(report.failed) == {
        name: "not a regular file (a device, pipe or socket): give a MIDI file"
        for name in ("fifo.mid", "zero.mid")
    }
