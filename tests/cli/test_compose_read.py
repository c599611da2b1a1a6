"""What the composing commands read: a MIDI file timed in SMPTE frames (which symusic's reader
refuses) is read as the repairing reader converts it, as ``aurl analyze`` and the server's
composing read it; its notes are kept note for note."""

from __future__ import annotations

from pathlib import Path

import symusic

from aurl.cli import main

SMPTE = Path(__file__).resolve().parents[1] / "fixtures" / "edge" / "smpte.mid"


def test_a_file_timed_in_smpte_frames_is_harmonized(tmp_path, capsys) -> None:
    assert main(["harmonize", str(SMPTE), "--out", str(tmp_path)]) == 0, capsys.readouterr().err
    assert "given notes kept 100%" in capsys.readouterr().out
    (written,) = tmp_path.glob("*.mid")
    tracks = {t.name: t for t in symusic.Score(str(written)).tracks}
    assert len(tracks["Soprano"].notes) == 2 and len(tracks) == 4
