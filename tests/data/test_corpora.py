"""The palestrina, renaissance and all corpora on a few real music21 scores: manifest fields,
one style per piece, groups by mass, resumable, bounded, a folder of corpora read back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from aurl.cli import main
from aurl.data import corpora
from aurl.data.corpus import CLASSICAL_FOLDERS, _corpus_root, style_of
from aurl.errors import DataError

# Two movements of one mass (their file numbers differ: only the !!!OPR record says they
# belong together) and one movement of another.
SAME_MASS = ("palestrina/Credo_67_c.krn", "palestrina/Gloria_70_c.krn")
OTHER_MASS = "palestrina/Credo_16_c.krn"


@pytest.fixture()
def pal_root(tmp_path) -> Path:
    root = tmp_path / "corpus"
    (root / "palestrina").mkdir(parents=True)
    for rel in (*SAME_MASS, OTHER_MASS):
        shutil.copyfile(_corpus_root() / rel, root / rel)
    return root


def test_palestrina_groups_by_mass_and_resumes(pal_root, tmp_path):
    out = tmp_path / "pal"
    report = corpora.build_palestrina(out, root=pal_root, workers=1)
    assert report.converted == 3 and not report.skipped
    manifest = json.loads((out / "manifest.json").read_text())
    entries = {e["source"]: e for e in manifest["files"]}
    a, b, c = (entries[s] for s in (*SAME_MASS, OTHER_MASS))
    assert a["work"] == b["work"] == "Missa In illo tempore"
    assert a["group"] == b["group"] != c["group"]  # one mass, one group, one split
    assert a["split"] == b["split"]
    assert a["title"].startswith("Missa In illo tempore - ")
    for e in (a, b, c):
        assert e["style"] == "palestrina" and e["composer"] == corpora.PALESTRINA
        assert e["notes"] > 20 and e["tracks"] >= 2 and e["duration_s"] > 5
        assert (out / e["file"]).is_file()
    # resumable: nothing is redone; a lost file is converted again
    assert corpora.build_palestrina(out, root=pal_root, workers=1).converted == 0
    (out / a["file"]).unlink()
    again = corpora.build_palestrina(out, root=pal_root, workers=1)
    assert again.converted == 1 and len(again.files) == 3


def test_limit_takes_a_hashed_spread_and_oversized_scores_are_refused(
    pal_root, tmp_path, monkeypatch
):
    report = corpora.build_palestrina(tmp_path / "two", root=pal_root, workers=1, limit=2)
    assert len(report.files) == 2
    monkeypatch.setattr(
        corpora, "MAX_SCORE_BYTES", 1250
    )  # Credo_67_c: 1,245 bytes, the others more
    report = corpora.build_palestrina(tmp_path / "small", root=pal_root, workers=1)
    assert [e["source"] for e in report.files] == [SAME_MASS[0]]
    assert all("refused" in s["reason"] for s in report.skipped) and len(report.skipped) == 2


def test_a_folder_of_another_corpus_is_refused(pal_root, tmp_path):
    out = tmp_path / "x"
    corpora.build_palestrina(out, root=pal_root, workers=1, limit=1)
    with pytest.raises(DataError, match="belongs to corpus 'palestrina'"):
        corpora.build_renaissance(out, workers=1, limit=1)


def test_renaissance_merges_josquins_voices(tmp_path):
    root = tmp_path / "corpus"
    for folder in corpora.RENAISSANCE:
        (root / folder).mkdir(parents=True)
    shutil.copyfile(_corpus_root() / "josquin/oVenusBant.abc", root / "josquin/oVenusBant.abc")
    report = corpora.build_renaissance(tmp_path / "ren", root=root, workers=1)
    (entry,) = report.files
    # the ABC file holds one tune per voice: one piece of three voices, not three in a row
    assert entry["tracks"] == 3 and entry["composer"] == "Josquin des Prez"
    assert entry["style"] == "renaissance"


def test_renaissance_sources_leave_palestrina_out():
    sources = corpora.renaissance_sources()
    folders = {s.path.split("/")[0] for s in sources}
    assert folders == set(corpora.RENAISSANCE) and len(sources) > 150
    assert len({Path(s.path).with_suffix("").as_posix() for s in sources}) == len(sources)


def test_style_labels_are_one_per_corpus():
    assert style_of("bach-chorales", {"source": "bach/bwv1.6.mxl"}) == "chorale"
    assert style_of("classical", {"source": "bach/bwv1.6.mxl"}) == "chorale"
    assert style_of("classical", {"source": "mozart/k80/movement1.mxl"}) == "classical"
    assert style_of("anything", {"style": "folk"}) == "folk"
    assert style_of("my-midi", {}) == ""


TUNE = """X: 1
T: The Rose in the Heather
M: 6/8
L: 1/8
K: D
A | d2 d dcd | e2 e efg | f2 d e2 c | d3 d2 :|
|: f | a2 a agf | e2 e efg | f2 d e2 c | d3 d2 :|
"""  # as in tests/data/test_folk.py


def test_all_writes_every_corpus_with_its_style_and_labels_read_back(pal_root, tmp_path):
    root = pal_root  # + one small score of every other corpus
    for folder in corpora.RENAISSANCE:
        (root / folder).mkdir(parents=True, exist_ok=True)
    for rel in ("josquin/oVenusBant.abc", "mozart/k545/movement1_exposition.mxl"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_corpus_root() / rel, root / rel)
    for folder in CLASSICAL_FOLDERS:
        (root / folder).mkdir(exist_ok=True)
    (root / "oneills1850").mkdir()
    (root / "oneills1850" / "book.abc").write_text(TUNE, encoding="latin-1")
    out = tmp_path / "all"
    report = corpora.build_all(out, root=root, workers=1, limit=2)
    manifest = json.loads((out / "manifest.json").read_text())
    by_corpus: dict[str, list] = {}
    for e in manifest["files"]:
        by_corpus.setdefault(e["corpus"], []).append(e)
        assert (out / e["file"]).is_file() and e["file"].startswith(e["corpus"] + "/")
        assert e["style"] == style_of(e["corpus"], {})  # one style per corpus, disjoint
    assert len(by_corpus["bach-chorales"]) > 300  # the bundled chorales, copied whole
    assert {k: len(v) for k, v in by_corpus.items() if k != "bach-chorales"} == {
        "classical": 1, "folk": 1, "palestrina": 2, "renaissance": 1,
    }  # fmt: skip
    assert len(report.files) == len(manifest["files"])
    labels = corpora.manifest_labels(out)
    assert {f: lab["style"] for f, lab in labels.items()} == {
        e["file"]: e["style"] for e in manifest["files"]
    }
    # the same folder without its top manifest: the subfolders' manifests give the same labels
    (out / "manifest.json").unlink()
    assert corpora.manifest_labels(out) == labels


def test_cli_palestrina_limit(tmp_path, capsys):
    out = tmp_path / "pal"
    assert main(["data", "corpus", "--name", "palestrina", "--out", str(out), "--limit", "1",
                 "--workers", "1"]) == 0  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["files"]) == 1 and manifest["files"][0]["style"] == "palestrina"
    assert "wrote 1 MIDI files" in capsys.readouterr().out
