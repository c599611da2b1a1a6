"""Style transfer that keeps the source: constrained decoding under the target style.

A style VAE decodes the source's latent under the target style's vector, but a small model's
latent carries little of the source (BENCHMARKS.md, "Styles, second pass": rhythm and contour
similarity no better than a prior draw's). So what is to be kept is not left to the latent; it
is imposed on the decoding, and the model picks the rest (the pitches, the other voices, the
durations) under the target style:

- **rhythm** (``keep="rhythm"``): the output starts notes exactly when the source does. Time is
  the grammar's (steps since START, :attr:`aurl.data.grammar.GrammarState.time`), an opening
  rest included. At a source onset the row must play at least one NOTE_ON before its next
  TIME_SHIFT (or END); between onsets no note may start; a TIME_SHIFT may not jump over the next
  onset and lands either on it or, while notes sound (so that a NOTE_OFF can follow), on a time
  where the source has an event (the source's note ends: durations stay on its grid). END waits
  for the last onset. The source's opening tempo is kept (its TEMPO bin).
- **contour** (``keep="contour"``): the output's skyline (:func:`aurl.analysis.melody.skyline`,
  the highest new note of each onset unless a held higher note covers it) moves like the
  source's: the ``j``-th skyline note of the output goes up, down or repeats against the one
  before as the source's ``j``-th does (its Parsons code). NOTE_ONs come in ascending order
  within a step, so the last one is the step's top note: NOTE_ONs above the highest pitch that
  can still end the step well are removed, and the step may not end (TIME_SHIFT or END) until
  its top note does. END, which closes every sounding note, never follows a step whose top note
  a held note covers, and (without rhythm) waits until the output's skyline has as many notes
  as the source's. With rhythm kept too, each source onset's role is kept as well: where the
  source's next onset sounds under a held note, the output's highest note is held over it
  (no NOTE_OFF), and the new notes go under it.
- ``both``: rhythm and contour; ``none``: plain decoding (the free VAE transfer).

The constraints are hard, but never at the grammar's expense: where they would leave a row
nothing to play (e.g. the polyphony cap reached below the wanted pitch), the row takes what
the grammar and the ordinary constraints allow at that one step (the output stays valid and the
kept property lapses there; :attr:`TransferMasker.lapses` counts such row-steps, and the
benchmark reports them). Beyond the source's skyline, or where its step cannot be taken (up
from the highest pitch), the top note is free. One instrument family per row: the first the
model picks. :class:`TransferMasker` wraps the :class:`LogitMasker` that
:func:`aurl.generation.generate.generate` already takes, so sampling, the window and the style
vector are the loop's own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aurl.config import GenerationConfig
from aurl.data.vocab import END, Kind, Vocab
from aurl.errors import ConfigError, ConstraintError, MidiReadError
from aurl.generation.constraints import NEG_INF, LogitMasker, MaskState

KEEPS = ("rhythm", "contour", "both", "none")
DEFAULT_KEEP = "rhythm"  # measured: BENCHMARKS.md, "Style transfer by constrained decoding"


@dataclass(frozen=True)
class SourcePlan:
    """What the output keeps of one source piece (from :func:`source_plan`).

    Attributes:
        onsets: (K,) int64 grammar times (steps) at which the source starts notes.
        events: (end + 1,) bool: times at which the source has an event (a TIME_SHIFT may land).
        end: time of the source's last event.
        tempo_bin: the source's opening TEMPO bin (-1: none).
        sky: (K,) bool: the highest new note at onset ``k`` is a skyline note (not covered).
        directions: (S - 1,) int8: the skyline's steps, -1 down, 0 repeat, +1 up (Parsons).
    """

    onsets: np.ndarray
    events: np.ndarray
    end: int
    tempo_bin: int
    sky: np.ndarray
    directions: np.ndarray


@dataclass(frozen=True)
class SourcePiece:
    """The piece of ``aurl generate --variations FILE``, read once: its ids (for the VAE's
    latents and for :func:`source_plan`) and its meter (for a model that takes one)."""

    ids: np.ndarray
    meter: tuple[int, int]


def read_source(path: str | Path, tokenizer: Any) -> SourcePiece:
    """Read ``path`` once: the raw score (checked bytes, :func:`aurl.data.midi_io.read_score`)
    gives the meter (:func:`aurl.data.meter.score_meter`) and, repaired like a file, the ids
    (:meth:`Tokenizer.encode_score`, equal to ``encode_file``'s). A file symusic does not read
    as it is (SMPTE time, a damaged file the tolerant reader takes) goes through
    ``encode_file`` instead (a second read, of these files only), with the MIDI default meter,
    as :func:`aurl.data.meter.read_meter` gives it.

    Raises:
        MidiReadError: the file cannot be read.
    """
    from aurl.data.meter import DEFAULT_METER, score_meter
    from aurl.data.midi_io import RepairReport, read_score

    try:
        score = read_score(path, tokenizer.data_config)
    except MidiReadError:
        return SourcePiece(tokenizer.encode_file(path), DEFAULT_METER)
    report = RepairReport(path=str(path))
    return SourcePiece(tokenizer.encode_score(score, report), score_meter(score))


def source_plan(ids: np.ndarray, tokenizer: Any) -> SourcePlan:
    """The :class:`SourcePlan` of a source's ids (START ..., END optional).

    Raises:
        ConstraintError: the source has no notes.
    """
    from aurl.analysis.melody import skyline
    from aurl.data.notes import pitched

    vocab: Vocab = tokenizer.vocab
    ids = np.asarray(ids, dtype=np.int64)
    kind, value = vocab.kind[ids], vocab.value[ids]
    steps = np.where(kind == Kind.TIME_SHIFT, value, 0).astype(np.int64)
    time = np.cumsum(steps)  # (T,) the grammar's time after each token
    is_on = kind == Kind.NOTE_ON
    if not is_on.any():
        raise ConstraintError("the source has no notes: give a MIDI file with notes")
    onsets = np.unique(time[is_on])
    is_event = ~np.isin(kind, (Kind.TIME_SHIFT, Kind.START, Kind.END, Kind.PAD))
    event_times = np.unique(time[is_event])
    end = int(event_times[-1])
    events = np.zeros(end + 1, dtype=bool)
    events[event_times] = True
    tempos = value[kind == Kind.TEMPO]
    # the skyline of the decoded notes, mapped to the onsets by rank (both sorted by time)
    notes = pitched(tokenizer.decode_to_notes(ids))
    note_onsets = np.unique(notes["onset"])
    melody = skyline(notes)
    if len(note_onsets) == len(onsets):
        sky = np.isin(note_onsets, melody["onset"])
        directions = np.sign(np.diff(melody["pitch"].astype(np.int64))).astype(np.int8)
    else:  # decoded notes do not match the token onsets one to one (not seen): no contour
        sky, directions = np.ones(len(onsets), dtype=bool), np.zeros(0, dtype=np.int8)
    return SourcePlan(
        onsets=onsets.astype(np.int64), events=events, end=end,
        tempo_bin=int(tempos[0]) if len(tempos) else -1, sky=sky, directions=directions,
    )  # fmt: skip


@dataclass
class TransferState:
    """The base masker's state plus, per row, the step being played (numpy, on the host)."""

    base: MaskState
    played: np.ndarray  # (B,) bool: a NOTE_ON since the last TIME_SHIFT
    new: np.ndarray  # (B, P) bool: pitches started since the last TIME_SHIFT
    top: np.ndarray  # (B,) int: the highest of them (-1: none)
    sky_count: np.ndarray  # (B,) int: the output's skyline notes so far
    sky_pitch: np.ndarray  # (B,) int: the last of them (-1: none)


class TransferMasker:
    """A :class:`LogitMasker` plus each row's source (:class:`SourcePlan`): rhythm, contour or
    both kept as hard masks, the base masks winning where they would leave a row nothing.

    It has the calls :func:`aurl.generation.generate.generate` makes of a masker (pass it as
    ``masker``); its row state lives in numpy on the host, so it is not for beam search
    (refused by :func:`transfer_masker`) or a ``steer`` that reorders rows.
    """

    def __init__(self, base: LogitMasker, plans: Sequence[SourcePlan], keep: str) -> None:
        if keep not in KEEPS:
            raise ConfigError(f"--keep {keep!r}: give one of {', '.join(KEEPS)}")
        self.base, self.plans = base, list(plans)
        self.vocab, self.grammar = base.vocab, base.grammar
        self.rhythm = keep in ("rhythm", "both")
        self.contour = keep in ("contour", "both")
        v = self.vocab
        self.pitch_min = v.config.pitch_min
        self.n_pitches = v.n_pitches
        self.kind, self.value = v.kind.astype(np.int64), v.value.astype(np.int64)
        self.on = slice(v.note_on, v.note_on + v.n_pitches)
        self.vel = slice(v.velocity, v.velocity + v.config.velocity_bins)
        self.shift = slice(v.time_shift, v.time_shift + v.config.max_shift_steps)
        self.instrument = slice(v.instrument, v.size)
        self.pedal = slice(v.sustain_on, v.sustain_off + 1)
        self.off = slice(v.note_off, v.note_off + v.n_pitches)
        self.tempo = slice(v.tempo, v.tempo + v.config.tempo_bins)
        self.max_shift = v.config.max_shift_steps
        self.lapses = 0  # row-steps at which the kept masks gave way to the base ones

    # -- state ----------------------------------------------------------------------------

    def initial_state(self, batch: int) -> TransferState:
        if batch != len(self.plans):
            raise ConstraintError(f"{len(self.plans)} sources for {batch} rows: give one per row")
        return TransferState(
            base=self.base.initial_state(batch), played=np.zeros(batch, dtype=bool),
            new=np.zeros((batch, self.n_pitches), dtype=bool),
            top=np.full(batch, -1), sky_count=np.zeros(batch, dtype=np.int64),
            sky_pitch=np.full(batch, -1),
        )  # fmt: skip

    def prime(self, state: TransferState, ids: Any) -> TransferState:
        """The state after a (B, P) prefix (START, or a primer), token by token."""
        for col in range(ids.shape[1]):
            state = self.advance(state, ids[:, col])
        return state

    def advance(self, state: TransferState, ids: Any, grammar: Any = None) -> TransferState:
        """One token per row: the base state, then the step's notes and the skyline."""
        base = self.base.advance(state.base, ids, grammar)
        tok = _host(ids).astype(np.int64, copy=False)
        kind, pitch = self.kind[tok], self.value[tok] - self.pitch_min
        played, new, top = state.played.copy(), state.new.copy(), state.top.copy()
        sky_count, sky_pitch = state.sky_count.copy(), state.sky_pitch.copy()
        closes = (kind == Kind.TIME_SHIFT) | (kind == Kind.END)
        if closes.any():
            # the step's top note is a skyline note unless a held higher note covers it
            held = _held_max(self._sounding(state.base), state.new)
            sky = closes & played & (top > held)
            sky_count[sky] += 1
            sky_pitch[sky] = top[sky]
            played[closes], new[closes], top[closes] = False, False, -1
        ons = np.flatnonzero(kind == Kind.NOTE_ON)
        if len(ons):
            played[ons] = True
            new[ons, pitch[ons]] = True
            top[ons] = np.maximum(top[ons], pitch[ons])
        return TransferState(base, played, new, top, sky_count, sky_pitch)

    def finished(self, state: TransferState) -> Any:
        return self.base.finished(state.base)

    def all_finished(self, state: TransferState) -> bool:
        return self.base.all_finished(state.base)

    def _sounding(self, base: MaskState) -> np.ndarray:
        """(B, P) bool: pitches sounding in any family."""
        return _host(base.grammar.sounding).any(axis=1)

    # -- masking ----------------------------------------------------------------------------

    def apply(self, logits: Any, state: TransferState) -> Any:
        """The base masks, then the kept properties: (B, V) logits with -inf where removed."""
        import torch

        masked = self.base.apply(logits, self._base_state(state))
        out = self._restrict(masked.detach().cpu().numpy(), state)
        return torch.from_numpy(out).to(masked.device)

    def apply_numpy(self, logits: np.ndarray, state: TransferState) -> np.ndarray:
        return self._restrict(self.base.apply_numpy(logits, self._base_state(state)), state)

    def _base_state(self, state: TransferState) -> MaskState:
        """The base masker's state as its masks should see it: with rhythm kept, a source's
        opening rest is the output's too, so the base's rule against leading silence is off
        (the onsets rule makes the first note come at the source's first onset)."""
        if not self.rhythm or state.base.all_started:
            return state.base
        return dataclasses.replace(state.base, all_started=True)

    def _restrict(self, masked: np.ndarray, state: TransferState) -> np.ndarray:
        """``masked`` with the ids the sources rule out at -inf, except in rows where that
        would leave nothing (those keep ``masked``)."""
        ok = np.isfinite(masked)  # (B, V): what the grammar and the constraints allow
        keep = np.ones_like(ok)
        g = state.base.grammar
        time, count = _host(g.time).astype(np.int64, copy=False), _host(g.count)
        sounding = self._sounding(state.base)
        held = _held_max(sounding, state.new)
        family = _host(g.family)
        # one instrument family, the first the row picks: a change of family mid-step would
        # leave the notes of the one before unreleasable (families ascend within a step)
        keep[family < self.vocab.config.num_instruments, self.instrument] = False
        for row, plan in enumerate(self.plans):
            if ok[row, END] and ok[row].sum() == 1:
                continue  # the row must end: nothing to steer
            good, floor = self._good_tops(plan, state, row, held[row], int(time[row]))
            top_ok = good is None or not state.played[row] or bool(good[state.top[row]])
            if self.rhythm:
                self._rhythm_row(keep[row], plan, bool(state.played[row]), int(time[row]),
                                 int(count[row]), top_ok)  # fmt: skip
            elif not top_ok:  # the step's top note does not end it well yet
                keep[row, self.shift] = False
                keep[row, END] = False
            if self.rhythm and self.contour and not state.played[row]:
                k = int(np.searchsorted(plan.onsets, time[row], side="left"))
                if k < len(plan.onsets) and not plan.sky[k] and held[row] >= 0:
                    # the source's next onset sounds under a held note: keep ours held too
                    keep[row, self.off.start + held[row]] = False
            if good is not None:
                self._contour_row(keep[row], good, floor, sounding[row] & ~state.new[row],
                                  int(count[row]))  # fmt: skip
                self._contour_end(keep[row], plan, state, row, int(held[row]))
            notes_left = (ok[row, self.on] & keep[row, self.on]).any()
            if ok[row, self.on].any() and not notes_left:
                keep[row, self.vel] = False  # a VELOCITY must lead to a NOTE_ON
        kept = ok & keep
        empty = ~kept.any(axis=1)
        kept[empty] = ok[empty]  # nothing left: the base masks alone at this step
        self.lapses += int(empty.sum())
        return np.where(kept, masked, NEG_INF).astype(masked.dtype, copy=False)

    def _rhythm_row(
        self, keep: np.ndarray, plan: SourcePlan, played: bool, t: int, count: int, top_ok: bool
    ) -> None:
        """Mask one row (``keep``, in place) so that its onsets follow ``plan``'s."""
        onsets = plan.onsets
        ahead = int(np.searchsorted(onsets, t, side="right" if played else "left"))
        at_onset = not played and ahead < len(onsets) and onsets[ahead] == t
        if not (played or at_onset):
            keep[self.on] = False
            keep[self.vel] = False
        if plan.tempo_bin >= 0:
            keep[self.tempo] = False
            keep[self.tempo.start + plan.tempo_bin] = True
        if at_onset or not top_ok:  # play first (and, with contour, the right top note)
            keep[self.shift] = False
            keep[END] = False
            return
        last = ahead >= len(onsets)
        if not last:
            keep[END] = False  # onsets still to play
        nxt = plan.end if last else int(onsets[ahead])
        s = np.arange(1, self.max_shift + 1)
        land = t + s
        event = np.zeros(len(s), dtype=bool)
        inside = land <= plan.end
        event[inside] = plan.events[land[inside]]
        # land on the next onset, or where the source has an event while a note can end there
        onward = (land == nxt) | (s == self.max_shift) if not last else np.zeros_like(event)
        allowed = (land <= nxt) & (onward | (event & (count > 0)))
        keep[self.shift] &= allowed

    def _contour_row(
        self, keep: np.ndarray, good: np.ndarray, floor: int, held: np.ndarray, count: int
    ) -> None:
        """Mask one row's notes (``keep``, in place) so that its step can end on a ``good``
        top note: NOTE_ONs ascend, so none above the highest good pitch, and only good ones
        where one more note reaches the polyphony cap. Where no pitch is good because held
        notes at or above ``floor`` stand in the way (a repeat of a held pitch, a step down
        under a held note), no note starts and NOTE_OFFs go lowest blocker first (they too
        ascend), so every blocker can go."""
        on = keep[self.on]  # views: writing them writes ``keep``
        if good.any():
            on[int(np.flatnonzero(good)[-1]) + 1 :] = False
            if count >= self.grammar.polyphony_cap - 1:
                on &= good
            return
        on[:] = False
        keep[self.pedal] = False  # a pedal or instrument change here ends the NOTE_OFFs
        keep[self.instrument] = False
        blockers = np.flatnonzero(held[floor:]) + floor
        if len(blockers):
            keep[self.off][blockers[0] + 1 :] = False

    def _contour_end(
        self, keep: np.ndarray, plan: SourcePlan, state: TransferState, row: int, held: int
    ) -> None:
        """No END (in ``keep``, in place) where it would break the contour: END closes every
        sounding note, so a step's top note covered by a held note would join the skyline
        unchecked; and, without the rhythm's last onset to wait for, not before the output's
        skyline has as many notes as the source's."""
        played, top = bool(state.played[row]), int(state.top[row])
        covered = played and held > top
        short = int(state.sky_count[row]) + played < len(plan.directions) + 1
        if covered or (short and not self.rhythm):
            keep[END] = False

    def _good_tops(
        self, plan: SourcePlan, state: TransferState, row: int, held: int, t: int
    ) -> tuple[np.ndarray | None, int]:
        """(P,) bool: the pitch indices that end the row's step well as its top note, for
        the contour (None: no contour kept); and the lowest held pitch index in the way of
        a skyline note that moves as the source's does."""
        if not self.contour:
            return None, 0
        j, q = int(state.sky_count[row]), int(state.sky_pitch[row])
        want_sky: bool | None = None  # the source's note here: on the skyline, covered, either
        if self.rhythm:
            k = int(np.searchsorted(plan.onsets, t, side="left"))
            if k < len(plan.onsets) and plan.onsets[k] == t:
                want_sky = bool(plan.sky[k])
        p = np.arange(self.n_pitches)
        moves = np.ones(self.n_pitches, dtype=bool)  # the first note, or beyond the source
        if j >= 1 and j - 1 < len(plan.directions) and q >= 0:
            d = int(plan.directions[j - 1])
            step = (p > q) if d > 0 else (p < q) if d < 0 else (p == q)
            if step.any():  # (none above the highest pitch: free)
                moves = step
        on_skyline = moves & (p > held)
        covered = p < held
        floor = int(np.flatnonzero(moves)[-1]) if moves.any() else 0
        if want_sky is None:
            return on_skyline | covered, floor
        if want_sky or held < 0:
            return on_skyline, floor
        return covered, floor


def _host(x: Any) -> np.ndarray:
    """A torch tensor (any device) or an array as a numpy array on the host."""
    return x.cpu().numpy() if hasattr(x, "cpu") else np.asarray(x)


def _held_max(sounding: np.ndarray, new: np.ndarray) -> np.ndarray:
    """(B,) the highest pitch index sounding but not started at this step (-1: none)."""
    held = sounding & ~new
    highest = held.shape[1] - 1 - np.argmax(held[:, ::-1], axis=1)
    return np.where(held.any(axis=1), highest, -1)


def transfer_masker(
    model: Any, config: GenerationConfig, sources: Sequence[np.ndarray], tokenizer: Any,
    keep: str = DEFAULT_KEEP,
) -> LogitMasker | TransferMasker:  # fmt: skip
    """The masker that keeps ``keep`` of each source (one row per source): the ordinary
    :func:`aurl.generation.generate.make_masker` for ``none``, else a :class:`TransferMasker`
    over it (``model``: an engine or a model, as :func:`generate` takes).

    Raises:
        ConfigError: an unknown ``keep``, or beam search with a kept property.
        ConstraintError: a source without notes, or bad constraints.
    """
    from aurl.engines import as_engine
    from aurl.generation.generate import make_masker

    engine = as_engine(model)
    if keep not in KEEPS:
        raise ConfigError(f"--keep {keep!r}: give one of {', '.join(KEEPS)}")
    base = make_masker(engine.vocab, config, None if engine.numpy else engine.device)
    if keep == "none":
        return base
    if config.beam > 1:
        raise ConfigError(f"--keep {keep} samples token by token: drop --beam (or --keep none)")
    return TransferMasker(base, [source_plan(ids, tokenizer) for ids in sources], keep)


def transfer_config(config: GenerationConfig, sources: Sequence[np.ndarray]) -> GenerationConfig:
    """``config`` with room for the longest source twice over when it asks fewer tokens (the
    output keeps the source's time, and may play more notes per onset)."""
    longest = max(len(ids) for ids in sources)
    return dataclasses.replace(config, max_tokens=max(config.max_tokens, 2 * longest))
