"""Fill-in-the-middle windows (aurl.data.fim) on real chorales: the FIM order is a reordering of
a valid time-order sequence, the middle's notes end where the middle ends (none of their
NOTE_OFFs is left in the suffix), the masks allow every scored target, and a dataset without
FIM draws exactly the windows it drew before."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from aurl.data.cache import TokenCache, prepare
from aurl.data.dataset import WindowDataset, collate
from aurl.data.fim import (
    EOM,
    MID,
    PRE,
    SUF,
    close_middle,
    draw_fim,
    fim_allowed,
    fim_window,
    open_notes,
    step_boundaries,
)  # fmt: skip
from aurl.data.grammar import Grammar
from aurl.data.tokenizer import Tokenizer
from aurl.data.vocab import Kind, Vocab

CHORALES = Path(__file__).parents[2] / "src" / "aurl" / "data" / "bundled" / "bach-chorales"
NAMES = ["bach_bwv10.7.mid", "bach_bwv11.6.mid", "bach_bwv13.6.mid", "bach_bwv14.5.mid"]
V = Vocab()


@pytest.fixture(scope="module")
def pieces() -> list[np.ndarray]:
    tok = Tokenizer()
    return [np.asarray(tok.encode_file(CHORALES / n), np.int64) for n in NAMES]


def cuts_of(ids: np.ndarray, rng: np.random.Generator, n: int) -> list[tuple[int, int]]:
    b = np.concatenate([[0], step_boundaries(ids, V)])
    return [tuple(int(x) for x in np.sort(rng.choice(b, 2, replace=False))) for _ in range(n)]


def test_fim_window_reorders_a_valid_time_order_sequence(pieces):
    grammar, rng = Grammar(V), np.random.default_rng(0)
    closed = 0
    for ids in pieces:
        assert grammar.count_violations(ids) == 0
        for i, j in cuts_of(ids, rng, 25):
            w = fim_window(ids, i, j, V)
            s = len(w.ids) - len(ids[i:j]) - len(ids[:i]) - 4  # suffix length in the window
            assert w.ids[0] == SUF and w.ids[s + 1] == PRE and w.ids[-1] == EOM
            assert w.ids[s + 2 + i] == MID
            np.testing.assert_array_equal(w.ids[s + 2 : s + 2 + i], ids[:i])  # prefix
            np.testing.assert_array_equal(w.ids[s + 3 + i : -1], ids[i:j])  # middle
            music = w.pos >= 0
            np.testing.assert_array_equal(w.source[w.pos[music]], w.ids[music])
            assert (w.pos[~music] == -1).all() and len(set(w.pos[music])) == music.sum()
            # the source is a valid piece: the closing NOTE_OFFs sit in canonical order
            assert grammar.count_violations(w.source) == 0
            # no NOTE_OFF of a note the middle left sounding is in the suffix
            opened = {p for _, p in open_notes(ids[i:j], V)}
            closing, kept = close_middle(ids[i:j], ids[j:], V)
            closed += len(closing)
            np.testing.assert_array_equal(w.ids[1 : s + 1], kept)
            first_off = {}
            for t in kept:
                if V.kind[t] in (Kind.NOTE_ON, Kind.NOTE_OFF):
                    first_off.setdefault(int(V.value[t]), V.kind[t] == Kind.NOTE_OFF)
            assert not any(first_off.get(p, False) for p in opened)
            # dropped from the suffix = the closing offs that had an off there
            assert len(ids[j:]) - len(kept) <= len(closing)
            assert len(w.middle) == len(w.ids) and w.middle.sum() == j - i + 1
    assert closed > 50  # the join matters: many cuts leave notes sounding


def test_fim_masks_allow_every_scored_target(pieces):
    grammar, rng = Grammar(V), np.random.default_rng(1)
    for ids in pieces[:2]:
        for i, j in cuts_of(ids, rng, 10):
            w = fim_window(ids, i, j, V)
            t = lambda x: torch.as_tensor(x)[None]  # noqa: E731
            state = grammar.initial_state(1)
            allowed = fim_allowed(grammar, t(w.ids), t(w.source), t(w.pos), t(w.middle), state)[0]
            assert allowed.shape == (len(w.ids), V.size + 1)
            nxt = w.ids[1:]
            scored = nxt <= EOM
            col = np.where(nxt == EOM, V.size, np.minimum(nxt, V.size))
            ok = allowed[:-1].numpy()[np.arange(len(nxt)), col]
            assert ok[scored].all()  # the true sequence is always allowed
            eom_rows = np.flatnonzero(allowed[:, V.size].numpy())
            assert eom_rows[0] == np.flatnonzero(w.ids == MID)[0] and eom_rows[-1] == len(w.ids) - 2
            # the first middle token is predicted from MID with the prefix's state: the same
            # row as a plain sequence gives after the prefix
            if i > 0:
                plain = grammar.sequence_masks(t(ids))[0, i - 1]
                mid = int(np.flatnonzero(w.ids == MID)[0])
                assert torch.equal(allowed[mid, : V.size], plain)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> TokenCache:
    src = tmp_path_factory.mktemp("midi")
    for n in NAMES:
        (src / n).write_bytes((CHORALES / n).read_bytes())
    out = tmp_path_factory.mktemp("cache")
    prepare(src, out, workers=1)
    return TokenCache(out)


def test_fim_rate_zero_draws_the_windows_it_drew_before(cache):
    plain = WindowDataset(cache, "train", window=128, seed=3)
    off = WindowDataset(cache, "train", window=128, seed=3, fim_rate=0.0)
    half = WindowDataset(cache, "train", window=128, seed=3, fim_rate=0.5)
    n_fim = 0
    for k in range(len(plain)):
        a, b, c = plain[k], off[k], half[k]
        assert set(a) == set(b) and np.array_equal(a["ids"], b["ids"])
        assert a["offset"] == c["offset"] and a["index"] == c["index"]
        if c["fim"].ids[0] == SUF:  # a FIM window of the same slot: the same tokens, reordered
            n_fim += 1
            f = c["fim"]
            i = int(np.flatnonzero(f.ids == MID)[0] - np.flatnonzero(f.ids == PRE)[0] - 1)
            j = i + int(f.middle.sum()) - 1
            again = fim_window(a["ids"][: 128 - 4], i, j, V)
            assert np.array_equal(again.ids, f.ids) and np.array_equal(c["ids"], f.ids)
        else:
            assert np.array_equal(c["ids"], a["ids"])
    assert 0 < n_fim < len(plain)
    batch = collate([half[k] for k in range(4)])
    assert {"fim_source", "fim_pos", "fim_middle"} <= set(batch)
    assert "fim_pos" not in collate([plain[k] for k in range(4)])


def test_draw_fim_respects_the_window(pieces):
    rng = np.random.default_rng(0)
    for _ in range(20):
        w = draw_fim(pieces[0], rng, V, rate=1.0, window=100)
        assert len(w.ids) <= 100 and w.ids[0] == SUF
