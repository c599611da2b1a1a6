"""The harmonization task: four-part rule counts (hand-computed) and one short run."""

from __future__ import annotations

import numpy as np
import pytest

from aurl.data.notes import make_notes
from aurl.evaluation.tasks import (
    Variant,
    chorale_voices,
    evaluate_harmonize,
    harmonize_table,
    held_out_chorales,
    voice_rules,
)


def _voices() -> list[np.ndarray]:
    """Three slices (beats 0, 1, 2) of four voices, chosen so that (see the comments):
    S-A move in parallel fifths 0->1, S-B in parallel (compound) fifths 1->2; the tenor
    crosses above the alto at beat 1 and is out of its range there (68 > 67); S-A are wider
    than an octave at beat 2 (15 semitones)."""
    s = make_notes([0, 1, 2], 1, [72, 74, 79])
    a = make_notes([0, 1, 2], 1, [65, 67, 64])
    t = make_notes([0, 1, 2], 1, [57, 68, 55])
    b = make_notes([0, 1, 2], 1, [48, 43, 48])
    return [s, a, t, b]


def test_voice_rules_hand_computed() -> None:
    r = voice_rules(_voices())
    assert r["moves"] == 12  # 6 pairs, each moving in both transitions
    assert r["parallels"] == 2
    assert r["parallels_per_100_moves"] == pytest.approx(100 * 2 / 12)
    assert r["crossings_per_100_slices"] == pytest.approx(100 / 3)
    assert r["spacing_per_100_slices"] == pytest.approx(100 / 3)
    assert r["out_of_range_per_100_notes"] == pytest.approx(100 / 12)


def test_contrary_motion_is_not_parallel() -> None:
    # a fifth to a fifth (19 -> 7 semitones) with the voices moving apart the other way round:
    # contrary motion, not a parallel; the same fifths with both voices falling: a parallel
    s, b = make_notes([0, 1], 1, [72, 67]), make_notes([0, 1], 1, [53, 60])
    assert voice_rules([s, b])["parallels"] == 0
    assert voice_rules([s, make_notes([0, 1], 1, [65, 60])])["parallels"] == 1


def test_held_out_chorales_are_the_test_split() -> None:
    files = held_out_chorales()
    assert len(files) >= 20
    import json

    manifest = json.loads((files[0].parent / "manifest.json").read_text())
    split = {f["file"]: f["split"] for f in manifest["files"]}
    assert all(split[f.name] == "test" for f in files)
    assert all(len(v) for v in chorale_voices(files[0]))


def test_short_harmonize_run_keeps_melody_and_beats_unconditional_bits() -> None:
    from aurl.cli.generate import SHIPPED, load_model

    if not (SHIPPED / "config.json").is_file():
        pytest.skip("no shipped model")
    model = load_model(None, "cpu")
    files = held_out_chorales()[:1]
    result = evaluate_harmonize(model, files, variants=(Variant("forcing", 1),), max_beats=6)
    rows = result["rows"]
    assert rows["forcing"]["melody_kept"] == 1.0
    voices = [v[v["onset"] < 6] for v in chorale_voices(files[0])]
    for v in voices:
        v["duration"] = np.minimum(v["duration"], 6 - v["onset"])
    bach = voice_rules(voices)
    assert rows["bach"]["crossings_per_100_slices"] == pytest.approx(
        bach["crossings_per_100_slices"]
    )
    lik = result["likelihood"]
    assert lik["conditional_bits_per_note"] < lik["unconditional_bits_per_note"]
    assert "| forcing |" in harmonize_table(result)
