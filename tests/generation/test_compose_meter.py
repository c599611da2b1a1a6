"""The composing commands count a 3/4 piece in 3/4: the input's time signature reaches the
(meter-conditioned) shipped model through the library calls, the CLI and the evaluation task."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import symusic

from aurl.cli import main
from aurl.cli.generate import SHIPPED
from aurl.data.notes import notes_from_score
from aurl.generation.compose import (
    ComposeOptions,
    TimeMap,
    harmonize,
    make_plan,
    melody_line,
    score_plan,
)

pytestmark = pytest.mark.skipif(not (SHIPPED / "config.json").is_file(), reason="no model")
CHORALES = Path(__file__).resolve().parents[2] / "src/aurl/data/bundled/bach-chorales"
WALTZ = CHORALES / "bach_bwv342.mid"  # a grouped-test chorale in 3/4
BEATS = 12


@pytest.fixture(scope="module")
def model():
    from aurl.cli.generate import load_model

    m = load_model(None, "cpu")
    assert m.config.meter  # the shipped model is meter-conditioned: 3/4 and 4/4 differ for it
    return m


def _voices(beats: float = BEATS) -> list[np.ndarray]:
    score = symusic.Score(str(WALTZ))
    out = []
    for track in score.tracks:
        one = symusic.Score(score.tpq)
        one.tracks.append(track.copy())
        notes = notes_from_score(one)
        notes = notes[notes["onset"] < beats]
        notes["duration"] = np.minimum(notes["duration"], beats - notes["onset"])
        out.append(notes)
    return out


def test_time_map_reads_the_chorales_meter() -> None:
    assert TimeMap.of_score(symusic.Score(str(WALTZ))).meter == (3, 4)
    assert TimeMap().meter == (4, 4)  # no time signature: the MIDI default


def test_score_plan_and_the_evaluation_task_count_in_the_files_meter(model) -> None:
    from aurl.data.tokenizer import Tokenizer
    from aurl.evaluation.tasks import _encode_notes, evaluate_harmonize

    voices = _voices()
    line = melody_line(voices[0])
    plan = make_plan(line, model.vocab, ceiling=True, max_free=3)
    bach = np.sort(np.concatenate(voices), order=["onset", "pitch"])
    ids = _encode_notes(bach, Tokenizer(model.vocab_config), WALTZ)
    in_34 = score_plan(model, plan, ids, meter=(3, 4)).conditional_bits
    in_44 = score_plan(model, plan, ids).conditional_bits
    assert abs(in_34 - in_44) > 0.1  # the meter reaches the model: its bars move
    result = evaluate_harmonize(model, [WALTZ], variants=(), max_beats=BEATS)
    assert result["likelihood"]["conditional_bits_per_note"] * result["likelihood"][
        "atb_notes"
    ] == pytest.approx(in_34, rel=1e-6)


def test_cli_harmonize_passes_the_melodys_meter(model, tmp_path: Path, capsys) -> None:
    score = symusic.Score(str(WALTZ))
    melody_file = tmp_path / "waltz.mid"
    cut = symusic.Score(score.tpq)
    cut.time_signatures = score.time_signatures.copy()
    cut.tempos = score.tempos.copy()
    track = score.tracks[0].copy()
    track.notes = [n for n in track.notes if n.time < BEATS * score.tpq]
    cut.tracks.append(track)
    cut.dump_midi(str(melody_file))
    rc = main(["harmonize", str(melody_file), "--out", str(tmp_path / "out"), "--particles", "1",
               "--seed", "0", "--engine", "torch"])  # fmt: skip  (the library call below: torch)
    assert rc == 0
    printed = float(re.search(r"([0-9.]+) bits per given note", capsys.readouterr().out)[1])
    line = _voices()[0]
    qpm = float(score.tempos[0].qpm) if len(score.tempos) else 120.0
    opts = ComposeOptions(particles=1, seed=0)
    (waltz,) = harmonize(model, line, options=opts, qpm=qpm, meter=(3, 4))
    (common,) = harmonize(model, line, options=opts, qpm=qpm)
    assert printed == pytest.approx(waltz.stats["given_bits_per_note"], abs=0.006)
    assert abs(printed - common.stats["given_bits_per_note"]) > 0.02
