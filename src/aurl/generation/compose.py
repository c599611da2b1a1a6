"""Composing around given notes: harmonize a melody, infill a span, accompany a part.

The method is constrained decoding with the shipped left-to-right model (no retraining): the
decode loop walks musical time, and at each time step the given notes' NOTE_OFFs and NOTE_ONs
are forced in the canonical order (docs/design.md, "Canonical event order": offs by ascending
pitch, then ons by ascending pitch), while the model fills in the other notes between them.
A :class:`Plan` holds the given events by step and where the model may add notes; one mask per
row and token (:meth:`_Row.allowed`) keeps, of what the grammar allows:

- the next forced event, and the model's own NOTE_OFFs / NOTE_ONs whose pitches fit below it in
  the ascending order (NOTE_ONs only inside the free span, below the melody when ``ceiling`` is
  set, never on a pitch the given part holds, while fewer than ``max_free`` of them sound);
- a TIME_SHIFT only once every event of the step is out, and never past the next given event,
  the edges of the free span or the end (outside the free span: exactly the gap);
- END only at the end of the plan, after its last events.

Plain forcing cannot see the next melody note coming. The cheap remedy is sequential Monte Carlo
(``particles > 1``): rows sample from the constrained distribution ``q`` and carry the
importance weight ``log p(token) - log q(token)``, where ``p`` is the model under the grammar
alone; a forced token therefore weighs in with its model probability (how well the row's
harmony prepared the given note). Every ``resample_every`` tokens, when the effective sample
size falls under half the rows, the rows are resampled by weight (systematic resampling) and
the model state is reordered with them; at the end the heaviest row of each sample is kept. The
weights make the kept row a draw from the model's own joint distribution restricted to
continuations that contain the given notes, which forcing alone does not approximate
(docs/design.md, "Composing around given notes").

The loop talks to the model only through an engine: ``init_state(batch)`` and
``step(ids, state) -> logits`` on numpy arrays, plus ``reorder(state, rows)`` for resampling
(:class:`TorchEngine` adapts a torch model; torch is imported only there; :class:`NumpyEngine`
adapts an :mod:`aurl.engines` numpy engine such as the onnx one), and the grammar state is kept
in numpy, so the loop runs without torch on the onnx engine.

Harmonizing shapes the proposal three more ways (:class:`ComposeOptions`): NOTE_ONs that would
move in parallel fifths or octaves are masked (:meth:`_Masks.parallel_free`), the model's notes
lean towards the melody's key (:func:`melody_key`, :func:`scale_bias`) and away from
dissonances under the melody note of their step (:func:`dissonance_bias`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from aurl.data.notes import DRUM_PROGRAM, NOTE_DTYPE, pitched
from aurl.data.vocab import END, PAD, START, Kind, Vocab
from aurl.errors import ConstraintError
from aurl.generation.voice_leading import ABOVE, EITHER, refused
from aurl.progress import Progress, silent

CHORALE_FAMILY = 0  # the family the shipped model's chorales are written in (piano, program 0)
DEFAULT_VELOCITY = 90  # the chorales' velocity
NO_CEILING = 128
MIN_MELODY_PITCH = 52  # E3: lower, three voices cannot go under the melody
MAX_MELODY_PITCH = 96
MIN_FREE_PITCH, MAX_FREE_PITCH = 33, 84  # where the model's own notes may go (A1..C6)
CADENCE_STRICTNESS = 0.995  # the lean of the model's notes towards a cadence at phrase ends (BENCHMARKS.md)
JUDGED_BEATS = 8  # beats before a phrase end that the judge of its cadence reads


# --------------------------------------------------------------------------------------------
# Options, results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ComposeOptions:
    """How to sample.

    Attributes:
        num_samples: Compositions to return.
        particles: Rows per sample for sequential Monte Carlo (1: forcing alone).
        temperature: Sampling temperature of the proposal (1: the model's own distribution).
        seed: Random seed (same seed and options, same notes).
        resample_every: Tokens between resampling checks.
        key: Optional key name; the model's own notes outside its scale are down-weighted by
            ``log(1 - key_strictness)`` (the weights correct for it).
        key_strictness: See ``key``.
        melody_key: With ``key`` empty, :func:`harmonize` takes the key the melody is in
            (:func:`aurl.analysis.keys.estimate_key` on the melody): forcing cannot see the
            melody ahead, and without a key its first chords are often in another one.
        voice_leading: In :func:`harmonize`, never propose a NOTE_ON that would move in
            parallel fifths or octaves with the melody or a lower voice (voices read bottom-up
            in pitch order, see :meth:`_Masks.parallel_free`).
        consonance: In :func:`harmonize`, the model's NOTE_ONs that make a dissonance (a
            second, tritone or seventh: 1, 2, 6, 10, 11 semitones mod 12) with the melody pitch
            of their step get ``log(1 - consonance)`` (0: none). In the canonical order the notes
            below the melody come before its NOTE_ON at each step, so without it the model
            chooses each chord before it sees the melody note the chord sounds under.
        cadences: In :func:`harmonize` (with a key: ``key`` or ``melody_key``), lean towards
            a cadence at each of the melody's phrase ends
            (:func:`aurl.analysis.structure.phrase_boundaries`): the model's notes there lean to
            the chord the melody note calls for (:meth:`Arrivals.of_melody`), and with
            ``particles > 1`` the rows that arrive on a cadence in the key
            (:func:`aurl.analysis.chords.detect_cadences`) replace those that do not, where
            some do (:class:`Arrivals`).
        cadence_strictness: How hard ``cadences`` leans: the model's notes outside the chord
            there get ``log(1 - cadence_strictness)`` (in ``[0, 1)``).
        spacing: In :func:`harmonize` (and :func:`accompany`, :func:`_around_wide`), a
            NOTE_ON of the model that completes the chord (the
            last of ``voices - 1`` notes, with none of the model's notes above it) more than an
            octave under the melody note, or more than an octave over the next note down when
            two are below it, gets ``log(1 - spacing)`` (0: none): the textbook spacing of the
            upper voices, which :func:`aurl.evaluation.tasks.voice_rules` counts.
        ranges: In :func:`harmonize` with SATB voices, a NOTE_ON of the model outside the
            textbook range (:data:`aurl.generation.voices.SATB_RANGES`) of the voice it would
            sound as (its rank among the model's notes sounding below it: bass, tenor, alto)
            gets ``log(1 - ranges)`` (0: none); in :func:`accompany`, the ranges of the voices
            around the part.
        around: In :func:`accompany`, how hard the model's voices keep their places around
            the given part (as many above it as the part's voice has above it in SATB, the
            rest below): a NOTE_ON on a side that has its voices already, and moving on with a
            voice above missing, get ``log(1 - around)`` (0: none). In :func:`infill` of one
            voice, how hard it keeps its place among the given voices and out of parallels
            with them.
    """

    num_samples: int = 1
    particles: int = 8
    temperature: float = 1.0
    seed: int = 0
    resample_every: int = 8
    key: str = ""
    key_strictness: float = 0.9
    melody_key: bool = True
    voice_leading: bool = True
    consonance: float = 0.7
    cadences: bool = True
    cadence_strictness: float = CADENCE_STRICTNESS
    spacing: float = 0.9
    ranges: float = 0.9
    around: float = 0.9999


@dataclass
class Composition:
    """One result: the model's new notes, the whole score and statistics.

    Attributes:
        notes: The generated notes only (note array, beats; seconds at the plan's tempo).
        score: A ``symusic.Score`` (tick) with the given and the new notes on named tracks, or
            None where the caller builds it.
        stats: ``log_weight`` (nats, the row's importance weight), ``given_bits`` (bits the model
            spent on the forced tokens: how unexpected the given notes were), ``tokens``,
            ``seconds`` (wall), ``resamples``, ``particles``, ``fallbacks``.
    """

    notes: np.ndarray
    score: Any = None
    stats: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# The plan: given events by step
# --------------------------------------------------------------------------------------------


class VoiceAfter(NamedTuple):
    """:func:`infill` of one voice: its kept note after the span, which the last new note
    moves to."""

    pitch: int
    step: int  # where it starts
    since: int  # the last given onset before it: a new note from here on sounds up to it
    others: tuple[int, ...]  # the other given pitches sounding as it starts, ascending


@dataclass(frozen=True)
class Plan:
    """What is forced and where the model may write, in steps (1/32 beat in beat mode).

    Attributes:
        offs: step -> ascending pitches of given NOTE_OFFs at that step.
        ons: step -> ascending pitches of given NOTE_ONs at that step.
        free_start, free_end: the model's notes may start in [free_start, free_end) and are
            closed at free_end at the latest.
        end: the last step (END comes here).
        ceiling_steps, ceiling: the model's NOTE_ONs stay below ``ceiling[i]`` from step
            ``ceiling_steps[i]`` on (NO_CEILING: no limit).
        max_free: most of the model's notes sounding at once.
        tempo_bin: the TEMPO token's bin.
        above: :func:`accompany`: the model's voices to keep above the given part.
        rank, voice_before: :func:`infill` of one voice: the given voices to keep above it,
            and the pitch of its own kept note sounding into the span.
        after: :func:`infill` of one voice: its own kept note after the span (None: none).
    """

    offs: dict[int, list[int]]
    ons: dict[int, list[int]]
    free_start: int
    free_end: int
    end: int
    ceiling_steps: np.ndarray
    ceiling: np.ndarray
    max_free: int
    tempo_bin: int
    event_steps: np.ndarray  # sorted steps with given events, edges and the end
    voice_leading: bool = False  # mask NOTE_ONs that form parallel 5ths/8ves (see _Masks)
    melody_top: bool = False  # the given notes are a melody above everything (harmonize)
    # accompany: the model's voices to keep above the given part (the rest below it); -1: none
    above: int = -1
    # infill of one voice: the given voices to keep above the model's notes; -1: none
    rank: int = -1
    voice_before: int = -1  # infill of one voice: its kept note sounding into the span, -1: none
    given_most: int = 0  # most given notes sounding at once
    after: VoiceAfter | None = None  # infill of one voice: its kept note after the span

    def ceiling_at(self, t: int) -> int:
        i = int(np.searchsorted(self.ceiling_steps, t, side="right")) - 1
        return int(self.ceiling[i]) if i >= 0 else NO_CEILING

    @property
    def polyphony_cap(self) -> int:
        """The grammar's cap on notes sounding at once: room for every given note and the
        model's own (16 and ``max_free + 8`` at least, as the training data's cap)."""
        return max(16, self.max_free + 8, self.given_most + self.max_free)

    def next_event(self, t: int) -> int:
        i = int(np.searchsorted(self.event_steps, t, side="right"))
        return int(self.event_steps[i]) if i < len(self.event_steps) else self.end


def note_steps(notes: np.ndarray, steps_per_beat: int) -> tuple[np.ndarray, np.ndarray]:
    """(onset, end) steps of each note, end > onset, a re-struck pitch cut where it restarts."""
    on = np.round(notes["onset"] * steps_per_beat).astype(np.int64)
    off = np.round((notes["onset"] + notes["duration"]) * steps_per_beat).astype(np.int64)
    off = np.maximum(off, on + 1)
    pitch = notes["pitch"].astype(np.int64)
    order = np.lexsort((on, pitch))
    for a, b in zip(order[:-1], order[1:]):  # same pitch, next onset: cut the earlier note
        if pitch[a] == pitch[b] and off[a] > on[b]:
            off[a] = max(on[b], on[a] + 1) if on[b] > on[a] else off[a]
    return on, off


def in_vocabulary(notes: np.ndarray, vc: Any, name: str | Path) -> None:
    """Raise :class:`ConstraintError` where pitched ``notes`` (of ``name``: a file, "the given
    notes") sound a pitch the vocabulary ``vc`` (its config) lacks: a given note the model
    cannot write ran composing to "did not end within N tokens"."""
    notes = pitched(notes)
    if not len(notes):
        return
    lo, hi = int(notes["pitch"].min()), int(notes["pitch"].max())
    if lo < vc.pitch_min or hi > vc.pitch_max:
        raise ConstraintError(
            f"{name} spans MIDI pitches {lo}..{hi}, the model's are {vc.pitch_min}.."
            f"{vc.pitch_max}: transpose it by octaves into that range"
        )


def make_plan(
    given: np.ndarray,
    vocab: Vocab,
    *,
    free_span: tuple[float, float] | None = None,
    ceiling: bool = False,
    max_free: int = 3,
    qpm: float = 120.0,
    voice_leading: bool = False,
    above: int = -1,
    rank: int = -1,
    voice_before: int = -1,
    voice_after: tuple[int, float] | None = None,
) -> Plan:
    """The :class:`Plan` for given notes (beats) and a free span in beats (default: from the
    first given onset to the last given end); ``above``, ``rank``, ``voice_before``: see
    :class:`Plan`; ``voice_after``: (pitch, onset in beats) of the voice's kept note after the
    span (None: none).

    Raises:
        ConstraintError: the vocabulary counts time in seconds (the plan needs beats), or a
            given note's pitch is not one of the vocabulary's (the model could not write it).
    """
    vc = vocab.config
    if vc.time_unit != "beat":
        raise ConstraintError(
            "this checkpoint counts time in seconds (vocab.time_unit=seconds): composing around "
            "given notes needs a beat-time model such as the shipped one"
        )
    in_vocabulary(given, vc, "the given part")
    spb = vocab.config.steps_per_beat
    on, off = note_steps(given, spb) if len(given) else (np.zeros(0, int), np.zeros(0, int))
    pitch = given["pitch"].astype(np.int64)
    ons: dict[int, list[int]] = {}
    offs: dict[int, list[int]] = {}
    for t, p in zip(on.tolist(), pitch.tolist()):
        ons.setdefault(t, []).append(p)
    for t, p in zip(off.tolist(), pitch.tolist()):
        offs.setdefault(t, []).append(p)
    ons = {t: sorted(set(v)) for t, v in ons.items()}
    offs = {t: sorted(set(v)) for t, v in offs.items()}
    if free_span is None:
        a, b = int(on.min()), int(off.max())
    else:
        a, b = (int(round(x * spb)) for x in free_span)
    end = max(int(off.max()) if len(off) else 0, b)
    steps = np.unique(np.concatenate([on, off, [a, b, end]]))
    # the ceiling: the highest given pitch sounding after each event step; in a rest, the next
    # given note's pitch
    if ceiling and len(given):
        top = np.full(len(steps), -1, dtype=np.int64)
        for s_on, s_off, p in zip(on, off, pitch):
            inside = (steps >= s_on) & (steps < s_off)
            top[inside] = np.maximum(top[inside], p)
        for i in range(len(top) - 2, -1, -1):
            if top[i] < 0:
                top[i] = top[i + 1]
        top[top < 0] = NO_CEILING
    else:
        top = np.full(len(steps), NO_CEILING, dtype=np.int64)
    return Plan(
        offs=offs, ons=ons, free_start=a, free_end=b, end=end, ceiling_steps=steps, ceiling=top,
        max_free=max_free, tempo_bin=int(vocab.tempo_bin(qpm)), event_steps=steps,
        voice_leading=voice_leading, melody_top=ceiling, above=above, rank=rank,
        voice_before=voice_before, after=_voice_after(voice_after, on, off, pitch, ons, spb, a),
        given_most=max_polyphony(given),
    )  # fmt: skip


def _voice_after(
    after: tuple[int, float] | None,
    on: np.ndarray,
    off: np.ndarray,
    pitch: np.ndarray,
    ons: dict[int, list[int]],
    spb: int,
    free_start: int,
) -> VoiceAfter | None:
    """The :class:`VoiceAfter` of a voice's kept note ``after`` (pitch, onset in beats), read
    against the given notes' steps (None: no such note)."""
    if after is None:
        return None
    p, step = int(after[0]), int(round(after[1] * spb))
    since = max((s for s in ons if s < step), default=free_start)
    sounding = sorted(pitch[(on <= step) & (off > step)].tolist())
    if p not in sounding:
        return None
    sounding.remove(p)
    return VoiceAfter(pitch=p, step=step, since=since, others=tuple(sounding))


# --------------------------------------------------------------------------------------------
# One row of the decode: where it stands in the plan
# --------------------------------------------------------------------------------------------


class _Row:
    """The plan-side state of one row (copied when resampling)."""

    def __init__(self, plan: Plan) -> None:
        self.t = 0
        self.given: set[int] = set()
        self.free: dict[int, int] = {}  # sounding pitch -> onset step
        self.made: list[tuple[int, int, int, int]] = []  # (onset, end, pitch, velocity bin)
        self.velocity: int | None = None
        self.after_velocity = False
        self.short_shift = False
        self.ended = False
        self.given_nll = 0.0
        self.onset_here = True
        self.prev_free: list[int] = []  # free pitches of the last slice, ascending
        self.prev_given: list[int] = []  # the given pitches of the last slice, ascending
        self.enter(plan, 0)

    def copy(self) -> _Row:
        new = object.__new__(_Row)
        new.__dict__.update(self.__dict__)
        new.given, new.free, new.made = set(self.given), dict(self.free), list(self.made)
        new.offs, new.ons = list(self.offs), list(self.ons)
        return new

    def enter(self, plan: Plan, t: int) -> None:
        """Arrive at step ``t``: the offs and ons forced here (free notes on a pitch a given note
        takes, and every free note at the end of the free span, are closed here)."""
        if self.onset_here:  # leaving a slice (a step where notes started): remember it
            self.prev_free = sorted(self.free)
            self.prev_given = sorted(self.given)
            self.onset_here = False
        self.t = t
        ons = plan.ons.get(t, [])
        close = {p for p in self.free if p in ons or t >= plan.free_end}
        self.offs = sorted(set(plan.offs.get(t, [])) | close)
        self.ons = list(ons)
        held = self.given - set(self.offs)
        self.top = max(ons) if ons else max(held, default=-1)  # the given pitch after t
        self.k_off = self.k_on = 0
        self.phase, self.lo = 0, -1

    @property
    def prev_top(self) -> int:
        """The given (melody) pitch of the last slice, -1: none."""
        return self.prev_given[-1] if self.prev_given else -1

    def done_here(self) -> bool:
        return self.k_off == len(self.offs) and self.k_on == len(self.ons)


class _Masks:
    """Id blocks of the vocabulary and the mask builder of one plan."""

    def __init__(self, vocab: Vocab, plan: Plan) -> None:
        self.vocab, self.plan = vocab, plan
        self.V = vocab.size
        self.on0, self.off0 = vocab.note_on, vocab.note_off
        self.pmin = vocab.config.pitch_min
        self.vel = slice(vocab.velocity, vocab.sustain_on)
        self.max_shift = vocab.config.max_shift_steps

    def _ons(self, m: np.ndarray, row: _Row, lo: int) -> None:
        """NOTE_ONs (or the VELOCITY before them) that may come after pitch ``lo``."""
        plan = self.plan
        f = row.ons[row.k_on] if row.k_on < len(row.ons) else NO_CEILING
        if row.k_on < len(row.ons):
            if row.velocity is None:
                m[self.vel] = True
            else:
                m[self.on0 + f - self.pmin] = True
        if plan.free_start <= row.t < plan.free_end and len(row.free) < plan.max_free:
            hi = min(f, plan.ceiling_at(row.t), MAX_FREE_PITCH + 1)
            taken = row.given | set(row.free) | set(row.ons)
            cand = [p for p in range(max(lo + 1, MIN_FREE_PITCH), hi) if p not in taken]
            if cand and plan.voice_leading:
                cand = self.parallel_free(row, cand, around=not plan.melody_top)
            if cand:
                if row.velocity is not None:
                    m[[self.on0 + p - self.pmin for p in cand]] = True
                if not row.after_velocity:
                    m[self.vel] = True

    @staticmethod
    def parallel_free(row: _Row, cand: list[int], around: bool = False) -> list[int]:
        """The candidate pitches of a new free note that move in no parallel fifth or octave
        (:mod:`aurl.generation.voice_leading`) with a free note below it or with the melody
        (the highest given pitch: the top voice). ``around`` (accompany): the given pitch is a
        voice with the model's above it too, and candidates above it are checked against it
        as well."""
        if not row.prev_free:
            return cand
        extra = ()
        if row.top >= 0 and row.prev_top >= 0:
            extra = ((row.top, row.prev_top, EITHER if around else ABOVE),)
        bad = refused(row.prev_free, sorted(row.free), min(cand), max(cand) + 1, extra)
        return [c for c in cand if c not in bad]

    def allowed(self, row: _Row) -> np.ndarray:
        """(V,) bool: what the plan allows next in ``row``."""
        m = np.zeros(self.V, dtype=bool)
        if row.ended:
            m[PAD] = True
            return m
        if row.after_velocity:
            self._ons(m, row, row.lo)
            m[self.vel] = False
            return m
        if row.t >= self.plan.end:  # END closes every note: the last offs may come or not
            m[END] = True
        if row.phase == 0:
            f = row.offs[row.k_off] if row.k_off < len(row.offs) else NO_CEILING
            free_offs = [p for p in row.free if row.lo < p < f and p not in row.offs]
            if free_offs:
                m[[self.off0 + p - self.pmin for p in free_offs]] = True
            if row.k_off < len(row.offs):
                m[self.off0 + f - self.pmin] = True
                return m
        self._ons(m, row, row.lo if row.phase == 1 else -1)
        if row.done_here():
            plan = self.plan
            if row.t >= plan.end:
                m[END] = True
            elif not row.short_shift:
                gap = min(plan.next_event(row.t) - row.t, self.max_shift)
                reach = gap  # where the shift to the next event goes
                if gap < self.max_shift and self.idle(row, row.t + gap):
                    reach = min(plan.next_event(row.t + gap) - row.t, self.max_shift)
                if plan.free_start <= row.t < plan.free_end:  # or any shorter one, in the span
                    m[self.vocab.time_shift : self.vocab.time_shift + gap - 1] = True
                m[self.vocab.shift_id(reach)] = True
        return m

    def idle(self, row: _Row, t: int) -> bool:
        """Nothing could follow a short shift to step ``t`` but another shift, which the
        grammar forbids: an edge of the free span with no given event there and no free note
        to close (say the span is an empty bar, or its bar line falls between the notes of a
        piece in 7/8). A shift skips such a step instead of landing on it."""
        plan = self.plan
        live = (
            t >= plan.end or bool(plan.ons.get(t)) or bool(plan.offs.get(t))
            or plan.free_start <= t < plan.free_end or (t >= plan.free_end and bool(row.free))
        )  # fmt: skip
        return not live

    def advance(self, row: _Row, tok: int) -> bool:
        """Step ``row`` past ``tok``; True when ``tok`` was a given note's event."""
        kind, value = int(self.vocab.kind[tok]), int(self.vocab.value[tok])
        given = (kind == Kind.NOTE_OFF and value in row.given) or (
            kind == Kind.NOTE_ON and row.k_on < len(row.ons) and value == row.ons[row.k_on]
        )
        if kind == Kind.NOTE_OFF:
            if row.k_off < len(row.offs) and value == row.offs[row.k_off]:
                row.k_off += 1
            if value in row.free:
                row.made.append((row.free.pop(value), row.t, value, row.velocity or 0))
            else:
                row.given.discard(value)
            row.lo = value
        elif kind == Kind.NOTE_ON:
            row.onset_here = True
            if row.phase == 0:
                row.phase, row.lo = 1, -1
            if row.k_on < len(row.ons) and value == row.ons[row.k_on]:
                row.k_on += 1
                row.given.add(value)
            else:
                row.free[value] = row.t
            row.lo = value
            row.after_velocity = False
        elif kind == Kind.VELOCITY:
            if row.phase == 0:
                row.phase, row.lo = 1, -1
            row.velocity, row.after_velocity = value, True
        elif kind == Kind.TIME_SHIFT:
            row.short_shift = value < self.max_shift
            row.enter(self.plan, row.t + value)
            return False
        elif kind == Kind.END:
            for p, start in row.free.items():
                row.made.append((start, row.t, p, row.velocity or 0))
            row.free.clear()
            row.ended = True
        row.short_shift = False
        return given


# --------------------------------------------------------------------------------------------
# Phrase ends: rows that arrive on a cadence
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arrivals:
    """Where a melody's phrases arrive, the key their cadences are read in and the
    proposal's lean towards them: what :func:`decode` steers to.

    The lean (``spans``, :meth:`of_melody`) shapes every row's proposal near an arrival. With
    particles, once every row of a sample is ``lookahead`` steps past an arrival (so the chord
    struck there is complete), each row's notes from :data:`JUDGED_BEATS` before the arrival to
    that step (the given ones, ``given``, and its own, cut there) are read as
    :func:`aurl.evaluation.tasks.cadence_rate` reads a finished harmonization: chords per beat, and a cadence (authentic, plagal, half or deceptive) when
    the chord sounding at the arrival and the one before it make one in ``key``. Where some rows
    of a sample arrive on a cadence and some do not, the sample's rows are resampled by weight
    from those that do (a potential of zero on the others: sequential Monte Carlo steered by the
    analysis, as :func:`aurl.generation.cadence.generate_phrased` steers generated pieces).

    Attributes:
        steps: Arrival steps, ascending.
        key: The :class:`aurl.analysis.keys.Key` the cadences are read in.
        given: The given notes (beats).
        lookahead: Steps past an arrival before its rows are judged.
        spans: ``(start, end, bias)``: from step ``start`` to ``end`` the model's NOTE_ONs and
            NOTE_OFFs get the (V,) ``bias`` (:meth:`bias`).
    """

    steps: tuple[int, ...]
    key: Any
    given: np.ndarray
    lookahead: int
    spans: tuple[tuple[int, int, np.ndarray], ...] = ()

    def __post_init__(self) -> None:
        # the span of each step (the first that holds it), and the given notes' ends in beats
        last = max((end for _, end, _ in self.spans), default=0)
        table = np.full(last, -1, dtype=np.int64)
        for i in range(len(self.spans) - 1, -1, -1):
            start, end, _ = self.spans[i]
            table[max(start, 0) : end] = i
        object.__setattr__(self, "_span_at", table)
        object.__setattr__(self, "given_ends", self.given["onset"] + self.given["duration"])

    @classmethod
    def of_melody(
        cls, line: np.ndarray, key_name: str, vocab: Vocab, strictness: float = CADENCE_STRICTNESS
    ) -> Arrivals | None:
        """The arrivals of a melody's phrases (None without a key or a phrase), with the
        proposal's lean towards a cadence: where the melody arrives on a note of the tonic
        triad, the model's NOTE_ONs of the beat before lean to the dominant seventh chord's
        pitch classes and those of the arrival's beat to the tonic triad's; where it arrives on a
        note of the dominant triad (a half cadence), the arrival's to that triad's. Other
        pitch classes get ``log(1 - strictness)`` there (the importance weights correct for it).
        The fifth of the key (in both triads) takes the half cadence, as most of Bach's phrase
        ends on it do (the training chorales, chords read as the judge reads them: V under 94
        of 160, I under 41; on the tonic, I under 414 of 499)."""
        from aurl.analysis.keys import parse_key
        from aurl.analysis.structure import phrase_boundaries

        phrases = phrase_boundaries(line)
        if not key_name or not phrases:
            return None
        key = parse_key(key_name)
        spb = vocab.config.steps_per_beat
        steps = tuple(sorted({int(round(p.arrival * spb)) for p in phrases}))
        tonic = (0, 4, 7) if key.mode == "major" else (0, 3, 7)
        dominant, dominant7 = (7, 11, 2), (7, 11, 2, 5)
        spans = []
        onsets = np.round(line["onset"] * spb).astype(np.int64)
        for t in steps:
            at = np.flatnonzero(onsets == t)
            if not len(at):
                continue
            m = (int(line["pitch"][at[-1]]) - key.tonic) % 12
            if m in tonic and m not in dominant:
                spans.append((t - spb, t, _pc_bias(vocab, key.tonic, dominant7, strictness)))
                spans.append((t, t + spb, _pc_bias(vocab, key.tonic, tonic, strictness)))
            elif m in dominant:
                spans.append((t, t + spb, _pc_bias(vocab, key.tonic, dominant, strictness)))
        return cls(steps=steps, key=key, given=line, lookahead=spb, spans=tuple(spans))

    def bias(self, t: int) -> np.ndarray | None:
        """The (V,) lean of the model's NOTE_ONs and NOTE_OFFs at step ``t`` (None: none
        there)."""
        i = int(self._span_at[t]) if 0 <= t < len(self._span_at) else -1
        return self.spans[i][2] if i >= 0 else None

    def cadence_at(self, row: _Row, arrival: int, cut: int, spb: int) -> bool:
        """Whether ``row``'s notes up to step ``cut`` arrive on a cadence at step ``arrival``
        (read from :data:`JUDGED_BEATS` whole beats before the arrival's beat on, so a long
        piece costs the same per phrase end as a short one)."""
        from aurl.analysis.chords import arrival_cadences

        base = max(0, arrival // spb - JUDGED_BEATS) * spb  # a whole beat: the cells stay put
        late = self.given_ends > base / spb + 1e-9  # the given notes still sounding at base
        on = np.round(self.given["onset"][late] * spb).astype(np.int64).tolist()
        off = np.round(self.given_ends[late] * spb).astype(np.int64).tolist()
        spans = list(zip(on, off, self.given["pitch"][late].tolist()))
        spans += [(a, b, p) for a, b, p, _ in row.made if b > base]
        spans += [(a, cut, p) for p, a in row.free.items()]
        spans = [(max(a, base), min(b, cut), p) for a, b, p in spans if a < cut]
        spans = np.array([x for x in spans if x[1] > x[0]], dtype=np.int64).reshape(-1, 3)
        notes = np.zeros(len(spans), dtype=NOTE_DTYPE)
        notes["onset"] = (spans[:, 0] - base) / spb
        notes["duration"] = (spans[:, 1] - spans[:, 0]) / spb
        notes["pitch"] = spans[:, 2]
        notes["velocity"] = DEFAULT_VELOCITY
        return arrival_cadences(notes, [(arrival - base) / spb], self.key)[0]


def phrase_end_cadences(line: np.ndarray, notes: np.ndarray, key_name: str) -> dict[str, int]:
    """``{"phrase_ends", "cadences"}``: the melody's phrase ends
    (:func:`aurl.analysis.structure.phrase_boundaries`) and how many of them the melody with
    ``notes`` under it arrives on a cadence in the key (as ``aurl evaluate --task harmonize``
    reads them); empty without a key."""
    from aurl.analysis.chords import arrival_cadences
    from aurl.analysis.keys import parse_key
    from aurl.analysis.structure import phrase_boundaries

    phrases = phrase_boundaries(line)
    if not key_name or not phrases:
        return {}
    both = np.sort(np.concatenate([line, notes]), order=["onset", "pitch"])
    hits = arrival_cadences(both, [p.arrival for p in phrases], parse_key(key_name))
    return {"phrase_ends": len(phrases), "cadences": int(sum(hits))}


def _pc_bias(vocab: Vocab, tonic: int, degrees: tuple[int, ...], strictness: float) -> np.ndarray:
    """(V,) bias: NOTE_ONs whose pitch class is none of ``degrees`` above ``tonic`` get
    ``log(1 - strictness)``, NOTE_OFFs of those pitch classes ``-log(1 - strictness)`` (a note
    held into the chord from the one before is let go)."""
    bias = np.zeros(vocab.size)
    for kind, sign in ((Kind.NOTE_ON, 1.0), (Kind.NOTE_OFF, -1.0)):
        ids = np.flatnonzero(vocab.kind == kind)
        inside = np.isin((vocab.value[ids] - tonic) % 12, degrees)
        bias[ids[~inside]] = sign * math.log(1.0 - strictness)
    return bias


# --------------------------------------------------------------------------------------------
# The engine seam
# --------------------------------------------------------------------------------------------


class TorchEngine:
    """A torch model (``init_state`` / ``step``) behind numpy in, numpy out.

    The window slides when the cache is full: the state restarts on the last ``overlap`` tokens
    with the earlier ones as ``history`` (their musical time and grammar state carry over).
    """

    def __init__(
        self, model: Any, *, overlap: int = 1024, meter: tuple[int, int] | None = None
    ) -> None:
        import torch

        self.torch, self.model = torch, model
        self.vocab: Vocab = model.vocab
        self.device = model.embed.weight.device
        self.capacity = int(model.config.max_seq_len)
        self.overlap = min(overlap, self.capacity // 2)
        self.meter = meter  # the piece's time signature (a meter model counts its bars)

    def init_state(self, ids: np.ndarray) -> tuple[Any, np.ndarray]:
        """A state after the prefix ``ids`` (B, P); returns (state, logits (B, V))."""
        state = {"ids": ids.copy()}
        return state, self._start(state)

    def _start(self, state: dict) -> np.ndarray:
        torch, ids = self.torch, state["ids"]
        n = ids.shape[1]
        first = 0 if n < self.capacity else n - self.overlap
        t = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        with torch.no_grad():
            meter = None
            if self.meter is not None:
                meter = torch.tensor([self.meter], device=self.device).expand(ids.shape[0], 2)
            state["model"] = self.model.init_state(
                ids.shape[0], device=self.device, capacity=self.capacity,
                history=t[:, :first] if first > 0 else None, meter=meter,
            )  # fmt: skip
            logits = self.model.step(t[:, first:], state["model"])[:, -1]
        return logits.float().cpu().numpy()

    def step(self, ids: np.ndarray, state: dict) -> np.ndarray:
        """Feed one id per row (B,); returns the logits (B, V) after it."""
        torch = self.torch
        state["ids"] = np.concatenate([state["ids"], ids[:, None]], axis=1)
        if state["model"].pos >= self.capacity:
            return self._start(state)
        t = torch.as_tensor(ids[:, None], dtype=torch.long, device=self.device)
        with torch.no_grad():
            logits = self.model.step(t, state["model"])[:, -1]
        return logits.float().cpu().numpy()

    def reorder(self, state: dict, rows: np.ndarray) -> dict:
        from aurl.generation.constraints import index_state

        index = self.torch.as_tensor(rows, dtype=self.torch.long, device=self.device)
        return {"ids": state["ids"][rows], "model": index_state(state["model"], index)}


class NumpyEngine:
    """An :mod:`aurl.engines` engine that keeps its arrays in numpy (``numpy = True``, e.g.
    :class:`aurl.engines.onnx_engine.OnnxEngine`) behind the compose loop's calls; nothing here
    imports torch. Only the engine's public calls are used: ``init_state(batch, capacity=,
    history=)``, ``step(ids (B, T), state) -> (B, T, V)`` and ``reorder(state, rows)``. When the
    state is full, it restarts on the last ``overlap`` tokens with the earlier ones as
    ``history`` (as :class:`TorchEngine`)."""

    def __init__(
        self, engine: Any, *, overlap: int = 1024, meter: tuple[int, int] | None = None
    ) -> None:
        self.engine = engine
        self.vocab: Vocab = engine.vocab
        self.capacity = int(engine.config.max_seq_len)
        self.overlap = min(overlap, self.capacity // 2)
        self.meter = meter

    def init_state(self, ids: np.ndarray) -> tuple[dict, np.ndarray]:
        """A state after the prefix ``ids`` (B, P); returns (state, logits (B, V))."""
        state = {"ids": np.asarray(ids, dtype=np.int64).copy()}
        return state, self._start(state)

    def _start(self, state: dict) -> np.ndarray:
        ids = state["ids"]
        n = ids.shape[1]
        first = 0 if n < self.capacity else n - self.overlap
        meter = None if self.meter is None else np.tile(np.array([self.meter]), (len(ids), 1))
        state["model"] = self.engine.init_state(
            ids.shape[0], capacity=self.capacity, history=ids[:, :first] if first else None,
            meter=meter,
        )  # fmt: skip
        return np.asarray(self.engine.step(ids[:, first:], state["model"])[:, -1], np.float32)

    def step(self, ids: np.ndarray, state: dict) -> np.ndarray:
        """Feed one id per row (B,); returns the logits (B, V) after it."""
        ids = np.asarray(ids, dtype=np.int64)
        state["ids"] = np.concatenate([state["ids"], ids[:, None]], axis=1)
        if state["model"].pos >= self.capacity:
            return self._start(state)
        return np.asarray(self.engine.step(ids[:, None], state["model"])[:, -1], np.float32)

    def reorder(self, state: dict, rows: np.ndarray) -> dict:
        return {"ids": state["ids"][rows], "model": self.engine.reorder(state["model"], rows)}


def as_engine(model: Any, *, meter: tuple[int, int] | None = None) -> Any:
    """``model`` as an engine: a torch model is wrapped in :class:`TorchEngine`, a numpy
    :mod:`aurl.engines` engine (the onnx one) in :class:`NumpyEngine`; anything that already
    has ``init_state`` / ``step`` / ``reorder`` on numpy arrays is used as is. ``meter``: the
    piece's ``(numerator, denominator)`` (a meter model counts its bars in it; None: 4/4)."""
    if hasattr(model, "embed"):
        return TorchEngine(model, meter=meter)
    if getattr(model, "numpy", False) is True and hasattr(model, "grammar_state"):
        return NumpyEngine(model, meter=meter)
    missing = [m for m in ("init_state", "step", "reorder", "vocab") if not hasattr(model, m)]
    if missing:
        raise ConstraintError(
            f"this model cannot compose: it lacks {', '.join(missing)} (give an Aurl model or "
            "engine)"
        )
    return model


# --------------------------------------------------------------------------------------------
# The decode loop
# --------------------------------------------------------------------------------------------


def _logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    top = np.max(x, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return (np.log(np.exp(x - top).sum(axis=axis, keepdims=True)) + top).squeeze(axis)


def _grammar_masks(grammar: Any, gstate: Any) -> np.ndarray:
    return np.asarray(grammar.allowed(gstate), dtype=bool)


def scale_bias(vocab: Vocab, key: str, strictness: float) -> np.ndarray:
    """(V,) bias: NOTE_ONs outside the key's scale get ``log(1 - strictness)``; a minor key's
    scale holds its raised sixth and seventh too (the leading tone of its dominant chords).

    Raises:
        ConstraintError: ``key`` is not a key name.
    """
    from aurl.generation.constraints import key_bias

    return key_bias(vocab, key, strictness, minor=("natural", "melodic"))


DISSONANT = (1, 2, 6, 10, 11)  # semitones mod 12 below a melody note: seconds, tritone, sevenths


def dissonance_bias(vocab: Vocab, strictness: float) -> np.ndarray:
    """(13, V) bias: row ``pc`` gives NOTE_ONs a dissonant interval class (:data:`DISSONANT`)
    below a melody note of pitch class ``pc`` ``log(1 - strictness)``; row 12 (no melody note)
    and strictness 0 give none."""
    bias = np.zeros((13, vocab.size))
    if strictness <= 0:
        return bias
    on = np.flatnonzero(vocab.kind == Kind.NOTE_ON)
    penalty = _penalty(strictness)
    for pc in range(12):
        bias[pc, on[np.isin((pc - vocab.value[on]) % 12, DISSONANT)]] = penalty
    return bias


def melody_key(line: np.ndarray) -> str:
    """The key name of a melody (:func:`aurl.analysis.keys.estimate_key`; "" when it has fewer
    than two pitch classes)."""
    from aurl.analysis.keys import estimate_key
    from aurl.errors import DataError

    try:
        return estimate_key(line).name
    except DataError:
        return ""


def decode(
    model: Any,
    plan: Plan,
    options: ComposeOptions = ComposeOptions(),
    *,
    arrivals: Arrivals | None = None,
    progress: Progress = silent,
) -> list[Composition]:
    """Sample ``options.num_samples`` compositions that hold ``plan``'s given events (with
    ``arrivals``, leaning towards cadences at its phrase ends, and with ``options.particles >
    1`` keeping the rows that arrive on one).

    Returns:
        One :class:`Composition` per sample (``score`` None: the callers build it), its
        ``notes`` the model's own notes.
    """
    from aurl.data.grammar import Grammar

    t0 = time.perf_counter()
    engine = as_engine(model)
    vocab: Vocab = engine.vocab
    masks = _Masks(vocab, plan)
    S, K = options.num_samples, max(1, options.particles)
    B = S * K
    rng = np.random.default_rng(options.seed)
    grammar = Grammar(vocab, polyphony_cap=plan.polyphony_cap)
    prefix = np.array([START, vocab.tempo + plan.tempo_bin, vocab.instrument + CHORALE_FAMILY])
    ids = np.tile(prefix, (B, 1))
    gstate = grammar.initial_numpy_state(B)  # numpy all along: the loop never needs torch
    for j in range(ids.shape[1]):
        gstate = grammar.advance(gstate, ids[:, j])
    state, logits = engine.init_state(ids)
    rows = [_Row(plan) for _ in range(B)]
    weight = np.zeros(B)
    bias = np.zeros(vocab.size)
    if options.key:
        bias = scale_bias(vocab, options.key, options.key_strictness)
    free_on = np.zeros(vocab.size, dtype=bool)
    free_on[vocab.note_on : vocab.note_off] = True
    any_off = np.zeros(vocab.size, dtype=bool)
    any_off[vocab.note_off : vocab.note_off + vocab.n_pitches] = True
    around = plan.above >= 0  # accompany: voices above and below a given part
    against_top = dissonance_bias(vocab, options.consonance if plan.melody_top or around else 0.0)
    spacing = options.spacing if plan.melody_top else 0.0
    ranks = _rank_ranges(plan.max_free) if plan.melody_top else None
    if around:
        ranks = _around_ranges(plan.max_free + 1, plan.above)
    range_low = _penalty(options.ranges) if ranks is not None else 0.0
    around_low = _penalty(options.around) if around or plan.rank >= 0 else 0.0
    every_voice = not plan.melody_top and not around and plan.rank < 0  # infill, every voice
    around_spacing = _penalty(options.spacing) if around or every_voice else 0.0
    shift_ids = np.zeros(vocab.size, dtype=bool)
    shift_ids[vocab.time_shift : vocab.time_shift + vocab.config.max_shift_steps] = True
    shift_ids[END] = True
    vel_ids = np.zeros(vocab.size, dtype=bool)
    vel_ids[vocab.velocity : vocab.sustain_on] = True
    spacing_low = _penalty(spacing)
    resamples = fallbacks = n = 0
    spb = vocab.config.steps_per_beat
    due = list(arrivals.steps) if arrivals is not None and K > 1 else []  # arrivals to judge
    judged = steered = 0
    limit = 64 + 8 * (plan.end + 1)  # a bug guard: far more tokens than any plan needs
    for _ in progress(iter(int, 1), desc="compose"):
        if all(r.ended for r in rows):
            break
        if n > limit:
            raise RuntimeError(f"composing did not end within {limit} tokens")
        g_allowed = _grammar_masks(grammar, gstate)  # (B, V)
        plan_allowed = np.stack([masks.allowed(r) for r in rows])
        keep = g_allowed & plan_allowed
        empty = ~keep.any(-1)
        if empty.any():  # never expected: the plan alone decides (counted in the stats)
            fallbacks += int(empty.sum())
            keep[empty] = plan_allowed[empty]
        # p: the model under the grammar; q: what is sampled (plan, key bias, temperature)
        logp = np.where(g_allowed, logits, -np.inf)
        logp = logp - _logsumexp(logp)[:, None]
        proposal = np.where(keep, logits / options.temperature, -np.inf)
        is_free_on = free_on[None, :] & keep
        top = np.array([r.top % 12 if r.top >= 0 else 12 for r in rows])
        proposal = proposal + np.where(is_free_on, bias[None, :] + against_top[top], 0.0)
        if range_low < 0:  # each voice in its range
            for b, r in enumerate(rows):
                out = _out_of_range(r, ranks, around)
                if out is not None:
                    if around and r.k_on < len(r.ons):  # not the given note due next
                        out = out[~np.isin(out, r.ons[r.k_on :])]
                    proposal[b, out + vocab.note_on - vocab.config.pitch_min] += range_low
        if around_low < 0 and plan.rank >= 0:  # infill of one voice: between its neighbours
            for b, r in enumerate(rows):
                for wrong in (_between(r, plan), _parallel_between(r, plan),
                              _parallel_after(r, plan)):  # fmt: skip
                    if wrong is not None:
                        proposal[b, wrong + vocab.note_on - vocab.config.pitch_min] += around_low
        if around_low < 0 and around:  # accompany: the part's count of voices above it
            for b, r in enumerate(rows):
                full, short, release = _around(r, plan)
                if full is not None:
                    proposal[b, full + vocab.note_on - vocab.config.pitch_min] += around_low
                if short:
                    proposal[b] += np.where(shift_ids, around_low, 0.0)
                if release:  # anything but a NOTE_OFF: a voice below ends, one comes above
                    proposal[b] += np.where(shift_ids | free_on | vel_ids, around_low, 0.0)
        if around_spacing < 0:  # upper voices within an octave (accompany, infill)
            for b, r in enumerate(rows):
                wide = _around_wide(r, plan)
                if wide is not None:
                    if r.k_on < len(r.ons):  # not the given note due next
                        wide = wide[~np.isin(wide, r.ons[r.k_on :])]
                    proposal[b, wide + vocab.note_on - vocab.config.pitch_min] += around_spacing
        if spacing_low < 0:  # the upper voices within an octave of each other
            for b, r in enumerate(rows):
                wide = _wide(r, plan)
                if wide is not None:
                    proposal[b, wide + vocab.note_on - vocab.config.pitch_min] += spacing_low
        leans = [arrivals.bias(r.t) for r in rows] if arrivals is not None else []
        if any(b is not None for b in leans):  # the lean towards a cadence
            lean = np.stack([_or_zero(b, vocab.size) for b in leans])
            for b, r in enumerate(rows):  # not on the given note due next: it is forced
                if r.k_on < len(r.ons):
                    lean[b, vocab.note_on + r.ons[r.k_on] - vocab.config.pitch_min] = 0.0
            proposal = proposal + np.where(is_free_on | (any_off[None, :] & keep), lean, 0.0)
        logq = proposal - _logsumexp(proposal)[:, None]
        u = rng.random(B)
        cdf = np.cumsum(np.exp(logq), axis=1)
        tok = np.minimum((cdf < (u * cdf[:, -1])[:, None]).sum(1), vocab.size - 1)
        lp = logp[np.arange(B), tok]
        lq = logq[np.arange(B), tok]
        for b, r in enumerate(rows):
            if r.ended:
                continue
            if masks.advance(r, int(tok[b])) and np.isfinite(lp[b]):
                r.given_nll -= lp[b]
            if np.isfinite(lp[b]):
                weight[b] += lp[b] - lq[b]
        gstate = grammar.advance(gstate, tok.astype(np.int64))
        logits = engine.step(tok.astype(np.int64), state)
        n += 1
        index = np.arange(B)
        if K > 1 and n % options.resample_every == 0:
            w = weight.reshape(S, K)
            pw = np.exp(w - w.max(1, keepdims=True))
            ess = pw.sum(1) ** 2 / (pw**2).sum(1)
            for s in np.flatnonzero(ess < K / 2):
                index[s * K : (s + 1) * K] = s * K + _systematic(w[s], rng)
                # resampled rows share the mean weight (the estimate of p(given) stays)
                weight[s * K : (s + 1) * K] = _logsumexp(w[s]) - math.log(K)
        while due and all(r.ended or r.t >= min(due[0] + arrivals.lookahead, plan.end)
                          for r in rows):  # fmt: skip
            arrival = due.pop(0)
            cut = min(arrival + arrivals.lookahead, plan.end)
            judged += 1
            for s in range(S):
                ok = np.array([arrivals.cadence_at(rows[i], arrival, cut, spb)
                               for i in index[s * K : (s + 1) * K]])  # fmt: skip
                if ok.any() and not ok.all():  # keep the rows that arrive on a cadence
                    w = np.where(ok, weight[index[s * K : (s + 1) * K]], -np.inf)
                    index[s * K : (s + 1) * K] = index[s * K : (s + 1) * K][_systematic(w, rng)]
                    weight[s * K : (s + 1) * K] = _logsumexp(w) - math.log(K)
                    steered += 1
        if (index != np.arange(B)).any():
            rows = [rows[i].copy() for i in index]
            state = engine.reorder(state, index)
            gstate = _index_grammar(gstate, index)
            logits = logits[index]
            resamples += 1
    out = []
    for s in range(S):
        best = s * K + int(np.argmax(weight[s * K : (s + 1) * K]))
        r = rows[best]
        made = np.array(r.made, dtype=np.int64).reshape(-1, 4)
        notes = np.zeros(len(made), dtype=NOTE_DTYPE)
        notes["onset"] = made[:, 0] / spb
        notes["duration"] = (made[:, 1] - made[:, 0]) / spb
        qpm = float(vocab.bin_tempo[plan.tempo_bin])
        notes["onset_s"] = notes["onset"] * 60.0 / qpm
        notes["duration_s"] = notes["duration"] * 60.0 / qpm
        notes["pitch"] = made[:, 2]
        notes["velocity"] = DEFAULT_VELOCITY
        notes = np.sort(notes, order=["onset", "pitch"])
        n_given = sum(len(v) for v in plan.ons.values())
        stats = {
            "log_weight": float(weight[best]),
            "given_bits": float(r.given_nll / math.log(2)),
            "given_bits_per_note": float(r.given_nll / math.log(2) / max(1, n_given)),
            "tokens": n,
            "seconds": time.perf_counter() - t0,
            "resamples": resamples,
            "particles": K,
            "fallbacks": fallbacks,
            "arrivals_judged": judged,
            "arrivals_steered": steered,
        }
        out.append(Composition(notes=notes, stats=stats))
    return out


def _penalty(strictness: float) -> float:
    """``log(1 - strictness)``: 0 for none, -inf for 1 (never)."""
    if strictness <= 0:
        return 0.0
    return math.log(1.0 - strictness) if strictness < 1.0 else -np.inf


def _rank_ranges(free_voices: int) -> np.ndarray | None:
    """(free_voices, 2) the SATB range of the model's voices from the bottom (bass first),
    under a melody (the soprano's, last, dropped); None where the voices are not SATB's."""
    from aurl.generation.voices import voice_ranges

    ranges = voice_ranges(free_voices + 1)
    return None if ranges is None else ranges[:-1]


def _around_ranges(voices: int, above: int) -> np.ndarray | None:
    """(voices - 1, 2) the SATB range of the model's voices from the bottom (bass first) around
    a given part with ``above`` of them over it; None where the voices are not SATB's."""
    from aurl.generation.voices import voice_ranges

    ranges = voice_ranges(voices)
    return None if ranges is None else np.delete(ranges, voices - 1 - above, axis=0)


def _around(row: _Row, plan: Plan) -> tuple[np.ndarray | None, bool, bool]:
    """Accompany's lean (:attr:`Plan.above`): the pitches a new NOTE_ON of the model would put
    on a side of the given part whose voices are all there already (None: no such pitch);
    whether moving on (a TIME_SHIFT, END) would leave fewer voices above the part than the
    plan keeps there, with room for another; and whether, with no room (the part moved above
    a held voice), a voice should end here first (the step's NOTE_OFFs still open)."""
    if plan.above < 0 or row.top < 0:
        return None, False, False
    below = sum(p < row.top for p in row.free)
    over = sum(p > row.top for p in row.free)
    p = np.arange(MIN_FREE_PITCH, MAX_FREE_PITCH + 1)
    full = ((p < row.top) & (below >= plan.max_free - plan.above)) | (
        (p > row.top) & (over >= plan.above))  # fmt: skip
    missing = over < plan.above
    room = len(row.free) < plan.max_free
    short = missing and room and row.done_here()
    release = missing and not room and row.phase == 0 and not row.after_velocity
    return (p[full] if full.any() else None), short, release


def _between(row: _Row, plan: Plan) -> np.ndarray | None:
    """Infill of one voice (:attr:`Plan.rank`): the pitches a new NOTE_ON of the model would
    sound at with another count of the given notes sounding above it than the voice has (as
    many as sound, where fewer do; None: no such pitch), so that a new alto stays between the
    soprano and the tenor."""
    if plan.rank < 0:
        return None
    given = np.array(sorted({*row.given, *row.ons}), dtype=np.int64)
    if len(given) == 0:
        return None
    p = np.arange(MIN_FREE_PITCH, MAX_FREE_PITCH + 1)
    over = len(given) - np.searchsorted(given, p, side="right")
    wrong = (over != min(plan.rank, len(given))) & ~np.isin(p, given)
    return p[wrong] if wrong.any() else None


def _parallel_between(row: _Row, plan: Plan) -> np.ndarray | None:
    """Infill of one voice: the pitches a new NOTE_ON of the model would reach in parallel
    fifths or octaves with a given voice (None: none). The voices are read by rank: the given
    notes of the last slice and of this one, as many in each, pair up in pitch order, and the
    new voice continues its own last note; a pair moving the same way from one interval to the
    same fifth or octave class is a parallel, as :func:`aurl.evaluation.tasks.voice_rules`
    counts."""
    if plan.rank < 0:
        return None
    prev_given = row.prev_given
    if len(row.prev_free) == 1:
        pp = row.prev_free[0]
    elif not row.prev_free and not row.made and not row.free and plan.voice_before in prev_given:
        pp = plan.voice_before  # the span's first note: the voice's own note before it
        prev_given = list(prev_given)
        prev_given.remove(pp)
    else:
        return None
    now = sorted({*row.given, *row.ons})
    if not now or len(now) != len(prev_given):
        return None
    c = np.arange(MIN_FREE_PITCH, MAX_FREE_PITCH + 1)
    bad = np.zeros(len(c), dtype=bool)
    for q, pq in zip(now, prev_given):
        if q == pq:
            continue
        iv, piv = np.abs(c - q) % 12, abs(pp - pq) % 12
        same_way = np.sign(c - pp) == np.sign(q - pq)
        bad |= (c != pp) & same_way & (iv == piv) & (piv in (0, 7))
    return c[bad] if bad.any() else None


def _parallel_after(row: _Row, plan: Plan) -> np.ndarray | None:
    """Infill of one voice: the pitches a new NOTE_ON of the model would move from in parallel
    fifths or octaves with a given voice into the voice's own kept note after the span (None:
    none, or a note started now would not be the last before it). Read as
    :func:`_parallel_between` reads: the given notes sounding now and as that note starts,
    paired in pitch order."""
    after = plan.after
    if plan.rank < 0 or after is None or not after.since <= row.t < min(plan.free_end, after.step):
        return None
    now = sorted({*row.given, *row.ons})
    if not now or len(now) != len(after.others):
        return None
    c = np.arange(MIN_FREE_PITCH, MAX_FREE_PITCH + 1)
    bad = np.zeros(len(c), dtype=bool)
    for q, qn in zip(now, after.others):
        niv = abs(after.pitch - qn) % 12
        if q == qn or niv not in (0, 7):
            continue
        same_way = np.sign(after.pitch - c) == np.sign(qn - q)
        bad |= (c != after.pitch) & same_way & (np.abs(c - q) % 12 == niv)
    return c[bad] if bad.any() else None


def _around_wide(row: _Row, plan: Plan) -> np.ndarray | None:
    """Accompany's (and infill's of every voice) spacing: the pitches a new NOTE_ON of the
    model would put more than an octave above the note under it as an upper voice (with two or
    more sounding below it), or, as the last of the model's voices under the part (accompany),
    more than an octave under the part's note where that is an upper voice (None: no such
    pitch). SATB's textbook spacing: soprano and alto, alto and tenor within an octave."""
    if plan.melody_top or plan.rank >= 0 or (plan.above >= 0 and row.top < 0):
        return None
    floor = row.lo if row.phase == 1 else -1  # the step's last NOTE_ON: new ones go above it
    p = np.arange(max(floor + 1, MIN_FREE_PITCH), MAX_FREE_PITCH + 1)
    sounding = np.array(sorted({*row.free, *row.given, *row.ons}), dtype=np.int64)
    if len(sounding) < 2:  # no candidate has two notes under it
        return None
    under = np.searchsorted(sounding, p)  # notes below each candidate
    below_next = np.where(under > 0, sounding[np.maximum(under - 1, 0)], -1)
    wide = (under >= 2) & (p - below_next > 12)
    if plan.above < 0:  # infill of every voice: no part to keep the voices around
        return p[wide] if wide.any() else None
    below_part = sum(q < row.top for q in row.free)
    last_under = (p < row.top) & (below_part + 1 == plan.max_free - plan.above)
    wide |= last_under & (plan.max_free - plan.above >= 2) & (row.top - p > 12)
    return p[wide] if wide.any() else None


def _out_of_range(row: _Row, ranks: np.ndarray, around: bool = False) -> np.ndarray | None:
    """The pitches a new NOTE_ON of the model would sound out of the range of the voice of its
    rank (how many of the model's notes sound below it; None: nothing out of range). Only the
    model's own pitches, under the melody note (``row.top``): the melody's NOTE_ON is given;
    ``around`` (accompany): above the given part's note too."""
    hi = MAX_FREE_PITCH + 1 if row.top < 0 or around else min(row.top, MAX_FREE_PITCH + 1)
    p = np.arange(MIN_FREE_PITCH, hi)
    rank = np.minimum(np.searchsorted(np.sort(list(row.free)), p), len(ranks) - 1)
    out = (p < ranks[rank, 0]) | (p > ranks[rank, 1])
    return p[out] if out.any() else None


def _wide(row: _Row, plan: Plan) -> np.ndarray | None:
    """The pitches a new NOTE_ON of the model would sound more than an octave from its upper
    neighbour (the melody) or lower neighbour (with two below it) as the top note of a full
    chord (None: such a note would not complete the chord, or nothing is too wide)."""
    if row.top < 0 or len(row.free) + 1 != plan.max_free:
        return None
    below = sorted(row.free)  # a note above all of them is the chord's top (the alto)
    floor = max(row.lo if row.phase == 1 else -1, below[-1] if below else -1)
    p = np.arange(max(floor + 1, MIN_FREE_PITCH), min(row.top, MAX_FREE_PITCH + 1))
    wide = row.top - p > 12
    if len(below) >= 2:
        wide |= p - below[-1] > 12
    return p[wide] if wide.any() else None


def _or_zero(bias: np.ndarray | None, size: int) -> np.ndarray:
    return np.zeros(size) if bias is None else bias


def _systematic(log_weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Systematic resampling: ``len(log_weights)`` indices drawn by weight (-inf: never)."""
    K = len(log_weights)
    p = np.exp(log_weights - np.max(log_weights))
    pos = (rng.random() + np.arange(K)) / K
    return np.minimum(np.searchsorted(np.cumsum(p / p.sum()), pos), K - 1)


def _index_grammar(gstate: Any, index: np.ndarray) -> Any:
    """Rows ``index`` of a numpy grammar state."""
    import dataclasses

    return type(gstate)(**{
        f.name: np.asarray(getattr(gstate, f.name))[index] for f in dataclasses.fields(gstate)
    })  # fmt: skip


# --------------------------------------------------------------------------------------------
# Checks on the given notes
# --------------------------------------------------------------------------------------------


def melody_line(notes: np.ndarray, *, name: str = "melody") -> np.ndarray:
    """The one melodic line of ``notes``: its notes, the highest where notes start together,
    each cut where the next starts.

    Raises:
        ConstraintError: no notes, drums only, chords at most onsets, or a range the voices
            cannot go under.
    """
    if len(notes) == 0:
        raise ConstraintError(f"{name} has no notes: give a MIDI or MusicXML file with a melody")
    notes = pitched(notes)
    if len(notes) == 0:
        raise ConstraintError(f"{name} holds drums only: give a pitched melody")
    notes = np.sort(notes, order=["onset", "pitch"])
    onsets, counts = np.unique(np.round(notes["onset"] * 64), return_counts=True)
    if (counts > 1).mean() > 0.5:
        raise ConstraintError(
            f"{name} has chords at {(counts > 1).mean():.0%} of its onsets: give one melodic "
            "line (or a score whose top track is the melody)"
        )
    key = np.round(notes["onset"] * 64)
    last_of_onset = np.r_[key[1:] != key[:-1], True]  # sorted by pitch: the top note
    line = notes[last_of_onset].copy()
    ends = line["onset"] + line["duration"]
    nxt = np.r_[line["onset"][1:], np.inf]
    line["duration"] = np.minimum(ends, nxt) - line["onset"]
    lo, hi = int(line["pitch"].min()), int(line["pitch"].max())
    if lo < MIN_MELODY_PITCH or hi > MAX_MELODY_PITCH:
        raise ConstraintError(
            f"{name} spans MIDI pitches {lo}..{hi}: three voices need it within "
            f"{MIN_MELODY_PITCH}..{MAX_MELODY_PITCH}; transpose it by octaves into that range"
        )
    return line


# --------------------------------------------------------------------------------------------
# The library API
# --------------------------------------------------------------------------------------------


def _with_seconds(notes: np.ndarray, qpm: float) -> np.ndarray:
    notes = notes.copy()
    notes["onset_s"] = notes["onset"] * 60.0 / qpm
    notes["duration_s"] = notes["duration"] * 60.0 / qpm
    return notes


def harmonize(
    model: Any,
    melody_notes: np.ndarray,
    *,
    voices: int = 4,
    options: ComposeOptions = ComposeOptions(),
    qpm: float = 120.0,
    like: Any = None,
    meter: tuple[int, int] | None = None,
    progress: Progress = silent,
) -> list[Composition]:
    """Compose ``voices - 1`` voices under a melody (kept exactly).

    Args:
        model: A model (or engine) that speaks the shipped vocabulary in beat time.
        melody_notes: The melody as a note array (beats); see :func:`melody_line`.
        voices: Voices in all, the melody included (2..4 for SATB names).
        options: Sampling options.
        qpm: Tempo for the model's TEMPO token.
        like: A symusic Score whose tempos, time and key signatures the result copies.
        meter: The melody's time signature ``(numerator, denominator)`` (:attr:`TimeMap.meter`):
            a meter model counts its bars in it (None: 4/4).
        progress: Progress helper over tokens.

    Returns:
        ``options.num_samples`` compositions; ``score`` holds the melody (Soprano) and the new
        voices on tracks named by :func:`aurl.generation.voices.voice_names`.

    Raises:
        ConstraintError: a melody the voices cannot go under, or a model that cannot compose.
    """
    from aurl.generation.voices import assign_voices, voice_names

    if voices < 2:
        raise ConstraintError(f"--voices {voices}: harmonizing needs at least 2 voices")
    line = melody_line(melody_notes)
    engine = as_engine(model, meter=meter)
    if options.melody_key and not options.key:
        options = replace(options, key=melody_key(line))
    plan = make_plan(
        line, engine.vocab, ceiling=True, max_free=voices - 1, qpm=qpm,
        voice_leading=options.voice_leading,
    )  # fmt: skip
    from aurl.generation.anticipation import AnticipationEngine, supports_anticipation

    anticipating = supports_anticipation(model)  # the model also reads the melody ahead
    if anticipating:
        engine = AnticipationEngine(model, plan, meter=meter)
    arrivals = None
    if options.cadences:
        arrivals = Arrivals.of_melody(
            line, options.key, engine.vocab, strictness=options.cadence_strictness
        )
    results = decode(engine, plan, options, arrivals=arrivals, progress=progress)
    names = voice_names(voices)
    for c in results:
        c.stats.update(phrase_end_cadences(line, c.notes, options.key))
        parts = [(names[0], line)]
        v = assign_voices(c.notes, voices - 1)
        parts += [(names[i + 1], c.notes[v == i]) for i in range(voices - 1)]
        c.score = parts_score(parts, like=like)
        if anticipating:
            c.stats["engine"] = "anticipation"
    return results


def accompany(
    model: Any,
    part_notes: np.ndarray,
    *,
    voices: int = 4,
    part_name: str = "Part",
    options: ComposeOptions = ComposeOptions(),
    qpm: float = 120.0,
    like: Any = None,
    meter: tuple[int, int] | None = None,
    progress: Progress = silent,
) -> list[Composition]:
    """Compose ``voices - 1`` voices around a part (kept exactly), above and below it.

    The part is one of the SATB voices (:func:`part_voice`: by its track name, else by its
    pitch): the model keeps as many voices above it as that voice has above it, the rest below
    (``options.around``), each in its range (``options.ranges``), consonant with the part
    (``options.consonance``) and without parallel fifths or octaves against it or each other
    (``options.voice_leading``). The part's track keeps its name; the new voices take the
    other SATB names, top down. ``meter``: as in :func:`harmonize`.

    Raises:
        ConstraintError: no pitched notes, or a model that cannot compose.
    """
    from aurl.generation.voices import assign_voices, voice_names

    notes = pitched(part_notes)
    if len(notes) == 0:
        raise ConstraintError(f"{part_name} has no pitched notes: give a part to accompany")
    engine = as_engine(model, meter=meter)
    above = part_voice(notes, voices, part_name)
    plan = make_plan(notes, engine.vocab, ceiling=False, max_free=voices - 1, qpm=qpm,
                     voice_leading=options.voice_leading, above=above)  # fmt: skip
    results = decode(engine, plan, options, progress=progress)
    for c in results:
        v = assign_voices(c.notes, voices - 1)
        groups = [c.notes[v == i] for i in range(voices - 1)]
        names = list(voice_names(voices))
        own = names.pop(above)
        parts = [(part_name or own, notes)]
        parts += list(zip(names, groups))
        c.score = parts_score(parts, like=like)
    return results


def part_of(tracks: list[tuple[str, np.ndarray]], name: str) -> tuple[np.ndarray, str]:
    """The part :func:`accompany` keeps, from a file's ``(name, notes)`` tracks: every pitched
    note, named by the track when there is one, else ``Part``.

    Raises:
        ConstraintError: no pitched note (``name``: the file, for the message).
    """
    notes = pitched(np.concatenate([n for _, n in tracks])) if tracks else np.zeros(0, NOTE_DTYPE)
    if len(notes) == 0:
        what = "drums only" if tracks else "no notes"
        raise ConstraintError(f"{name} has {what}: give a part with pitched notes")
    return notes, tracks[0][0] if len(tracks) == 1 else "Part"


def part_voice(notes: np.ndarray, voices: int, name: str = "") -> int:
    """Which of ``voice_names(voices)`` (0: the top) a given part is: the one its track name
    names (any case), else the one whose textbook range (:data:`~aurl.generation.voices.
    SATB_RANGES`) centres nearest its median pitch."""
    from aurl.generation.voices import SATB, SATB_RANGES, voice_names

    names = [n.lower() for n in voice_names(voices)]
    if name.strip().lower() in names:
        return names.index(name.strip().lower())
    median = float(np.median(notes["pitch"]))
    centre = [sum(SATB_RANGES[SATB.index(n.title())]) / 2 for n in names]
    return int(np.argmin([abs(median - c) for c in centre]))


def voice_rank(voice: np.ndarray, others: np.ndarray) -> int:
    """How many of ``others``' notes sound above ``voice`` (one line) at its onsets, the most
    common count: its place among the other voices (0: the top; -1: no onset with any other
    note sounding, no rule)."""
    counts = []
    ends = others["onset"] + others["duration"]
    for n in voice:
        sounding = (others["onset"] <= n["onset"] + 1e-9) & (ends > n["onset"] + 1e-9)
        if sounding.any():
            counts.append(int((others["pitch"][sounding] > n["pitch"]).sum()))
    return int(np.bincount(counts).argmax()) if counts else -1


def infill(
    model: Any,
    notes: np.ndarray,
    span: tuple[float, float],
    part: np.ndarray | None = None,
    *,
    max_free: int | None = None,
    options: ComposeOptions = ComposeOptions(),
    qpm: float = 120.0,
    meter: tuple[int, int] | None = None,
    progress: Progress = silent,
) -> list[Composition]:
    """Regenerate the notes that start in ``span`` (beats, [start, end)), of the notes selected
    by ``part`` (a bool mask over ``notes``, or over their pitched notes only; None: all),
    keeping every other note; drum notes are set aside. At most
    ``max_free`` new notes sound at once (default: the chosen notes' own most at once). One
    voice regenerated (``part`` given, one note at a time) keeps its place among the others
    (:func:`voice_rank` of the notes it replaces: a new alto between soprano and tenor),
    leaned as ``options.around``. ``meter``: the piece's time signature, as in
    :func:`harmonize`.

    Returns:
        Compositions whose ``notes`` are the new notes only (``score`` None: the caller puts
        them on its tracks, see :func:`tracks_for`).

    Raises:
        ConstraintError: an empty or reversed span, or a span outside the piece.
    """
    a, b = span
    if part is not None and len(part) == len(notes):  # a mask over all the notes: keep the
        part = np.asarray(part, bool)[notes["program"] != DRUM_PROGRAM]  # pitched notes' part
    notes = pitched(notes)
    if len(notes) == 0:
        raise ConstraintError("the piece has no pitched notes: nothing to infill around")
    if part is not None and len(part) != len(notes):
        raise ValueError(f"part has {len(part)} entries for {len(notes)} pitched notes")
    last = float((notes["onset"] + notes["duration"]).max())
    if not 0 <= a < b:
        raise ConstraintError(f"span {a:g}-{b:g} beats is empty or reversed: give start < end")
    if a >= last:
        raise ConstraintError(f"span starts at beat {a:g}, after the piece ends ({last:g})")
    chosen = np.ones(len(notes), bool) if part is None else np.asarray(part, bool)
    regen = chosen & (notes["onset"] >= a - 1e-9) & (notes["onset"] < b - 1e-9)
    given = notes[~regen]
    if max_free is None:  # as many voices as the replaced notes had at once (at least one)
        max_free = max(1, max_polyphony(notes[chosen]))
    rank = voice_rank(notes[regen], notes[~chosen]) if part is not None and max_free == 1 else -1
    before = notes[chosen & ~regen & (notes["onset"] < a - 1e-9)]
    into = before[before["onset"] + before["duration"] >= a - 1e-6]  # sounding up to the span
    voice_before = int(into["pitch"][np.argmax(into["onset"])]) if rank >= 0 and len(into) else -1
    later = notes[chosen & ~regen & (notes["onset"] >= b - 1e-9)]
    voice_after = None
    if rank >= 0 and len(later):  # the voice's own kept note after the span
        first = np.argmin(later["onset"])
        voice_after = (int(later["pitch"][first]), float(later["onset"][first]))
    engine = as_engine(model, meter=meter)
    plan = make_plan(given, engine.vocab, free_span=(a, min(b, last)), max_free=max_free,
                     qpm=qpm, rank=rank, voice_before=voice_before, voice_after=voice_after,
                     voice_leading=options.voice_leading and rank < 0)  # fmt: skip
    from aurl.generation.fim import FimEngine, supports_fim

    if not supports_fim(model):
        return decode(engine, plan, options, progress=progress)
    # a FIM model writes the span knowing what follows it; it is not asked outside the span,
    # so it gives no probability for the given notes there
    out = decode(FimEngine(model, plan, meter=meter), plan, options, progress=progress)
    for c in out:
        c.stats.update(given_bits=math.nan, given_bits_per_note=math.nan, engine="fim")
    return out


def max_polyphony(notes: np.ndarray) -> int:
    """Most notes sounding at once (0 for none)."""
    if len(notes) == 0:
        return 0
    t = np.concatenate([notes["onset"], notes["onset"] + notes["duration"]])
    step = np.concatenate([np.ones(len(notes)), -np.ones(len(notes))])
    order = np.lexsort((step, t))  # ends before starts at the same time
    return int(np.cumsum(step[order]).max())


def infill_regenerated(notes: np.ndarray, span: tuple[float, float], part: Any = None) -> Any:
    """(N,) bool: the notes :func:`infill` replaces (the chosen part's pitched notes starting in
    span; drum notes are always kept)."""
    chosen = np.ones(len(notes), bool) if part is None else np.asarray(part, bool)
    chosen = chosen & (notes["program"] != DRUM_PROGRAM)
    return chosen & (notes["onset"] >= span[0] - 1e-9) & (notes["onset"] < span[1] - 1e-9)


def parts_score(parts: list[tuple[str, np.ndarray]], *, tpq: int = 480, like: Any = None) -> Any:
    """A tick score with one named track per ``(name, notes)``; tempo, time and key signatures
    from ``like`` (a symusic Score) when given."""
    import symusic

    from aurl.generation.export import notes_track, score_like

    like = like if like is not None else symusic.Score(tpq)
    return score_like(
        like, [notes_track(name, n, like.tpq, program=_program(n)) for name, n in parts]
    )


def _program(notes: np.ndarray) -> int:
    """The track's program: its notes' most common one (0 for an empty track; 128 = drums)."""
    return int(np.bincount(notes["program"]).argmax()) if len(notes) else 0


# --------------------------------------------------------------------------------------------
# Pieces: tracks, meter and tempo, spans, rebuilt scores (shared by the CLI and the server)
# --------------------------------------------------------------------------------------------


def composing_model(model: Any) -> Any:
    """``model`` itself when it can compose around given notes.

    Raises:
        ConstraintError: not a transformer-mode, beat-time model.
    """
    config, vc = getattr(model, "config", None), getattr(model, "vocab_config", None)
    mode = getattr(config, "mode", "transformer")
    unit = getattr(vc, "time_unit", "beat")
    if mode != "transformer" or unit != "beat":
        raise ConstraintError(
            f"this checkpoint ({mode}, time in {unit}) cannot compose around given notes: use "
            "a transformer-mode, beat-time model such as the shipped one"
        )
    return model


def track_notes(score: Any) -> list[tuple[str, np.ndarray]]:
    """``(name, note array)`` for each track of a symusic Score with notes (drums keep
    program 128); unnamed tracks are called ``Track i``."""
    import symusic

    from aurl.data.notes import notes_from_score

    out = []
    for i, track in enumerate(score.tracks):
        one = symusic.Score(score.tpq)
        one.tempos = score.tempos.copy()
        one.tracks.append(track.copy())
        notes = notes_from_score(one)
        if len(notes):
            out.append((track.name or f"Track {i}", notes))
    return out


def top_track(tracks: list[tuple[str, np.ndarray]]) -> tuple[str, np.ndarray]:
    """The melody of a piece given as ``(name, notes)`` tracks: its only track, or the pitched
    track with the highest median pitch (``("melody", empty)`` for no tracks)."""
    from aurl.data.notes import empty_notes

    if not tracks:
        return "melody", empty_notes()
    tonal = [(n, pitched(x)) for n, x in tracks if len(pitched(x))]
    if not tonal:
        return tracks[0]
    return max(tonal, key=lambda t: float(np.median(t[1]["pitch"])))


@dataclass(frozen=True)
class TimeMap:
    """A piece's meter and tempo, in beats from its start (what spans in bars or seconds need).

    Attributes:
        signatures: ``(beat, numerator, denominator)`` per time signature (none: 4/4).
        tempos: ``(beat, qpm)`` per tempo change (none, or before the first: 120).
        keys: ``(beat, key, tonality)`` per key signature (symusic's fields), copied to results.
    """

    signatures: tuple[tuple[float, int, int], ...] = ()
    tempos: tuple[tuple[float, float], ...] = ()
    keys: tuple[tuple[float, int, int], ...] = ()

    @classmethod
    def of_score(cls, score: Any, *, meter_from: Any = None) -> TimeMap:
        """The map of a tick symusic Score (time and key signatures from ``meter_from`` when
        given: a repaired score keeps only its tempos)."""
        tpq = float(score.tpq)
        meter = score if meter_from is None else meter_from
        mtpq = float(meter.tpq)
        return cls(
            signatures=tuple((float(s.time) / mtpq, int(s.numerator), int(s.denominator))
                             for s in meter.time_signatures if s.numerator > 0 and s.denominator > 0),
            tempos=tuple((float(t.time) / tpq, float(t.qpm)) for t in score.tempos if t.qpm > 0),
            keys=tuple((float(k.time) / mtpq, int(k.key), int(k.tonality))
                       for k in meter.key_signatures),
        )  # fmt: skip

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> TimeMap:
        """The inverse of :meth:`to_json`."""
        return cls(
            signatures=tuple((float(b), int(n), int(d)) for b, n, d in obj.get("signatures", ())),
            tempos=tuple((float(b), float(q)) for b, q in obj.get("tempos", ())),
            keys=tuple((float(b), int(k), int(t)) for b, k, t in obj.get("keys", ())),
        )

    def to_json(self) -> dict[str, Any]:
        """Plain lists (what the upload worker sends back)."""
        return {"signatures": [list(s) for s in self.signatures],
                "tempos": [list(t) for t in self.tempos], "keys": [list(k) for k in self.keys]}  # fmt: skip

    @property
    def meter(self) -> tuple[int, int]:
        """The piece's time signature ``(numerator, denominator)``: its first one (4/4 where
        there is none), as :func:`aurl.data.meter.read_meter` reads a file's for training."""
        if not self.signatures:
            return (4, 4)
        _, num, den = min(self.signatures)
        return (num, den)

    @property
    def first_qpm(self) -> float:
        """The tempo at the start (120 when there is none)."""
        return self.tempos[0][1] if self.tempos and self.tempos[0][0] <= 0 else 120.0

    def bar_starts(self, until: float) -> list[float]:
        """Beat of each bar start from the time signatures, up to ``until`` beats (and one
        more)."""
        sigs = [(b, n * 4.0 / d) for b, n, d in self.signatures] or [(0.0, 4.0)]
        if sigs[0][0] > 0:
            sigs.insert(0, (0.0, 4.0))
        starts, beat, k = [], 0.0, 0
        while beat <= until + 1e-9:
            while k + 1 < len(sigs) and sigs[k + 1][0] <= beat + 1e-9:
                k += 1
            starts.append(beat)
            beat += sigs[k][1]
        starts.append(beat)
        return starts

    def seconds_to_beats(self, seconds: float) -> float:
        """The beat at ``seconds`` through the tempo map."""
        tempos = list(self.tempos) or [(0.0, 120.0)]
        if tempos[0][0] > 0:
            tempos.insert(0, (0.0, 120.0))
        beat, elapsed = 0.0, 0.0
        for (b0, qpm), nxt in zip(tempos, [*tempos[1:], (float("inf"), 0.0)]):
            length = (nxt[0] - b0) * 60.0 / qpm
            if elapsed + length >= seconds:
                return b0 + (seconds - elapsed) * qpm / 60.0
            elapsed += length
            beat = nxt[0]
        return beat

    def bar_span(
        self, first: int, last: int, end: float, *, name: str = "the piece", field: str = "bars"
    ) -> tuple[float, float]:
        """Bars ``first..last`` (1-based, inclusive) of a piece ending at beat ``end`` as a
        beat span.

        Raises:
            ConfigError: reversed, or outside the piece (the message names ``field``).
        """
        from aurl.errors import ConfigError

        starts = self.bar_starts(end)
        n_bars = len(starts) - 1 if starts[-2] < end - 1e-9 else len(starts) - 2
        if not 1 <= first <= last <= n_bars:
            raise ConfigError(
                f"{field} {first}-{last}: {name} has bars 1-{n_bars}; give 1 <= A <= B <= {n_bars}"
            )
        return starts[first - 1], starts[last]

    def seconds_span(
        self, start: float, stop: float, end_s: float, *, field: str = "span"
    ) -> tuple[float, float]:
        """Seconds ``start..stop`` of a piece ending at ``end_s`` seconds as a beat span.

        Raises:
            ConfigError: reversed, negative, or starting after the end (naming ``field``).
        """
        from aurl.errors import ConfigError

        if not 0 <= start < stop or start >= end_s:
            raise ConfigError(
                f"{field} {start:g}-{stop:g}: give 0 <= S < T with S before the end ({end_s:.1f} s)"
            )
        return self.seconds_to_beats(start), self.seconds_to_beats(stop)

    def like_score(self, tpq: int = 480) -> Any:
        """An empty tick symusic Score with these tempos, time and key signatures (the
        ``like`` of :func:`parts_score`)."""
        import symusic

        score = symusic.Score(tpq)
        for b, qpm in self.tempos:
            score.tempos.append(symusic.Tempo(round(b * tpq), qpm))
        for b, n, d in self.signatures:
            score.time_signatures.append(symusic.TimeSignature(round(b * tpq), n, d))
        for b, k, t in self.keys:
            score.key_signatures.append(symusic.KeySignature(round(b * tpq), k, t))
        return score


def piece_notes(tracks: list[tuple[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """All the notes of ``(name, notes)`` tracks, and the track index of each."""
    from aurl.data.notes import empty_notes

    if not tracks:
        return empty_notes(), np.zeros(0, np.int64)
    notes = np.concatenate([n for _, n in tracks])
    owner = np.concatenate([np.full(len(n), i) for i, (_, n) in enumerate(tracks)])
    return notes, owner


def infill_score(
    tracks: list[tuple[str, np.ndarray]],
    span: tuple[float, float],
    new_notes: np.ndarray,
    *,
    part: int | None = None,
    like: Any = None,
) -> Any:
    """The infilled piece as a tick score: each track keeps its notes outside what
    :func:`infill` replaced, and the new notes join the track ``part`` (when one part was
    regenerated) or are spread over the pitched (non-drum) tracks by voice, the highest voice
    to the track with the highest median pitch."""
    from aurl.generation.voices import assign_voices

    notes, owner = piece_notes(tracks)
    regen = infill_regenerated(notes, span, None if part is None else owner == part)
    if part is not None:
        new_owner = np.full(len(new_notes), part)
    else:
        melodic = [i for i, (_, n) in enumerate(tracks) if _program(n) != DRUM_PROGRAM]
        order = np.array(melodic)[
            np.argsort([-float(np.median(tracks[i][1]["pitch"])) for i in melodic])
        ]
        new_owner = order[assign_voices(new_notes, len(order))]
    parts = []
    for i, (name, _) in enumerate(tracks):
        mine = np.concatenate([notes[(owner == i) & ~regen], new_notes[new_owner == i]])
        parts.append((name, np.sort(mine, order=["onset", "pitch"])))
    return parts_score(parts, like=like)


# --------------------------------------------------------------------------------------------
# Scoring a known answer under the plan (evaluation)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanScore:
    """Bits of the model's part of a known sequence (e.g. Bach's alto, tenor and bass).

    Attributes:
        conditional_bits: sum over the free tokens of -log2 q, q the plan-constrained
            distribution the decoder samples from (given notes forced, time clipped).
        unconditional_bits: the same tokens under the model with the grammar alone.
        free_notes: NOTE_ONs of the free part (the denominator of bits per note).
        given_bits: -log2 p of the given notes' NOTE_ON/NOTE_OFF tokens under the model.
        outside: tokens the plan did not allow (0 when the sequence holds the given notes).
    """

    conditional_bits: float
    unconditional_bits: float
    free_notes: int
    given_bits: float
    outside: int

    @property
    def conditional_bits_per_note(self) -> float:
        return self.conditional_bits / max(1, self.free_notes)

    @property
    def unconditional_bits_per_note(self) -> float:
        return self.unconditional_bits / max(1, self.free_notes)


def score_plan(
    model: Any,
    plan: Plan,
    ids: np.ndarray,
    *,
    meter: tuple[int, int] | None = None,
    logits: np.ndarray | None = None,
) -> PlanScore:
    """Score a token sequence (START TEMPO INSTRUMENT ... END) against ``plan``: what the
    decoder's constrained distribution and the plain model assign to its free tokens.

    The model runs once over the whole sequence (teacher forcing, the context at most) in the
    piece's ``meter`` (None: 4/4); the plan's masks are stepped along it exactly as
    :func:`decode` steps them. ``logits`` (T, V), row ``t`` predicting ``ids[t + 1]``: the
    model's logits when the caller ran it (an anticipation model reads controls between the
    ids: :func:`aurl.generation.anticipation.score_anticipated`).
    """
    import torch

    from aurl.data.grammar import Grammar

    vocab: Vocab = model.vocab
    ids = np.asarray(ids, dtype=np.int64)[: model.config.max_seq_len]
    if logits is None:
        with torch.no_grad():
            m = None if meter is None else torch.tensor([meter])
            logits = model(torch.as_tensor(ids)[None], meter=m).logits[0].float().numpy()  # (T, V)
    grammar = Grammar(vocab, polyphony_cap=plan.polyphony_cap)
    g = grammar.sequence_masks(torch.as_tensor(ids)[None])[0].numpy()  # (T, V)
    masks = _Masks(vocab, plan)
    row = _Row(plan)
    cond = uncond = given = 0.0
    notes = outside = 0
    for i in range(3, len(ids)):  # after START TEMPO INSTRUMENT
        tok = int(ids[i])
        plan_ok = masks.allowed(row)
        keep = g[i - 1] & plan_ok
        x = logits[i - 1]
        logp = np.where(g[i - 1], x, -np.inf)
        logp = logp - _logsumexp(logp)
        if not keep[tok]:
            outside += 1
            keep = g[i - 1]
        logq = np.where(keep, x, -np.inf)
        logq = logq - _logsumexp(logq)
        if masks.advance(row, tok):
            given -= logp[tok]
        else:
            cond -= logq[tok]
            uncond -= logp[tok]
            notes += int(vocab.kind[tok] == Kind.NOTE_ON)
        if row.ended:
            break
    ln2 = math.log(2)
    return PlanScore(cond / ln2, uncond / ln2, notes, given / ln2, outside)


def melody_kept(written: np.ndarray, given: np.ndarray, *, tolerance: float = 1.0 / 64) -> float:
    """Share of the ``given`` notes found in ``written`` with the same pitch and onset and end
    within ``tolerance`` beats (1.0 when all are kept; NaN for no given notes)."""
    if len(given) == 0:
        return float("nan")
    if len(written) == 0:
        return 0.0
    same = given["pitch"][:, None] == written["pitch"][None, :]  # (G, W)
    close_on = np.abs(given["onset"][:, None] - written["onset"][None, :]) <= tolerance
    g_end = given["onset"] + given["duration"]
    w_end = written["onset"] + written["duration"]
    close_end = np.abs(g_end[:, None] - w_end[None, :]) <= tolerance
    return float((same & close_on & close_end).any(1).mean())


def plan_allows(vocab: Vocab, plan: Plan, ids: list[int] | np.ndarray) -> np.ndarray:
    """(V,) bool: what ``plan`` allows after the generated ids ``ids`` (those after START,
    TEMPO, INSTRUMENT), before the grammar is applied: the decoder's mask, for inspection."""
    masks, row = _Masks(vocab, plan), _Row(plan)
    for tok in ids:
        masks.advance(row, int(tok))
    return masks.allowed(row)
