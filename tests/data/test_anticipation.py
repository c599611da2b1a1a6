"""Anticipated windows (aurl.data.anticipation): the top line's NOTE_ONs copied as controls
exactly ``delta`` ahead of their time (to the token), never scored, and nothing changes without
them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from aurl.config import Config, DataConfig, LossConfig, ModelConfig
from aurl.data.anticipation import anticipate, interleave, token_times, top_line
from aurl.data.tokenizer import Tokenizer
from aurl.data.vocab import ANTICIPATION_BASE, Kind, Vocab
from aurl.errors import ConfigError

CHORALES = Path(__file__).parents[2] / "src/aurl/data/bundled/bach-chorales"
V = Vocab()
DELTA = 4 * V.config.steps_per_beat  # one 4/4 bar
TINY = dict(d_model=32, n_layers=2, n_heads=2, max_seq_len=512, dropout=0.0, meter=True)


@pytest.fixture(scope="module")
def ids() -> np.ndarray:
    return np.asarray(Tokenizer().encode_file(CHORALES / "bach_bwv10.7.mid"), np.int64)


def test_token_times_hand_computed() -> None:
    shift = V.shift_id(8)  # 8 steps
    seq = np.array([0, V.note_on_id(60), shift, V.note_off_id(60), shift, shift, 1])
    assert token_times(seq, V).tolist() == [0, 0, 0, 8, 8, 16, 24]


def test_top_line_is_the_soprano_of_a_chorale() -> None:
    """On four-track chorales the top line is the soprano track's line (the melody ``aurl
    harmonize`` takes) at 99% of its notes, and little else: a soprano note struck again by the
    alto in unison reads as a new top note in the merged stream (bwv10.7's last bars)."""
    from aurl.evaluation.tasks import chorale_voices
    from aurl.generation.compose import melody_line

    n_got = n_want = n_both = 0
    for name in ("bach_bwv10.7.mid", "bach_bwv342.mid", "bach_bwv117.4.mid", "bach_bwv153.5.mid"):
        seq = np.asarray(Tokenizer().encode_file(CHORALES / name), np.int64)
        tau = token_times(seq, V)
        flags = top_line(seq, V)
        got = set(zip(tau[flags].tolist(), V.value[seq[flags]].tolist()))
        line = melody_line(chorale_voices(CHORALES / name)[0])
        steps = np.round(line["onset"] * V.config.steps_per_beat).astype(int)
        want = set(zip(steps.tolist(), line["pitch"].astype(int).tolist()))
        n_got, n_want, n_both = n_got + len(got), n_want + len(want), n_both + len(got & want)
    assert n_both >= 0.99 * n_want
    assert n_both >= 0.95 * n_got


def test_controls_come_exactly_delta_ahead(ids) -> None:
    """Every control sits right before the first music token read at its note's time minus
    delta (after the one read before it), carries its note's pitch, and the music tokens keep
    their order; the tail whose controls the window cannot know is dropped."""
    window = ids[:400]
    melody = top_line(window, V)
    w = anticipate(window, melody, V, delta=DELTA)
    is_ctrl = w.ids >= ANTICIPATION_BASE
    assert is_ctrl.sum() > 20
    assert np.array_equal(w.ids[~is_ctrl], window[: (~is_ctrl).sum()])  # music untouched
    assert np.array_equal(w.pos[~is_ctrl], np.arange((~is_ctrl).sum()))
    assert (w.pos[is_ctrl] == -1).all()
    tau = token_times(window, V)
    notes = np.flatnonzero(melody)
    for k, i in enumerate(np.flatnonzero(is_ctrl)):
        note = notes[k]  # controls come in the melody's order
        assert w.ids[i] - ANTICIPATION_BASE + V.config.pitch_min == V.value[window[note]]
        after = w.pos[i + 1 :][w.pos[i + 1 :] >= 0][0]
        before = w.pos[:i][w.pos[:i] >= 0][-1]
        assert tau[after] >= tau[note] - DELTA
        assert before == 0 or tau[before] < tau[note] - DELTA
    # the window keeps music only up to delta before its last complete time step
    kept = w.source
    horizon = tau[-1] + (V.value[window[-1]] if V.kind[window[-1]] == Kind.TIME_SHIFT else 0)
    assert (token_times(kept, V) + DELTA < horizon).all()
    assert len(kept) < len(window)


def test_piece_start_controls_follow_start_and_a_whole_piece_keeps_everything(ids) -> None:
    w = anticipate(ids, top_line(ids, V), V, delta=DELTA)
    assert w.ids[0] == ids[0] and w.ids[1] >= ANTICIPATION_BASE  # due at or before 0: after START
    assert len(w.source) == len(ids)  # END inside: nothing is unknown, nothing dropped
    assert (w.ids >= ANTICIPATION_BASE).sum() == top_line(ids, V).sum()


def test_interleave_hand_computed() -> None:
    shift = V.shift_id(8)
    seq = np.array([0, V.note_on_id(60), shift, V.note_off_id(60), shift, 1])  # times 0 0 0 8 8 16
    out, pos = interleave(seq, np.array([-8, 4, 8, 40]), np.array([900, 901, 902, 903]), V)
    assert out.tolist() == [0, 900, seq[1], seq[2], 901, 902, seq[3], seq[4], seq[5]]
    assert pos.tolist() == [0, -1, 1, 2, -1, -1, 3, 4, 5]


def _model(anticipation: float):
    from aurl.models.model import MusicTransformerVAEGAN

    torch.manual_seed(0)
    return MusicTransformerVAEGAN(ModelConfig(**TINY, anticipation=anticipation))


def test_without_anticipation_nothing_changes(ids) -> None:
    """model.anticipation 0 creates no parameter; with it, the control rows come last, so every
    other parameter draws the same values and a plain sequence gives bitwise-equal logits."""
    plain, ant = _model(0).eval(), _model(4).eval()
    assert plain.controls is None and not any(k.startswith("controls") for k in plain.state_dict())
    other = ant.state_dict()
    for k, v in plain.state_dict().items():
        assert torch.equal(v, other[k]), k
    assert other["controls.weight"].shape == (V.n_pitches, 32)
    x = torch.as_tensor(ids[:300])[None]
    with torch.no_grad():
        assert torch.equal(plain(x).logits, ant(x).logits)


def test_rate_zero_windows_are_the_plain_windows(tmp_path) -> None:
    """data.anticipation_rate 0 (the default) adds nothing to the items; at a rate > 0 the
    windows not chosen are the same windows (the draw has its own random stream)."""
    import shutil

    from aurl.data.cache import TokenCache, prepare
    from aurl.data.dataset import WindowDataset

    (tmp_path / "midi").mkdir()
    for path in sorted(CHORALES.glob("*.mid"))[:12]:
        shutil.copy(path, tmp_path / "midi" / path.name)
    prepare(tmp_path / "midi", tmp_path / "cache", data_config=DataConfig(valid_fraction=0.2,
            test_fraction=0.0), workers=1)  # fmt: skip
    cache = TokenCache(tmp_path / "cache")
    plain = WindowDataset(cache, "train", window=256, seed=3)
    chosen = WindowDataset(cache, "train", window=256, seed=3, anticipation_rate=0.5,
                           anticipation_beats=4)  # fmt: skip
    n_plain = n_ant = 0
    for k in range(len(plain)):
        a, b = plain[k], chosen[k]
        assert "fim" not in a
        if (b["ids"] >= ANTICIPATION_BASE).any():
            n_ant += 1
            assert np.array_equal(b["fim"].source, a["ids"][: len(b["fim"].source)])
        else:
            n_plain += 1
            assert np.array_equal(a["ids"], b["ids"])
    assert n_plain > 0 and n_ant > 0
    with pytest.raises(ConfigError, match="model.anticipation"):
        WindowDataset(cache, "train", window=256, anticipation_rate=0.5)


def test_controls_are_never_scored(ids) -> None:
    """The loss sends no gradient to the logits that predict a control, and some to every
    logit that predicts a music token."""
    from aurl.data.fim import collate_fim, fim_allowed
    from aurl.data.grammar import Grammar
    from aurl.models.losses import compute_losses

    model = _model(4).train()
    w = anticipate(ids[:300], top_line(ids[:300], V), V, delta=DELTA)
    x = torch.as_tensor(w.ids)[None]
    f = collate_fim([w])
    grammar = Grammar(V)
    allowed = fim_allowed(grammar, x, f["fim_source"], f["fim_pos"], f["fim_middle"],
                          grammar.initial_state(1))  # fmt: skip
    kept = {}
    model.head.register_forward_hook(
        lambda m, i, o: kept.setdefault("logits", o.retain_grad() or o)
    )
    batch = {"ids": x, "attention_mask": torch.ones_like(x, dtype=torch.bool),
             "fim": (f["fim_source"], f["fim_pos"])}  # fmt: skip
    losses = compute_losses(model, batch, LossConfig(), step=0, allowed=allowed)
    losses["total"].backward()
    grad = kept["logits"].grad[0, :-1].abs().sum(-1)  # (T - 1,) row t predicts ids[t + 1]
    to_control = x[0, 1:] >= ANTICIPATION_BASE
    assert to_control.sum() > 20
    assert (grad[to_control] == 0).all()
    assert (grad[~to_control] > 0).all()


def test_config_check_names_the_keys() -> None:
    from aurl.training.trainer import check_fim

    with pytest.raises(ConfigError, match="model.anticipation"):
        check_fim(Config(data=DataConfig(anticipation_rate=0.5)))
    with pytest.raises(ConfigError, match="fim_rate"):
        check_fim(Config(data=DataConfig(anticipation_rate=0.5, fim_rate=0.5),
                         model=ModelConfig(anticipation=4, fim=True)))  # fmt: skip
    check_fim(Config(data=DataConfig(anticipation_rate=0.5), model=ModelConfig(anticipation=4)))
