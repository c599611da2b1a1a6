"""The token cache on real chorales: equivalence with the tokenizer, incremental rebuilds,
interruption, crash leftovers, parts and merging, vocabulary checks, the CLI."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from aurl.config import DataConfig, VocabConfig
from aurl.data.cache import TokenCache, merge_caches, parse_shard, prepare, shard_of
from aurl.data.split import split_of
from aurl.data.tokenizer import Tokenizer
from aurl.data.vocab import Kind, Vocab
from aurl.errors import DataError

CHORALES = Path(__file__).parents[2] / "src" / "aurl" / "data" / "bundled" / "bach-chorales"
NAMES = sorted(p.name for p in CHORALES.glob("*.mid"))[:8]
DATA = DataConfig(valid_fraction=0.3, test_fraction=0.3)


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    """Six chorales (two in a sub-folder) and one file that is not MIDI."""
    src = tmp_path / "midi"
    (src / "sub").mkdir(parents=True)
    for i, name in enumerate(NAMES[:6]):
        shutil.copy(CHORALES / name, src / ("sub" if i >= 4 else "") / name)
    (src / "broken.mid").write_bytes(b"this is not a MIDI file")
    (src / "notes.txt").write_text("ignored: not a MIDI suffix")
    return src


def reference(src: Path) -> dict[str, np.ndarray]:
    """What the cache must hold: the tokenizer's output for every readable file."""
    tok = Tokenizer(data_config=DATA)
    out = {}
    for p in sorted(src.rglob("*.mid")):
        if p.name != "broken.mid":
            out[p.relative_to(src).as_posix()] = tok.encode_file(p)
    return out


def contents(cache: TokenCache) -> dict[str, np.ndarray]:
    return {cache.relpath(i): np.asarray(cache.tokens(i)) for i in range(len(cache))}


def assert_matches(cache: TokenCache, ref: dict[str, np.ndarray]) -> None:
    got = contents(cache)
    assert sorted(got) == sorted(ref)
    for rel, ids in ref.items():
        assert got[rel].dtype == np.uint16
        np.testing.assert_array_equal(got[rel], ids)


def test_prepare_matches_tokenizer_and_index(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    report = prepare(corpus, out, data_config=DATA, workers=1)
    ref = reference(corpus)
    assert report.files == 7 and report.tokenized == 6
    assert [p for p, _ in report.failed] == ["broken.mid"]
    assert "MidiReadError" in report.failed[0][1]

    cache = TokenCache(out)
    assert len(cache) == 6
    assert_matches(cache, ref)
    assert [cache.relpath(i) for i in range(6)] == sorted(ref)  # rows sorted by path
    vocab = Vocab()
    for i in range(len(cache)):
        rel = cache.relpath(i)
        split = split_of(rel, DATA.valid_fraction, DATA.test_fraction)
        assert i in cache.split_indices(split)
        assert cache.notes[i] == int((vocab.kind[ref[rel]] == Kind.NOTE_ON).sum())
    for split in ("train", "valid", "test"):
        rows = cache.split_indices(split)
        assert cache.total_tokens(split) == sum(len(ref[cache.relpath(i)]) for i in rows)
        assert report.totals[split]["tokens"] == cache.total_tokens(split)
        assert report.totals[split]["notes"] == cache.total_notes(split)
    assert cache.total_tokens() == sum(len(v) for v in ref.values())
    assert cache.vocab_config == VocabConfig()
    assert cache.failed[0]["path"] == "broken.mid"
    with pytest.raises(DataError, match="split"):
        cache.split_indices("training")


def test_two_workers_give_the_same_cache(corpus: Path, tmp_path: Path) -> None:
    prepare(corpus, tmp_path / "one", data_config=DATA, workers=1)
    prepare(corpus, tmp_path / "two", data_config=DATA, workers=2)
    a, b = TokenCache(tmp_path / "one"), TokenCache(tmp_path / "two")
    assert [a.relpath(i) for i in range(len(a))] == [b.relpath(i) for i in range(len(b))]
    assert_matches(b, {k: np.asarray(v) for k, v in contents(a).items()})


def test_incremental_rebuild_redoes_only_new_and_changed(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    prepare(corpus, out, data_config=DATA, workers=1)
    again = prepare(corpus, out, data_config=DATA, workers=1)
    assert (again.tokenized, again.unchanged, again.removed) == (0, 6, 0)
    assert [p for p, _ in again.failed] == ["broken.mid"]  # reported again, not retried

    # touched but not changed: hashed, found equal, not tokenized again
    os.utime(corpus / NAMES[0], ns=(1, 1))
    touched = prepare(corpus, out, data_config=DATA, workers=1)
    assert (touched.tokenized, touched.unchanged) == (0, 6)

    shutil.copy(CHORALES / NAMES[7], corpus / NAMES[1])  # changed content
    (corpus / NAMES[2]).unlink()  # removed
    shutil.copy(CHORALES / NAMES[6], corpus / "sub" / NAMES[6])  # new
    (corpus / "broken.mid").unlink()  # the failure disappears with its file
    report = prepare(corpus, out, data_config=DATA, workers=1)
    assert (report.tokenized, report.unchanged, report.removed) == (2, 4, 1)
    assert report.failed == []
    assert_matches(TokenCache(out), reference(corpus))
    # every shard file left behind is one the index refers to
    cache = TokenCache(out)
    assert sorted(os.listdir(out / "shards")) == sorted(cache._index.shards)


def test_new_split_fractions_resplit_without_tokenizing(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    prepare(corpus, out, data_config=DATA, workers=1)
    other = DataConfig(valid_fraction=0.0, test_fraction=0.5)
    report = prepare(corpus, out, data_config=other, workers=1)
    assert report.tokenized == 0
    cache = TokenCache(out)
    splits = [("train", "valid", "test")[s] for s in cache.splits]
    assert splits == [split_of(cache.relpath(i), 0.0, 0.5) for i in range(len(cache))]
    assert "valid" not in splits and {"train", "test"} <= set(splits)


def test_mostly_dead_shards_are_compacted(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    prepare(corpus, out, data_config=DATA, workers=1)
    first = os.listdir(out / "shards")
    for k, name in enumerate(NAMES[:4]):  # 4 of 6 pieces replaced: the old shard is mostly dead
        shutil.copy(CHORALES / NAMES[7 - k % 2], corpus / name)
    report = prepare(corpus, out, data_config=DATA, workers=1)
    cache = TokenCache(out)
    assert report.tokenized == 4 and report.compacted == 2
    assert not set(first) & set(os.listdir(out / "shards"))  # the old shard file is gone
    size = sum((out / "shards" / s).stat().st_size for s in os.listdir(out / "shards"))
    assert size == 2 * cache.total_tokens()  # no dead tokens left
    assert_matches(cache, reference(corpus))


def test_vocabulary_change_redoes_everything(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    prepare(corpus, out, data_config=DATA, workers=1)
    other = VocabConfig(max_shift_steps=64)

    def dies_at_once(items, total=None, desc=""):
        raise RuntimeError("machine lost")
        yield from items

    with pytest.raises(RuntimeError):  # before the first commit of the new vocabulary
        prepare(corpus, out, vocab_config=other, data_config=DATA, progress=dies_at_once)
    assert_matches(TokenCache(out), reference(corpus))  # the old cache is intact
    report = prepare(corpus, out, vocab_config=other, data_config=DATA, workers=1)
    assert report.tokenized == 6
    cache = TokenCache(out)
    assert cache.vocab_config == other
    tok = Tokenizer(other, DATA)
    for i in range(len(cache)):
        np.testing.assert_array_equal(cache.tokens(i), tok.encode_file(corpus / cache.relpath(i)))
    cache.check_vocab(other)
    with pytest.raises(DataError, match="max_shift_steps=64"):
        cache.check_vocab(VocabConfig())


def test_interrupted_run_keeps_committed_work(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"

    def dies_after_three(items, total=None, desc=""):
        for n, item in enumerate(items):
            if n == 3:
                raise RuntimeError("machine lost")  # like a crash: no final commit
            yield item

    with pytest.raises(RuntimeError):
        prepare(corpus, out, data_config=DATA, workers=1, commit_every=2, progress=dies_after_three)
    cache = TokenCache(out)  # the commit after the 2nd file is there and readable
    ref = reference(corpus)
    assert len(cache) == 2
    for rel, ids in contents(cache).items():
        np.testing.assert_array_equal(ids, ref[rel])

    report = prepare(corpus, out, data_config=DATA, workers=1)
    assert (report.tokenized, report.unchanged) == (4, 2)
    assert_matches(TokenCache(out), ref)


def test_keyboard_interrupt_commits_what_is_done(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"

    def interrupted(items, total=None, desc=""):
        for n, item in enumerate(items):
            if n == 4:
                raise KeyboardInterrupt
            yield item

    with pytest.raises(KeyboardInterrupt):
        prepare(corpus, out, data_config=DATA, workers=1, progress=interrupted)
    assert len(TokenCache(out)) == 4


def test_crash_leftovers_are_ignored_then_cleaned(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    prepare(corpus, out, data_config=DATA, workers=1)
    before = contents(TokenCache(out))
    # what a crash between shard writes and the index commit leaves behind
    (out / "shards" / "20990101000000-deadbeef-00000.u16").write_bytes(b"\x07\x00" * 100)
    (out / "index.npz.tmp").write_bytes(b"half an index")
    after = contents(TokenCache(out))
    assert sorted(after) == sorted(before)
    for rel in before:
        np.testing.assert_array_equal(after[rel], before[rel])
    prepare(corpus, out, data_config=DATA, workers=1)
    assert not (out / "index.npz.tmp").exists()
    assert not (out / "shards" / "20990101000000-deadbeef-00000.u16").exists()


def test_small_shard_files_roll_over(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    prepare(corpus, out, data_config=DATA, workers=1, shard_tokens=100)
    cache = TokenCache(out)
    assert len(os.listdir(out / "shards")) == 6  # every piece is longer than 100 tokens
    assert_matches(cache, reference(corpus))


def test_parts_are_merged_by_a_plain_prepare(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    parts = [prepare(corpus, out, data_config=DATA, workers=1, shard=(i, 3)) for i in range(3)]
    rels = sorted(reference(corpus))
    for i, rep in enumerate(parts):
        part = TokenCache(out / "parts" / f"{i}-of-3")
        assert [part.relpath(j) for j in range(len(part))] == [
            r for r in rels if shard_of(r, 3) == i
        ]
        assert rep.cache == out / "parts" / f"{i}-of-3"
    report = prepare(corpus, out, data_config=DATA, workers=1)
    assert report.merged == 6 and report.tokenized == 0
    assert [p for p, _ in report.failed] == ["broken.mid"]
    assert not (out / "parts").exists()
    assert_matches(TokenCache(out), reference(corpus))


def test_merge_caches_joins_and_refuses_other_vocab(corpus: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    prepare(corpus, a, data_config=DATA, workers=1, shard=(0, 2))
    prepare(corpus, b, data_config=DATA, workers=1, shard=(1, 2))
    n = merge_caches([a / "parts" / "0-of-2", b / "parts" / "1-of-2"], tmp_path / "m")
    assert n == 6
    assert_matches(TokenCache(tmp_path / "m"), reference(corpus))
    assert (a / "parts" / "0-of-2" / "index.npz").is_file()  # inputs kept by default

    c = tmp_path / "c"
    other = VocabConfig(max_shift_steps=64)
    prepare(corpus, c, vocab_config=other, data_config=DATA, workers=1)
    with pytest.raises(DataError, match="another vocabulary"):
        merge_caches([a / "parts" / "0-of-2", c], tmp_path / "m")
    assert merge_caches([c], tmp_path / "m") == 6  # a cache of another vocabulary is replaced
    assert TokenCache(tmp_path / "m").vocab_config == other


def test_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a folder"):
        prepare(tmp_path / "missing", tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no MIDI files"):
        prepare(tmp_path / "empty", tmp_path / "cache")
    with pytest.raises(DataError, match="not a token cache"):
        TokenCache(tmp_path)
    assert parse_shard("2/8") == (2, 8)
    for bad in ("8/8", "x/2", "1"):
        with pytest.raises(DataError, match="--shard"):
            parse_shard(bad)


def test_cli_prepare(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from aurl.cli import main

    out = tmp_path / "cache"
    assert main(["data", "prepare", str(corpus), "--out", str(out), "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "failed broken.mid: MidiReadError" in printed
    assert "6 tokenized" in printed and "1 failed" in printed
    assert (out / "config.yaml").is_file()
    assert len(TokenCache(out)) == 6
    assert main(["data", "prepare", str(corpus), "--out", str(out), "--shard", "3/2"]) == 1
    assert "--shard '3/2'" in capsys.readouterr().err
    only_broken = tmp_path / "broken"
    only_broken.mkdir()
    shutil.copy(corpus / "broken.mid", only_broken / "broken.mid")
    assert main(["data", "prepare", str(only_broken), "--out", str(tmp_path / "c2")]) == 1


def test_split_follows_the_manifest_groups(corpus: Path, tmp_path: Path) -> None:
    """A corpus manifest's tune groups decide the split: files of one group share it, whatever
    their paths hash to; a file the manifest does not list keeps its path's split."""
    import json

    top = sorted(p.name for p in corpus.glob("*.mid") if p.name != "broken.mid")
    groups = {name: "one tune" for name in top[:3]}
    assert len({split_of(n, 0.3, 0.3) for n in groups}) > 1  # by path they would part
    files = [{"file": n, "group": g} for n, g in groups.items()]
    (corpus / "manifest.json").write_text(json.dumps({"files": files}))
    prepare(corpus, tmp_path / "cache", data_config=DATA, workers=1)
    cache = TokenCache(tmp_path / "cache")
    split = {cache.relpath(i): ("train", "valid", "test")[s] for i, s in enumerate(cache.splits)}
    assert {split[n] for n in groups} == {split_of("one tune", 0.3, 0.3)}
    assert split[top[3]] == split_of(top[3], 0.3, 0.3)
