"""Grammar: encoded files obey it, the vectorized masks equal stepping the machine, hand-made
states allow exactly what the rules say."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aurl.config import DataConfig, VocabConfig
from aurl.data import Grammar, Tokenizer, Vocab
from aurl.data.grammar import GrammarState

FIXTURES = Path(__file__).parents[1] / "fixtures"
ALL_FILES = sorted((FIXTURES / "midi").glob("*.mid")) + sorted((FIXTURES / "edge").glob("*.mid"))
VOCAB = Vocab()
NAMES = VOCAB.names()
ID = {name: i for i, name in enumerate(NAMES)}


def ids_of(text: str) -> torch.Tensor:
    return torch.tensor([[ID[n] for n in text.split()]])


PATHS = {  # (numpy_on_cpu, row_batch_max): the incremental machine's three implementations
    "torch": (False, 0),
    "numpy": (True, 0),
    "numpy rows": (True, 10**9),
}


def step_masks(grammar: Grammar, ids: torch.Tensor) -> torch.Tensor:
    """The reference: advance the incremental machine one token at a time, on every path
    (torch, numpy vectorized, numpy row by row), which must agree exactly."""
    out, final = {}, {}
    for name, (numpy_on_cpu, row_batch_max) in PATHS.items():
        grammar.numpy_on_cpu, grammar.row_batch_max = numpy_on_cpu, row_batch_max
        state = grammar.initial_state(ids.shape[0], ids.device)
        rows = []
        for t in range(ids.shape[1]):
            state = grammar.advance(state, ids[:, t])
            rows.append(grammar.allowed(state))
        out[name] = torch.stack(rows, 1)  # (B, T, V)
        final[name] = state
    del grammar.numpy_on_cpu, grammar.row_batch_max  # back to the class defaults
    for name, masks in out.items():
        assert torch.equal(masks, out["torch"]), f"{name} path differs from the torch path"
        for f in dataclasses.fields(GrammarState):  # every field, time and counts included
            a, b = getattr(final[name], f.name), getattr(final["torch"], f.name)
            assert torch.equal(a, b), f"{name} path: state field {f.name} differs"
    return out["torch"]


def allowed_names(grammar: Grammar, text: str) -> set[str]:
    mask = grammar.sequence_masks(ids_of(text))[0, -1]
    return {NAMES[i] for i in torch.nonzero(mask)[:, 0].tolist()}


@pytest.fixture(scope="module")
def encoded() -> list[np.ndarray]:
    tok = Tokenizer(data_config=DataConfig(drums="keep"))
    return [tok.encode_file(p) for p in ALL_FILES]


def padded(seqs: list[np.ndarray], length: int) -> torch.Tensor:
    out = torch.full((len(seqs), length), ID["PAD"], dtype=torch.long)
    for i, s in enumerate(seqs):
        n = min(len(s), length)
        out[i, :n] = torch.as_tensor(s[:n])
    return out


def test_every_encoded_file_obeys_the_grammar(encoded):
    g = Grammar(VOCAB, polyphony_cap=16)
    assert {p.name: g.count_violations(s) for p, s in zip(ALL_FILES, encoded)} == {
        p.name: 0 for p in ALL_FILES
    }
    secs = Tokenizer(VocabConfig(time_unit="seconds"))
    g = Grammar(secs.vocab, 16)
    assert sum(g.count_violations(secs.encode_file(p)) for p in ALL_FILES) == 0


def test_polyphony_capped_encoding_obeys_a_capped_grammar():
    tok = Tokenizer(data_config=DataConfig(polyphony_cap=2))
    g = Grammar(VOCAB, polyphony_cap=2)
    assert sum(g.count_violations(tok.encode_file(p)) for p in ALL_FILES) == 0


def test_sequence_masks_equal_stepping_on_real_files(encoded):
    g = Grammar(VOCAB, 16)
    batch = padded(encoded, 160)  # short files end and pad inside the window
    assert torch.equal(g.sequence_masks(batch), step_masks(g, batch))


def test_sequence_masks_equal_stepping_on_corrupted_sequences(encoded):
    g = Grammar(VOCAB, 4)
    rng = np.random.default_rng(0)
    batch = padded(encoded, 120)
    hit = torch.as_tensor(rng.random(batch.shape) < 0.15)
    batch[hit] = torch.as_tensor(rng.integers(-3, VOCAB.size + 3, int(hit.sum())))
    assert torch.equal(g.sequence_masks(batch), step_masks(g, batch))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(st.integers(0, 773), min_size=30, max_size=30), min_size=1, max_size=3))
def test_sequence_masks_equal_stepping_on_random_ids(rows):
    g = Grammar(VOCAB, 3)
    ids = torch.tensor(rows)
    ids[:, 0] = ID["START"]
    assert torch.equal(g.sequence_masks(ids), step_masks(g, ids))


def test_windows_continue_from_state_after_the_prefix(encoded):
    g = Grammar(VOCAB, 16)
    batch = padded(encoded[:4], 200)
    whole = g.sequence_masks(batch)
    state = g.state_after(batch[:, :90])
    assert torch.equal(g.sequence_masks(batch[:, 90:], state), whole[:, 90:])
    # and stepping from that state agrees too
    stepped = g.advance(state, batch[:, 90])
    assert torch.equal(g.allowed(stepped), whole[:, 90])


def test_hand_made_states():
    g = Grammar(VOCAB, polyphony_cap=2)
    assert {NAMES[i] for i in torch.nonzero(g.allowed(g.initial_state(1))[0])[:, 0]} == {"START"}
    assert allowed_names(g, "START") == {f"TEMPO_{b}" for b in range(32)}
    after_tempo = allowed_names(g, "START TEMPO_18")
    assert "TEMPO_3" not in after_tempo and "NOTE_ON_60" not in after_tempo  # no family yet
    assert {"INSTRUMENT_0", "INSTRUMENT_15", "TIME_SHIFT_7", "END"} <= after_tempo
    seg = allowed_names(g, "START TEMPO_18 INSTRUMENT_0 VELOCITY_19 NOTE_ON_60")
    # ascending NOTE_ONs, no NOTE_OFF after an ON, the same velocity bin is not repeated
    assert "NOTE_ON_61" in seg and "NOTE_ON_59" not in seg and "NOTE_ON_60" not in seg
    assert "NOTE_OFF_60" not in seg and "VELOCITY_19" not in seg and "VELOCITY_3" in seg
    assert "INSTRUMENT_0" not in seg and "INSTRUMENT_1" in seg and "SUSTAIN_ON" not in seg
    capped = allowed_names(g, "START TEMPO_18 INSTRUMENT_0 VELOCITY_19 NOTE_ON_60 NOTE_ON_64")
    assert not any(n.startswith(("NOTE_ON", "VELOCITY")) for n in capped)  # cap of 2 reached
    nxt = allowed_names(g, "START TEMPO_18 INSTRUMENT_0 VELOCITY_19 NOTE_ON_60 TIME_SHIFT_4")
    assert {n for n in nxt if n.startswith("NOTE_OFF")} == {"NOTE_OFF_60"}
    assert "TIME_SHIFT_1" not in nxt and "END" not in nxt and "SUSTAIN_ON" in nxt
    assert "TEMPO_2" in nxt and "TEMPO_18" not in nxt
    pending = allowed_names(g, "START TEMPO_18 INSTRUMENT_0 VELOCITY_19")
    assert all(n.startswith("NOTE_ON") for n in pending) and len(pending) == 88
    assert "TIME_SHIFT_1" in allowed_names(g, "START TEMPO_18 TIME_SHIFT_512")
    assert allowed_names(g, "START TEMPO_18 END") == {"PAD"}
    assert allowed_names(g, "START TEMPO_18 END PAD") == {"PAD"}


def test_instrument_families_ascend_within_a_step():
    g = Grammar(VOCAB, 16)
    names = allowed_names(g, "START TEMPO_18 INSTRUMENT_5 VELOCITY_19 NOTE_ON_60")
    assert "INSTRUMENT_4" not in names and "INSTRUMENT_6" in names
    # at a new step any other family may come first
    names = allowed_names(g, "START TEMPO_18 INSTRUMENT_5 VELOCITY_19 NOTE_ON_60 TIME_SHIFT_3")
    assert "INSTRUMENT_4" in names and "INSTRUMENT_5" not in names


def test_count_violations_exact():
    g = Grammar(VOCAB, 16)
    # NOTE_ON before any velocity (1), orphan NOTE_OFF (2), shift after a short shift (3),
    # UNK (4); the rest is fine
    ids = ids_of("START TEMPO_18 INSTRUMENT_0 NOTE_ON_60 VELOCITY_19 NOTE_ON_64 NOTE_OFF_62 "
                 "TIME_SHIFT_4 TIME_SHIFT_4 UNK END")[0]  # fmt: skip
    bad = g.violations(ids[None])[0]
    assert torch.nonzero(bad)[:, 0].tolist() == [3, 6, 8, 9]
    assert g.count_violations(ids.numpy()) == 4


def test_random_walks_never_dead_end():
    """Sampling only allowed ids, the machine always offers something next (END eventually)."""
    g = Grammar(VOCAB, 3)
    gen = torch.Generator().manual_seed(0)
    state = g.initial_state(8)
    for _ in range(300):
        mask = g.allowed(state)
        assert mask.any(-1).all()
        probs = mask.float()
        probs[:, ID["END"]] *= 0.01  # keep walking a while
        state = g.advance(state, torch.multinomial(probs, 1, generator=gen)[:, 0])


def test_features_report_sounding_pitches_and_time():
    g = Grammar(VOCAB, 16)
    ids = ids_of("START TEMPO_18 INSTRUMENT_0 VELOCITY_19 NOTE_ON_60 INSTRUMENT_5 NOTE_ON_60 "
                 "TIME_SHIFT_8 INSTRUMENT_0 NOTE_OFF_60")  # fmt: skip
    f = g.sequence_features(ids)
    p60 = 60 - 21
    assert f.sounding[0, :, p60].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]  # strings still on
    assert f.polyphony[0].tolist() == [0, 0, 0, 0, 1, 1, 2, 2, 2, 1]
    assert f.time[0, -1] == 8 and f.family[0, -1] == 0
    state = g.state_after(ids)
    assert state.sounding[0, 5, p60] and not state.sounding[0, 0, p60] and state.count[0] == 1
