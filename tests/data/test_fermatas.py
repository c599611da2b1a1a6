"""Bach's fermatas beside the bundled chorales: they line up with the MIDI files, and one score
read again from music21 gives what is stored."""

from __future__ import annotations

import json

import numpy as np
import pytest

from aurl.data.fermatas import CHORALES, FERMATAS_FILE, dumps, load_fermatas, score_fermatas
from aurl.data.notes import notes_from_file
from aurl.errors import DataError


def test_every_bundled_chorale_has_its_fermatas_on_its_notes() -> None:
    fermatas = load_fermatas()
    manifest = json.loads((CHORALES / "manifest.json").read_text(encoding="utf-8"))
    assert set(fermatas) == {e["file"] for e in manifest["files"]}
    closing = 0
    for name, ends in fermatas.items():
        notes = notes_from_file(CHORALES / name)
        onsets = np.unique(notes["onset"])
        last = float((notes["onset"] + notes["duration"]).max())
        # each arrival is a note onset of the MIDI file (the beats are the file's, repeats
        # expanded), each release inside the piece, in order
        assert np.isin(ends[:, 0], onsets).all(), name
        assert (ends[:, 1] > ends[:, 0]).all() and (ends[:, 1] <= last + 1e-9).all(), name
        assert (np.diff(ends[:, 0]) > 0).all(), name
        closing += len(ends) > 0 and abs(ends[-1, 1] - last) < 1e-9
    assert sum(len(v) for v in fermatas.values()) > 2000  # ~7 phrases per chorale
    assert closing >= 0.98 * len(fermatas)  # the last fermata ends the piece


def test_a_score_read_again_gives_the_stored_fermatas() -> None:
    from music21 import common, converter

    path = str(common.getCorpusFilePath() / "bach" / "bwv103.6.mxl")  # its repeat expands
    got = score_fermatas(converter.parse(path, forceSource=True))
    # 8 phrases of 8 beats: the written 48 beats with the first 16 repeated
    assert got == [(8.0 * k - 1, 8.0 * k) for k in range(1, 9)]
    np.testing.assert_array_equal(load_fermatas()["bach_bwv103.6.mid"], np.array(got))


def test_the_file_is_written_one_chorale_a_line(tmp_path) -> None:
    doc = json.loads(FERMATAS_FILE.read_text(encoding="utf-8"))
    assert dumps(doc) == FERMATAS_FILE.read_text(encoding="utf-8")
    assert len(FERMATAS_FILE.read_text().splitlines()) == len(doc["files"]) + 6


def test_a_missing_or_wrong_file_says_how_to_rebuild(tmp_path) -> None:
    with pytest.raises(DataError, match=r"missing.json: .*python -m aurl.data.fermatas"):
        load_fermatas(tmp_path / "missing.json")
    (tmp_path / "wrong.json").write_text('{"no files": 1}')
    with pytest.raises(DataError, match="wrong.json: cannot read the chorales' fermatas"):
        load_fermatas(tmp_path / "wrong.json")
