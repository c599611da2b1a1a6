"""The model's musical-time and grammar-feature inputs, computed in numpy (no torch).

The ONNX graphs (:mod:`aurl.models.onnx_export`) take, for each token, the indices and vectors
that :class:`aurl.models.model.MusicalTime` and :class:`aurl.models.model.GrammarFeatures`
derive from the ids; this module derives them the same way, incrementally, from a small state
carried between calls:

- musical time: ``ticks`` (B,) cumulative 1/32-beat ticks (beat mode: TIME_SHIFT steps) and
  ``tempo`` (B,) the tempo bin in force (-1 before the first TEMPO). Per token: the shift's
  ticks at the current tempo, read from one precomputed (tempo bins + 1, shifts) table; phase
  = position in the beat in 1/32, beat = beat in the bar. The bar is 4 beats, or, for a model
  with meter conditioning (``model.meter``), each row's time signature counted in quarter-note
  beats (``bar`` (B,) ticks per bar, set once by :meth:`Features.initial`; 3/4 -> 3 beats, 6/8
  -> 3), whose length in beats is one more input, ``bar_beats`` (B,), for the graphs' embedding
  of the bar length.
- grammar features: the grammar state (:class:`aurl.data.grammar.GrammarState` with numpy
  fields, advanced by the one grammar implementation), which pitches sound in any family
  (``sounding`` (B, P)) and the step at which each started (``onset`` (B, P)); ``age`` = time -
  onset where sounding. Kept incrementally: one grammar step and three small array operations
  per token.

The tests hold these inputs equal to the torch model's own (:mod:`tests.engines`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from aurl.data.grammar import Grammar
from aurl.data.vocab import Kind, Vocab

PHASE_BINS = 32  # as aurl.models.model.PHASE_BINS (held equal by the tests)
BEATS_PER_BAR = 4  # as aurl.models.model.BEATS_PER_BAR
MAX_BEATS = 12  # as aurl.models.model.MAX_BEATS


def bar_ticks(meter: np.ndarray, ticks_per_beat: int) -> np.ndarray:
    """Ticks per bar of each meter ``(numerator, denominator)`` (B, 2) in quarter-note beats of
    ``ticks_per_beat`` ticks, at most :data:`MAX_BEATS` beats (``aurl.models.model.bar_ticks``
    in numpy). (B,) int64."""
    meter = np.asarray(meter, dtype=np.int64).reshape(-1, 2)
    num, den = meter[:, 0], np.maximum(meter[:, 1], 1)
    return np.clip(ticks_per_beat * 4 * num // den, 1, MAX_BEATS * ticks_per_beat)


@dataclass
class FeatureState:
    """What the features carry between calls, for B rows (numpy arrays)."""

    ticks: np.ndarray  # (B,) int64
    tempo: np.ndarray  # (B,) int64, -1: no TEMPO yet
    grammar: Any  # GrammarState with numpy fields (None: the model has no grammar features)
    sounding: np.ndarray  # (B, P) bool: pitches sounding in any family
    onset: np.ndarray  # (B, P) int64: step at which each sounding pitch started
    bar: np.ndarray  # (B,) int64: ticks per bar (4 beats, or the row's meter)

    def take(self, rows: np.ndarray) -> FeatureState:
        """The state of rows ``rows`` (beam search reorders)."""
        g = self.grammar
        if g is not None:
            g = type(g)(**{f.name: getattr(g, f.name)[rows] for f in fields(g)})
        return FeatureState(self.ticks[rows], self.tempo[rows], g, self.sounding[rows],
                            self.onset[rows], self.bar[rows])  # fmt: skip


class Features:
    """Feature inputs of one vocabulary (see the module docstring).

    Args:
        vocab: the model's vocabulary.
        musical_time: the model has musical-time embeddings (``model.musical_position``).
        grammar_features: the model has grammar-feature embeddings (``model.grammar_features``).
        meter: the model has meter conditioning (``model.meter``): bars follow the meter given
            to :meth:`initial`, and ``bar_beats`` is an input; without it every bar has 4 beats
            and a meter given is ignored (as the model does).
    """

    def __init__(
        self, vocab: Vocab, *, musical_time: bool, grammar_features: bool, meter: bool = False
    ) -> None:
        c = vocab.config
        self.vocab, self.musical_time, self.grammar_features = vocab, musical_time, grammar_features
        self.meter = meter and musical_time
        self.grammar = Grammar(vocab)
        self.shift = np.where(vocab.kind == Kind.TIME_SHIFT, vocab.value, 0).astype(np.int64)
        self.tempo_of = np.where(vocab.kind == Kind.TEMPO, vocab.value, -1).astype(np.int64)
        steps = np.arange(c.max_shift_steps + 1, dtype=np.float64)
        if c.time_unit == "beat":
            self.ticks_per_beat = c.steps_per_beat
            table = np.broadcast_to(steps, (c.tempo_bins + 1, len(steps))).round()
        else:
            self.ticks_per_beat = PHASE_BINS
            bpm = np.concatenate([[120.0], np.asarray(vocab.bin_tempo, dtype=np.float64)])
            table = (steps[None, :] * c.step_seconds * bpm[:, None] / 60.0 * PHASE_BINS).round()
        self.ticks = table.astype(np.int64)  # (tempo bins + 1, shifts)
        self.P = vocab.n_pitches
        # ids after which sounding pitches or their ages can change (notes and time)
        kind = vocab.kind
        self.moves = (kind == Kind.NOTE_ON) | (kind == Kind.NOTE_OFF) | (kind == Kind.TIME_SHIFT)
        # the same lookups as Python lists, for the row-by-row path of advance_into
        self._tempo_of, self._shift = self.tempo_of.tolist(), self.shift.tolist()
        self._ticks = self.ticks.tolist()
        self._note = np.where(
            (kind == Kind.NOTE_ON) | (kind == Kind.NOTE_OFF),
            np.clip(vocab.value - c.pitch_min, 0, self.P - 1),
            -1,
        ).tolist()  # fmt: skip  (pitch index of a note id, -1 otherwise)
        self.is_note = np.asarray(self._note) >= 0  # (V,) NOTE_ON / NOTE_OFF ids
        self._is_shift = (kind == Kind.TIME_SHIFT).tolist()

    def initial(self, batch: int, meter: np.ndarray | None = None) -> FeatureState:
        """The state before any token. ``meter`` (B, 2) or (2,): the time signatures
        ``(numerator, denominator)`` the bars follow (meter models; default 4/4)."""
        z = np.zeros(batch, dtype=np.int64)
        r = self.ticks_per_beat
        if self.meter and meter is not None:
            bar = np.broadcast_to(bar_ticks(meter, r), (batch,)).copy()
        else:
            bar = np.full(batch, BEATS_PER_BAR * r, dtype=np.int64)
        return FeatureState(
            ticks=z, tempo=z - 1,
            grammar=self.grammar.initial_numpy_state(batch) if self.grammar_features else None,
            sounding=np.zeros((batch, self.P), dtype=bool),
            onset=np.zeros((batch, self.P), dtype=np.int64), bar=bar,
        )  # fmt: skip

    def start(
        self, batch: int, meter: np.ndarray | None = None, history: np.ndarray | None = None
    ) -> FeatureState:
        """The state before a numpy engine's first token: :meth:`initial`, then the ``history``
        (B, n) ids that set the musical time and grammar features without entering the cache
        (the tokens a sliding window left behind)."""
        state = self.initial(batch, meter)
        if history is not None and history.shape[1] > 0:
            _, state = self(np.asarray(history, dtype=np.int64), state)
        return state

    def buffers(self, batch: int) -> dict[str, np.ndarray]:
        """Input arrays for one token per row, for :meth:`advance_into` to fill: (B, 1) each,
        (B, 1, P) float32 ``sounding`` and ``age``, (B,) ``bar_beats``; only the model's inputs."""
        out = {"ids": np.zeros((batch, 1), np.int64)}
        if self.musical_time:
            out.update({n: np.zeros((batch, 1), np.int64) for n in ("phase", "beat", "tempo")})
            if self.meter:
                out["bar_beats"] = np.zeros(batch, np.int64)
        if self.grammar_features:
            out["sounding"] = np.zeros((batch, 1, self.P), np.float32)
            out["age"] = np.zeros((batch, 1, self.P), np.float32)
            out["family"] = np.zeros((batch, 1), np.int64)
        return out

    def advance_into(
        self, ids: np.ndarray, state: FeatureState, out: dict[str, np.ndarray], *, fresh: bool
    ) -> FeatureState:
        """:meth:`__call__` for one token per row (``ids`` (B,)) without allocating inputs:
        writes the inputs after it into ``out`` (from :meth:`buffers`) and returns the new
        state. Row by row in Python scalars (a handful of numpy calls cost more at the batch
        sizes of generation); held equal to :meth:`__call__` by the tests.

        ``fresh``: ``out`` does not hold the inputs of the previous token of this state, so
        every array is written; otherwise ``sounding`` and ``age`` change only where a note or
        a time shift changes them."""
        rows = ids.tolist()
        out["ids"][:, 0] = ids
        ticks, tempo = state.ticks, state.tempo
        if self.musical_time:
            r, bars = self.ticks_per_beat, state.bar.tolist()
            new_ticks, new_tempo = ticks.tolist(), tempo.tolist()
            phase, beat, tempo_in = out["phase"], out["beat"], out["tempo"]
            for b, i in enumerate(rows):
                t = self._tempo_of[i]
                cur = t if t >= 0 else new_tempo[b]
                tk = new_ticks[b] + self._ticks[cur + 1][self._shift[i]]
                new_ticks[b], new_tempo[b] = tk, cur
                phase[b, 0] = (tk % r) * PHASE_BINS // r
                beat[b, 0] = (tk % bars[b]) // r
                tempo_in[b, 0] = cur + 1
            ticks = np.array(new_ticks, dtype=np.int64)
            tempo = np.array(new_tempo, dtype=np.int64)
            if self.meter and fresh:
                out["bar_beats"][:] = -(-state.bar // r)
        g, snd, onset = state.grammar, state.sounding, state.onset
        if self.grammar_features:
            g = self.grammar.advance(g, ids)
            out["family"][:, 0] = g.family
            if fresh:
                now = g.sounding.any(1)  # (B, P)
                time = g.time[:, None]  # (B, 1)
                onset = np.where(now & ~snd, time, onset)
                out["sounding"][:, 0] = now
                np.multiply(time - onset, now, out=out["age"][:, 0], casting="unsafe")
                snd = now
            else:
                snd, onset = self._move(rows, g, snd, onset, out)
        return FeatureState(ticks, tempo, g, snd, onset, state.bar)

    def _move(
        self, rows: list[int], g: Any, snd: np.ndarray, onset: np.ndarray, out: dict
    ) -> tuple[np.ndarray, np.ndarray]:
        """The sounding pitches, their onsets and the ``sounding`` / ``age`` inputs after one
        token per row, from those before it (copied before any change: states are values)."""
        copied = False
        sounding, age = out["sounding"], out["age"]
        for b, i in enumerate(rows):
            p = self._note[i]
            if p >= 0:  # a note: one pitch may start or stop sounding (in any family)
                now = bool(g.sounding[b, :, p].any())
                if now == snd[b, p]:
                    continue
                if not copied:
                    snd, onset, copied = snd.copy(), onset.copy(), True
                snd[b, p] = now
                if now:
                    onset[b, p] = g.time[b]
                sounding[b, 0, p] = now
                age[b, 0, p] = 0
            elif self._is_shift[i]:  # time moved: every sounding pitch ages
                np.multiply(g.time[b] - onset[b], snd[b], out=age[b, 0], casting="unsafe")
        return snd, onset

    def _scan(
        self, ids: np.ndarray, g: Any, snd: np.ndarray
    ) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
        """The grammar state after ``ids`` (B, T) from ``g``, and after each token the pitches
        sounding in any family (B, T, P), the time (B, T) and the family (B, T): one grammar
        step per token (the one grammar implementation), the rest gathered once (``sounding``
        is read again only after a note; ``snd``: the pitches sounding before ``ids``)."""
        notes = self.is_note[ids].any(0).tolist()  # (T,): a note in the column
        nows, times, families = [], [], []
        for j, note in enumerate(notes):
            g = self.grammar.advance(g, ids[:, j])
            if note:
                snd = g.sounding.any(1)  # (B, P)
            nows.append(snd)
            times.append(g.time)
            families.append(g.family)
        return g, np.stack(nows, 1), np.stack(times, 1), np.stack(families, 1)

    def __call__(self, ids: np.ndarray, state: FeatureState) -> tuple[dict, FeatureState]:
        """Inputs after each token of ``ids`` (B, T) and the state after the last one."""
        B, T = ids.shape
        out: dict[str, np.ndarray] = {"ids": ids}
        ticks, tempo = state.ticks, state.tempo
        if self.musical_time:
            t = self.tempo_of[ids]  # (B, T)
            if T == 1:
                cur = np.where(t >= 0, t, tempo[:, None])
            else:  # the last TEMPO at or before each token (column 0: the carried one)
                here = np.concatenate([tempo[:, None], t], axis=1)  # (B, 1 + T)
                last = np.maximum.accumulate(np.where(here >= 0, np.arange(T + 1), 0), axis=1)
                cur = np.take_along_axis(here, last, axis=1)[:, 1:]
            cum = ticks[:, None] + np.cumsum(self.ticks[cur + 1, self.shift[ids]], axis=1)
            r = self.ticks_per_beat
            out["phase"] = (cum % r) * PHASE_BINS // r
            out["beat"] = (cum % state.bar[:, None]) // r
            out["tempo"] = cur + 1
            if self.meter:  # the bar's length in whole beats (rounded up), as the model embeds it
                out["bar_beats"] = -(-state.bar // r)
            ticks, tempo = cum[:, -1], cur[:, -1]
        g, snd, onset = state.grammar, state.sounding, state.onset
        if self.grammar_features:
            g, now, time, family = self._scan(ids, g, snd)
            # onset: when each pitch last began to sound (kept where none began in ``ids``)
            began = now & ~np.concatenate([snd[:, None], now[:, :-1]], axis=1)  # (B, T, P)
            last = np.maximum.accumulate(np.where(began, np.arange(T)[:, None], -1), axis=1)
            at = np.take_along_axis(time, last.reshape(B, -1).clip(0), axis=1).reshape(last.shape)
            onsets = np.where(last >= 0, at, onset[:, None])  # (B, T, P)
            out["sounding"] = now.astype(np.float32)
            out["age"] = np.where(now, time[:, :, None] - onsets, 0).astype(np.float32)
            out["family"] = family
            snd, onset = now[:, -1], onsets[:, -1]
        return out, replace(state, ticks=ticks, tempo=tempo, grammar=g, sounding=snd, onset=onset)


def cache_capacity(capacity: int | None, context: int) -> int:
    """A numpy engine's KV cache length: ``capacity``, by default the model's ``context``
    (``max_seq_len``: where the rotary tables end), never more."""
    capacity = capacity or context
    if capacity > context:
        raise ValueError(f"capacity {capacity} exceeds the model's context ({context})")
    return capacity
