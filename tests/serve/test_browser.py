"""A real browser against a real `aurl serve`: headless Chromium (Debian's package) driven by
Playwright. Generate on the studio page, wait for notes on the roll, download the MIDI and
the MusicXML and parse them; answer one listening trial and find the answer in SQLite.

Skipped, with the reason, only where Chromium or Playwright is not installed (`.ci/run`
installs both: `apt-get install -y chromium chromium-driver`, `pip install -e '.[dev]'`).
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import symusic

from tests.serve.conftest import LiveServer
from tests.serve.test_formats_and_parts import xml_parts

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHORALE = Path(__file__).resolve().parents[1] / "fixtures" / "midi" / "bach_bwv269.mid"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    "--autoplay-policy=no-user-gesture-required",
]  # fmt: skip

pytestmark = [
    pytest.mark.skipif(
        not Path(CHROMIUM).is_file(),
        reason="no Chromium: apt-get install -y chromium chromium-driver (as .ci/run does)",
    ),
]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="no Playwright: pip install -e '.[dev]'"
    )
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield b
        b.close()


def test_studio_generates_streams_and_downloads_a_midi_file(browser, live_server, tmp_path):
    page = browser.new_page(accept_downloads=True)
    offhost = []
    page.on("request", lambda r: None if r.url.startswith(live_server.url.replace("http", "ws"))
            or r.url.startswith(live_server.url) else offhost.append(r.url))  # fmt: skip
    page.goto(live_server.url + "/")
    page.wait_for_function("document.querySelectorAll('#model option').length > 0")
    page.fill("#seconds", "6")
    page.fill("#seed", "7")
    page.click("#generate")
    page.wait_for_function("Number(document.getElementById('roll').dataset.notes) > 0",
                           timeout=60_000)  # fmt: skip
    page.wait_for_selector("#download:not([disabled])", timeout=60_000)
    shown = int(page.get_attribute("#roll", "data-notes"))
    with page.expect_download() as info:
        page.click("#download")
    path = tmp_path / "piece.mid"
    info.value.save_as(path)
    score = symusic.Score(str(path))
    notes = sum(len(t.notes) for t in score.tracks)
    assert notes == shown > 0  # every streamed note is in the file, and nothing else
    assert score.to("second").end() <= 6.5
    with page.expect_download(timeout=60_000) as info:
        page.click("#download-xml")
    assert info.value.suggested_filename == "aurl_seed7.musicxml"
    xml = tmp_path / "piece.musicxml"
    info.value.save_as(xml)
    parts = xml_parts(xml.read_bytes())  # the same tracks, sounding the same pitches
    assert len(parts) == len([t for t in score.tracks if len(t.notes)])
    assert set().union(*parts.values()) == {n.pitch for t in score.tracks for n in t.notes}
    first_ms = int(page.get_attribute("#roll", "data-first-note-ms"))
    print(f"studio: first note on the roll {first_ms} ms after Generate")
    assert offhost == []  # the page loaded nothing from anywhere else
    page.close()


def _voice_file(tmp_path: Path, name: str) -> tuple[Path, Any, Any]:
    """A MIDI file of the fixture chorale's first two bars of voice ``name``; returns the
    path, the chorale's score and that voice's track."""
    bach = symusic.Score(str(CHORALE))
    one = symusic.Score(bach.tpq)
    one.tempos, one.time_signatures = bach.tempos, bach.time_signatures
    (track,) = [t.copy() for t in bach.tracks if t.name == name and len(t.notes)]
    track.notes = track.notes.filter(lambda n: n.time < 8 * bach.tpq)  # two bars
    one.tracks.append(track)
    path = tmp_path / f"{name.lower()}.mid"
    one.dump_midi(str(path))
    return path, bach, track


def _studio(browser, live_server):
    page = browser.new_page(accept_downloads=True)
    page.goto(live_server.url + "/")
    page.wait_for_function("document.querySelectorAll('#model option').length > 0")
    return page


def _press(page, button: str, done: str) -> None:
    """Click ``button`` and wait until the status says ``done`` (or an error, then fail)."""
    page.click(button)
    page.wait_for_function(f"['{done}', 'error'].some((w) => document.getElementById("
                           "'status').textContent.startsWith(w)) || document.getElementById("
                           "'status').classList.contains('error')", timeout=60_000)  # fmt: skip
    assert page.text_content("#status") == done


def _download(page, path: Path) -> Any:
    with page.expect_download() as info:
        page.click("#download")
    info.value.save_as(path)
    return symusic.Score(str(path))


@pytest.mark.parametrize(
    "voice, button, done", [("Soprano", "#harmonize", "harmonized"),
                            ("Alto", "#accompany", "accompanied")],
)  # fmt: skip
def test_studio_composes_around_an_uploaded_voice(browser, live_server, tmp_path, voice,
                                                  button, done):  # fmt: skip
    """Choose a soprano line and press Harmonize, or an alto line and press Accompany: the
    roll shows the four voices, and the download holds the given voice note for note on its
    own track with the other three SATB voices around it."""
    path, bach, track = _voice_file(tmp_path, voice)
    page = _studio(browser, live_server)
    page.set_input_files("#melody", str(path))
    _press(page, button, done)
    result = _download(page, tmp_path / f"{done}.mid")
    got = {t.name: t for t in result.tracks}
    assert sorted(got) == ["Alto", "Bass", "Soprano", "Tenor"]
    beats = [(n.time / result.tpq, n.pitch) for n in got[voice].notes]
    assert beats == [(n.time / bach.tpq, n.pitch) for n in track.notes]
    shown = int(page.get_attribute("#roll", "data-notes"))
    assert shown == sum(len(t.notes) for t in got.values())
    page.close()


def test_listening_page_records_an_answer_in_sqlite(browser, live_server):
    page = browser.new_page()
    page.goto(live_server.url + "/listen")
    page.click("#new")
    page.wait_for_selector("#pick-a:not([disabled])", timeout=60_000)
    trial = page.evaluate("document.body.dataset.trial")
    page.click("#pick-a")
    page.wait_for_function("document.body.dataset.answered === '1'", timeout=30_000)
    with sqlite3.connect(live_server.db) as db:
        rows = db.execute(
            "SELECT choice, correct FROM answers WHERE trial_id = ?", (trial,)
        ).fetchall()
        bach = db.execute("SELECT bach_side FROM trials WHERE id = ?", (trial,)).fetchone()[0]
    assert rows == [("A", int(bach == "A"))]
    page.goto(live_server.url + "/listen/results")
    assert "chorales" in page.inner_text("#results")
    page.close()


def test_the_style_menu_lists_the_models_styles_and_sends_the_choice(browser, tmp_path):
    """`aurl serve --model chorales styles`: the Style menu offers none for the
    chorale model and the five styles for `styles`; Generate sends the chosen one."""
    server = LiveServer(tmp_path / "listen.sqlite", ("--model", "chorales", "styles"))
    try:
        page = browser.new_page()
        sent: list[str] = []
        page.on("websocket", lambda ws: ws.on("framesent", lambda f: sent.append(str(f))))
        page.goto(server.url + "/")
        page.wait_for_function("document.querySelectorAll('#model option').length == 2")
        menu = "Array.from(document.querySelectorAll('#style option')).map(o => o.value)"
        assert page.evaluate(menu) == [""]
        page.select_option("#model", "styles")
        assert page.evaluate(menu) == ["", "chorale", "classical", "folk", "palestrina",
                                       "renaissance"]  # fmt: skip
        page.select_option("#style", "folk")
        page.fill("#seconds", "3")
        page.click("#generate")
        page.wait_for_selector("#download:not([disabled])", timeout=60_000)
        assert any('"style":"folk"' in f and '"model":"styles"' in f for f in sent), sent
        page.close()
    finally:
        server.stop()


def test_studio_infills_one_part_of_a_loaded_piece(browser, live_server, tmp_path):
    """Load a chorale, choose Alto in the Part menu (filled with the file's tracks), select
    seconds 2-6 and press Infill: the download keeps every other voice note for note and the
    alto outside the selection, and writes the alto inside it again."""
    page = _studio(browser, live_server)
    page.set_input_files("#primer", str(CHORALE))
    page.wait_for_function("document.querySelectorAll('#part option').length == 5")
    names = page.eval_on_selector_all("#part option", "os => os.map((o) => o.textContent)")
    assert names == ["all", "Soprano", "Alto", "Tenor", "Bass"]
    page.select_option("#part", label="Alto")
    page.evaluate("selection = [2, 6]; redraw()")  # what a drag on the roll sets
    _press(page, "#infill", "filled in")
    result = _download(page, tmp_path / "infilled.mid").to("second")
    got = {t.name: t for t in result.tracks if len(t.notes)}
    from aurl.config import DataConfig
    from aurl.data.midi_io import read_midi

    # the chorale as the server reads it (read_midi's repairs: two doubled bass notes merged)
    score, _ = read_midi(CHORALE, DataConfig(drums="keep"))
    bach = {t.name: t for t in score.to("second").tracks if len(t.notes)}

    def rows(track, inside: bool):
        return sorted((round(n.time, 2), n.pitch) for n in track.notes
                      if (2 - 1e-3 <= n.time < 6 - 1e-3) == inside)  # fmt: skip

    for name in ("Soprano", "Tenor", "Bass"):
        assert rows(got[name], True) + rows(got[name], False) == rows(bach[name], True) + rows(
            bach[name], False)  # fmt: skip
    assert rows(got["Alto"], False) == rows(bach["Alto"], False)
    assert rows(got["Alto"], True) and rows(got["Alto"], True) != rows(bach["Alto"], True)
    page.close()


def test_studio_generates_in_voices_and_lists_them_as_parts(browser, live_server, tmp_path):
    """Voices: SATB sends `aurl generate --voices 4`'s options; the piece comes back on four
    tracks, which the Part menu then offers (for Infill of one voice). The menu starts at SATB:
    the shipped chorales are written in four voices (`/api/health`'s `voices`)."""
    page = _studio(browser, live_server)
    sent: list[str] = []
    page.on("websocket", lambda ws: ws.on("framesent", lambda f: sent.append(str(f))))
    page.fill("#seconds", "6")
    assert page.input_value("#voices") == "4"
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#part option').length == 5",
                           timeout=60_000)  # fmt: skip
    names = page.eval_on_selector_all("#part option", "os => os.map((o) => o.textContent)")
    assert names == ["all", "Soprano", "Alto", "Tenor", "Bass"]
    assert any('"voices":4' in f and '"voice_leading":true' in f for f in sent), sent
    score = _download(page, tmp_path / "voices.mid")
    assert [t.name for t in score.tracks] == ["Soprano", "Alto", "Tenor", "Bass"]
    assert int(page.get_attribute("#roll", "data-notes")) == sum(len(t.notes) for t in score.tracks)
    page.close()


def test_check_voices_marks_the_faults_on_the_roll(browser, live_server, tmp_path):
    """Load a four-track exercise with one parallel octave, a crossing, a wide spacing and a
    bass note out of range; Check voices marks the four on the roll and counts them."""
    from tests.analysis.test_part_writing import CHORDS, _write, satb

    from aurl.analysis.part_writing import SATB

    path = _write(list(zip(SATB, satb(*CHORDS))), tmp_path / "exercise.mid")
    page = _studio(browser, live_server)
    page.set_input_files("#primer", str(path))
    page.wait_for_function("document.querySelectorAll('#part option').length == 5")
    page.click("#check")
    page.wait_for_function("document.getElementById('roll').dataset.faults === '4'",
                           timeout=30_000)  # fmt: skip
    said = page.text_content("#status")
    assert said.startswith("Soprano, Alto, Tenor, Bass: 0 parallel fifths, 1 parallel octaves")
    assert "1 crossings, 1 wide spacings, 1 out of range" in said
    page.close()
