"""aurl.fileio: atomic writes leave the old file or the whole new one, never a temp file."""

from pathlib import Path

import pytest

from aurl.fileio import atomic_write, atomic_write_text, temp_path


def test_atomic_write_creates_folders_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "out.json"
    assert atomic_write_text(target, "one") == target
    atomic_write(target, lambda tmp: tmp.write_bytes(b"two"))
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def test_temp_name_is_hidden_and_keeps_the_suffix(tmp_path: Path) -> None:
    tmp = temp_path(tmp_path / "piece.mid")
    assert tmp.parent == tmp_path and tmp.name.startswith(".") and tmp.suffix == ".mid"


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
