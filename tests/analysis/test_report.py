"""The analysis report and ``aurl analyze`` on real chorales and on degenerate files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import symusic

from aurl.analysis.report import aggregate, analyze_notes, write_report
from aurl.cli import main
from aurl.cli.analyze import read_piece
from aurl.data.notes import DRUM_PROGRAM, make_notes

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "midi"


def i_iv_v_i_twice() -> np.ndarray:
    voicings = [[48, 64, 67, 72], [53, 65, 69, 72], [55, 62, 67, 71], [48, 64, 67, 72]] * 2
    parts = [make_notes([2.0 * i] * 4, 2.0, v) for i, v in enumerate(voicings)]
    return np.sort(np.concatenate(parts), order=["onset", "pitch"])


def test_analyze_notes_on_a_hand_built_piece():
    result = analyze_notes(i_iv_v_i_twice(), name="cadences")
    assert result["status"] == "ok"
    assert result["key"]["name"] == "C major"
    assert result["progression"] == ["I", "IV", "V", "I", "IV", "V", "I"]
    assert result["ngrams"]["3"][0] == [["I", "IV", "V"], 2]
    assert result["transitions"]["states"][:3] == ["I", "IV", "V"]
    assert result["cadence_counts"] == {"authentic": 1}  # one phrase: the final V-I
    json.dumps(result, allow_nan=False)  # strict JSON: no NaN anywhere


@pytest.mark.parametrize(
    ("notes", "status"),
    [
        (make_notes([], [], []), "empty"),
        (make_notes([0.0, 1.0], 1.0, [36, 38], program=DRUM_PROGRAM), "drums-only"),
        (make_notes([0.0], [1.0], [60]), "single-note"),
        (make_notes([0.0, 30000.0], [1.0, 1.0], [60, 64]), "too-long"),
    ],
)
def test_nothing_to_analyse_gives_a_report_that_says_so(tmp_path, notes, status):
    result = analyze_notes(notes, name="x.mid")
    assert result["status"] == status
    write_report(result, tmp_path)
    assert "Not analysed: " + result["message"] in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "analysis.json").read_text())["status"] == status


def test_zero_length_notes_have_no_key_and_no_chords():
    result = analyze_notes(make_notes([0.0, 1.0, 2.0], 0.0, [60, 64, 67]))
    assert result["status"] == "ok" and result["key"] is None
    assert [c["label"] for c in result["chords"]] == ["N"]
    json.dumps(result, allow_nan=False)


def test_one_pitch_class_has_no_key_but_a_melody():
    result = analyze_notes(make_notes(np.arange(4.0), 1.0, [60, 72, 60, 48]))
    assert result["status"] == "ok" and result["key"] is None
    assert "cannot estimate a key" in result["message"]
    assert result["melody"]["range"] == 24 and "progression" not in result


def test_aggregate_counts_progressions_and_cadences():
    piece = analyze_notes(i_iv_v_i_twice(), name="a")
    empty = analyze_notes(make_notes([], [], []), name="b")
    agg = aggregate([piece, piece, empty], [{"file": "c.mid", "error": "broken"}])
    assert (agg["files"], agg["analysed"]) == (4, 2)
    assert agg["ngrams"]["2"][0] == [["I", "IV"], 4]
    assert agg["cadences"] == {"authentic": 2}
    assert agg["cadence_progressions"] == {"V -> I (authentic)": 2}
    assert agg["keys"] == {"C major": 2}
    assert [x["status"] for x in agg["not_analysable"]] == ["empty"]
    assert agg["skipped"] == [{"file": "c.mid", "error": "broken"}]


def test_chorale_report_with_plots(tmp_path):
    notes, beats_per_bar, _ = read_piece(FIXTURES / "bach_bwv269.mid")
    assert beats_per_bar == 3.0  # 3/4
    result = analyze_notes(notes, name="bwv269", beats_per_bar=beats_per_bar)
    assert result["key"]["name"] == "G major"  # music21 and the score's signature agree
    assert result["structure"]["form"].startswith("A A")  # the repeated Stollen of a bar form
    assert result["cadences"][-1]["kind"] == "authentic"
    write_report(result, tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"analysis.json", "report.md", "report.html", "chords.png", "similarity.png",
            "contour.png", "transitions.png"} <= names  # fmt: skip
    assert "G major" in (tmp_path / "report.html").read_text()


def _write_midi(path: Path, notes: list[tuple[int, int, int]], drum: bool = False) -> None:
    score = symusic.Score(480)
    if notes:
        track = symusic.Track("t", 0, drum)
        for time, duration, pitch in notes:
            track.notes.append(symusic.Note(time, duration, pitch, 90))
        score.tracks.append(track)
    score.dump_midi(str(path))


def test_cli_folder_with_good_degenerate_and_broken_files(tmp_path, capsys):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    shutil.copy(FIXTURES / "bach_bwv66.6.mid", src / "sub" / "chorale.mid")
    _write_midi(src / "empty.mid", [])
    _write_midi(src / "drums.mid", [(0, 240, 36), (480, 240, 38)], drum=True)
    _write_midi(src / "one.mid", [(0, 480, 60)])
    (src / "broken.mid").write_bytes(b"MThd garbage")
    out = tmp_path / "out"
    assert main(["analyze", str(src), "--out", str(out), "--no-plots"]) == 0
    agg = json.loads((out / "analysis.json").read_text())
    assert (agg["files"], agg["analysed"]) == (5, 1)
    assert {x["status"] for x in agg["not_analysable"]} == {"empty", "drums-only", "single-note"}
    assert [Path(x["file"]).name for x in agg["skipped"]] == ["broken.mid"]
    assert json.loads((out / "sub" / "chorale" / "analysis.json").read_text())["key"]["name"] == (
        "F# minor"
    )
    assert "drums only" in (out / "drums" / "report.md").read_text()
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "broken.mid" in captured.err
    assert "analysed 1 of 5 files (1 unreadable)" in captured.out


def test_cli_single_file_and_errors(tmp_path, capsys):
    out = tmp_path / "one"
    args = ["analyze", str(FIXTURES / "bach_bwv347.mid"), "--out", str(out), "--no-plots"]
    assert main([*args, "--chords-per", "half-bar"]) == 0
    result = json.loads((out / "analysis.json").read_text())
    assert result["resolution"] == 2.0 and result["beats_per_bar"] == 4.0
    assert main([*args, "--beats-per-bar", "-3"]) == 2  # a usage error
    assert main(["analyze", str(tmp_path / "missing"), "--out", str(out)]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad.mid").write_bytes(b"not midi")
    assert main(["analyze", str(tmp_path / "bad.mid"), "--out", str(out)]) == 1
