"""The bundled corpus: manifest vs files, one real conversion end to end, the repeat cap."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest
import symusic

from aurl.cli import main
from aurl.data.corpus import (
    BUNDLED_DIR,
    MANIFEST,
    CorpusReport,
    ScoreSkipped,
    Source,
    build_corpus,
    convert_score,
    convert_sources,
    drop_duplicates,
    list_sources,
    read_manifest,
    stream_to_score,
)
from aurl.data.notes import notes_from_file
from aurl.data.split import split_of
from aurl.errors import DataError

CHORALES = BUNDLED_DIR / "bach-chorales"


@pytest.fixture(scope="module")
def bundled() -> dict:
    return read_manifest(CHORALES)


# --------------------------------------------------------------------------------------------
# The bundled chorales
# --------------------------------------------------------------------------------------------


def test_bundled_manifest_lists_exactly_the_files(bundled):
    files = sorted(p.name for p in CHORALES.glob("*.mid"))
    listed = [e["file"] for e in bundled["files"]]
    assert listed == files  # same names, sorted, no duplicates
    assert len(files) == 350  # 371 Riemenschneider numbers, 350 distinct scores
    assert sorted(p.name for p in CHORALES.iterdir()) == [*files, MANIFEST]
    assert bundled["name"] == "bach-chorales" and bundled["skipped"] == []


def test_bundled_manifest_matches_music21_sources(bundled):
    sources = list_sources("bach-chorales")
    assert [s.file for s in sources] == [e["file"] for e in bundled["files"]]
    for s, e in zip(sources, bundled["files"]):
        assert e["source"] == s.path and e["title"] == s.title
        assert e["composer"] == "Johann Sebastian Bach"
    # the file name is the source path with "/" -> "_"
    assert Source("bach/bwv66.6.mxl", "").file == "bach_bwv66.6.mid"


def test_bundled_manifest_numbers_match_the_files(bundled):
    for e in bundled["files"]:
        score = symusic.Score(str(CHORALES / e["file"]))
        assert sum(len(t.notes) for t in score.tracks) == e["notes"], e["file"]
        assert len(score.tracks) == e["tracks"] and all(len(t.notes) for t in score.tracks)
        assert score.to("second").end() == pytest.approx(e["duration_s"], abs=1e-3), e["file"]
        assert e["split"] == split_of(e["group"], 0.1, 0.1)
        assert e["repeats"] in ("none", "expanded")
    total = len(bundled["files"])
    n_train = sum(e["split"] == "train" for e in bundled["files"])
    assert 0.7 < n_train / total < 0.9


def test_copy_is_instant_and_identical(tmp_path, bundled):
    report = build_corpus("bach-chorales", tmp_path / "out")
    assert report.copied == 350 and report.converted == 0 and report.skipped == []
    for e in bundled["files"][::25]:
        assert (tmp_path / "out" / e["file"]).read_bytes() == (CHORALES / e["file"]).read_bytes()
    assert read_manifest(tmp_path / "out")["files"] == bundled["files"]
    assert report.notes == sum(e["notes"] for e in bundled["files"])


def test_copy_recomputes_splits_for_other_fractions(tmp_path):
    report = build_corpus("bach-chorales", tmp_path, valid_fraction=0.0, test_fraction=0.5)
    splits = {e["split"] for e in read_manifest(tmp_path)["files"]}
    assert splits == {"train", "test"}
    assert all(e["split"] == split_of(e["group"], 0.0, 0.5) for e in report.files)


def test_cli_corpus_prints_a_summary(tmp_path, capsys):
    assert main(["data", "corpus", "--name", "bach-chorales", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"wrote 350 MIDI files to {tmp_path} (350 copied, 0 converted)" in out
    assert "manifest:" in out and (tmp_path / MANIFEST).is_file()


def test_identical_music_is_kept_once(tmp_path, bundled):
    a, b = bundled["files"][:2]
    twin = {**a, "file": "zz_twin.mid", "source": "elsewhere/twin.mxl"}
    for entry, src in [(a, a), (b, b), (twin, a)]:
        (tmp_path / entry["file"]).write_bytes((CHORALES / src["file"]).read_bytes())
    report = CorpusReport("test", tmp_path, files=[a, b, twin])
    drop_duplicates(report, copied_names={a["file"]})
    assert [e["file"] for e in report.files] == [a["file"], b["file"]]
    assert report.skipped == [
        {"source": "elsewhere/twin.mxl", "reason": f"same music as {a['file']}"}
    ]
    assert (report.copied, report.converted) == (1, 1)
    assert not (tmp_path / "zz_twin.mid").exists()


def test_unknown_corpus_and_missing_manifest_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="unknown corpus 'jazz'"):
        build_corpus("jazz", tmp_path)
    with pytest.raises(DataError, match="manifest.json"):
        read_manifest(tmp_path)


def test_classical_sources_cover_the_five_composers():
    sources = list_sources("classical")
    folders = {s.path.split("/")[0] for s in sources}
    assert folders == {"bach", "beethoven", "mozart", "haydn", "schubert"} | {
        "schumann_robert",
        "schumann_clara",
    }
    # one format per score: beethoven/opus18no1/movement1 exists as .krn and .mxl
    assert len({s.file for s in sources}) == len(sources)
    assert "beethoven/opus18no1/movement1.mxl" in {s.path for s in sources}


# --------------------------------------------------------------------------------------------
# Converting one score end to end
# --------------------------------------------------------------------------------------------


def test_one_chorale_converts_like_the_bundled_file_and_the_fixture(tmp_path, fixtures_dir):
    source = next(s for s in list_sources("bach-chorales") if s.path == "bach/bwv269.mxl")
    assert source.title == "Aus meines Herzens Grunde (BWV 269)"  # Riemenschneider no. 1
    entry = convert_score(source, tmp_path / source.file)
    assert entry["file"] == "bach_bwv269.mid" and entry["repeats"] == "expanded"
    # music21 writes an empty fifth track (see the fixture); it is dropped
    assert (entry["notes"], entry["tracks"], entry["duration_s"]) == (302, 4, 42.0)
    # deterministic: byte for byte the bundled file
    assert (tmp_path / source.file).read_bytes() == (CHORALES / source.file).read_bytes()
    # same notes as the checked-in fixture (converted through music21 the same way)
    ours = notes_from_file(tmp_path / source.file)
    fixture = notes_from_file(fixtures_dir / "midi" / "bach_bwv269.mid")
    np.testing.assert_array_equal(ours, fixture)


def test_one_chorale_has_music21s_notes(tmp_path):
    from music21 import corpus

    score = corpus.parse("bach/bwv66.6.mxl", forceSource=True).stripTies()
    pitches = sorted(p.midi for n in score.recurse().notes for p in n.pitches)
    convert_score(Source("bach/bwv66.6.mxl", "J.S. Bach", "t"), tmp_path / "a.mid")
    ours = notes_from_file(tmp_path / "a.mid")
    assert sorted(ours["pitch"].tolist()) == pitches


def test_pool_conversion_reports_written_and_skipped(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "broken.xml").write_text("<score-partwise><part id='P1'>")
    sources = [
        Source("bach/bwv66.6.mxl", "J.S. Bach", "a"),
        Source("src/broken.xml", "nobody", "b"),
    ]
    import music21.common

    root = tmp_path / "root"
    (root / "bach").mkdir(parents=True)
    (root / "bach" / "bwv66.6.mxl").symlink_to(
        Path(music21.common.getCorpusFilePath()) / "bach" / "bwv66.6.mxl"
    )
    (root / "src").symlink_to(tmp_path / "src")
    entries, skipped = convert_sources(sources, tmp_path / "out", workers=2, root=root)
    assert [e["file"] for e in entries] == ["bach_bwv66.6.mid"]
    assert [s["source"] for s in skipped] == ["src/broken.xml"]
    assert skipped[0]["reason"].startswith("music21 cannot read it")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bach_bwv66.6.mid"]


# --------------------------------------------------------------------------------------------
# Repeats
# --------------------------------------------------------------------------------------------


def repeated_score(times: int, *, badly_formed: bool = False):
    """Three 4/4 bars of whole notes C4 C#4 D4; bars 1-2 repeated ``times`` times in all."""
    from music21 import bar, meter, note, stream

    part = stream.Part()
    for i in range(3):
        m = stream.Measure(number=i + 1)
        if i == 0:
            m.append(meter.TimeSignature("4/4"))
        m.append(note.Note(60 + i, quarterLength=4))
        part.append(m)
    bars = list(part.getElementsByClass(stream.Measure))
    bars[0].leftBarline = bar.Repeat(direction="start")
    bars[1].rightBarline = bar.Repeat(direction="end", times=times)
    if badly_formed:  # start repeats without their ends
        bars[1].leftBarline = bar.Repeat(direction="start")
        bars[2].leftBarline = bar.Repeat(direction="start")
    score = stream.Score()
    score.insert(0, part)
    return score


def quarters_and_pitches(score) -> tuple[float, list[int]]:
    notes = score.tracks[0].notes.numpy()
    return score.end() / score.ticks_per_quarter, notes["pitch"].tolist()


def test_repeats_are_expanded():
    score, repeats = stream_to_score(repeated_score(2))
    assert repeats == "expanded"
    assert quarters_and_pitches(score) == (20.0, [60, 61, 60, 61, 62])


def test_runaway_expansion_is_capped_to_the_written_order():
    score, repeats = stream_to_score(repeated_score(10))  # 84 quarters of 12 written: 7x
    assert repeats.startswith("capped: expansion gave 0.7 min (7.0x the written score)")
    assert quarters_and_pitches(score) == (12.0, [60, 61, 62])
    # the same score under a looser cap is expanded in full
    score, repeats = stream_to_score(repeated_score(10), max_repeat_factor=8.0)
    assert repeats == "expanded" and quarters_and_pitches(score)[0] == 84.0
    # ... and the absolute cap applies too (84 quarters at 120 BPM = 42 s)
    score, repeats = stream_to_score(repeated_score(10), max_repeat_factor=8.0, max_minutes=0.5)
    assert repeats.startswith("capped") and quarters_and_pitches(score)[0] == 12.0


def test_badly_formed_repeats_are_skipped_with_the_reason():
    with pytest.raises(ScoreSkipped, match="music21 cannot expand its repeats"):
        stream_to_score(repeated_score(2, badly_formed=True))


def test_manifest_is_json_with_the_documented_fields(bundled):
    entry = bundled["files"][0]
    assert set(entry) == {
        "file", "source", "composer", "title", "duration_s", "notes", "tracks", "repeats",
        "warnings", "group", "split", "style",
    }  # fmt: skip
    assert {e["style"] for e in bundled["files"]} == {"chorale"}
    assert json.loads(json.dumps(bundled)) == bundled


def test_classical_corpus_converts_a_score_beside_the_copied_chorales(tmp_path, monkeypatch):
    """``build_corpus("classical")`` on a music21 corpus folder that holds one small score (the
    exposition of the piano sonata K. 545, two staves): the chorales are copied, the score converted."""
    import music21.common
    from music21 import corpus as m21corpus

    import aurl.data.corpus as corpus_module

    rel = "mozart/k545/movement1_exposition.mxl"
    root = tmp_path / "music21"
    (root / "mozart" / "k545").mkdir(parents=True)
    (root / rel).symlink_to(Path(music21.common.getCorpusFilePath()) / rel)
    monkeypatch.setattr(corpus_module, "_corpus_root", lambda: root)
    report = build_corpus("classical", tmp_path / "out", workers=1)
    assert (report.copied, report.converted, report.skipped) == (350, 1, [])
    manifest = read_manifest(tmp_path / "out")
    assert manifest["name"] == "classical" and len(manifest["files"]) == 351
    entry = next(e for e in manifest["files"] if e["source"] == rel)
    assert entry["file"] == "mozart_k545_movement1_exposition.mid"
    assert entry["composer"] == "Wolfgang Amadeus Mozart"
    assert entry["style"] == "classical"  # and the copied chorales "chorale"
    assert {e["style"] for e in manifest["files"] if e is not entry} == {"chorale"}
    assert entry["title"] == "movement1_exposition.mxl"  # music21's movement name: no title
    assert entry["split"] == split_of(entry["file"], 0.1, 0.1)
    midi = symusic.Score(str(tmp_path / "out" / entry["file"]))
    assert entry["tracks"] == len(midi.tracks) == 2  # the two staves
    assert entry["notes"] == midi.note_num()
    # the notes are music21's: the same pitches, each note as often as the repeats play it
    score = m21corpus.parse(rel, forceSource=True).stripTies()
    pitches = collections.Counter(p.midi for n in score.recurse().notes for p in n.pitches)
    ours = collections.Counter(notes_from_file(tmp_path / "out" / entry["file"])["pitch"].tolist())
    assert set(ours) == set(pitches)
    plays = 2 if entry["repeats"] == "expanded" else 1
    assert sum(ours.values()) == plays * sum(pitches.values())
