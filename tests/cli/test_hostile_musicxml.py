"""Hostile MusicXML given to ``aurl analyze`` and the composing commands (docs/design.md,
"Hostile inputs, session 19 (commands)"): music21 reads it, so what music21 does with a file
beyond parsing it (its pickle cache, a zip's declared sizes) is checked here."""

from __future__ import annotations

import json
import os
import pickle
import zlib
from pathlib import Path

import pytest

from aurl.cli import main


def _musicxml(path: Path, pitches: str = "CDEFGABC") -> Path:
    """A one-part score of quarter notes, C4 up to C5."""
    notes = "".join(
        f"<note><pitch><step>{s}</step><octave>{5 if k == 7 else 4}</octave></pitch>"
        "<duration>1</duration><type>quarter</type></note>"
        for k, s in enumerate(pitches)
    )
    path.write_text(
        '<?xml version="1.0" encoding="UTF-8"?><score-partwise version="4.0"><part-list>'
        '<score-part id="P1"><part-name>Melody</part-name></score-part></part-list>'
        '<part id="P1"><measure number="1"><attributes><divisions>1</divisions></attributes>'
        f"{notes}</measure></part></score-partwise>"
    )
    return path


class _Planted:
    """What a planted pickle runs when it is loaded: it touches a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_musicxml_is_never_read_from_music21s_pickle_cache(tmp_path, monkeypatch, capsys):
    """music21 pickled every score it parsed into its scratch folder (``/tmp/music21``, shared
    by every user) and, on the next parse of the same path, unpickled that file when it was
    newer than the score: a pickle planted there ran its code in ``aurl analyze`` and the
    composing commands, and a score replaced by an older-dated one was read as the old one.
    Now music21 reads the score itself every time and writes no pickle."""
    from music21 import converter, environment

    from aurl.cli.compose import read_score

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(environment.Environment, "getRootTempDir", lambda self: scratch)
    score = _musicxml(tmp_path / "score.musicxml")
    os.utime(score, (0, 0))  # older than the planted pickle
    marker = tmp_path / "pickle-ran"
    planted = converter.PickleFilter(score).getPickleFp(scratch, zipType="gz")
    planted.write_bytes(zlib.compress(pickle.dumps(_Planted(marker))))

    assert len(read_score(score).tracks[0].notes) == 8  # in-process: harmonize, accompany, infill
    out = tmp_path / "out"
    assert main(["analyze", str(score), "--out", str(out), "--no-plots"]) == 0  # in a worker
    assert json.loads((out / "analysis.json").read_text())["notes"] == 8
    assert not marker.exists(), "the planted pickle was loaded"
    assert sorted(scratch.iterdir()) == [planted], "music21 wrote a pickle"


def _zipped(path: Path, xml: str) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("META-INF/container.xml", '<container><rootfiles><rootfile full-path='
                   '"score.xml"/></rootfiles></container>')  # fmt: skip
        z.writestr("score.xml", xml)
    return path


def test_an_mxl_that_unpacks_past_64_mib_is_refused_before_music21_reads_it(tmp_path, capsys):
    """An .mxl of 1 MB unpacking to 1 GiB of XML (a comment of spaces) grew ``aurl
    harmonize`` to 5.4 GB over 55 s before it was stopped: music21 reads the whole member into
    memory. Now the declared size is checked first: one line naming the file."""
    score = _musicxml(tmp_path / "plain.musicxml").read_text()
    bomb = _zipped(tmp_path / "bomb.mxl",
                   score.replace("</part-list>", "</part-list><!--" + " " * 2**26 + "-->"))  # fmt: skip
    assert bomb.stat().st_size < 2**20
    for argv in (["analyze", str(bomb), "--out", str(tmp_path / "a"), "--no-plots"],
                 ["harmonize", str(bomb), "--checkpoint", str(tmp_path / "none"), "--out",
                  str(tmp_path / "h")]):  # fmt: skip
        assert main(argv) == 1
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and f"{bomb}: 67,109," in lines[0] and "64 MiB" in lines[0], lines


# a time signature of 10**9 beats (music21 partitions it: 3.4 GB after 40 s) and a repeat
# played 10**6 times (music21 expands it before writing the MIDI)
HANGS = {
    "time signature": ("<time><beats>1000000000</beats><beat-type>4</beat-type></time>", ""),
    "repeat": ("", '<barline location="right"><repeat direction="backward" times="1000000"/>'
               "</barline>"),
}


@pytest.mark.parametrize("case", list(HANGS))
@pytest.mark.parametrize("command", ["harmonize", "accompany", "infill"])
def test_a_score_music21_hangs_on_costs_the_composing_command_its_bound(
    case, command, tmp_path, monkeypatch, capsys
):
    """The composing commands read one MusicXML file with music21 in their own process: a
    score it loops or grows on ran them for minutes (and gigabytes). Now music21 runs in a
    worker process with a time bound (here 1 s) and a memory bound: one line naming the file."""
    import signal

    from aurl.cli import compose

    monkeypatch.setattr(compose, "MUSICXML_TIME_S", 1.0, raising=False)
    attributes, barline = HANGS[case]
    path = _musicxml(tmp_path / "hang.musicxml")
    path.write_text(path.read_text().replace("</divisions>", "</divisions>" + attributes)
                    .replace("</measure>", barline + "</measure>"))  # fmt: skip
    argv = [command, str(path), "--checkpoint", str(tmp_path / "none"), "--out",
            str(tmp_path / "out"), *(["--bars", "1-1"] if command == "infill" else [])]  # fmt: skip

    def too_long(*_):
        raise TimeoutError(f"aurl {command} ran past 30 s")

    old = signal.signal(signal.SIGALRM, too_long)
    signal.setitimer(signal.ITIMER_REAL, 30.0)
    try:
        code = main(argv)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    lines = capsys.readouterr().err.splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith(f"error: {path} cannot be read")
    assert "reader timed out after 1.0 s" in lines[0] or "out of memory" in lines[0], lines


def test_a_musicxml_file_gets_music21s_time_not_a_midi_files(tmp_path, monkeypatch, capsys):
    """``aurl analyze`` gave every file 5 s plus 2 s per MiB of the file: Beethoven's op. 18/1 i
    from music21's own corpus (a 40 KB .mxl holding 1.4 MiB of XML; 30 s of music21 here) was
    "reader timed out after 5.1 s". A MusicXML file now gets music21's pace per MiB of the XML
    it holds. (Here MIDI's bound is cut to 0.1 s, under what music21 takes for any score.)"""
    from aurl.cli.compose import read_seconds
    from aurl.data import isolate

    monkeypatch.setattr(isolate, "TIME_BOUND_S", 0.1)
    monkeypatch.setattr(isolate, "TIME_PER_MIB_S", 0.0)
    xml = _musicxml(tmp_path / "plain.musicxml").read_text()
    score = _zipped(tmp_path / "score.mxl", xml.replace("</part-list>", "</part-list><!--"
                                                        + " " * 2**21 + "-->"))  # fmt: skip
    assert read_seconds(score) >= 2 * read_seconds(tmp_path / "plain.musicxml")  # 2 MiB of XML
    assert main(["analyze", str(score), "--out", str(tmp_path / "out"), "--no-plots"]) == 0
    assert "timed out" not in capsys.readouterr().err


def test_music21s_warnings_are_not_printed_beside_the_error_line(tmp_path) -> None:
    """A score music21 cannot read printed its warnings (a file path, a line of its source)
    above the one ``error:`` line: ``<divisions>0</divisions>``."""
    import subprocess
    import sys

    path = _musicxml(tmp_path / "div0.musicxml")
    path.write_text(path.read_text().replace("<divisions>1<", "<divisions>0<"))
    run = subprocess.run([sys.executable, "-m", "aurl", "analyze", str(path), "--out",
                          str(tmp_path / "out"), "--no-plots"], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    lines = run.stderr.splitlines()
    assert run.returncode == 1 and len(lines) == 1, lines
    assert lines[0] == (f"error: cannot analyse {path} cannot be read (float division by zero): "
                        "give a MIDI or MusicXML file")  # fmt: skip
