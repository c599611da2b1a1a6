"""The hash split: deterministic, stable when files are added, fractions respected."""

from __future__ import annotations

import hashlib
import random

import pytest

from aurl.data.split import SPLITS, hash_unit, normalize_relpath, split_counts, split_of
from aurl.errors import ConfigError


def fake_paths(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    composers = ["bach", "mozart", "haydn", "beethoven", "lakh/0a", "maestro/2018"]
    return [f"{rng.choice(composers)}/piece_{rng.randrange(10**9):09d}_{i}.mid" for i in range(n)]


def test_hash_unit_is_the_documented_sha1_formula():
    # u = first 8 bytes of SHA-1 of the UTF-8 path, big-endian, / 2**64
    for path in ["y.mid", "bach_bwv66.6.mid", "ünïcode/Ärger.mid"]:
        expected = int(hashlib.sha1(path.encode("utf-8")).hexdigest()[:16], 16) / 2**64
        assert hash_unit(path) == expected


def test_known_paths_keep_their_split():
    # Pinned values: a change here would move files between splits for every existing cache.
    assert hash_unit("y.mid") == pytest.approx(0.016897951755806797, abs=1e-15)
    assert split_of("y.mid") == "test"  # 0.0169 < 0.1
    assert split_of("y.mid", 0.1, 0.01) == "valid"  # 0.01 <= 0.0169 < 0.11
    assert split_of("y.mid", 0.0, 0.0) == "train"
    assert split_of("x.mid") == "train"  # u = 0.988
    assert split_of("bach_bwv66.6.mid") == "train"  # u = 0.378
    assert split_of("bach_bwv66.6.mid", 0.0, 0.38) == "test"


def test_path_spellings_agree():
    assert normalize_relpath("a\\b\\c.mid") == "a/b/c.mid"
    assert normalize_relpath("./a/b/c.mid") == "a/b/c.mid"
    for p in ["a\\b\\c.mid", "./a/b/c.mid", "././a/b/c.mid"]:
        assert hash_unit(p) == hash_unit("a/b/c.mid")


def test_split_is_deterministic_and_independent_of_other_files():
    paths = fake_paths(2000)
    alone = {p: split_of(p) for p in paths[:500]}
    # the same files among 4x as many others, visited in another order
    mixed = paths[::-1] + fake_paths(6000, seed=1)
    together = {p: split_of(p) for p in mixed}
    assert all(together[p] == s for p, s in alone.items())


@pytest.mark.parametrize("valid,test", [(0.1, 0.1), (0.05, 0.2), (0.0, 0.3), (0.25, 0.0)])
def test_fractions_on_many_paths(valid, test):
    n = 20000
    counts = split_counts(fake_paths(n), valid, test)
    assert sum(counts.values()) == n and set(counts) == set(SPLITS)
    # binomial std at n=20000 is <= 0.0036; 4 sigma
    assert counts["valid"] / n == pytest.approx(valid, abs=0.015)
    assert counts["test"] / n == pytest.approx(test, abs=0.015)
    if valid == 0.0:
        assert counts["valid"] == 0
    if test == 0.0:
        assert counts["test"] == 0


def test_growing_a_fraction_only_takes_files_from_train():
    paths = fake_paths(3000)
    before = {p: split_of(p, 0.1, 0.1) for p in paths}
    more_valid = {p: split_of(p, 0.2, 0.1) for p in paths}
    assert all(more_valid[p] == s for p, s in before.items() if s != "train")
    assert sum(s == "valid" for s in more_valid.values()) > sum(
        s == "valid" for s in before.values()
    )


@pytest.mark.parametrize("valid,test", [(-0.1, 0.1), (0.1, 1.0), (0.6, 0.5), (float("nan"), 0.1)])
def test_bad_fractions_raise_config_error_naming_the_key(valid, test):
    with pytest.raises(ConfigError, match=r"data\.(valid|test)_fraction"):
        split_of("a.mid", valid, test)
