"""The hash split: deterministic, stable when files are added, fractions respected."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from aurl.data.corpus import read_manifest
from aurl.data.split import SPLITS, hash_unit, normalize_relpath, split_counts, split_of
from aurl.data.tunes import (
    SAME_TUNE,
    normalize_title,
    similar_pairs,
    soprano_intervals,
    tune_groups,
)
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


# --------------------------------------------------------------------------------------------
# Tune groups: the split of the bundled corpus has no melodic leak
# --------------------------------------------------------------------------------------------

CHORALES = Path(__file__).parents[2] / "src" / "aurl" / "data" / "bundled" / "bach-chorales"


@pytest.fixture(scope="module")
def bundled() -> tuple[dict, dict[str, tuple[int, ...]]]:
    """The bundled manifest and every file's soprano intervals."""
    manifest = read_manifest(CHORALES)
    melodies = {e["file"]: soprano_intervals(CHORALES / e["file"]) for e in manifest["files"]}
    return manifest, melodies


def test_normalize_title_names_the_hymn():
    assert (
        normalize_title("Meine Seel’ erhebt den Herren (BWV 10.7)")
        == "meine seel erhebt den herren"
    )
    assert normalize_title("Wer nur den lieben Gott läßt walten (BWV 88.7)") == (
        "wer nur den lieben gott lasst walten"
    )
    assert normalize_title("") == ""


def test_soprano_intervals_of_a_chorale():
    # BWV 10.7's track "Soprano" (mean pitch 72.4, above the alto's 65.6) opens on
    # D5 F5 D5 D5 D5: intervals +3 -3 0 0
    melody = soprano_intervals(CHORALES / "bach_bwv10.7.mid")
    assert melody[:4] == (3, -3, 0, 0) and len(melody) > 20


def test_tune_groups_join_titles_and_tunes_and_bridge():
    tune = (2, 2, -1, -3, 5, 0, -2, 1, 1, -4)
    titles = {"a.mid": "Hymn One (BWV 1.1)", "b.mid": "Hymn one (BWV 2.2)", "c.mid": "",
              "d.mid": "Other", "e.mid": ""}  # fmt: skip
    melodies = {"a.mid": (1,) * 10, "b.mid": tune, "c.mid": tune[:-1] + (3,), "d.mid": (5, -5) * 5,
                "e.mid": (7,) * 10}  # fmt: skip
    groups = tune_groups(titles, melodies)
    # a ~ b by title, b ~ c by tune (ratio 0.9): one group keyed by its smallest title
    assert groups["a.mid"] == groups["b.mid"] == groups["c.mid"] == "hymn one"
    assert groups["d.mid"] == "other" and groups["e.mid"] == "e.mid"
    # one note more in c's tune (ratio 0.85 < 0.9): c stands alone, keyed by its file name
    melodies["c.mid"] = tune[:-2] + (3, 3)
    assert tune_groups(titles, melodies)["c.mid"] == "c.mid"


def test_bundled_split_has_no_melodic_leak(bundled):
    manifest, melodies = bundled
    split = {e["file"]: e["split"] for e in manifest["files"]}
    train = [f for f, s in split.items() if s == "train"]
    held = [f for f, s in split.items() if s != "train"]
    assert len(held) >= 0.12 * len(split)  # the fractions still hold out files (50 groups)
    assert similar_pairs(melodies, SAME_TUNE, among=held, against=train) == []
    # and the path hash alone would leak: the test can see a leak when there is one
    by_path = {f: split_of(f) for f in split}
    held_p = [f for f, s in by_path.items() if s != "train"]
    train_p = [f for f, s in by_path.items() if s == "train"]
    assert len(similar_pairs(melodies, SAME_TUNE, among=held_p, against=train_p)) >= 10


def test_bundled_manifest_is_what_the_rule_gives(bundled):
    manifest, melodies = bundled
    titles = {e["file"]: e["title"] for e in manifest["files"]}
    groups = tune_groups(titles, melodies)
    for e in manifest["files"]:
        assert e["group"] == groups[e["file"]]
        assert e["split"] == split_of(e["group"], manifest["valid_fraction"],
                                      manifest["test_fraction"])  # fmt: skip
