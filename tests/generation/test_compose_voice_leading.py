"""The voice-leading mask of the harmonizer (no parallel fifths or octaves proposed), the scale
bias of a key, and the numpy engine seam (the onnx engine behind the compose loop). Hand-built
plans and a tiny model: no shipped weights needed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aurl.data.notes import make_notes
from aurl.data.vocab import Vocab
from aurl.generation.compose import make_plan, plan_allows, scale_bias


def _ons(vocab: Vocab, mask: np.ndarray) -> set[int]:
    return set(
        (np.flatnonzero(mask[vocab.note_on : vocab.note_off]) + vocab.config.pitch_min).tolist()
    )


def _at_beat_1(vocab: Vocab, voice_leading: bool, first: list[int], melody: list[int]) -> set[int]:
    """Pitches a new note may take at beat 1 after the free notes ``first`` under the melody's
    first note sounded for beat 0 and were all closed (their offs, then the melody's, then the
    ons below the melody come in ascending order)."""
    plan = make_plan(make_notes([0, 1], 1, melody), vocab, ceiling=True, max_free=3,
                     voice_leading=voice_leading)  # fmt: skip
    vel = vocab.velocity + 22
    ids = [vel, *(vocab.note_on_id(p) for p in first), vocab.note_on_id(melody[0])]
    ids += [vocab.shift_id(32), *(vocab.note_off_id(p) for p in first),
            vocab.note_off_id(melody[0])]  # fmt: skip
    return _ons(vocab, plan_allows(vocab, plan, ids))


def test_parallel_octaves_and_fifths_with_the_melody_are_masked() -> None:
    vocab = Vocab()
    # C4 under C5 (an octave); the melody steps up to D5: D4 would be a parallel octave
    free = _at_beat_1(vocab, True, [60], [72, 74])
    assert 62 not in free
    # contrary (D3: down into the double octave), oblique, other intervals: allowed
    assert {50, 59, 60, 64, 65, 67}.issubset(free)
    assert 62 in _at_beat_1(vocab, False, [60], [72, 74])  # the switch matters
    # F4 under C5 (a fifth); the melody steps up to D5: G4 would be a parallel fifth
    assert 67 not in _at_beat_1(vocab, True, [65], [72, 74])
    # the melody falls C5 -> B4: a fifth F4 -> E4 follows in similar motion, masked
    assert 64 not in _at_beat_1(vocab, True, [65], [72, 71])
    # contrary motion into an octave (C5 up to D5, E4 down to D4) is no parallel: allowed
    assert 62 in _at_beat_1(vocab, True, [64], [72, 74])


def test_parallels_between_free_voices_are_masked() -> None:
    vocab = Vocab()
    melody = [79, 79]  # a held G5 on top (re-struck: it does not move)
    plan = make_plan(make_notes([0, 1], 1, melody), vocab, ceiling=True, max_free=3,
                     voice_leading=True)  # fmt: skip
    vel = vocab.velocity + 22
    ids = [vel, vocab.note_on_id(48), vocab.note_on_id(55), vocab.note_on_id(79),
           vocab.shift_id(32), vocab.note_off_id(48), vocab.note_off_id(55), vocab.note_off_id(79),
           vocab.note_on_id(50)]  # fmt: skip
    # C3-G3 (a fifth), the bass has stepped up to D3: A3 above it is a parallel fifth
    free = _ons(vocab, plan_allows(vocab, plan, ids))
    assert 57 not in free and 53 in free and 55 in free


def test_a_voice_that_drops_out_is_read_by_nearest_pitch() -> None:
    vocab = Vocab()
    # slice 0: C3, D4, G4 under D5 (G4-D5 a fifth); at beat 1 the melody falls to C5 and the
    # bass rests: F4, nearest to G4, continues the G4 voice, so it (F4-C5, a fifth, both
    # falling) is masked although by rank from the bottom it would continue C3 (rising); E4,
    # nearest to D4, rises: allowed
    plan = make_plan(make_notes([0, 1], 1, [74, 72]), vocab, ceiling=True, max_free=3,
                     voice_leading=True)  # fmt: skip
    vel = vocab.velocity + 22
    ids = [vel, vocab.note_on_id(48), vocab.note_on_id(62), vocab.note_on_id(67),
           vocab.note_on_id(74), vocab.shift_id(32), vocab.note_off_id(48), vocab.note_off_id(62),
           vocab.note_off_id(67), vocab.note_off_id(74)]  # fmt: skip
    free = _ons(vocab, plan_allows(vocab, plan, ids))
    assert 65 not in free and 64 in free


def test_an_infilled_voice_moves_into_its_kept_note_without_parallels() -> None:
    """`aurl infill --part`: the last new note of the voice moves to the voice's own kept note
    after the span; a pitch that would make that move a parallel fifth or octave with a given
    voice is named for the lean (`_parallel_after`), and only where a note started now would
    sound up to that kept note."""
    from aurl.generation.compose import _parallel_after, _Row

    vocab = Vocab()
    # the soprano C5 (beats 0-1) steps up to D5 (beat 1); the alto is written again in beats
    # 0-1 and keeps its G4 at beat 1 (a fifth under D5)
    given = make_notes([0, 1, 1], 1, [72, 74, 67])
    plan = make_plan(given, vocab, free_span=(0.0, 1.0), max_free=1, rank=1,
                     voice_after=(67, 1.0))  # fmt: skip
    assert plan.after is not None
    assert (plan.after.pitch, plan.after.step, plan.after.since) == (67, 32, 0)
    assert plan.after.others == (74,)
    bad = set(_parallel_after(_Row(plan), plan).tolist())
    # F4 -> G4 under C5 -> D5: parallel fifths; F3 too (a twelfth); both rising with the soprano
    assert {65, 53}.issubset(bad)
    # E4 (a sixth into a fifth), A4 (contrary motion into the fifth), G4 (oblique): allowed
    assert not {64, 69, 67} & bad
    # a note started before the soprano's last onset in the span does not sound up to the kept
    # note: nothing is named there
    given = make_notes([0, 0.5, 1, 1], [0.5, 0.5, 1, 1], [71, 72, 74, 67])
    plan = make_plan(given, vocab, free_span=(0.0, 1.0), max_free=1, rank=1,
                     voice_after=(67, 1.0))  # fmt: skip
    assert plan.after.since == 16
    assert _parallel_after(_Row(plan), plan) is None


def test_scale_bias_keeps_the_leading_tone_of_a_minor_key() -> None:
    vocab = Vocab()
    bias = scale_bias(vocab, "A minor", 0.9)
    on = vocab.note_on_id
    assert bias[on(68)] == 0.0 and bias[on(66)] == 0.0  # G#, F#: raised 7th and 6th
    assert bias[on(69)] == 0.0 and bias[on(67)] == 0.0  # A, G natural
    assert bias[on(70)] == pytest.approx(math.log(0.1))  # Bb: outside
    assert bias[vocab.shift_id(1)] == 0.0


def test_numpy_engine_gives_the_torch_logits(tiny_model, tiny_export) -> None:
    from aurl.engines.onnx_engine import OnnxEngine
    from aurl.generation.compose import NumpyEngine, TorchEngine, as_engine

    onnx = as_engine(OnnxEngine(tiny_export))
    assert isinstance(onnx, NumpyEngine)
    torch_engine = TorchEngine(tiny_model)
    vocab = onnx.vocab
    prefix = np.tile([1, vocab.tempo + 10, vocab.instrument], (3, 1))
    rng = np.random.default_rng(0)
    seq = rng.integers(vocab.note_on, vocab.note_off, size=(3, 40))
    (s1, l1), (s2, l2) = onnx.init_state(prefix), torch_engine.init_state(prefix)
    np.testing.assert_allclose(l1, l2, atol=1e-4)
    for j in range(seq.shape[1]):
        if j == 20:  # a resampling step: rows reordered in both
            s1, s2 = (
                onnx.reorder(s1, np.array([2, 2, 0])),
                torch_engine.reorder(s2, np.array([2, 2, 0])),
            )
        l1, l2 = onnx.step(seq[:, j], s1), torch_engine.step(seq[:, j], s2)
        np.testing.assert_allclose(l1, l2, atol=1e-4)


def test_numpy_engine_harmonizes_without_torch_in_the_loop(tiny_export) -> None:
    from aurl.engines.onnx_engine import OnnxEngine
    from aurl.generation.compose import ComposeOptions, harmonize

    melody = make_notes([0, 1, 2, 3], 1, [67, 69, 71, 72])
    opts = ComposeOptions(particles=2, seed=0, resample_every=2)
    (c,) = harmonize(OnnxEngine(tiny_export), melody, options=opts)
    assert c.stats["fallbacks"] == 0 and c.stats["tokens"] > 10
    assert len(c.notes) == 0 or c.notes["pitch"].max() < 72


def test_cli_harmonize_on_the_onnx_engine(tiny_export, tmp_path) -> None:
    import symusic

    from aurl.cli import main
    from aurl.data.notes import notes_from_score
    from aurl.generation.compose import melody_kept, parts_score
    from aurl.generation.export import write_midi

    melody = make_notes([0, 1, 2, 3], 1, [67, 69, 71, 72])
    write_midi(parts_score([("Melody", melody)]), tmp_path / "m.mid")
    argv = ["harmonize", str(tmp_path / "m.mid"), "--engine", "onnx", "--checkpoint",
            str(tiny_export), "--particles", "1", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 0
    score = symusic.Score(str(tmp_path / "out" / "m_harmonized_seed0_000.mid"))
    soprano = next(t for t in score.tracks if t.name == "Soprano")
    one = symusic.Score(score.tpq)
    one.tracks.append(soprano.copy())
    assert melody_kept(notes_from_score(one), melody) == 1.0


def test_every_near_earlier_note_is_a_possible_source() -> None:
    vocab = Vocab()
    # slice 0: Bb3, D4, F4 under D5; at beat 1 the melody falls to C5 and the bass rests. C4 is
    # two semitones from both Bb3 and D4; read as the D4 voice falling it makes octaves with the
    # melody (D4-D5 -> C4-C5), so it is masked; B3 (a seventh under C5) is not
    plan = make_plan(make_notes([0, 1], 1, [74, 72]), vocab, ceiling=True, max_free=3,
                     voice_leading=True)  # fmt: skip
    vel = vocab.velocity + 22
    ids = [vel, vocab.note_on_id(58), vocab.note_on_id(62), vocab.note_on_id(65),
           vocab.note_on_id(74), vocab.shift_id(32), vocab.note_off_id(58), vocab.note_off_id(62),
           vocab.note_off_id(65), vocab.note_off_id(74)]  # fmt: skip
    free = _ons(vocab, plan_allows(vocab, plan, ids))
    assert 60 not in free and 59 in free
