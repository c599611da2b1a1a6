"""``aurl data check``: the audit's numbers, its JSON, its exit codes, and bad files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from aurl.cli import main
from aurl.config import Config, VocabConfig
from aurl.data import Tokenizer
from aurl.data.check import check_paths

FIXTURES = Path(__file__).parents[1] / "fixtures"
EDGE = FIXTURES / "edge"
KEYS = {"files", "ok", "repaired", "failed", "notes", "tokens", "max_onset_error_ms",
        "max_onset_error_steps"}  # fmt: skip


def test_edge_folder_audit_exact():
    s = check_paths(EDGE).to_dict()
    # notes kept per file: chords 6, sustain 4, tempo_changes 12, long_gap 2, overlap 3,
    # out_of_range 5, multi_instrument 6, drums 1 (drums dropped), velocity_zero 3, type0 2,
    # absurd_ticks 2, empty_track 2, smpte 2
    assert (s["files"], s["ok"], s["repaired"], s["failed"], s["notes"]) == (13, 6, 7, [], 50)
    tok = Tokenizer()
    assert s["tokens"] == sum(len(tok.encode_file(p)) for p in EDGE.glob("*.mid"))
    assert s["max_onset_error_steps"] == 0.0 and s["max_onset_error_ms"] == 0.0
    assert s["repairs"] == {"absurd_ticks": 2, "drum_tracks": 1, "empty_tracks": 1,
                            "out_of_range_folded": 4, "duplicates": 1, "overlaps": 1, "smpte": 1,
                            "zero_duration": 1}  # fmt: skip


def test_seconds_mode_error_within_half_a_step():
    s = check_paths(EDGE, Config(vocab=VocabConfig(time_unit="seconds"))).to_dict()
    assert 0 < s["max_onset_error_steps"] <= 0.5
    assert s["max_onset_error_ms"] <= 15.625 / 2 + 1e-6


def test_cli_json_on_real_files(capsys):
    assert main(["data", "check", str(FIXTURES / "midi"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= KEYS and out["files"] == 6 and out["failed"] == []
    assert out["notes"] > 2000 and out["max_onset_error_steps"] == 0.0


def test_cli_bad_files_exit_1_without_traceback(tmp_path, capsys):
    shutil.copy(EDGE / "chords.mid", tmp_path / "good.mid")
    (tmp_path / "trunc.mid").write_bytes((EDGE / "multi_instrument.mid").read_bytes()[:60])
    (tmp_path / "zero.mid").write_bytes(b"")
    (tmp_path / "text.mid").write_text("not music")
    div0 = bytearray((EDGE / "chords.mid").read_bytes())
    div0[12:14] = b"\0\0"
    (tmp_path / "div0.mid").write_bytes(bytes(div0))
    assert main(["data", "check", str(tmp_path), "--json"]) == 1
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert "Traceback" not in captured.err
    assert (out["files"], out["ok"], out["repaired"], out["notes"]) == (5, 1, 1, 7)
    assert out["repaired_files"][0]["repairs"] == {"truncated_tracks": 1, "header_fixed": 1}
    failed = {Path(f["path"]).name: f["error"] for f in out["failed"]}
    assert set(failed) == {"div0.mid", "zero.mid", "text.mid"}
    assert "empty file" in failed["zero.mid"] and "not a MIDI file" in failed["text.mid"]
    assert "division of 0 ticks per quarter" in failed["div0.mid"]
    # the table names the reasons too
    assert main(["data", "check", str(tmp_path)]) == 1
    table = capsys.readouterr().out
    assert "failed" in table and "zero.mid: empty file" in table
    assert "5 files: 1 ok, 1 repaired, 3 failed" in table


@pytest.mark.parametrize("args", [["/no/such/path"], ["EMPTY"]])
def test_cli_usage_errors_exit_2(tmp_path, capsys, args):
    args = [str(tmp_path) if a == "EMPTY" else a for a in args]
    assert main(["data", "check", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


def test_cli_single_file_table(capsys):
    assert main(["data", "check", str(EDGE / "overlap_same_pitch.mid")]) == 0
    out = capsys.readouterr().out
    assert (
        "repaired" in out
        and "duplicates 1, overlaps 1" in out
        and "1 files: 0 ok, 1 repaired" in out
    )
