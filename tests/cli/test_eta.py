"""A long ``aurl harmonize`` (``accompany``, ``infill``) says how long it is up front and
reports the time left while it runs, off a terminal too (session 8: a 10,000-note melody was
minutes of silence; session 18: accompany and infill said nothing)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from aurl.cli.eta import estimated, harmonize_tokens, infill_tokens, minutes

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "midi"


def test_lines_come_after_first_then_every_with_the_time_left():
    now = [0.0]
    out = io.StringIO()
    progress = estimated(1000, "harmonize", first=10, every=60, stream=out, clock=lambda: now[0])
    for _ in progress(range(300), desc="compose"):
        now[0] += 0.25  # 4 tokens a second
    lines = out.getvalue().splitlines()
    # at 10 s (token 40), then 60 s later (token 280); the run ends at 75 s
    assert lines == [
        "harmonize: 40 of ~1,000 tokens (4%) in 10 s; about 4 min left",
        "harmonize: 280 of ~1,000 tokens (28%) in 70 s; about 3 min left",
    ]
    out = io.StringIO()  # a short run prints nothing
    for _ in estimated(1000, "h", stream=out, clock=lambda: 0.0)(range(50)):
        pass
    assert out.getvalue() == ""
    assert [minutes(s) for s in (42, 180, 9000)] == ["42 s", "3 min", "2.5 h"]


@pytest.fixture(scope="module")
def shipped():
    from aurl.cli.generate import SHIPPED, load_model

    if not (SHIPPED / "config.json").is_file():
        pytest.skip("no shipped model")
    return load_model(None, "cpu")


def test_the_estimate_is_near_what_a_harmonization_decodes(shipped):
    """The shipped model harmonizing a chorale's soprano in 4 voices: 458 tokens for 36 notes
    (12.7 a note; the estimate says 12.5)."""
    from aurl.cli.compose import read_score
    from aurl.generation.compose import ComposeOptions, harmonize, top_track, track_notes

    _, notes = top_track(track_notes(read_score(FIXTURES / "bach_bwv66.6.mid")))
    (c,) = harmonize(shipped, notes, voices=4, options=ComposeOptions(particles=1))
    assert abs(c.stats["tokens"] / harmonize_tokens(len(notes), 4) - 1) < 0.15


def test_harmonize_says_its_length_up_front(tmp_path, capsys):
    import dataclasses

    import symusic
    import torch

    from aurl.cli import main
    from aurl.config import ModelConfig, VocabConfig
    from aurl.models import MusicTransformerVAEGAN
    from aurl.models.pretrained import save_pretrained

    torch.manual_seed(0)
    config = dataclasses.replace(
        ModelConfig(), d_model=32, n_layers=2, n_heads=2, dropout=0.0, max_seq_len=256
    )
    save_pretrained(MusicTransformerVAEGAN(config, VocabConfig()).eval(), tmp_path / "tiny")
    score = symusic.Score(480)
    track = symusic.Track("tune", 0, False)
    for i in range(12):
        track.notes.append(symusic.Note(i * 480, 480, (60, 62, 64, 65)[i % 4], 80))
    score.tracks.append(track)
    score.dump_midi(str(tmp_path / "tune.mid"))
    code = main(["harmonize", str(tmp_path / "tune.mid"), "--out", str(tmp_path / "out"),
                 "--checkpoint", str(tmp_path / "tiny"), "--voices", "3"])  # fmt: skip
    assert code == 0
    err = capsys.readouterr().err
    assert "tune.mid: 12 melody notes in 3 voices, about 120 tokens to compose\n" in err


def test_the_infill_estimate_is_near_what_an_infill_decodes(shipped):
    """The shipped model writing bars 3-6 of a chorale again, every voice and the alto alone:
    the whole piece is decoded, 2.1-2.5 tokens a note; the estimate says 2.4."""
    from aurl.cli.compose import read_score
    from aurl.generation.compose import ComposeOptions, infill, piece_notes, track_notes

    tracks = track_notes(read_score(FIXTURES / "bach_bwv66.6.mid"))
    notes, owner = piece_notes(tracks)
    for part in (None, owner == 1):
        (c,) = infill(shipped, notes, (8.0, 24.0), part, options=ComposeOptions(particles=1))
        assert abs(c.stats["tokens"] / infill_tokens(len(notes)) - 1) < 0.15, c.stats["tokens"]


def test_accompany_and_infill_say_their_length_up_front(tmp_path, capsys):
    from aurl.cli import main

    chorale = FIXTURES / "bach_bwv66.6.mid"
    assert main(["infill", str(chorale), "--bars", "3-6", "--part", "alto", "--out",
                 str(tmp_path / "i")]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert f"{chorale}: 163 notes, bars 3-6 of Alto written again, about 391 tokens to compose\n" in err
    import symusic

    score = symusic.Score(str(chorale))
    alto = symusic.Score(score.tpq)
    alto.tracks.append(next(t for t in score.tracks if t.name == "Alto").copy())
    alto.dump_midi(str(tmp_path / "alto.mid"))
    assert main(["accompany", str(tmp_path / "alto.mid"), "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "alto.mid: 42 notes of the part in 4 voices, about 525 tokens to compose\n" in err
