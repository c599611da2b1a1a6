"""The folk corpus: ABC files split into tunes, converted one per MIDI file, bad tunes reported
and skipped, runaway repeats refused, groups by title and by melody (MinHash), resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aurl.cli import main
from aurl.data.corpus import ScoreSkipped
from aurl.data.folk import (
    Tune,
    build_folk,
    candidate_pairs,
    convert_tune,
    folk_groups,
    list_tunes,
    minhash,
    split_abc,
)
from aurl.data.tunes import soprano_intervals

# Two real tunes of O'Neill's 1850 collection as music21 ships them (the first one's meter
# object is shared by two bars in music21's reading: its MIDI writer refuses that unless fixed),
# the second again under another title in another key (the same tune: one group), and two bad
# ones: no notes at all, and a text far beyond any tune's length.
HEADER = "% O'Neill's Music of Ireland, excerpt\nN: header line\n"
VALLEY = """X: 1
T: The Enchanted Valley
M: 2/4
L: 1/16
B: "O'Neill's 1"
K:Gm
G3-A (Bcd=e) | f4 (g2dB) | ({d}c3-B) G2-E2 | F4 (D2=E^F) |
G3-A (Bcd=e) | f4 d2-f2 | (g2a2 b2).g2 | {b}(a2g2 f2).d2 |
(d2{ed}c2) B2B2 | (A2G2 {AG}F2).D2 | (GABc) (d2{ed}c>A) | G2G2 G2z ||
G | B2c2 (dcAB) | G2G2 G3G | B2d2 (gfdc) | d2g2 (g3ga) |
(bagf) (gd)d>c | (B2AG) F-D.D2 | (GABc) d2d2 | (bgfd) cA.F2 |
G2A2 (B2{cB}AG) | A3-G F2-D2 | (GABc) (d2{ed}c>A) | G2G2 G2z2 ||
"""  # music21's oneills1850/0001-0050.abc, tune 1 (its N: and Z: lines left out)
ROSE = """X: 2
T: The Rose in the Heather
M: 6/8
L: 1/8
K: D
A | d2 d dcd | e2 e efg | f2 d e2 c | d3 d2 :|
|: f | a2 a agf | e2 e efg | f2 d e2 c | d3 d2 :|
"""
ROSE_AGAIN = """X: 3
T: The Heather Rose
M: 6/8
L: 1/8
K: G
d | g2 g gfg | a2 a abc' | b2 g a2 f | g3 g2 :|
|: b | d'2 d' d'c'b | a2 a abc' | b2 g a2 f | g3 g2 :|
"""  # the same tune a fourth higher: the same intervals
EMPTY = "X: 4\nT: Nothing At All\nM: 4/4\nL: 1/4\nK: C\n"
HUGE = "X: 5\nT: Endless\nM: 4/4\nL: 1/4\nK: C\n" + "CDEF|" * 5000 + "\n"


@pytest.fixture()
def abc_root(tmp_path) -> Path:
    root = tmp_path / "corpus"
    (root / "oneills1850").mkdir(parents=True)
    (root / "oneills1850" / "book.abc").write_text(
        HEADER + "\n".join([VALLEY, ROSE, ROSE_AGAIN, EMPTY, HUGE]), encoding="latin-1"
    )
    return root


def test_split_abc_carries_the_header_and_titles():
    tunes = split_abc(HEADER + VALLEY + "\n" + ROSE, "oneills1850/book.abc")
    assert [(t.index, t.title) for t in tunes] == [(1, "The Enchanted Valley"),
                                                   (2, "The Rose in the Heather")]  # fmt: skip
    assert all(t.text.startswith("N: header line\n") for t in tunes)  # % comments dropped
    assert tunes[1].file == "oneills1850_book_0002.mid"
    assert tunes[1].source == "oneills1850/book.abc#2"


def test_build_folk_converts_groups_skips_and_resumes(abc_root, tmp_path):
    out = tmp_path / "folk"
    report = build_folk(out, root=abc_root, collections=["oneills1850"], workers=1,
                        valid_fraction=0.3, test_fraction=0.3)  # fmt: skip
    files = {e["file"]: e for e in report.files}
    assert sorted(files) == [f"oneills1850_book_000{i}.mid" for i in (1, 2, 3)]
    assert all((out / f).is_file() for f in files)
    reasons = {s["source"]: s["reason"] for s in report.skipped}
    assert set(reasons) == {"oneills1850/book.abc#4", "oneills1850/book.abc#5"}
    assert reasons["oneills1850/book.abc#4"] == "no notes"
    assert "characters (limit" in reasons["oneills1850/book.abc#5"]
    valley = files["oneills1850_book_0001.mid"]
    assert valley["style"] == "folk" and valley["composer"] == "traditional"
    assert valley["collection"] == "O'Neill's Music of Ireland (1850)"
    assert valley["title"] == "The Enchanted Valley" and valley["notes"] > 40
    assert valley["duration_s"] > 10
    # the same tune under two titles and in two keys: one group, one split
    a, b = files["oneills1850_book_0002.mid"], files["oneills1850_book_0003.mid"]
    assert a["group"] == b["group"] == "the heather rose" and a["split"] == b["split"]
    assert valley["group"] == "the enchanted valley"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["files"]) == 3 and len(manifest["skipped"]) == 2
    # resumable: nothing is redone; a lost file is converted again
    again = build_folk(out, root=abc_root, collections=["oneills1850"], workers=1,
                       valid_fraction=0.3, test_fraction=0.3)  # fmt: skip
    assert again.converted == 0 and len(again.files) == 3
    (out / "oneills1850_book_0002.mid").unlink()
    third = build_folk(out, root=abc_root, collections=["oneills1850"], workers=1,
                       valid_fraction=0.3, test_fraction=0.3)  # fmt: skip
    assert third.converted == 1 and len(third.files) == 3
    # --limit: the first N in the hashed order
    first = list_tunes(abc_root, ["oneills1850"])[:2]
    small = build_folk(tmp_path / "two", root=abc_root, collections=["oneills1850"],
                       workers=1, limit=2)  # fmt: skip
    done = {e["source"] for e in small.files} | {s["source"] for s in small.skipped}
    assert done == {t.source for t in first}


def test_runaway_repeat_expansion_is_refused(tmp_path):
    tune = Tune("oneills1850/book.abc", 2, "The Rose in the Heather", ROSE)
    entry = convert_tune(tune, tmp_path / "a.mid")
    assert entry["repeats"] == "expanded"  # its two repeated strains: twice the written tune
    with pytest.raises(ScoreSkipped, match="runaway repeat expansion refused"):
        convert_tune(tune, tmp_path / "b.mid", max_repeat_factor=1.5)
    assert not (tmp_path / "b.mid").exists()


def test_minhash_candidates_find_the_same_tune_only(abc_root, tmp_path):
    report = build_folk(tmp_path / "f", root=abc_root, collections=["oneills1850"], workers=1)
    melodies = {e["file"]: soprano_intervals(tmp_path / "f" / e["file"]) for e in report.files}
    sigs = {f: minhash(m) for f, m in melodies.items()}
    pairs = candidate_pairs(sigs)
    assert ("oneills1850_book_0002.mid", "oneills1850_book_0003.mid") in pairs
    assert not any("0001" in a or "0001" in b for a, b in pairs)
    # without titles the melody alone joins the two settings
    groups = folk_groups(dict.fromkeys(melodies, ""), melodies)
    assert groups["oneills1850_book_0002.mid"] == groups["oneills1850_book_0003.mid"]
    assert groups["oneills1850_book_0001.mid"] == "oneills1850_book_0001.mid"
    assert minhash((1, 2, 3)) is None  # shorter than one 4-gram: no signature


def test_cli_folk_limit(tmp_path, capsys):
    out = tmp_path / "folk"
    assert main(["data", "corpus", "--name", "folk", "--out", str(out), "--limit", "3",
                 "--workers", "1"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["files"]) + len(manifest["skipped"]) == 3
    assert f"wrote {len(manifest['files'])} MIDI files" in text
    assert {e["style"] for e in manifest["files"]} == {"folk"}
