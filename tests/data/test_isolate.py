"""The second wall: a reader that crashes or hangs inside native code costs one file, in every
batch command (data check, data prepare, analyze on a folder) and for a single file.

No MIDI file crashes symusic after the pre-pass (test_fuzz.py looks for one), so the crash is
brought about on purpose: symusic's ``from_midi`` is wrapped to dereference a null pointer (a
real SIGSEGV) on a file whose track is named CRASH, and to sleep on one named HANG. The pool,
the commands and their reports are the real ones.
"""

from __future__ import annotations

import ctypes
import json
import shutil
import time
from pathlib import Path

import pytest
import symusic

from aurl.cli import main
from aurl.data import isolate
from aurl.data.isolate import Failed, isolated_map

FIXTURES = Path(__file__).parents[1] / "fixtures"


@pytest.fixture
def hostile_symusic(monkeypatch):
    """symusic whose parser segfaults on a CRASH track and hangs on a HANG track; 1 s bound."""
    factory = type(symusic.Score)
    real = factory.from_midi

    def from_midi(self, data, *args, **kwargs):
        if b"CRASH" in bytes(data):
            ctypes.string_at(0)  # a read of address 0: SIGSEGV, as an out-of-bounds read gives
        if b"HANG" in bytes(data):
            time.sleep(600)
        return real(self, data, *args, **kwargs)

    monkeypatch.setattr(factory, "from_midi", from_midi)
    monkeypatch.setattr(isolate, "TIME_BOUND_S", 1.0)


def _named(src: Path, dst: Path, name: str) -> Path:
    score = symusic.Score(str(src))
    score.tracks[0].name = name
    score.dump_midi(str(dst))
    return dst


@pytest.fixture
def folder(tmp_path):
    """Two good files, a crasher and a hanger."""
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(FIXTURES / "midi" / "bach_bwv66.6.mid", d / "a_good.mid")
    shutil.copy(FIXTURES / "edge" / "chords.mid", d / "d_good.mid")
    _named(FIXTURES / "edge" / "chords.mid", d / "b_crash.mid", "CRASH")
    _named(FIXTURES / "edge" / "chords.mid", d / "c_hang.mid", "HANG")
    return d


def test_data_check_json_keeps_every_file(hostile_symusic, folder, capsys):
    assert main(["data", "check", str(folder), "--json", "--workers", "2"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert (out["files"], out["ok"] + out["repaired"]) == (4, 2)
    failed = {Path(f["path"]).name: f["error"] for f in out["failed"]}
    assert failed == {
        "b_crash.mid": f"{folder / 'b_crash.mid'}: reader crashed (signal 11)",
        "c_hang.mid": f"{folder / 'c_hang.mid'}: reader timed out after 1.0 s",
    }


@pytest.mark.parametrize("command", [["data", "check"], ["analyze"]])
def test_single_crasher_on_the_command_line_exits_1(
    hostile_symusic, folder, tmp_path, capsys, command
):
    args = [*command, str(folder / "b_crash.mid")]
    if command == ["analyze"]:
        args += ["--out", str(tmp_path / "out"), "--no-plots"]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "reader crashed (signal 11)" in captured.out + captured.err
    assert "Traceback" not in captured.err


def test_prepare_keeps_the_rest_and_names_the_signal(hostile_symusic, folder, tmp_path):
    from aurl.data.cache import TokenCache, prepare

    report = prepare(folder, tmp_path / "cache", workers=2)
    assert sorted(report.failed) == [
        ("b_crash.mid", "reader crashed (signal 11)"),
        ("c_hang.mid", "reader timed out after 1.0 s"),
    ]
    cache = TokenCache(tmp_path / "cache")
    assert sorted(cache.relpath(i) for i in range(len(cache))) == ["a_good.mid", "d_good.mid"]


def test_analyze_folder_skips_the_crasher(hostile_symusic, folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["analyze", str(folder), "--out", str(out), "--no-plots"]) == 0
    agg = json.loads((out / "analysis.json").read_text())
    skipped = {Path(x["file"]).name: x["error"] for x in agg["skipped"]}
    assert set(skipped) == {"b_crash.mid", "c_hang.mid"}
    assert skipped["b_crash.mid"].endswith("reader crashed (signal 11)")
    assert agg["analysed"] == 2


# -- the pool itself ---------------------------------------------------------------------------


def _die_on_three(k: int) -> int:
    import os
    import signal

    if k == 3:
        os.kill(os.getpid(), signal.SIGSEGV)
    if k == 5:
        os.abort()
    return k * k


def test_dead_workers_are_replaced_and_named_by_signal():
    res = dict(isolated_map(_die_on_three, range(8), workers=2))
    assert res.pop(3) == Failed("reader crashed (signal 11)")
    assert res.pop(5) == Failed("reader crashed (signal 6)")
    assert res == {k: k * k for k in range(8) if k not in (3, 5)}


def _hang_on_one(k: int) -> int:
    if k == 1:
        time.sleep(600)
    return k


def test_hang_is_killed_by_the_watchdog():
    res = dict(isolated_map(_hang_on_one, range(3), workers=1, seconds=lambda _: 1.0))
    assert res == {0: 0, 1: Failed("reader timed out after 1.0 s"), 2: 2}


def _boom(k: int) -> int:
    raise ValueError(f"bug on {k}")


def test_an_exception_in_the_worker_is_raised_in_the_caller():
    with pytest.raises(ValueError, match="bug on 0"):
        list(isolated_map(_boom, [0]))


def test_time_bound_grows_with_the_file(tmp_path):
    small, big = tmp_path / "small.mid", tmp_path / "big.mid"
    small.write_bytes(b"x" * 100)
    big.write_bytes(b"x" * 2**21)
    assert isolate.time_bound(small) == pytest.approx(5.0, abs=0.01)
    assert isolate.time_bound(big) == pytest.approx(5.0 + 2 * 2.0)
