"""Musical constraints as composable, batch-vectorized logit masks.

Each constraint turns the generation state into an additive bias over the vocabulary: ``0``
leaves an id alone, ``-inf`` forbids it, a finite negative value down-weights it. Static
constraints (key, pitch range, tempo) are folded into one ``(V,)`` vector at construction, so
they cost one add per step; dynamic ones (instrument set, note density, length in tokens or
seconds) read the grammar's state (family, tempo, time) and a :class:`MaskState` with the few
counters it lacks, kept only while a constraint reads them.

The grammar (:class:`aurl.data.grammar.Grammar`, the one grammar of Aurl) is always on and always
wins: a constraint can only remove ids the grammar allows. If the constraints leave a row with
nothing, that row may only end (END closes every note), so the output stays valid.

The masker works on torch tensors (``device`` given) or on numpy arrays alone (``device=None``:
the loop of the onnx engine, which never imports torch); this module imports torch only where a
torch path runs.

Every option is checked in :func:`build_constraints`; a bad or unsatisfiable combination raises
:class:`ConstraintError` before anything is generated.

The end rule of a length in seconds (``Constraints.hold_beats``, one beat of
``generation.meter``: :func:`end_hold_beats`): a piece ends in its last beat, and its final
chord has sounded at least that beat when it does. The last beat is counted in whole time steps
back from the last step the clock reaches, at the tempo in force. No note starts inside it, and
a row enters it only by a time shift after which its latest note start lies a beat or more
behind it; there the row ends at once (as the grammar lets: a NOTE_OFF after a shift, then END,
which closes every note), so the chord sounding since that start is held to the end, never
struck a sixteenth before the clock cuts it. A one-beat shift is always such a shift, so the
rule never leaves a row only unlikely ids; before the last beat it changes nothing but the
shifts that would land inside it too early.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np

from aurl.config import GenerationConfig
from aurl.data.vocab import END, Kind, Vocab
from aurl.errors import AurlError, ConstraintError

if TYPE_CHECKING:
    import torch

NEG_INF = float("-inf")
DENSITY_STRENGTH = 2.0  # bias per unit of log(target / actual density) on NOTE_ON
DENSITY_MAX_BIAS = 8.0
MIN_TOKENS = 8  # the shortest limit that leaves room for one note and a clean END
PARALLEL_MEMO = 65536  # voice leading: (last slice, sounding) pairs remembered per masker
DENSE_VOICES = 12  # voice leading on a torch device: dense up to this polyphony cap, else host
END_HOLD_BEATS = 1.0  # quarter notes: the shortest final chord of a piece limited in seconds


@dataclass
class MaskState:
    """What the masker carries between steps.

    The grammar's state already tracks the current family, tempo bin, time in steps and END
    (``GrammarState.family``, ``tempo``, ``time``, ``ended``); the masker adds only what the
    constraints need beyond it, and counts only while a constraint reads it.
    """

    grammar: Any  # aurl.data.grammar.GrammarState
    step: int  # tokens generated so far (the same for every unfinished row)
    notes: torch.Tensor  # (B,) NOTE_ONs so far, primer included (numpy in numpy mode)
    seconds: torch.Tensor  # (B,) float64 elapsed seconds, primer included
    all_started: bool  # every row has played a note
    onset: Any = None  # (B,) float64 time step of the latest NOTE_ON (-inf: none), end rule only
    # voice leading only (``Constraints.voice_leading``): the last slice, (B, P) bool, the
    # pitches sounding when time last moved on from a step where a note started; and (B,) bool,
    # a note has started at the current step
    last_slice: Any = None
    fresh: Any = None


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


class _Tables:
    """Vocabulary lookups as numpy arrays (``device`` None) or tensors on one device, shared
    by every constraint."""

    def __init__(self, vocab: Vocab, device: torch.device | str | None = None) -> None:
        self.vocab = vocab
        kind, value = vocab.kind.astype(np.int64), vocab.value.astype(np.int64)
        self.kind, self.value = kind, value
        self.is_note_on = kind == Kind.NOTE_ON
        self.is_shift = kind == Kind.TIME_SHIFT
        self.is_tempo = kind == Kind.TEMPO
        self.is_instrument = kind == Kind.INSTRUMENT
        # ids that start a note (VELOCITY is always followed by a NOTE_ON)
        self.is_velocity = kind == Kind.VELOCITY
        self.is_end = kind == Kind.END
        self.starts_note = self.is_note_on | self.is_velocity
        # ids after which the grammar does not allow END, and new notes (zero length at END)
        self.blocks_end = self.starts_note | self.is_shift | self.is_instrument
        self.shift_steps = np.where(self.is_shift, value, 0).astype(np.float64)  # (V,)
        # Seconds per step for each tempo bin (beat mode) or the fixed step (seconds mode).
        bins = np.arange(vocab.config.tempo_bins)
        sps = [vocab.seconds_per_step(float(vocab.bin_tempo[b])) for b in bins]
        self.seconds_per_step = np.array(sps, dtype=np.float64)
        if device is not None:
            import torch

            for name, a in list(vars(self).items()):
                if isinstance(a, np.ndarray):
                    setattr(self, name, torch.as_tensor(a, device=device))
        c = vocab.config
        self.step_seconds = c.step_seconds
        # Seconds mode decodes at 120 BPM, where a step is step_seconds * 2 beats.
        self.beats_per_step = (
            1.0 / c.steps_per_beat if c.time_unit == "beat" else c.step_seconds * 2
        )
        self.default_tempo_bin = int(vocab.tempo_bin(120.0))


# --------------------------------------------------------------------------------------------
# Constraints
# --------------------------------------------------------------------------------------------


def key_bias(
    vocab: Vocab, key: str, strictness: float, minor: tuple[str, ...] = ("natural",)
) -> np.ndarray:
    """(V,) bias: out-of-scale NOTE_ONs get ``log(1 - strictness)`` (``-inf`` at strictness 1).
    A minor key's scale is the union of the ``minor`` forms named (``natural``, ``harmonic``,
    ``melodic``: :func:`aurl.analysis.keys.scale_pitch_classes`).

    Raises:
        ConstraintError: ``key`` is not a key name.
    """
    from aurl.analysis.keys import parse_key, scale_pitch_classes

    try:
        parsed = parse_key(key)
    except AurlError as e:
        raise ConstraintError(f"--key: {e}") from None
    in_scale = np.zeros(12, dtype=bool)
    for form in minor:
        in_scale[scale_pitch_classes(parsed, form)] = True
    bias = np.zeros(vocab.size)
    note_on = vocab.kind == Kind.NOTE_ON
    out = note_on & ~in_scale[vocab.value % 12]
    bias[out] = math.log(1.0 - strictness) if strictness < 1.0 else NEG_INF
    return bias


def pitch_range_bias(vocab: Vocab, low: int, high: int) -> np.ndarray:
    """(V,) bias: NOTE_ONs outside ``[low, high]`` forbidden.

    Raises:
        ConstraintError: empty range or no vocabulary pitch inside it.
    """
    c = vocab.config
    if low > high:
        raise ConstraintError(f"pitch range {low}..{high} is empty: give low <= high")
    if high < c.pitch_min or low > c.pitch_max:
        raise ConstraintError(
            f"pitch range {low}..{high} lies outside the model's pitches "
            f"{c.pitch_min}..{c.pitch_max}: choose a range that overlaps them"
        )
    bias = np.zeros(vocab.size)
    note_on = vocab.kind == Kind.NOTE_ON
    bias[note_on & ((vocab.value < low) | (vocab.value > high))] = NEG_INF
    return bias


def tempo_bias(vocab: Vocab, tempo: float, tempo_range: tuple[float, ...]) -> np.ndarray:
    """(V,) bias: only the TEMPO bin nearest ``tempo`` (if > 0), or the bins inside
    ``tempo_range`` (two BPM values), stay allowed.

    Raises:
        ConstraintError: a malformed range or one that holds no tempo bin.
    """
    bias = np.zeros(vocab.size)
    is_tempo = vocab.kind == Kind.TEMPO
    bpm = vocab.bin_tempo[vocab.value[is_tempo]]
    if tempo > 0 and tempo_range:
        raise ConstraintError("give a fixed tempo or a tempo range, not both")
    if tempo > 0:
        c = vocab.config
        if not c.tempo_min <= tempo <= c.tempo_max:
            raise ConstraintError(
                f"tempo {tempo:g} BPM is outside the model's {c.tempo_min:g}..{c.tempo_max:g} BPM"
            )
        keep = vocab.value[is_tempo] == int(vocab.tempo_bin(tempo))
    elif tempo_range:
        if len(tempo_range) != 2 or tempo_range[0] > tempo_range[1]:
            raise ConstraintError(
                f"tempo range {list(tempo_range)}: give two BPM values, low <= high"
            )
        keep = (bpm >= tempo_range[0]) & (bpm <= tempo_range[1])
        if not keep.any():
            raise ConstraintError(
                f"tempo range {tempo_range[0]:g}..{tempo_range[1]:g} BPM holds no tempo of the "
                f"model (bins at {', '.join(f'{b:.0f}' for b in vocab.bin_tempo)} BPM)"
            )
    else:
        return bias
    ids = np.flatnonzero(is_tempo)
    bias[ids[~keep]] = NEG_INF
    return bias


def instrument_bias(vocab: Vocab, families: tuple[int, ...]) -> np.ndarray:
    """(V,) bias: INSTRUMENT tokens outside ``families`` forbidden.

    Raises:
        ConstraintError: a family outside the vocabulary.
    """
    bias = np.zeros(vocab.size)
    if not families:
        return bias
    n = vocab.config.num_instruments
    bad = [f for f in families if not 0 <= f < n]
    if bad:
        raise ConstraintError(
            f"instrument families {bad} do not exist: use 0..{n - 1} (General MIDI program // 8)"
        )
    is_instrument = vocab.kind == Kind.INSTRUMENT
    bias[is_instrument & ~np.isin(vocab.value, families)] = NEG_INF
    return bias


@dataclass(frozen=True)
class Constraints:
    """The checked constraints of one generation run.

    Attributes:
        static: (V,) float64 bias from the key, pitch range, tempo and instrument constraints.
        families: allowed instrument families (empty: all); NOTE_ON waits while the current
            family is not one of them.
        density: target NOTE_ONs per beat (0: free).
        max_tokens: tokens to generate at most, END included.
        seconds: length limit in seconds (0: none).
        min_tokens: END is masked until this many tokens are generated (0: free).
        hold_beats: With ``seconds``: the piece ends inside its last this many beats, where no
            note starts, on notes struck at least that long before (0: off; the module's end
            rule).
        voice_leading: No NOTE_ON that moves in a parallel fifth or octave with a note
            sounding below it (:mod:`aurl.generation.voice_leading`, read against the last
            slice).
        voices: The voices the piece is written in (0: unknown), for ``voice_leading``.
        spacing: A NOTE_ON more than an octave above the highest note sounding under it, with
            another under that one (an upper voice too far from the next: the lowest voice
            may lie further), gets ``log(1 - spacing)`` (0: off).
        ranges: With ``voices`` SATB's (2-4), a NOTE_ON outside the textbook range of the
            voice of its rank from the bottom (:func:`aurl.generation.voices.voice_ranges`)
            gets ``log(1 - ranges)``
            (0: off).
    """

    static: np.ndarray
    families: tuple[int, ...] = ()
    density: float = 0.0
    max_tokens: int = 1024
    seconds: float = 0.0
    min_tokens: int = 0
    hold_beats: float = 0.0
    voice_leading: bool = False
    voices: int = 0
    spacing: float = 0.0
    ranges: float = 0.0


def end_hold_beats(meter: str = "") -> float:
    """The last beat of a piece limited in seconds, in quarter notes (the end rule: no note
    starts there, the final chord has sounded this long when the piece ends): one beat of
    ``meter`` ("" is 4/4), never less than :data:`END_HOLD_BEATS`.

    The beat is the denominator's note (2/2 and 3/2: a half note, 2 beats), or, in a compound
    meter (6/8, 9/8, 12/8: numerator a multiple of 3 above 3, denominator 8 or shorter), three
    of them (a dotted quarter, 1.5 beats); a beat shorter than a quarter note (3/8, 5/8, 6/16)
    holds a quarter note.

    Raises:
        ConfigError: ``meter`` is not ``N/D`` (:func:`aurl.data.meter.parse_meter`).
    """
    from aurl.data.meter import parse_meter

    num, den = parse_meter(meter) if meter else (4, 4)
    beat = 4.0 / den
    if den >= 8 and num > 3 and num % 3 == 0:
        beat *= 3
    return max(beat, END_HOLD_BEATS)


def build_constraints(vocab: Vocab, config: GenerationConfig) -> Constraints:
    """Check every constraint option of ``config`` and fold the static ones into one bias.

    Raises:
        ConstraintError: an unknown key, an empty or out-of-vocabulary range, or constraints
            that leave no NOTE_ON at all (e.g. a pitch range with no note of the key).
    """
    if config.max_tokens < MIN_TOKENS:
        raise ConstraintError(
            f"max tokens {config.max_tokens}: give at least {MIN_TOKENS} (a piece needs TEMPO, "
            "INSTRUMENT, VELOCITY, NOTE_ON, a TIME_SHIFT and END)"
        )
    if config.min_tokens > config.max_tokens - MIN_TOKENS:
        raise ConstraintError(
            f"min tokens {config.min_tokens} leaves no room to end within max tokens "
            f"{config.max_tokens}: give at most {config.max_tokens - MIN_TOKENS}"
        )
    static = pitch_range_bias(vocab, config.pitch_low, config.pitch_high)
    if config.key:
        static = static + key_bias(vocab, config.key, config.key_strictness)
    static = static + tempo_bias(vocab, config.tempo, config.tempo_range)
    static = static + instrument_bias(vocab, config.instruments)
    note_on = vocab.kind == Kind.NOTE_ON
    if not np.isfinite(static[note_on]).any():
        raise ConstraintError(
            f"no note can be played: key {config.key!r} has no pitch in the range "
            f"{config.pitch_low}..{config.pitch_high}; widen the range or change the key"
        )
    return Constraints(
        static=static,
        families=tuple(sorted(set(config.instruments))),
        density=config.density,
        max_tokens=config.max_tokens,
        seconds=config.seconds,
        min_tokens=config.min_tokens,
        hold_beats=end_hold_beats(config.meter) if config.seconds > 0 else 0.0,
        voice_leading=config.voice_leading,
        voices=config.voices,
        spacing=config.spacing,
        ranges=config.ranges,
    )


# --------------------------------------------------------------------------------------------
# The masker: grammar + constraints
# --------------------------------------------------------------------------------------------


def _block(vocab: Vocab, kind: Kind) -> slice:
    """The ids of ``kind``, which the vocabulary lays out as one block."""
    ids = np.flatnonzero(vocab.kind == kind)
    return slice(int(ids[0]), int(ids[-1]) + 1)


class LogitMasker:
    """Grammar and constraints applied together to next-token logits, vectorized over rows.

    Args:
        vocab: The model's vocabulary.
        grammar: The grammar state machine (:class:`aurl.data.grammar.Grammar`).
        constraints: From :func:`build_constraints`.
        device: Where the masks live (the model's device); None: numpy arrays throughout,
            for states from :meth:`initial_state` in numpy (no torch).
    """

    def __init__(
        self,
        vocab: Vocab,
        grammar: Any,
        constraints: Constraints,
        *,
        device: torch.device | str | None = "cpu",
    ) -> None:
        self.vocab, self.grammar, self.constraints = vocab, grammar, constraints
        self.numpy = device is None
        t = self.t = _Tables(vocab)  # numpy here; torch tensors below where a device is given
        # the static bias split: -inf entries remove ids, finite ones down-weight them
        static = constraints.static.astype(np.float32)
        hard = np.isneginf(static)
        static_keep = ~hard if hard.any() else None
        soft = np.where(hard, np.float32(0.0), static)
        static_soft = soft if (soft != 0).any() else None
        # keep_table[f]: (V,) what the hard static constraints keep while family f is current
        # (the last entry stands for "no INSTRUMENT yet", the grammar's family F): the static
        # mask, less the ids that start a note where the instrument constraint forbids notes.
        # One lookup per step; None when there is nothing to remove.
        n_fam = vocab.config.num_instruments
        family_ok = np.ones(n_fam + 1, dtype=bool)
        if constraints.families:
            family_ok[:] = False
            family_ok[list(constraints.families)] = True
        keep_table = family_ok[:, None] | ~t.starts_note
        if static_keep is not None:
            keep_table = keep_table & static_keep
        end_only = np.zeros(vocab.size, dtype=bool)
        end_only[END] = True
        # the NOTE_ON and VELOCITY ids are blocks of the vocabulary: slices are cheaper
        self.note_on_ids = _block(vocab, Kind.NOTE_ON)
        self.velocity_ids = _block(vocab, Kind.VELOCITY)
        # Before the first note: no time, no END, no pedal, so a note comes within 3 tokens.
        pedal = (t.kind == Kind.SUSTAIN_ON) | (t.kind == Kind.SUSTAIN_OFF)
        beats = t.shift_steps.astype(np.float32) * np.float32(t.beats_per_step)  # (V,) shifts
        # the range of each voice by rank (voice writing), and its lean
        from aurl.generation.voices import voice_ranges

        ranges = voice_ranges(constraints.voices) if constraints.ranges > 0 else None
        self.ranges_penalty = math.log1p(-constraints.ranges) if ranges is not None else 0.0
        # The tables constrain() reads, as numpy arrays and (device given) torch tensors.
        tables = SimpleNamespace(
            keep_table=None if keep_table.all() else keep_table, static_keep=static_keep,
            static_soft=static_soft, opens_silence=t.is_shift | (t.kind == Kind.END) | pedal,
            density_weight=t.is_note_on.astype(np.float32) - np.log1p(beats), end_only=end_only,
            is_end=t.is_end, is_velocity=t.is_velocity, blocks_end=t.blocks_end,
            not_end=~t.is_end, not_velocity=~t.is_velocity, not_blocks_end=~t.blocks_end,
            shift_steps=t.shift_steps, seconds_per_step=t.seconds_per_step,
            note_on_count=t.is_note_on.astype(np.int64),  # (V,) 1 for NOTE_ON ids
            is_shift=t.is_shift, pitch_index=np.arange(vocab.n_pitches),
            rank_ranges=(np.zeros((1, 2), np.int64) if ranges is None
                         else ranges - vocab.config.pitch_min),  # pitch offsets, bass first
        )  # fmt: skip
        self._np = _Backend(tables, numpy=True)
        self.device = None
        if not self.numpy:
            import torch

            self.device = d = torch.device(device)
            self.t = _Tables(vocab, d)
            as_torch = {
                k: None if v is None else torch.as_tensor(v, device=d)
                for k, v in vars(tables).items()
            }
            tables = SimpleNamespace(**as_torch)
            self._torch = _Backend(tables, numpy=False)
        # the tables of this masker's own backend, by name
        self.static_keep, self.static_soft = tables.static_keep, tables.static_soft
        self.keep_table, self.end_only = tables.keep_table, tables.end_only
        self.opens_silence, self.density_weight = tables.opens_silence, tables.density_weight
        self.note_on_count = tables.note_on_count
        # Seconds must be accumulated tempo by tempo in beat mode; in seconds mode they are
        # the grammar's step count times the step.
        self.beat_mode = vocab.config.time_unit == "beat"
        self.count_seconds = constraints.seconds > 0 and self.beat_mode
        # The end rule: the last beat in time steps (0: off).
        self.hold_steps = round(constraints.hold_beats / self.t.beats_per_step)
        # Constraints that can leave a row with nothing: check for empty rows only then.
        self.can_empty = (
            self.static_keep is not None
            or bool(constraints.families)
            or constraints.seconds > 0
            or constraints.min_tokens > 0  # where the grammar allows END alone
            or constraints.voice_leading
        )
        self.voice_leading = constraints.voice_leading
        self.spacing_penalty = math.log1p(-constraints.spacing)  # log(1 - spacing)
        self._parallel_memo: dict[bytes, np.ndarray] = {}  # (last slice, sounding) -> refused
        self.pitches = np.arange(vocab.config.pitch_min, vocab.config.pitch_min + vocab.n_pitches)

    # -- state ----------------------------------------------------------------------------------

    def initial_state(self, batch: int) -> MaskState:
        """State before any token (the first token must be START)."""
        if self.numpy:
            return MaskState(
                grammar=self.grammar.initial_numpy_state(batch), step=0,
                notes=np.zeros(batch, dtype=np.int64), seconds=np.zeros(batch), all_started=False,
                onset=np.full(batch, -np.inf) if self.hold_steps else None,
                **self._no_slice(batch, None),
            )  # fmt: skip
        import torch

        d = self.device
        return MaskState(
            **self._no_slice(batch, d),
            grammar=self.grammar.initial_state(batch, d),
            step=0,
            notes=torch.zeros(batch, dtype=torch.long, device=d),
            seconds=torch.zeros(batch, dtype=torch.float64, device=d),
            all_started=False,
            onset=torch.full((batch,), -math.inf, dtype=torch.float64, device=d)
            if self.hold_steps
            else None,
        )

    def _no_slice(self, batch: int, device: Any) -> dict[str, Any]:
        """The voice-leading fields of a state before any note (none when it is off)."""
        if not self.voice_leading:
            return {}
        last_slice = np.zeros((batch, self.vocab.n_pitches), dtype=bool)
        fresh = np.zeros(batch, dtype=bool)
        if device is None:
            return {"last_slice": last_slice, "fresh": fresh}
        import torch

        return {"last_slice": torch.as_tensor(last_slice, device=device),
                "fresh": torch.as_tensor(fresh, device=device)}  # fmt: skip

    def _tempo_bin(self, grammar_tempo: torch.Tensor) -> torch.Tensor:
        where = self._np.where if self.numpy else self._torch.where
        return where(grammar_tempo >= 0, grammar_tempo, self.t.default_tempo_bin)

    def prime(self, state: MaskState, ids: torch.Tensor) -> MaskState:
        """The state after a primer (B, P) (from :meth:`initial_state`), computed vectorized;
        the primer does not count against the length limit in tokens."""
        if self.numpy:
            return self._prime_numpy(state, np.asarray(ids, dtype=np.int64))
        import torch

        t = self.t
        kind, value = t.kind[ids], t.value[ids]  # (B, P)
        seconds = state.seconds
        if self.count_seconds:
            # Tempo in force before each token: the last TEMPO strictly before it.
            pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
            last = torch.where(kind == Kind.TEMPO, pos, -1).cummax(dim=1).values
            tempo = torch.where(last >= 0, value.gather(1, last.clamp(min=0)), -1)
            before = torch.cat([state.grammar.tempo[:, None], tempo[:, :-1]], dim=1)
            sps = t.seconds_per_step[self._tempo_bin(before)]  # (B, P)
            seconds = seconds + (t.shift_steps[ids] * sps).sum(1)
        onset = state.onset
        if onset is not None:  # the time of the primer's last NOTE_ON
            steps = state.grammar.time[:, None].double() + t.shift_steps[ids].cumsum(1)
            at = torch.where(kind == Kind.NOTE_ON, steps, -math.inf).max(1).values
            onset = torch.maximum(onset, at)
        scan = self.grammar.scan(ids, state.grammar)
        slices = {}
        if self.voice_leading:  # once per primer: in numpy, back to the device
            last_slice, fresh = _slice_after(
                state.last_slice.cpu().numpy(), state.fresh.cpu().numpy(),
                kind.cpu().numpy(), scan.any_sounding.cpu().numpy(),
            )  # fmt: skip
            d = state.fresh.device
            slices = {"last_slice": torch.as_tensor(last_slice, device=d),
                      "fresh": torch.as_tensor(fresh, device=d)}  # fmt: skip
        return MaskState(
            grammar=scan.state_after(),
            step=state.step,
            notes=state.notes + (kind == Kind.NOTE_ON).sum(1),
            seconds=seconds,
            all_started=state.all_started,
            onset=onset,
            **slices,
        )

    def _prime_numpy(self, state: MaskState, ids: np.ndarray) -> MaskState:
        """:meth:`prime` in numpy, token by token (a primer is fed once)."""
        g, seconds, t, onset = state.grammar, state.seconds, self.t, state.onset
        last_slice, fresh = state.last_slice, state.fresh
        for j in range(ids.shape[1]):
            if self.count_seconds:  # at the tempo in force before the token
                seconds = (
                    seconds
                    + t.shift_steps[ids[:, j]] * t.seconds_per_step[self._tempo_bin(g.tempo)]
                )
            if fresh is not None:
                last_slice, fresh = _next_slice(last_slice, fresh, ids[:, j], g, t, np.where)
            g = self.grammar.advance(g, ids[:, j])
            if onset is not None:
                onset = np.where(t.is_note_on[ids[:, j]], g.time, onset)
        return MaskState(
            grammar=g, step=state.step,
            notes=state.notes + (t.kind[ids] == Kind.NOTE_ON).sum(1), seconds=seconds,
            all_started=state.all_started, onset=onset, last_slice=last_slice, fresh=fresh,
        )  # fmt: skip

    def advance(self, state: MaskState, ids: torch.Tensor, grammar: Any = None) -> MaskState:
        """Advance by one generated token per row; ``ids`` is (B,).

        ``grammar``: the grammar state after ``ids`` when the caller already has it (the model
        keeps one for its grammar features); advanced here otherwise.
        """
        t, cons = self.t, self.constraints
        notes, seconds = state.notes, state.seconds
        if cons.density > 0 or not state.all_started:
            notes = notes + self.note_on_count[ids]
        if self.count_seconds:
            sps = t.seconds_per_step[self._tempo_bin(state.grammar.tempo)]
            seconds = seconds + t.shift_steps[ids] * sps
        grammar = grammar if grammar is not None else self.grammar.advance(state.grammar, ids)
        onset, last_slice, fresh = state.onset, state.last_slice, state.fresh
        where = np.where if self.numpy else self._torch.where
        if onset is not None:  # a NOTE_ON does not move time: the grammar's time is its own
            onset = where(t.is_note_on[ids], grammar.time, onset)
        if fresh is not None:
            last_slice, fresh = _next_slice(last_slice, fresh, ids, state.grammar, t, where)
        return MaskState(
            grammar=grammar,
            step=state.step + 1,
            notes=notes,
            seconds=seconds,
            all_started=state.all_started or bool((notes > 0).all()),
            onset=onset,
            last_slice=last_slice,
            fresh=fresh,
        )

    def finished(self, state: MaskState) -> torch.Tensor:
        """(B,) bool: rows that emitted END."""
        return state.grammar.ended

    def all_finished(self, state: MaskState) -> bool:
        """Every row emitted END (as Python bools: the cheapest check once a model step has
        filled the caches with its weights)."""
        return all(state.grammar.ended.tolist())

    # -- masking ----------------------------------------------------------------------------

    def constrain(self, state: MaskState, allowed: Any) -> tuple[Any, Any]:
        """What the constraints keep of the grammar's (B, V) mask ``allowed``: (keep (B, V)
        bool, additive soft bias (B, V) or (V,) or None), as numpy arrays when ``allowed`` is
        one (the CPU path of :meth:`apply`) and torch tensors otherwise.

        Hard constraints remove ids from ``keep``; soft ones (key strictness below 1, note
        density) add a finite bias. Rows that must stop (out of tokens or time) keep END alone
        where the grammar allows END; otherwise every id after which END cannot come (shift,
        velocity, instrument) and new notes are removed there, so the row can end at the next
        token. A VELOCITY is kept only where a NOTE_ON the constraints keep can follow it, and a
        row left with nothing gets what the grammar alone allows (:meth:`_fallback`).
        """
        cons, g = self.constraints, state.grammar
        x = self._np if isinstance(allowed, np.ndarray) else self._torch
        t = x.tables
        keep = allowed if t.keep_table is None else allowed & t.keep_table[x.of(g.family)]
        soft = t.static_soft
        if not state.all_started:
            # A piece opens with a note: no leading silence, and never an empty piece.
            keep = keep & ~((x.of(state.notes) == 0)[:, None] & t.opens_silence)
        if cons.density > 0:
            # log(target / actual), clamped: NOTE_ON up when too sparse, down when too dense;
            # one number per row, so in Python. NOTE_ON up and long shifts down when too
            # sparse (and the reverse): density is notes per beat, so shift lengths matter too.
            target, m, bps = cons.density + 1e-3, DENSITY_MAX_BIAS, self.t.beats_per_step
            push = [
                [min(max(DENSITY_STRENGTH * math.log(target / (n / beats + 1e-3)), -m), m)]
                for n, steps in zip(state.notes.tolist(), g.time.tolist())
                for beats in [max(steps * bps, 1.0)]
            ]
            dens = x.array(push, t.density_weight) * t.density_weight  # (B, V)
            soft = dens if soft is None else dens + soft
        if state.step < cons.min_tokens:  # too short to end yet (a length or time stop wins)
            keep = keep & t.not_end
        left = cons.max_tokens - state.step
        stop = None  # (B,) rows that must end now
        if left <= 3:  # a VELOCITY now would need a NOTE_ON at left == 2, where none may come
            keep = keep & t.not_velocity
        if left <= 2:
            keep = keep & t.not_blocks_end
            if left <= 1:
                stop = allowed[:, END] | True  # every row
        if cons.seconds > 0:
            tempo = x.of(g.tempo)
            sps = t.seconds_per_step[x.where(tempo >= 0, tempo, self.t.default_tempo_bin)]
            seconds = state.seconds if self.beat_mode else g.time * self.t.step_seconds
            elapsed = x.f64(seconds)  # (B,) float64
            remaining = cons.seconds - elapsed  # (B,)
            keep = keep & ~(t.shift_steps * sps[:, None] > remaining[:, None] + 1e-9)
            if self.hold_steps > 0:  # the end rule (module docstring)
                keep, late = self._end_rule(keep, state, remaining, sps, x)
            else:
                # The piece lasts the time asked, within a beat: no END before its last beat.
                early = remaining > sps / self.t.beats_per_step + 1e-9
                keep = keep & ~(early[:, None] & t.is_end)
                # Less than a sixteenth note left: end as soon as the grammar lets.
                late = remaining < sps * (0.25 / self.t.beats_per_step)
            # Rows that must end: no new notes, no shifts; END as soon as the grammar lets.
            keep = keep & ~(late[:, None] & t.blocks_end)
            stop = late if stop is None else stop | late
        if self.voice_leading:
            keep = self._no_parallels(keep, allowed, state, x)
        if self.spacing_penalty < 0 or self.ranges_penalty < 0:
            leans = self._voice_leans(state, x)
            soft = leans if soft is None else soft + leans
        if stop is not None:
            end_now = (stop & allowed[:, END])[:, None]
            keep = x.where(end_now, t.end_only, keep)
        if keep is not allowed and (self.can_empty or left <= 3):
            keep = self._repair(keep, allowed, x)
        return keep, soft

    def _end_rule(
        self, keep: Any, state: MaskState, remaining: Any, sps: Any, x: Any
    ) -> tuple[Any, Any]:
        """``keep`` under the end rule (the module docstring), and the (B,) rows inside their
        last beat, which must end: a row ``left`` whole time steps from the last step its clock
        reaches is in its last beat when ``left < hold_steps``; END comes only there, and a
        shift may land there only when the row's latest NOTE_ON is ``hold_steps`` or more behind
        the landing."""
        t, H = x.tables, self.hold_steps
        left = x.floor(remaining / sps + 1e-6)  # (B,) whole steps to the last step
        last = left < H
        keep = keep & ~((~last)[:, None] & t.is_end)
        # A shift the rule refuses is shorter than a beat and lands in the last beat: only
        # rows less than two beats from the end have one (torch: no host sync to skip them).
        if x.numpy and not bool((left < 2 * H).any()):
            return keep, last
        since = x.f64(state.grammar.time) - x.of(state.onset)  # (B,) steps since the last onset
        land = left[:, None] - t.shift_steps  # (B, V) steps left after each shift
        short = t.is_shift & (land < H - 0.5) & (since[:, None] + t.shift_steps < H - 0.5)
        return keep & ~short, last

    def _no_parallels(self, keep: Any, allowed: Any, state: MaskState, x: Any) -> Any:
        """``keep`` without the NOTE_ONs that would move in a parallel fifth or octave with a
        note sounding below them (:func:`aurl.generation.voice_leading.refused`, against
        the last slice). On the host, row by row where a row may start a note; on a torch
        device (a GPU) the same rule dense over the batch (:meth:`_no_parallels_dense`), so
        no step waits for the host."""
        on, g = self.note_on_ids, state.grammar
        if not x.numpy and self.grammar.polyphony_cap <= DENSE_VOICES:
            return self._no_parallels_dense(keep, state)
        if x.numpy:
            last, sounding = x.of(state.last_slice), x.of(g.sounding).any(1)
            can = allowed[:, on].any(1)
        else:
            last, sounding = state.last_slice.cpu().numpy(), g.sounding.any(1).cpu().numpy()
            can = allowed[:, on].any(1).cpu().numpy()
        rows = np.flatnonzero(can & last.any(1)).tolist()
        if not rows:
            return keep
        bad = np.stack([self._parallels(last[r], sounding[r]) for r in rows])
        if x.numpy:
            keep = keep.copy() if keep is allowed else keep
            keep[rows, on] = keep[rows, on] & ~bad
            return keep
        import torch

        drop = torch.zeros_like(keep)
        drop[rows, on] = torch.as_tensor(bad, device=keep.device)
        return keep & ~drop

    def _no_parallels_dense(self, keep: Any, state: MaskState) -> Any:
        """:meth:`_no_parallels` in torch over the whole batch at once: every (lower voice,
        its reading, the candidate's reading, candidate) of
        :func:`aurl.generation.voice_leading.refused` as one (B, K, 1+K, 1+K, P) tensor, K the
        polyphony cap (the most notes a slice holds; :data:`DENSE_VOICES` at most). Equal to
        the host rule (tested on the CPU)."""
        import torch

        from aurl.generation.voice_leading import NEAR_STEP

        pitch = self._torch.tables.pitch_index  # (P,) pitch offsets: differences are semitones
        K, none = min(self.grammar.polyphony_cap, len(pitch)), -10_000
        last, now = state.last_slice, state.grammar.sounding.any(1)  # (B, P)

        def ascending(mask: Any) -> tuple[Any, Any]:  # (B, K) pitches, `none` past the last
            v = torch.where(mask, pitch, -none).sort(dim=1).values[:, :K]
            return torch.where(v < -none, v, none), v < -none

        prev, prev_ok = ascending(last)
        q, q_ok = ascending(now)
        n_prev = last.sum(1, keepdim=True)  # (B, 1)
        near = (n_prev != self.constraints.voices)[:, :, None]  # (B, 1, 1): not a full slice
        # the lower voices' readings (B, K, 1 + K): by rank, then each earlier note near it
        q_near = near & prev_ok[:, None, :] & ((q[:, :, None] - prev[:, None, :]).abs() <= NEAR_STEP)
        qf = torch.cat([prev[:, :, None], torch.where(q_near, prev[:, None, :], none)], dim=2)
        moved = q_ok[:, :, None] & (qf != none) & (qf != q[:, :, None])
        # the candidates' readings (B, 1 + K, P): the note of their rank, each earlier one near
        below = now.long().cumsum(1) - now.long()  # notes sounding under each pitch
        by_rank = torch.gather(prev, 1, below.clamp(max=K - 1))
        by_rank = torch.where(below < n_prev, by_rank, none)
        c_near = near & prev_ok[:, :, None] & ((pitch - prev[:, :, None]).abs() <= NEAR_STEP)
        cf = torch.cat([by_rank[:, None, :], torch.where(c_near, prev[:, :, None], none)], dim=1)
        Q, QF = q[:, :, None, None, None], qf[:, :, :, None, None]
        CF = cf[:, None, None, :, :]
        interval = (pitch - Q).abs() % 12
        bad = (
            moved[:, :, :, None, None] & (CF != none) & (pitch > Q) & (CF != pitch) & (CF != QF)
            & ((interval == 0) | (interval == 7)) & ((CF - QF).abs() % 12 == interval)
            & (torch.sign(pitch - CF) == torch.sign(Q - QF))
        )  # fmt: skip
        drop = torch.zeros_like(keep)
        drop[:, self.note_on_ids] = bad.flatten(1, 3).any(1)
        return keep & ~drop

    def _voice_leans(self, state: MaskState, x: Any) -> Any:
        """(B, V) the leans of voice writing (:class:`Constraints`): ``log(1 - spacing)`` on
        the NOTE_ONs more than an octave above the highest sounding note under them, with
        another under that one; ``log(1 - ranges)`` on those outside the range of the voice of
        their rank (how many notes sound under them). Vectorised over rows: running counts and
        maxima over the pitches, no host synchronisation."""
        t = x.tables
        sounding = x.of(state.grammar.sounding).any(1)  # (B, P)
        pitch = t.pitch_index
        # at a silent pitch, the notes sounding at or below it are those below it
        count = x.cumsum(sounding)
        bias = 0.0
        if self.spacing_penalty < 0:
            top = x.cummax(x.where(sounding, pitch, -100))  # the highest of them
            wide = ~sounding & (count >= 2) & (pitch - top > 12)
            bias = wide * self.spacing_penalty
        if self.ranges_penalty < 0:
            low, high = t.rank_ranges[:, 0], t.rank_ranges[:, 1]
            rank = x.where(count < len(low), count, len(low) - 1)
            out = ~sounding & ((pitch < low[rank]) | (pitch > high[rank]))
            bias = bias + out * self.ranges_penalty
        return x.note_on_bias(bias, self.note_on_ids)

    def _parallels(self, last: np.ndarray, sounding: np.ndarray) -> np.ndarray:
        """(P,) bool, the NOTE_ON pitches refused after the last slice ``last`` with
        ``sounding`` (both (P,) bool), remembered: a piece's chords come back, and the rows of a
        search share their past."""
        key = last.tobytes() + sounding.tobytes()
        bad = self._parallel_memo.get(key)
        if bad is None:
            from aurl.generation.voice_leading import refused

            low, n = int(self.pitches[0]), len(self.pitches)
            prev, now = (np.flatnonzero(last) + low).tolist(), (np.flatnonzero(sounding) + low).tolist()
            bad = np.zeros(n, dtype=bool)
            voices = self.constraints.voices
            bad[[p - low for p in refused(prev, now, low, low + n, voices=voices)]] = True
            if len(self._parallel_memo) >= PARALLEL_MEMO:
                self._parallel_memo.clear()
            self._parallel_memo[key] = bad
        return bad

    def _repair(self, keep: Any, allowed: Any, x: Any) -> Any:
        """``keep`` with dead VELOCITYs removed and empty rows refilled (see :meth:`constrain`):
        one look at every row (a single transfer), the rare fixes row by row."""
        on, vel = self.note_on_ids, self.velocity_ids
        if x.numpy:  # bytes searches: far cheaper than numpy reductions between model steps
            V, k, a = keep.shape[1], keep.tobytes(), allowed.tobytes()
            rows = range(0, len(k), V)
            looks = [(1 in k[r : r + V], 1 in k[r + on.start : r + on.stop],
                      1 in a[r + on.start : r + on.stop]) for r in rows]  # fmt: skip
        else:
            looks = zip(
                keep.any(-1).tolist(), keep[:, on].any(-1).tolist(), allowed[:, on].any(-1).tolist()
            )
        for row, (kept, kept_note, allowed_note) in enumerate(looks):
            if self.can_empty and allowed_note and not kept_note:
                # A VELOCITY must be followed by a NOTE_ON: where the grammar allows notes but
                # the constraints remove them all, a VELOCITY would lead nowhere. (Before the
                # first VELOCITY the grammar allows no NOTE_ON at all: nothing to judge.)
                keep[row, vel] = False
                kept = bool(keep[row].any())
            if not kept:  # left with nothing: what the grammar alone allows
                keep[row] = self._fallback(allowed[row : row + 1], x)[0]
        return keep

    def apply(self, logits: torch.Tensor, state: MaskState) -> torch.Tensor:
        """Mask (B, V) logits: grammar-forbidden ids get -inf, constraints remove ids or add
        their soft bias.

        After END the grammar allows only PAD. A row the constraints would leave empty falls
        back to what the grammar alone allows (END alone where it can end), so the output is
        always valid. On the CPU the masks are combined in numpy (a generation step pays for
        calls, not data, and numpy's are cheaper), on other devices in torch.
        """
        import torch

        allowed = self.grammar.allowed(state.grammar)  # (B, V) bool
        if allowed.device.type == "cpu" and logits.device.type == "cpu":
            keep, soft = self.constrain(state, allowed.numpy())
            x = logits.detach().numpy()
            out = np.where(keep, x if soft is None else x + soft, NEG_INF)
            return torch.from_numpy(out.astype(x.dtype, copy=False))
        keep, soft = self.constrain(state, allowed)
        return torch.where(keep, logits if soft is None else logits + soft, NEG_INF)

    def apply_numpy(self, logits: np.ndarray, state: MaskState) -> np.ndarray:
        """:meth:`apply` for numpy (B, V) logits and a numpy state (``device=None``)."""
        keep, soft = self.constrain(state, self.grammar.allowed(state.grammar))
        out = np.where(keep, logits if soft is None else logits + soft, NEG_INF)
        return out.astype(logits.dtype, copy=False)

    def _fallback(self, allowed: Any, x: Any) -> Any:
        """For rows the constraints left empty: END where the grammar allows it, else the
        grammar's ids that keep the static constraints, else anything the grammar allows."""
        keep, static_keep = allowed, x.tables.static_keep
        if static_keep is not None:
            kept = allowed & static_keep
            keep = x.where(kept.any(-1)[:, None], kept, allowed)
        return x.where(allowed[:, END : END + 1], x.tables.end_only, keep)


def _next_slice(last_slice: Any, fresh: Any, ids: Any, before: Any, t: Any, where: Any):
    """The voice-leading fields (:class:`MaskState`) after one more token ``ids`` (B,) per row;
    ``before`` is the grammar's state before it. A shift leaving a step where a note started
    makes the notes sounding there the last slice."""
    shift = t.is_shift[ids]
    leave = shift & fresh
    sounding = before.sounding.any(1)  # (B, P), any family
    return where(leave[:, None], sounding, last_slice), (fresh & ~shift) | t.is_note_on[ids]


def _slice_after(
    last_slice: np.ndarray, fresh: np.ndarray, kind: np.ndarray, sounding: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_next_slice` over a primer at once (numpy): ``kind`` (B, T) its tokens' kinds,
    ``sounding`` (B, T, P) the pitches sounding after each."""
    on, shift = kind == Kind.NOTE_ON, kind == Kind.TIME_SHIFT
    pos = np.arange(kind.shape[1])
    last_on = np.maximum.accumulate(np.where(on, pos, -1), axis=1)
    last_shift = np.maximum.accumulate(np.where(shift, pos, -1), axis=1)
    # after token j: a note has started since the last shift (before any shift: or before j)
    fresh_after = (last_on > last_shift) | ((last_shift < 0) & fresh[:, None])
    fresh_before = np.concatenate([fresh[:, None], fresh_after[:, :-1]], axis=1)
    leave = np.where(shift & fresh_before, pos, -1).max(1)  # the last shift leaving an onset
    rows = np.flatnonzero(leave >= 0)
    last_slice = last_slice.copy()
    last_slice[rows] = sounding[rows, leave[rows]]  # a shift changes no sounding note
    return last_slice, fresh_after[:, -1]


class _Backend:
    """The masker's tables and the few functions whose names differ, for numpy or torch."""

    def __init__(self, tables: Any, numpy: bool) -> None:
        self.tables, self.numpy = tables, numpy
        if numpy:
            self.where, self.floor = np.where, np.floor
        else:
            import torch

            self.where, self.floor = torch.where, torch.floor

    def cumsum(self, a: Any) -> Any:
        """Running count along the last axis of a (B, n) bool array."""
        if self.numpy:
            return np.cumsum(a, axis=1)
        return a.long().cumsum(1)

    def cummax(self, a: Any) -> Any:
        """Running maximum along the last axis of a (B, n) array."""
        if self.numpy:
            return np.maximum.accumulate(a, axis=1)
        import torch

        return torch.cummax(a, dim=1).values

    def note_on_bias(self, rows: Any, note_on: slice) -> Any:
        """(B, V) float32: ``rows`` (B, P) in the NOTE_ON block, zero elsewhere."""
        B, V = rows.shape[0], len(self.tables.shift_steps)
        if self.numpy:
            bias = np.zeros((B, V), np.float32)
        else:
            import torch

            bias = torch.zeros((B, V), dtype=torch.float32, device=rows.device)
        bias[:, note_on] = rows
        return bias

    def of(self, tensor: torch.Tensor) -> Any:
        """A state tensor in this backend (a numpy view on the CPU)."""
        if isinstance(tensor, np.ndarray):
            return tensor
        return tensor.numpy() if self.numpy else tensor

    def f64(self, tensor: Any) -> Any:
        """:meth:`of` as float64."""
        if isinstance(tensor, np.ndarray):
            return tensor.astype(np.float64, copy=False)
        return self.of(tensor.double())

    def array(self, rows: list, like: Any) -> Any:
        """(B, 1) float rows of Python numbers, next to ``like``."""
        if self.numpy:
            return np.array(rows, dtype=like.dtype)
        import torch

        return torch.tensor(rows, dtype=like.dtype, device=like.device)


def index_state(state: Any, index: torch.Tensor) -> Any:
    """Select rows ``index`` (a (B',) long tensor) of every batched tensor inside ``state``.

    Works on tensors, dataclasses, dicts, lists, tuples and plain objects, so beam search can
    reorder the grammar, the masker's counters and the model's cache without knowing their layout. Tensors
    are assumed to be batch-first; 0-d tensors and non-tensors are kept.
    """
    import torch

    def take(t: torch.Tensor) -> torch.Tensor:
        return t.index_select(0, index) if t.dim() > 0 else t

    return map_state(state, torch.Tensor, take, objects_but=(torch.nn.Module, np.ndarray))


def map_state(
    state: Any, leaf: type, take: Any, *, objects_but: tuple[type, ...] | None = None
) -> Any:
    """``state`` rebuilt with ``take(x)`` for every ``leaf`` instance ``x`` inside its
    dataclasses, dicts, lists and tuples (named ones too) and, unless ``objects_but`` is None,
    inside the attributes of plain objects other than those types; anything else is kept."""
    if isinstance(state, leaf):
        return take(state)

    def inner(value: Any) -> Any:
        return map_state(value, leaf, take, objects_but=objects_but)

    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        changes = {f.name: inner(getattr(state, f.name)) for f in dataclasses.fields(state)}
        return dataclasses.replace(state, **changes)
    if isinstance(state, dict):
        return {k: inner(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        items = [inner(v) for v in state]
        return type(state)(items) if not hasattr(state, "_fields") else type(state)(*items)
    if (
        objects_but is not None
        and hasattr(state, "__dict__")
        and not isinstance(state, objects_but)
    ):
        new = object.__new__(type(state))
        new.__dict__.update({k: inner(v) for k, v in vars(state).items()})
        return new
    return state
