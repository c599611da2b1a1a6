"""Infilling with a fill-in-the-middle model (``model.fim``, trained with ``data.fim_rate``):
the middle is written knowing the suffix, in the order the model was trained on
(:mod:`aurl.data.fim`)::

    [SUF] suffix [PRE] prefix [MID] middle ...

The composing loop (:func:`aurl.generation.compose.decode`) is kept as it is: it walks musical
time from the piece's start, forces the given notes' events (outside the span and the given
NOTE_OFFs inside it) and closes the model's notes where the span ends, so the join to the suffix
is valid by construction. :class:`FimEngine` is the engine it talks to: it shows the model the
suffix first, then the last tokens of the prefix, then ``MID``, and steps the middle token by
token; each token gets the musical-time and grammar features of its place in time (the suffix's
are read from the given notes alone: the middle's notes end where the span ends, so nothing of
them sounds into the suffix, exactly as in training). Before the span every token is forced
(the one free choice, the first VELOCITY, is the chorales' bin); after it the loop forces the
rest, so the model is no longer asked: the span's time filled is the model's EOM.

Scoring a known middle (the benchmark, ``benchmarks/bench_infill.py``): :func:`middle_bits_fim`
(prefix and suffix, FIM order) and :func:`middle_bits_plain` (prefix only, any model), both over
the same tokens under the same grammar masks.

Torch is imported inside the functions (the generation package stays importable without it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from aurl.data.fim import EOM, MID, PRE, SUF, fim_window
from aurl.data.vocab import END, START, Kind, Vocab

PREFIX_TOKENS = 256  # prefix tokens the model attends to (training windows: 512 in all)
SUFFIX_TOKENS = 160  # suffix tokens shown before the prefix
CHORALE_VELOCITY_BIN = 22  # velocity 90 (the chorales' and compose.DEFAULT_VELOCITY)


def supports_fim(model: Any) -> bool:
    """True for a torch model with the FIM sentinel rows."""
    return getattr(model, "fim", None) is not None


def given_stream(plan: Any, vocab: Vocab) -> np.ndarray:
    """The given notes of ``plan`` as the composing loop writes them (START TEMPO INSTRUMENT,
    then per event step: shifts, NOTE_OFFs ascending, one VELOCITY before the first NOTE_ON,
    NOTE_ONs ascending; END at the plan's end)."""
    ids = [START, vocab.tempo + plan.tempo_bin, vocab.instrument]
    steps = sorted(set(plan.ons) | set(plan.offs) | {plan.end})
    t, velocity = 0, False
    for s in steps:
        while s > t:
            d = min(s - t, vocab.config.max_shift_steps)
            ids.append(int(vocab.shift_id(d)))
            t += d
        ids += [int(vocab.note_off_id(p)) for p in plan.offs.get(s, [])]
        ons = plan.ons.get(s, [])
        if ons and not velocity:
            ids.append(vocab.velocity + CHORALE_VELOCITY_BIN)
            velocity = True
        ids += [int(vocab.note_on_id(p)) for p in ons]
    return np.array([*ids, END], dtype=np.int64)


def first_event_at(ids: np.ndarray, vocab: Vocab, step: int) -> int:
    """Index of the first token of ``ids`` that is not a TIME_SHIFT and comes at or after time
    ``step`` (len(ids) when none)."""
    shift = np.where(vocab.kind[ids] == Kind.TIME_SHIFT, vocab.value[ids], 0)
    before = np.concatenate([[0], np.cumsum(shift)[:-1]])  # time at each token
    hit = np.flatnonzero((before >= step) & (shift == 0))
    return int(hit[0]) if hit.size else len(ids)


class FimEngine:
    """A FIM model behind the composing loop's engine calls (``init_state``, ``step``,
    ``reorder`` on numpy arrays; see the module docstring).

    Args:
        model: A torch model with ``model.fim``.
        plan: The :class:`~aurl.generation.compose.Plan` being decoded.
        meter: (numerator, denominator) the bars follow (meter models), or None (4/4).
    """

    def __init__(self, model: Any, plan: Any, *, meter: tuple[int, int] | None = None) -> None:
        import torch

        self.torch, self.model, self.plan = torch, model, plan
        self.vocab: Vocab = model.vocab
        self.device = model.embed.weight.device
        self.a, self.b = plan.free_start, plan.free_end
        self.meter = None if meter is None else torch.tensor([meter], device=self.device)
        given = given_stream(plan, self.vocab)
        j = first_event_at(given, self.vocab, self.b)
        self.suffix = given[j : j + SUFFIX_TOKENS]
        with torch.no_grad():
            feats = self._features(torch.as_tensor(given, device=self.device)[None], None)[0]
        self.suffix_features = feats[:, j : j + SUFFIX_TOKENS]  # (1, s, D)

    def _features(self, ids: Any, carry: Any) -> tuple[Any, Any]:
        """Time and grammar features (B, T, D) of ``ids`` after ``carry`` (None: the start),
        and the carry after them."""
        model, torch = self.model, self.torch
        B = ids.shape[0]
        if carry is None:
            start = model.start_after(torch.zeros(B, 0, dtype=torch.long), device=self.device)
            carry = (start.ticks, start.tempo, start.grammar)
        ticks, tempo, gram = carry
        meter = None if self.meter is None else self.meter.expand(B, 2)
        f = 0
        if model.time is not None:
            emb, ticks, tempo = model.time(ids, ticks, tempo, meter)
            f = f + emb
        if model.grammar_features is not None:
            g = model.grammar_features
            emb, gram = (g.advance if ids.shape[1] == 1 else g.extend)(ids, gram)
            f = f + emb
        return f, (ticks, tempo, gram)

    def _zeros(self, B: int, T: int) -> Any:
        return self.torch.zeros(B, T, self.model.config.d_model, device=self.device)

    def _dummy(self, B: int) -> np.ndarray:
        """Logits while the loop forces every token: the chorales' VELOCITY bin on top."""
        x = np.zeros((B, self.vocab.size), np.float32)
        x[:, self.vocab.velocity + CHORALE_VELOCITY_BIN] = 1e4
        return x

    def init_state(self, ids: np.ndarray) -> tuple[dict, np.ndarray]:
        """The loop's first tokens (B, P) (START TEMPO INSTRUMENT); returns (state, logits)."""
        torch = self.torch
        t = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        with torch.no_grad():
            feats, carry = self._features(t, None)
        state = {"ids": [t], "feats": [feats], "carry": carry, "time": 0, "model": None}
        if self.a <= 0:
            return state, self._prime(state)
        return state, self._dummy(len(ids))

    def _prime(self, state: dict) -> np.ndarray:
        """``[SUF] suffix [PRE]`` + the prefix's last tokens + ``[MID]`` into a fresh decode
        state; the logits at MID."""
        torch, model = self.torch, self.model
        prefix = torch.cat(state["ids"], dim=1)[:, -PREFIX_TOKENS:]  # (B, p)
        pfeats = torch.cat(state["feats"], dim=1)[:, -PREFIX_TOKENS:]
        B = prefix.shape[0]
        suf = torch.as_tensor(self.suffix, device=self.device)[None].expand(B, -1)
        ids = torch.cat([
            torch.full((B, 1), SUF, device=self.device), suf,
            torch.full((B, 1), PRE, device=self.device), prefix,
            torch.full((B, 1), MID, device=self.device),
        ], dim=1)  # fmt: skip
        feats = torch.cat([
            self._zeros(B, 1), self.suffix_features.expand(B, -1, -1), self._zeros(B, 1), pfeats,
            self._zeros(B, 1),
        ], dim=1)  # fmt: skip
        with torch.no_grad():
            state["model"] = model.init_state(
                B, device=self.device, capacity=model.config.max_seq_len
            )
            logits = model.step(ids, state["model"], features=feats)[:, -1]
        state["ids"] = state["feats"] = None
        return logits.float().cpu().numpy()

    def step(self, ids: np.ndarray, state: dict) -> np.ndarray:
        """Feed one id per row (B,); returns the logits (B, V) after it."""
        torch, vocab = self.torch, self.vocab
        before = state["time"]
        kind = vocab.kind[ids]
        shift = np.where(kind == Kind.TIME_SHIFT, vocab.value[ids], 0)
        if state["model"] is None:  # before the span: rows are alike (every token forced)
            state["time"] = before + int(shift[0])
        else:
            state["time"] = np.asarray(before) + shift
        if state["model"] is not None and np.all(np.asarray(before) >= self.b):
            return self._dummy(len(ids))  # past the span for every row: the loop forces it
        t = torch.as_tensor(ids[:, None], dtype=torch.long, device=self.device)
        with torch.no_grad():
            feats, state["carry"] = self._features(t, state["carry"])
            if state["model"] is None:
                state["ids"].append(t)
                state["feats"].append(feats)
                if state["time"] >= self.a:
                    return self._prime(state)
                return self._dummy(len(ids))
            logits = self.model.step(t, state["model"], features=feats)[:, -1]
        return logits.float().cpu().numpy()

    def reorder(self, state: dict, rows: np.ndarray) -> dict:
        from aurl.generation.constraints import index_state

        index = self.torch.as_tensor(rows, dtype=self.torch.long, device=self.device)
        out = dict(state)
        out["carry"] = index_state(state["carry"], index)
        if state["model"] is not None:
            out["model"] = index_state(state["model"], index)
            out["time"] = (
                np.asarray(state["time"])[rows] if np.ndim(state["time"]) else state["time"]
            )
        else:
            out["ids"] = [x[index] for x in state["ids"]]
            out["feats"] = [x[index] for x in state["feats"]]
        return out


# --------------------------------------------------------------------------------------------
# Scoring a known middle
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MiddleScore:
    """Bits of a known middle's tokens.

    Attributes:
        bits: sum of -log2 p over the middle's tokens (grammar-masked).
        eom_bits: -log2 p of EOM after the middle (FIM scoring; 0 otherwise).
        notes: NOTE_ONs in the middle (the denominator of bits per note).
        tokens: tokens scored (EOM not counted).
    """

    bits: float
    eom_bits: float
    notes: int
    tokens: int


def _masked_bits(logits: Any, allowed: Any, targets: Any) -> Any:
    """-log2 p of ``targets`` (n,) under ``logits`` (n, V') renormalised over ``allowed``."""
    import torch

    allowed = allowed.scatter(-1, targets[:, None], True)
    logp = torch.log_softmax(logits.float().masked_fill(~allowed, float("-inf")), dim=-1)
    return -logp.gather(-1, targets[:, None])[:, 0] / math.log(2)


def middle_bits_plain(
    model: Any, ids: np.ndarray, i: int, j: int, *, context: int = 512,
    meter: tuple[int, int] | None = None,
) -> MiddleScore:  # fmt: skip
    """Bits of ``ids[i:j]`` given the prefix only, left to right: the model attends to the last
    ``context - (j - i)`` tokens before ``i`` (musical time and grammar state from all)."""
    import torch

    from aurl.data.grammar import Grammar

    if i == 0:
        raise ValueError("the middle must not start the piece (nothing predicts its first token)")
    i0 = max(0, i - max(0, context - (j - i)))
    x = torch.as_tensor(ids[i0:j])[None]
    start = model.start_after(torch.as_tensor(ids[:i0])[None], device="cpu")
    m = None if meter is None else torch.tensor([meter])
    with torch.no_grad():
        logits = model(x, start=start, meter=m).logits[0]  # (n, V)
    grammar = Grammar(model.vocab)
    state = grammar.state_after(torch.as_tensor(ids[:i0])[None]) if i0 else grammar.initial_state(1)
    masks = grammar.sequence_masks(x, state)[0]
    rows = torch.arange(i - i0 - 1, j - i0 - 1)  # row r predicts token r + 1
    bits = _masked_bits(logits[rows], masks[rows], x[0, rows + 1])
    notes = int((model.vocab.kind[ids[i:j]] == Kind.NOTE_ON).sum())
    return MiddleScore(float(bits.sum()), 0.0, notes, j - i)


def middle_bits_fim(
    model: Any, ids: np.ndarray, i: int, j: int, *, context: int = 512,
    meter: tuple[int, int] | None = None,
) -> MiddleScore:  # fmt: skip
    """Bits of ``ids[i:j]`` (and of EOM after it) given the prefix and the suffix, in FIM order
    (:mod:`aurl.data.fim`): ``context`` tokens in all, the rest after the middle and the
    sentinels shared between suffix and prefix (half each, more to one when the other is
    short). The suffix loses the NOTE_OFFs of the notes the middle leaves sounding, as in
    training, so it tells nothing of the middle's pitches."""
    import torch

    from aurl.data.fim import fim_allowed
    from aurl.data.grammar import Grammar

    vocab: Vocab = model.vocab
    room = max(0, context - 4 - (j - i))
    n_suffix = len(ids) - j
    s = min(n_suffix, max(room // 2, room - i))
    p = min(i, room - s)
    i0 = i - p
    w = fim_window(ids[i0:], p, j - i0, vocab)
    n_suf_all = int(np.flatnonzero(w.ids == PRE)[0]) - 1
    keep = np.ones(len(w.ids), bool)
    keep[1 + s : 1 + n_suf_all] = False  # the suffix's first s tokens only
    fids, pos, middle = w.ids[keep], w.pos[keep], w.middle[keep]
    start = model.start_after(torch.as_tensor(ids[:i0])[None], device="cpu")
    t = lambda a: torch.as_tensor(a)[None]  # noqa: E731
    m = None if meter is None else torch.tensor([meter])
    with torch.no_grad():
        out = model(t(fids), start=start, meter=m, fim=(t(w.source), t(pos)))
        logits = model.eom_logits(out.logits, out.hidden)[0]  # (T, V + 1)
    grammar = Grammar(vocab)
    state = grammar.state_after(t(ids[:i0])) if i0 else grammar.initial_state(1)
    allowed = fim_allowed(grammar, t(fids), t(w.source), t(pos), t(middle), state)[0]
    first = int(np.flatnonzero(fids == MID)[0])  # row predicting the middle's first token
    rows = torch.arange(first, len(fids) - 1)
    targets = torch.as_tensor(np.minimum(fids[first + 1 :], EOM))
    bits = _masked_bits(logits[rows], allowed[rows], targets)
    notes = int((vocab.kind[ids[i:j]] == Kind.NOTE_ON).sum())
    return MiddleScore(float(bits[:-1].sum()), float(bits[-1]), notes, j - i)
