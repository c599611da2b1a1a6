"""Cadence-aware endings: where the tail is cut, how endings are scored, and the search on the
shipped model (pieces keep their length and their body, and end no worse than the plain ones)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aurl.cli.generate import SHIPPED
from aurl.config import GenerationConfig
from aurl.data.notes import make_notes, notes_from_file
from aurl.data.vocab import END, START, Vocab
from aurl.errors import ConfigError
from aurl.generation.cadence import CadenceOptions, ending_score, tail_cut, token_beats

FIXTURES = Path(__file__).parents[1] / "fixtures" / "midi"
CHORDS = {"C": [48, 64, 67, 72], "F": [53, 65, 69, 72], "G": [43, 62, 67, 71],
          "Am": [45, 64, 69, 72]}  # fmt: skip


def _piece(names: list[str]) -> np.ndarray:
    """One four-voice chord per beat, the last held two beats."""
    onset = [float(i) for i, c in enumerate(names) for _ in CHORDS[c]]
    dur = [2.0 if i == len(names) - 1 else 1.0 for i, c in enumerate(names) for _ in CHORDS[c]]
    return make_notes(onset=onset, duration=dur, pitch=[p for c in names for p in CHORDS[c]])


def _beats_ids(vocab: Vocab, beats: int) -> np.ndarray:
    """START, then per beat: VELOCITY NOTE_ON(60) SHIFT(1 beat) NOTE_OFF(60); END."""
    vel, on, off = vocab.velocity + 20, vocab.note_on_id(60), vocab.note_off_id(60)
    shift = vocab.shift_id(vocab.config.steps_per_beat)
    return np.array([START, *([vel, on, shift, off] * beats), END], dtype=np.int64)


def test_token_beats_and_tail_cut_by_hand() -> None:
    vocab = Vocab()
    ids = _beats_ids(vocab, 6)  # 1 + 24 + 1 tokens; beat b's VELOCITY at index 1 + 4b
    beats = token_beats(ids, vocab)
    assert beats[:6].tolist() == [0, 0, 0, 0, 1, 1]  # the shift's own time is before it
    assert beats[-1] == 6.0
    # the body ends at beat 6 (the last NOTE_OFF); the last 2 beats start at beat 4's NOTE_OFF
    # (index 16, after the shift at index 15), the first token of time 4
    assert tail_cut(ids, vocab, 2.0, primer_length=1) == 16
    assert beats[16] == 4.0 and beats[15] == 3.0
    assert tail_cut(ids, vocab, 2.0, primer_length=17) == 0  # the tail would cut the primer
    assert tail_cut(ids, vocab, 6.0, primer_length=1) == 0  # nothing would be kept


def test_ending_score_reads_the_last_cadence() -> None:
    assert ending_score(_piece(["C", "F", "G", "C"])) == 2  # V -> I: authentic
    assert ending_score(_piece(["C", "G", "C", "F", "C"])) == 2  # IV -> I: plagal
    assert ending_score(_piece(["C", "F", "C", "G"])) == 1  # ends on V: half
    assert ending_score(_piece(["C", "G", "F", "Am"])) == 0  # IV -> vi: none
    # a real chorale: BWV 66.6 closes IV -> I
    assert ending_score(notes_from_file(FIXTURES / "bach_bwv66.6.mid")) == 2


def test_pick_row_by_hand() -> None:
    from aurl.generation.cadence import pick_row

    assert pick_row(np.array([0, 2, 1, 3]), 1.2) == 2  # |1 - 1.2| is the least
    assert pick_row(np.array([0, 2, 1, 3]), 0.0) == 3  # no target: the most
    assert pick_row(np.array([1, 3, 3, 1]), 2.0) == 0  # four rows 1 away: the first
    assert pick_row(np.array([2, 2]), 0.0) == 0


def test_bad_options_name_the_field() -> None:
    with pytest.raises(ConfigError, match="particles 0"):
        CadenceOptions(particles=0)
    with pytest.raises(ConfigError, match="endings 0"):
        CadenceOptions(endings=0)
    with pytest.raises(ConfigError, match="target_per_beat -0.1"):
        CadenceOptions(target_per_beat=-0.1)
    with pytest.raises(ConfigError, match="tail_beats -1"):
        CadenceOptions(tail_beats=-1.0)


@pytest.fixture(scope="module")
def shipped():
    if not (SHIPPED / "config.json").is_file():
        pytest.skip("no model")
    from aurl.cli.generate import load_model

    return load_model(None, "cpu")


def test_ending_search_on_the_shipped_model(shipped) -> None:
    from aurl.data.tokenizer import Tokenizer
    from aurl.generation.cadence import generate_with_cadence
    from aurl.generation.generate import generate

    model = shipped
    tokenizer = Tokenizer(model.vocab_config)
    cfg = GenerationConfig(seconds=8.0, max_tokens=100_000, seed=1)
    options = CadenceOptions(endings=4, tail_beats=4.0)
    plain = generate(model, cfg, num_samples=4)
    searched = generate_with_cadence(model, cfg, num_samples=4, options=options)
    same = generate_with_cadence(model, cfg, num_samples=4, options=CadenceOptions(endings=1))
    assert all(np.array_equal(a.ids, b.ids) for a, b in zip(plain, same))
    changed = 0
    for a, b in zip(plain, searched):
        na, nb = tokenizer.decode_to_notes(a.ids), tokenizer.decode_to_notes(b.ids)
        assert ending_score(nb) >= ending_score(na)
        length = float((nb["onset_s"] + nb["duration_s"]).max())
        beat = float(nb["duration_s"][0] / nb["duration"][0])  # seconds per beat
        assert 8.0 - beat - 1e-6 <= length <= 8.0 + 1e-6  # still lasts the time asked
        cut = tail_cut(a.ids, model.vocab, options.tail_beats, a.primer_length)
        assert np.array_equal(b.ids[:cut], a.ids[:cut])  # the body is the plain piece's
        changed += not np.array_equal(a.ids, b.ids)
    assert changed >= 1  # some plain ending did not close, and a redrawn one did better


def test_phrase_search_on_the_shipped_model_finds_more_cadences(shipped) -> None:
    from aurl.data.grammar import Grammar
    from aurl.data.tokenizer import Tokenizer
    from aurl.generation.cadence import cadence_count, generate_with_cadence
    from aurl.generation.generate import generate

    model = shipped
    tokenizer = Tokenizer(model.vocab_config)
    grammar = Grammar(model.vocab, GenerationConfig().polyphony_cap)
    cfg = GenerationConfig(seconds=12.0, max_tokens=100_000, seed=0)
    options = CadenceOptions(particles=4, phrase_beats=4.0, target_per_beat=0.0)  # the most
    plain = [tokenizer.decode_to_notes(p.ids) for p in generate(model, cfg, num_samples=2)]
    pieces = generate_with_cadence(model, cfg, num_samples=2, options=options)
    found = [tokenizer.decode_to_notes(p.ids) for p in pieces]
    for piece, notes in zip(pieces, found):
        assert grammar.count_violations(piece.ids) == 0
        length = float((notes["onset_s"] + notes["duration_s"]).max())
        beat = float(notes["duration_s"][0] / notes["duration"][0])
        assert 12.0 - beat - 1e-6 <= length <= 12.0 + 1e-6
    # the 2 plain pieces of 24 beats hold no cadence and end on none; the search finds 4
    # cadences, and both pieces end on one
    before = sum(cadence_count(n, np.inf) for n in plain)
    after = sum(cadence_count(n, np.inf) for n in found)
    assert after >= before + 3, (before, after)
    assert sum(ending_score(n) > 0 for n in found) > sum(ending_score(n) > 0 for n in plain)


def test_cli_cadence_modes_write_pieces_of_the_time_asked(tmp_path, capsys) -> None:
    import torch

    from aurl.cli import main
    from aurl.config import load_config
    from aurl.models import build_model

    torch.manual_seed(0)
    build_model(load_config(preset="tiny")).save_pretrained(tmp_path / "tiny")
    lengths = {}
    for mode in ("off", "ending", "phrases", "thorough"):
        out = tmp_path / mode
        argv = ["generate", "--checkpoint", str(tmp_path / "tiny"), "--seconds", "4"]
        assert main([*argv, "--cadence", mode, "--out", str(out)]) == 0, capsys.readouterr().err
        notes = notes_from_file(out / "sample_seed0_000.mid")
        beat = float(notes["duration_s"][0] / notes["duration"][0])  # seconds per beat
        lengths[mode] = float((notes["onset_s"] + notes["duration_s"]).max()), beat
    assert all(4.0 - b - 1e-3 <= x <= 4.0 + 1e-3 for x, b in lengths.values()), lengths
    with pytest.raises(SystemExit):
        main(["generate", "--seconds", "4", "--cadence", "always", "--out", str(tmp_path)])
    assert "invalid choice: 'always'" in capsys.readouterr().err
