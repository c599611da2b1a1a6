"""The rules of part writing located (``aurl.analysis.part_writing``), a file's tracks read as
voices, and ``aurl analyze``'s Voice leading section: hand-built voices with known faults, a
Bach chorale, and a piano-like file that is not voices."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import symusic

from aurl.analysis import part_writing as pw
from aurl.analysis.report import voice_tracks
from aurl.cli import main
from aurl.data.notes import make_notes
from aurl.evaluation.tasks import voice_rules

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "midi"


def satb(*chords: list[int]) -> list[np.ndarray]:
    """Four voices (S, A, T, B) from chords of four pitches (highest first), a beat each."""
    n = len(chords)
    return [make_notes(list(range(n)), 1.0, [c[v] for c in chords]) for v in range(4)]


# beat 0: C5 G4 E4 C3; beat 1: D5 F4 D4 D3, the soprano and the bass up a step in octaves
# (a parallel octave; no other pair keeps a perfect interval); beat 2: E5 C4 D4 C3, the tenor
# over the alto (a crossing) and the soprano 16 semitones over the alto (spacing); beat 3: the
# bass on C2, under its range (E2-C4).
CHORDS = ([72, 67, 64, 48], [74, 65, 62, 50], [76, 60, 62, 48], [72, 67, 64, 36])


def test_faults_name_each_broken_rule_with_its_beat() -> None:
    got = pw.faults(satb(*CHORDS), list(pw.SATB))
    rules = [(f["beat"], f["rule"], tuple(f["voices"])) for f in got["faults"]]
    assert rules == [
        (1.0, "parallel octaves", ("Soprano", "Bass")),
        (2.0, "crossing", ("Alto", "Tenor")),
        (2.0, "spacing", ("Soprano", "Alto")),
        (3.0, "out of range", ("Bass",)),
    ]
    assert got["faults"][0]["pitches"] == [[72, 48], [74, 50]] and got["faults"][0]["from_beat"] == 0
    assert [f["second"] for f in got["faults"]] == [0.5, 1.0, 1.0, 1.5]  # 120 BPM: half a second a beat
    assert got["counts"]["moves"] == 6 + 6 + 6 and got["ranges_judged"]
    # the rates of `aurl evaluate --task` count the same faults
    rules = voice_rules(satb(*CHORDS))
    assert rules["parallels"] == 1 and rules["moves"] == 18 and rules["slices"] == 4
    assert rules["crossings_per_100_slices"] == 25.0 and rules["spacing_per_100_slices"] == 25.0
    assert rules["out_of_range_per_100_notes"] == 100 / 16
    # a fifth to a twelfth is a parallel; contrary motion into an octave is not
    assert pw.parallels(np.array([[67, 60], [74, 55]]))[1] == []  # up / down: contrary
    assert pw.parallels(np.array([[67, 60], [81, 62]]))[1] == [(0, 0, 1, 7)]


def test_spacing_judges_every_neighbouring_pair_but_the_lowest() -> None:
    """Three voices (S, A, B): the soprano 14 semitones over the alto is a spacing fault, the
    alto 19 over the bass is not (the bass may lie far under the others), nor are two voices
    two octaves apart."""
    three = np.array([[74, 60, 41], [72, 64, 45]])
    assert pw.wide(three) == [(0, 0, 14)]
    assert pw.wide(np.array([[84, 60]])) == []
    assert [k for _, k, _ in pw.wide(np.array([[86, 72, 58, 40]]))] == [0, 1]  # SATB: S-A, A-T


def _write(tracks: list[tuple[str, list[np.ndarray]]], path: Path) -> Path:
    score = symusic.Score(480)
    for name, notes in tracks:
        t = symusic.Track(name)
        for n in notes:
            t.notes.append(symusic.Note(int(n["onset"] * 480), int(n["duration"] * 480),
                                        int(n["pitch"]), 80))  # fmt: skip
        score.tracks.append(t)
    score.dump_midi(str(path))
    return path


def test_aurl_analyze_reports_the_voice_leading_of_a_file_in_voices(tmp_path) -> None:
    voices = satb(*CHORDS, [76, 67, 60, 48])
    path = _write(list(zip(pw.SATB, voices)), tmp_path / "exercise.mid")
    assert main(["analyze", str(path), "--out", str(tmp_path / "a"), "--no-plots"]) == 0
    got = json.loads((tmp_path / "a" / "analysis.json").read_text())["voice_leading"]
    assert got["voices"] == list(pw.SATB)
    assert got["counts"]["parallel octaves"] == 1 and got["counts"]["crossing"] == 1
    report = (tmp_path / "a" / "report.md").read_text()
    assert "## Voice leading" in report
    assert "| bar 1 beat 2 | parallel octaves | Soprano / Bass | C5-C3 to D5-D3 |" in report
    assert "| bar 1 beat 4 | out of range | Bass | C2 (range E2-C4) |" in report
    # a folder: the files in voices pooled
    (tmp_path / "two").mkdir()
    for name in ("a.mid", "b.mid"):
        (tmp_path / "two" / name).write_bytes(path.read_bytes())
    assert main(["analyze", str(tmp_path / "two"), "--out", str(tmp_path / "b"), "--no-plots"]) == 0
    pooled = json.loads((tmp_path / "b" / "analysis.json").read_text())["voice_leading"]
    assert pooled["files"] == 2 and pooled["parallel octaves"] == 2 and pooled["moves"] == 2 * got["counts"]["moves"]


def test_aurl_analyze_reads_musicxml_parts_as_voices(tmp_path, capsys) -> None:
    """A MusicXML chorale (music21's writing of the fixture's four parts) is analysed as its
    MIDI is: the same key, its parts read as SATB voices; in a folder a .xml that is no score
    is skipped naming it, and the rest analysed (MusicXML once: 'not a MIDI file')."""
    from music21 import converter

    xml = tmp_path / "in" / "bwv269.musicxml"
    xml.parent.mkdir()
    converter.parse(str(FIXTURES / "bach_bwv269.mid"), forceSource=True).write("musicxml", fp=str(xml))
    (tmp_path / "in" / "notes.xml").write_text("<shopping><item>milk</item></shopping>")
    assert main(["analyze", str(xml), "--out", str(tmp_path / "a"), "--no-plots"]) == 0
    got = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert got["key"]["name"] == "G major"
    assert len(got["voice_leading"]["voices"]) == 4 and got["voice_leading"]["counts"]["moves"] > 400
    assert main(["analyze", str(tmp_path / "in"), "--out", str(tmp_path / "b"), "--no-plots"]) == 0
    assert f"skipped {tmp_path / 'in' / 'notes.xml'} cannot be read" in capsys.readouterr().err
    assert json.loads((tmp_path / "b" / "analysis.json").read_text())["voice_leading"]["files"] == 1


def test_a_chorale_reads_as_satb_and_a_piano_part_as_no_voices() -> None:
    from aurl.data.midi_io import read_score
    from aurl.generation.compose import track_notes

    tracks = track_notes(read_score(FIXTURES / "bach_bwv269.mid"))
    voices = voice_tracks(tracks)
    assert [name for name, _ in voices] == ["Soprano", "Alto", "Tenor", "Bass"]
    # Bach's own part writing in this chorale: no parallels, nothing out of range
    got = pw.faults([n for _, n in voices], [name for name, _ in voices])["counts"]
    assert got["parallel fifths"] == got["parallel octaves"] == got["out of range"] == 0
    assert got["moves"] > 400
    # chords in one track (a piano's right hand) are no voice; nor is a single track
    chords = np.sort(np.concatenate([make_notes([i] * 3, 1.0, [60, 64, 67]) for i in range(4)]),
                     order="onset")  # fmt: skip
    bass = make_notes([0, 1, 2, 3], 1.0, [48, 43, 45, 41])
    assert voice_tracks([("RH", chords), ("LH", bass)]) is None
    assert voice_tracks([("Soprano", bass)]) is None
    # unnamed tracks read as numbered voices, highest first
    named = voice_tracks([("", bass), ("", make_notes([0, 1], 1.0, [72, 74]))])
    assert [name for name, _ in named] == ["Voice 1", "Voice 2"] and named[0][1]["pitch"][0] == 72


def test_a_long_piece_lists_the_first_faults_and_counts_them_all() -> None:
    # 1,500 beats with the alto over the soprano throughout: 1,500 crossings
    n = 1500
    voices = [make_notes(np.arange(n), 1.0, [60] * n), make_notes(np.arange(n), 1.0, [64] * n)]
    got = pw.faults(voices, ["Voice 1", "Voice 2"])
    assert got["counts"]["crossing"] == n and len(got["faults"]) == pw.MAX_LISTED
    assert got["faults"][-1]["beat"] == pw.MAX_LISTED - 1
