"""MusicXML replies (``format`` on generate / harmonize / infill, ``POST /api/musicxml``) and
the infill of one part (``part`` on ``POST /api/infill``), in-process on a tiny model."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest
import symusic

from tests.serve.test_api import CHORALE, _by_track, _excerpt, error_of

MUSICXML = "application/vnd.recordare.musicxml+xml"
STEPS = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}


def xml_parts(data: bytes) -> dict[str, set[int]]:
    """Part name -> the MIDI pitches its notes sound, read from MusicXML."""
    root = ET.fromstring(data)
    assert root.tag == "score-partwise"
    names = {p.get("id"): p.findtext("part-name") for p in root.iter("score-part")}
    out = {}
    for part in root.iter("part"):
        pitches = set()
        for pitch in part.iter("pitch"):
            alter = int(float(pitch.findtext("alter") or 0))
            octave = int(pitch.findtext("octave"))
            pitches.add(12 * (octave + 1) + STEPS[pitch.findtext("step")] + alter)
        name = names[part.get("id")]
        out[name if name not in out else f"{name} ({part.get('id')})"] = pitches
    return out


def midi_pitches(data: bytes) -> set[int]:
    score = symusic.Score.from_midi(data)
    return {n.pitch for t in score.tracks for n in t.notes}


def test_generate_as_musicxml_has_the_pitches_of_the_midi(client):
    body = {"max_tokens": 120, "seed": 4}
    midi = client.post("/api/generate", json=body)
    xml = client.post("/api/generate", json={**body, "format": "musicxml"})
    assert xml.status_code == 200, xml.text
    assert xml.headers["content-type"] == MUSICXML
    assert xml.headers["x-aurl-tokens"] == midi.headers["x-aurl-tokens"]
    assert ".musicxml" in xml.headers["content-disposition"]
    parts = xml_parts(xml.content)
    assert len(parts) == len(symusic.Score.from_midi(midi.content).tracks)
    pitches = set().union(*parts.values())
    assert pitches == midi_pitches(midi.content) and len(pitches) > 2


def test_musicxml_endpoint_writes_each_track_as_a_part(client):
    r = client.post("/api/musicxml", files={"file": ("bwv66.mid", CHORALE.read_bytes())})
    assert r.status_code == 200, r.text
    parts = xml_parts(r.content)
    score = symusic.Score(str(CHORALE))
    want = {t.name: {n.pitch for n in t.notes} for t in score.tracks if len(t.notes)}
    assert parts == want and len(parts) == 4


def test_harmonize_answers_in_musicxml(client):
    melody = _excerpt("bach_bwv117.4.mid", 8, tracks=1)
    r = client.post("/api/harmonize", files={"file": ("tune.mid", melody)},
                    data={"particles": "1", "format": "musicxml"})  # fmt: skip
    assert r.status_code == 200 and r.headers["content-type"] == MUSICXML, r.text
    assert list(xml_parts(r.content)) == ["Soprano", "Alto", "Tenor", "Bass"]


def test_format_and_musicxml_bad_input_are_4xx_naming_the_field(client):
    msg = error_of(client.post("/api/generate", json={"format": "pdf"}), 422, field="format")
    assert "musicxml" in msg
    files = {"file": ("c.mid", CHORALE.read_bytes())}
    error_of(client.post("/api/harmonize", files=files, data={"format": "wav"}), 422,
             field="format")  # fmt: skip
    r = client.post("/api/musicxml", files={"file": ("bad.mid", b"not a midi file")})
    assert "bad.mid" in error_of(r, 422, field="file")
    error_of(client.post("/api/musicxml"), 422, field="file")


@pytest.mark.parametrize("part", ["alto", "1"])
def test_infill_of_one_part_changes_only_that_track_in_the_span(client, part):
    piece = _excerpt("bach_bwv117.4.mid", 12)
    given = _by_track(piece)
    assert list(given)[1] == "Alto"
    r = client.post("/api/infill", files={"file": ("c.mid", piece)},
                    data={"bars": "2-2", "particles": "1", "part": part, "seed": "1"})  # fmt: skip
    assert r.status_code == 200, r.text
    got = _by_track(r.content)
    assert list(got) == list(given)
    for name in ("Soprano", "Tenor", "Bass"):
        np.testing.assert_array_equal(got[name], given[name])  # untouched, bar 2 included
    alto, old = got["Alto"], given["Alto"]
    inside = (alto[:, 1] >= 4) & (alto[:, 1] < 8)
    np.testing.assert_array_equal(alto[~inside], old[(old[:, 1] < 4) | (old[:, 1] >= 8)])
    assert inside.any()  # the alto's bar 2 was written again ...
    new = alto[inside]
    new = new[np.argsort(new[:, 1], kind="stable")]
    # ... as one voice, like the alto's own notes (the other voices are given, not redone)
    assert (new[1:, 1] >= new[:-1, 1] + new[:-1, 2] - 1e-9).all(), new


@pytest.mark.parametrize("part", ["Viola", "4", "-1", "99999"])
def test_infill_part_that_names_no_track_is_422_naming_the_field(client, part):
    piece = _excerpt("bach_bwv117.4.mid", 12)
    r = client.post("/api/infill", files={"file": ("c.mid", piece)},
                    data={"bars": "2-2", "particles": "1", "part": part})  # fmt: skip
    msg = error_of(r, 422, field="part")
    assert "0:Soprano, 1:Alto, 2:Tenor, 3:Bass" in msg
