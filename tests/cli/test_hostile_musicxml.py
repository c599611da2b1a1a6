"""Hostile MusicXML given to ``aurl analyze`` and the composing commands (docs/design.md,
"Hostile inputs, session 19 (commands)"): music21 reads it, so what music21 does with a file
beyond parsing it (its pickle cache, a zip's declared sizes) is checked here."""

from __future__ import annotations

import json
import os
import pickle
import zlib
from pathlib import Path

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
