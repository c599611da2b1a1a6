"""Musical constraints as composable, batch-vectorized logit masks.

Each constraint turns the generation state into an additive bias over the vocabulary: ``0``
leaves an id alone, ``-inf`` forbids it, a finite negative value down-weights it. Static
constraints (key, pitch range, tempo) are folded into one ``(V,)`` vector at construction, so
they cost one add per step; dynamic ones (instrument set, note density, length in tokens or
seconds) read a small :class:`Clock` of per-row counters that :meth:`LogitMasker.advance` keeps
up to date with a handful of gathers.

The grammar (:class:`aurl.data.grammar.Grammar`, the one grammar of Aurl) is always on and always
wins: a constraint can only remove ids the grammar allows. If the constraints leave a row with
nothing, that row may only end (END closes every note), so the output stays valid.

Every option is checked in :func:`build_constraints`; a bad or unsatisfiable combination raises
:class:`ConstraintError` before anything is generated.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from aurl.config import GenerationConfig
from aurl.data.vocab import END, PAD, Kind, Vocab
from aurl.errors import AurlError, ConstraintError

NEG_INF = float("-inf")
DENSITY_STRENGTH = 2.0  # bias per unit of log(target / actual density) on NOTE_ON
DENSITY_MAX_BIAS = 8.0


@dataclass
class Clock:
    """Per-row counters the dynamic constraints read. All tensors are (B,)."""

    length: torch.Tensor  # tokens generated so far (primer excluded)
    seconds: torch.Tensor  # elapsed time in seconds (primer included)
    beats: torch.Tensor  # elapsed time in beats
    notes: torch.Tensor  # NOTE_ONs so far (primer excluded)
    tempo_bin: torch.Tensor  # current tempo bin (long)
    family: torch.Tensor  # current instrument family (long); num_instruments: none yet
    finished: torch.Tensor  # bool: END emitted


@dataclass
class MaskState:
    """What the masker carries between steps: the grammar's state and the clock."""

    grammar: Any
    clock: Clock


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


class _Tables:
    """Vocabulary lookups as tensors on one device, shared by every constraint."""

    def __init__(self, vocab: Vocab, device: torch.device | str = "cpu") -> None:
        self.vocab = vocab
        kind = torch.as_tensor(vocab.kind.astype(np.int64), device=device)
        value = torch.as_tensor(vocab.value.astype(np.int64), device=device)
        self.kind, self.value = kind, value
        self.is_note_on = kind == Kind.NOTE_ON
        self.is_shift = kind == Kind.TIME_SHIFT
        self.is_tempo = kind == Kind.TEMPO
        self.is_instrument = kind == Kind.INSTRUMENT
        self.shift_steps = torch.where(self.is_shift, value, 0).double()  # (V,)
        # Seconds per step for each tempo bin (beat mode) or the fixed step (seconds mode).
        bins = np.arange(vocab.config.tempo_bins)
        sps = [vocab.seconds_per_step(float(vocab.bin_tempo[b])) for b in bins]
        self.seconds_per_step = torch.tensor(sps, dtype=torch.float64, device=device)
        c = vocab.config
        # Seconds mode decodes at 120 BPM, where a step is step_seconds * 2 beats.
        self.beats_per_step = (
            1.0 / c.steps_per_beat if c.time_unit == "beat" else c.step_seconds * 2
        )
        self.default_tempo_bin = int(vocab.tempo_bin(120.0))


# --------------------------------------------------------------------------------------------
# Constraints
# --------------------------------------------------------------------------------------------


def key_bias(vocab: Vocab, key: str, strictness: float) -> np.ndarray:
    """(V,) bias: out-of-scale NOTE_ONs get ``log(1 - strictness)`` (``-inf`` at strictness 1).

    Raises:
        ConstraintError: ``key`` is not a key name.
    """
    from aurl.analysis.keys import parse_key, scale_pitch_classes

    try:
        parsed = parse_key(key)
    except AurlError as e:
        raise ConstraintError(f"--key: {e}") from None
    in_scale = np.zeros(12, dtype=bool)
    in_scale[scale_pitch_classes(parsed)] = True
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
    """

    static: np.ndarray
    families: tuple[int, ...] = ()
    density: float = 0.0
    max_tokens: int = 1024
    seconds: float = 0.0


def build_constraints(vocab: Vocab, config: GenerationConfig) -> Constraints:
    """Check every constraint option of ``config`` and fold the static ones into one bias.

    Raises:
        ConstraintError: an unknown key, an empty or out-of-vocabulary range, or constraints
            that leave no NOTE_ON at all (e.g. a pitch range with no note of the key).
    """
    if config.max_tokens < 2:
        raise ConstraintError(f"max tokens {config.max_tokens}: give at least 2")
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
    )


# --------------------------------------------------------------------------------------------
# The masker: grammar + constraints
# --------------------------------------------------------------------------------------------


class LogitMasker:
    """Grammar and constraints applied together to next-token logits, vectorized over rows.

    Args:
        vocab: The model's vocabulary.
        grammar: The grammar state machine (``initial_state``, ``allowed``, ``advance``).
        constraints: From :func:`build_constraints`.
        device: Where the masks live (the model's device).
    """

    def __init__(
        self,
        vocab: Vocab,
        grammar: Any,
        constraints: Constraints,
        *,
        device: torch.device | str = "cpu",
    ) -> None:
        self.vocab, self.grammar, self.constraints = vocab, grammar, constraints
        self.device = torch.device(device)
        self.t = _Tables(vocab, self.device)
        self.static = torch.as_tensor(constraints.static, dtype=torch.float32, device=self.device)
        self.has_static = bool((constraints.static != 0).any())
        # family_ok[f]: NOTE_ON allowed in family f; the last entry stands for "no INSTRUMENT
        # yet", which is fine only without an instrument constraint.
        n_fam = vocab.config.num_instruments
        self.family_ok = torch.ones(n_fam + 1, dtype=torch.bool)
        if constraints.families:
            self.family_ok[:] = False
            self.family_ok[list(constraints.families)] = True
        self.family_ok = self.family_ok.to(self.device)
        self.no_family = n_fam
        self.end_only = torch.full((vocab.size,), NEG_INF, device=self.device)
        self.end_only[END] = 0.0
        self.pad_only = torch.full((vocab.size,), NEG_INF, device=self.device)
        self.pad_only[PAD] = 0.0

    # -- state ----------------------------------------------------------------------------------

    def initial_state(self, batch: int) -> MaskState:
        """State before any token (the first token must be START)."""
        d = self.device
        clock = Clock(
            length=torch.zeros(batch, dtype=torch.long, device=d),
            seconds=torch.zeros(batch, dtype=torch.float64, device=d),
            beats=torch.zeros(batch, dtype=torch.float64, device=d),
            notes=torch.zeros(batch, dtype=torch.long, device=d),
            tempo_bin=torch.full((batch,), self.t.default_tempo_bin, dtype=torch.long, device=d),
            family=torch.full((batch,), self.no_family, dtype=torch.long, device=d),
            finished=torch.zeros(batch, dtype=torch.bool, device=d),
        )
        return MaskState(self.grammar.initial_state(batch, d), clock)

    def prime(self, state: MaskState, ids: torch.Tensor) -> MaskState:
        """Advance over a primer (B, P) without counting it against the length limits."""
        for t in range(ids.shape[1]):
            state = self.advance(state, ids[:, t], count=False)
        return state

    def advance(self, state: MaskState, ids: torch.Tensor, *, count: bool = True) -> MaskState:
        """Advance grammar and clock by one token per row; ``ids`` is (B,)."""
        new_grammar = self.grammar.advance(state.grammar, ids)
        grammar = state.grammar if new_grammar is None else new_grammar  # in place or returned
        c, t = state.clock, self.t
        kind, value = t.kind[ids], t.value[ids]
        steps = t.shift_steps[ids]  # (B,) 0 for non-shifts
        is_tempo = kind == Kind.TEMPO
        is_instrument = kind == Kind.INSTRUMENT
        live = ~c.finished
        clock = Clock(
            length=c.length + live.long() if count else c.length,
            seconds=c.seconds + steps * t.seconds_per_step[c.tempo_bin],
            beats=c.beats + steps * t.beats_per_step,
            notes=c.notes + ((kind == Kind.NOTE_ON) & live).long() if count else c.notes,
            tempo_bin=torch.where(is_tempo, value, c.tempo_bin),
            family=torch.where(is_instrument, value, c.family),
            finished=c.finished | (ids == END),
        )
        return MaskState(grammar, clock)

    # -- masking ----------------------------------------------------------------------------

    def bias(self, state: MaskState) -> torch.Tensor:
        """(B, V) or (V,) additive bias of the constraints alone (grammar excluded)."""
        cons, t, c = self.constraints, self.t, state.clock
        bias = self.static
        if cons.families:
            wrong_family = ~self.family_ok[c.family]  # (B,)
            bias = bias + torch.where(wrong_family[:, None] & t.is_note_on, NEG_INF, 0.0)
        if cons.density > 0:
            actual = c.notes.double() / c.beats.clamp(min=1.0)
            # log(target/actual), clamped: pushes NOTE_ON up when too sparse, down when too dense
            push = torch.log((cons.density + 1e-3) / (actual + 1e-3)) * DENSITY_STRENGTH
            push = push.clamp(-DENSITY_MAX_BIAS, DENSITY_MAX_BIAS).float()
            bias = bias + torch.where(t.is_note_on, push[:, None], 0.0)
        if cons.seconds > 0:
            sps = t.seconds_per_step[c.tempo_bin]  # (B,)
            remaining = cons.seconds - c.seconds  # (B,)
            too_long = t.shift_steps * sps[:, None] > remaining[:, None] + 1e-9  # (B, V)
            bias = bias + torch.where(t.is_shift & too_long, NEG_INF, 0.0)
            # No time left for a sixteenth note: stop starting notes; no step left: end.
            sixteenth = sps * (0.25 / t.beats_per_step)
            no_notes = remaining < sixteenth
            bias = bias + torch.where(no_notes[:, None] & t.is_note_on, NEG_INF, 0.0)
            out_of_time = remaining < sps
            bias = torch.where(out_of_time[:, None], self.end_only, bias)
        # The last token must be END; keep the one before it free of NOTE_ONs so that no note
        # is born with zero length.
        left = cons.max_tokens - c.length  # (B,)
        bias = bias + torch.where((left <= 2)[:, None] & t.is_note_on, NEG_INF, 0.0)
        bias = torch.where((left <= 1)[:, None], self.end_only, bias)
        return bias

    def apply(self, logits: torch.Tensor, state: MaskState) -> torch.Tensor:
        """Mask (B, V) logits: grammar-forbidden ids and constraint-forbidden ids get -inf.

        Finished rows may only continue with PAD. A row the constraints would leave empty may
        only end (or, if the grammar forbids ending there, do anything the grammar allows).
        """
        allowed = self.grammar.allowed(state.grammar)  # (B, V) bool
        biased = logits + self.bias(state)
        out = torch.where(allowed, biased, NEG_INF)
        out = torch.where(state.clock.finished[:, None], self.pad_only, out)
        empty = torch.isneginf(out).all(dim=-1)  # (B,)
        if bool(empty.any()):
            fallback = torch.where(allowed, logits, NEG_INF)
            can_end = allowed[:, END]
            fallback = torch.where(can_end[:, None], self.end_only + logits, fallback)
            out = torch.where(empty[:, None], fallback, out)
        return out


def index_state(state: Any, index: torch.Tensor) -> Any:
    """Select rows ``index`` (a (B',) long tensor) of every batched tensor inside ``state``.

    Works on tensors, dataclasses, dicts, lists, tuples and plain objects, so beam search can
    reorder the grammar, the clock and the model's cache without knowing their layout. Tensors
    are assumed to be batch-first; 0-d tensors and non-tensors are kept.
    """
    if isinstance(state, torch.Tensor):
        return state.index_select(0, index) if state.dim() > 0 else state
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        changes = {
            f.name: index_state(getattr(state, f.name), index) for f in dataclasses.fields(state)
        }
        return dataclasses.replace(state, **changes)
    if isinstance(state, dict):
        return {k: index_state(v, index) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        items = [index_state(v, index) for v in state]
        return type(state)(items) if not hasattr(state, "_fields") else type(state)(*items)
    if hasattr(state, "__dict__") and not isinstance(state, (torch.nn.Module, np.ndarray)):
        new = object.__new__(type(state))
        new.__dict__.update({k: index_state(v, index) for k, v in vars(state).items()})
        return new
    return state
