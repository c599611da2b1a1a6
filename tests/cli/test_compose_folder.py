"""``aurl harmonize FOLDER`` and ``aurl accompany FOLDER``: a batch over the MIDI / MusicXML
files directly in a folder, the model loaded once; a file that cannot be composed on is reported
(``skipped FILE: why``) and the batch goes on; output names are checked before any work. On the
shipped model, through the command line in-process (the native engine where it runs)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from aurl.cli import main
from aurl.cli.compose import read_score
from aurl.generation.compose import track_notes

CHORALE = Path(__file__).resolve().parents[1] / "fixtures" / "midi" / "bach_bwv269.mid"


def _soprano(path: Path) -> np.ndarray:
    notes = dict(track_notes(read_score(path)))["Soprano"]
    return np.sort(notes, order=["onset", "pitch"])[["onset", "pitch"]]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Two melodies (the fixture chorale's soprano and the whole chorale: its top track is the
    melody), a file that is no MIDI, a damaged one, and a text file the batch leaves alone."""
    import symusic

    d = tmp_path_factory.mktemp("melodies")
    score = symusic.Score(str(CHORALE))
    top = score.copy()
    while len(top.tracks) > 1:
        top.tracks.pop(len(top.tracks) - 1)
    top.dump_midi(str(d / "a_tune.mid"))
    shutil.copy(CHORALE, d / "b_chorale.mid")
    (d / "c_damaged.mid").write_bytes(b"MThd\x00\x00\x00\x06garbage")
    (d / "d_notes.txt").write_text("not music")
    return d


def test_harmonize_a_folder_reports_the_bad_file_and_goes_on(folder, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["harmonize", str(folder), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    written = sorted(p.name for p in out.iterdir())
    assert written == ["a_tune_harmonized_seed0_000.mid", "b_chorale_harmonized_seed0_000.mid"]
    skipped = [line for line in captured.err.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 1 and f"{folder / 'c_damaged.mid'} cannot be read" in skipped[0]
    assert captured.out.strip().splitlines()[-1] == (
        f"harmonized 2 of 3 files in {folder}; skipped 1 (said above)"
    )
    for stem in ("a_tune", "b_chorale"):  # each melody kept note for note, under three voices
        got = out / f"{stem}_harmonized_seed0_000.mid"
        assert len(track_notes(read_score(got))) == 4
        np.testing.assert_array_equal(_soprano(got), _soprano(CHORALE))


def test_a_folder_whose_outputs_exist_writes_nothing(folder, tmp_path, capsys) -> None:
    """Without --force, a name taken by the second file's output stops the batch before the
    first file is composed (as one file's would)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "b_chorale_harmonized_seed0_000.mid").write_bytes(b"mine")
    assert main(["harmonize", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "b_chorale_harmonized_seed0_000.mid already exist" in err[0]
    assert sorted(p.name for p in out.iterdir()) == ["b_chorale_harmonized_seed0_000.mid"]


@pytest.mark.parametrize(
    "files, code, says",
    [
        ({"x.txt": b"no music"}, 1, "holds no MIDI or MusicXML files"),
        ({"x.mid": b"MThd", "y.mid": b""}, 1, "no file in"),
        ({"x.mid": b"MThd", "x.xml": b"<score/>"}, 2, "would write the same files"),
    ],
    ids=["no-music", "none-readable", "same-stem"],
)
def test_a_folder_nothing_can_come_of_is_one_line(tmp_path, capsys, files, code, says) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for name, data in files.items():
        (src / name).write_bytes(data)
    assert main(["harmonize", str(src), "--out", str(tmp_path / "out")]) == code
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and says in err[0], err
    assert not any((tmp_path / "out").glob("*.mid"))


def test_accompany_a_folder(folder, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["accompany", str(folder), "--voices", "3", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "a_tune_accompanied_seed0_000.mid", "b_chorale_accompanied_seed0_000.mid"
    ]  # fmt: skip
    captured = capsys.readouterr()
    last = captured.out.strip().splitlines()[-1]
    assert last.startswith(f"accompanied 2 of 3 files in {folder}")
    # the whole chorale, not one voice of it: said on stderr, once, naming its tracks
    said = [line for line in captured.err.splitlines() if "accompanied as one part" in line]
    assert said == [
        f"{folder / 'b_chorale.mid'}: its 4 tracks (Soprano, Alto, Tenor, Bass) are "
        "accompanied as one part; give one track's file to accompany a single voice"
    ]


def test_a_file_that_kills_the_reader_costs_that_file(folder, tmp_path, capsys, monkeypatch):
    """Each file is read once in a worker process first: a reader that dies on one (here made
    to, by a signal; symusic once did, on damaged bytes) skips that file, which is never read
    in the command's own process, and the others are harmonized."""
    import os
    import signal

    from aurl.cli import compose

    read, one = compose.read_score, compose._harmonize_one

    def dies_on_b(path):
        if Path(path).name == "b_chorale.mid":
            os.kill(os.getpid(), signal.SIGSEGV)
        return read(path)

    def never_b(args, path, model):
        assert Path(path).name != "b_chorale.mid", "read in the command's own process"
        return one(args, path, model)

    monkeypatch.setattr(compose, "read_score", dies_on_b)  # the workers are forked: they see it
    monkeypatch.setattr(compose, "_harmonize_one", never_b)
    out = tmp_path / "out"
    assert main(["harmonize", str(folder), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    sig = int(signal.SIGSEGV)
    assert f"skipped {folder / 'b_chorale.mid'}: reader crashed (signal {sig})" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["a_tune_harmonized_seed0_000.mid"]
