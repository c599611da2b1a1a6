"""The grammar state machine: which ids may come next (torch or numpy, batched).

One implementation serves generation (a logit mask, stepped token by token with
:meth:`Grammar.advance`, O(1) per token), training (:meth:`Grammar.sequence_masks`, the same
masks for a whole batch of sequences at once, vectorized over time) and validity checks
(:meth:`Grammar.count_violations`); for speed, the token-by-token calls also have a
row-by-row restatement of the rules for small batches, held equal to the rest by the tests (see
:class:`Grammar`). The rules follow the tokenizer's canonical order exactly
(:mod:`aurl.data.tokenizer`), so every encoded file has zero violations:

- START first, then a TEMPO; TEMPO only right after START or a TIME_SHIFT, and never the bin
  already in force.
- INSTRUMENT f: not right after another INSTRUMENT, f differs from the current family, and once
  the current family has had events at this step, f must be higher (ascending families).
- Within one family at one step: at most one SUSTAIN change first (ON only while off, OFF only
  while on), then NOTE_OFFs of sounding pitches in ascending order, then NOTE_ONs of silent pitches
  in ascending order, while fewer than ``polyphony_cap`` notes sound (all families together).
  NOTE_ON needs a velocity: one VELOCITY must have come before (the first note's); a VELOCITY
  must differ from the last one and is followed by a NOTE_ON only.
- TIME_SHIFT: not right after INSTRUMENT, and after a shift shorter than the maximum only an
  event (a gap is written full shifts first).
- END: not right after START, INSTRUMENT, VELOCITY or TIME_SHIFT; it closes every sounding note.
  After END only PAD. UNK is never allowed.

The state is a :class:`GrammarState` of small tensors (torch; or numpy arrays from
:meth:`Grammar.initial_numpy_state`, which the incremental calls keep in numpy, so a generation
loop runs without torch: this module imports torch only where a torch path runs). Every token, valid or not, updates it by a
fixed rule ("the last token of this kind wins"), which is what lets :meth:`sequence_masks`
compute every position at once with cumulative maxima and still equal stepping the machine.
The state also carries what a model may use as features: the sounding pitches (``sounding``,
``(B, families, pitches)``), the time in steps, the current family and the polyphony.
:meth:`Grammar.scan` computes it all for a batch once (a :class:`SequenceScan`, which the masks,
the features and the final state read); off the CPU it synchronises nothing with the host
(:attr:`Grammar.dense`), and neither does :meth:`Grammar.advance` on torch tensors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from aurl.data.vocab import END, PAD, START, UNK, Kind, Vocab

if TYPE_CHECKING:
    import torch

_NONE = -1  # last_kind before any token
# the kinds as plain ints: an IntEnum member costs a conversion in every comparison
_START, _END, _UNK = int(Kind.START), int(Kind.END), int(Kind.UNK)
_ON, _OFF, _SHIFT, _VEL = (
    int(k) for k in (Kind.NOTE_ON, Kind.NOTE_OFF, Kind.TIME_SHIFT, Kind.VELOCITY)
)
_SUS_ON, _SUS_OFF, _TEMPO, _INSTR = (
    int(k) for k in (Kind.SUSTAIN_ON, Kind.SUSTAIN_OFF, Kind.TEMPO, Kind.INSTRUMENT)
)


class _TorchOps:
    """The few array functions whose names differ between torch and numpy (torch side)."""

    @staticmethod
    def empty(shape: tuple, like):
        import torch

        return torch.empty(shape, dtype=torch.bool, device=like.device)

    @staticmethod
    def copy(x):
        return x.clone()

    @staticmethod
    def clamp_max(x, high: int):
        return x.clamp(max=high)


class _NumpyOps:
    """The same functions for numpy (the incremental path on CPU)."""

    @staticmethod
    def empty(shape: tuple, like):
        return np.empty(shape, dtype=bool)

    @staticmethod
    def copy(x):
        return x.copy()

    @staticmethod
    def clamp_max(x, high: int):
        return np.minimum(x, high)


class _Consts:
    """Lookup tables and aranges of one grammar on one backend and device."""

    @staticmethod
    def phase_table() -> np.ndarray:
        """The phase after each kind (read only where the kind sets one)."""
        ph = np.zeros(len(Kind), np.int64)
        ph[[Kind.SUSTAIN_ON, Kind.SUSTAIN_OFF]] = 1
        ph[Kind.NOTE_OFF], ph[Kind.NOTE_ON] = 2, 3
        return ph

    def __init__(self, grammar: Grammar, as_array) -> None:
        vocab, c = grammar.vocab, grammar.vocab.config
        self.kind = as_array(vocab.kind.astype(np.int64))
        self.value = as_array(vocab.value.astype(np.int64))
        self.phase_of = as_array(self.phase_table())
        self.pitches = as_array(np.arange(c.pitch_min, c.pitch_max + 1))
        self.velocities = as_array(np.arange(c.velocity_bins))
        self.tempos = as_array(np.arange(c.tempo_bins))
        self.families = as_array(np.arange(grammar.F))


@dataclass
class GrammarState:
    """The machine's state for a batch of B sequences (all tensors on one device)."""

    sounding: torch.Tensor  # (B, F, P) bool: sounding pitches per family
    sustain: torch.Tensor  # (B, F) bool: pedal down per family
    count: torch.Tensor  # (B,) long: notes sounding, all families
    family: torch.Tensor  # (B,) long: current family, F = none yet
    last_velocity: torch.Tensor  # (B,) long: last VELOCITY bin, -1 = none yet
    tempo: torch.Tensor  # (B,) long: tempo bin in force, -1 = none yet
    last_kind: torch.Tensor  # (B,) long: Kind of the last token, -1 = no token yet
    last_value: torch.Tensor  # (B,) long: its value (steps, pitch, bin, family)
    phase: torch.Tensor  # (B,) long: 0 segment start, 1 after sustain, 2 offs, 3 ons
    last_pitch: torch.Tensor  # (B,) long: last NOTE pitch in this family segment, -1 none
    family_events: torch.Tensor  # (B,) bool: family events since the last TIME_SHIFT/START
    started: torch.Tensor  # (B,) bool
    ended: torch.Tensor  # (B,) bool
    time: torch.Tensor  # (B,) long: steps since START

    def clone(self) -> GrammarState:
        return GrammarState(
            **{f.name: getattr(self, f.name).clone() for f in dataclasses.fields(self)}
        )


@dataclass
class SequenceFeatures:
    """Per-position grammar state after each token of a (B, T) batch."""

    sounding: torch.Tensor  # (B, T, P) bool: pitches sounding in any family
    polyphony: torch.Tensor  # (B, T) long
    family: torch.Tensor  # (B, T) long, F = none yet
    time: torch.Tensor  # (B, T) long: steps since START


@dataclass
class SequenceScan:
    """Everything one pass over a (B, T) batch computes (:meth:`Grammar.scan`): the masks
    (:meth:`Grammar.masks_of`), the model's features (:meth:`features`) and the state after
    the last token (:meth:`state_after`) all read it, so a training batch needs one scan."""

    fields: dict[str, torch.Tensor]  # GrammarState's scalar fields after each token, (B, T)
    cur_sounding: torch.Tensor  # (B, T, P) bool: sounding pitches of the current family
    cur_sustain: torch.Tensor  # (B, T) bool: the current family's pedal
    any_sounding: torch.Tensor  # (B, T, P) bool: sounding in any family
    final_sounding: torch.Tensor  # (B, F, P) bool: after the last token
    final_sustain: torch.Tensor  # (B, F) bool

    def features(self) -> SequenceFeatures:
        """What a model may use as input features, after each token."""
        f = self.fields
        return SequenceFeatures(
            sounding=self.any_sounding, polyphony=f["count"], family=f["family"], time=f["time"]
        )

    def state_after(self) -> GrammarState:
        """The state after the last token."""
        last = {name: t[:, -1] for name, t in self.fields.items()}
        return GrammarState(sounding=self.final_sounding, sustain=self.final_sustain, **last)


class Grammar:
    """The grammar of a :class:`Vocab` (see the module docstring for the rules).

    Speed of the incremental path (:meth:`advance`, :meth:`allowed`, one call per generated
    token): at the batch sizes of generation a call costs more than the work it does, so on the
    CPU it runs on numpy views of the state's tensors (numpy's calls are 2-4x cheaper than
    torch's), and up to ``row_batch_max`` rows it goes row by row with Python scalars, a handful
    of calls per row (batch 1: ``allowed`` 215 -> 12 us, ``advance`` 281 -> 30 us). The
    vectorized rules are written once for torch and numpy (:meth:`_mask`, :meth:`_advance`); the
    row-by-row ones restate them as plain branches, and the tests hold all three paths equal on
    real, corrupted and random sequences. ``numpy_on_cpu = False`` keeps everything in torch.
    The state stays torch tensors on every path.

    Args:
        vocab: the vocabulary.
        polyphony_cap: most notes sounding at once (all families together).
    """

    numpy_on_cpu: bool = True
    row_batch_max: int = 8  # allowed() and advance() go row by row up to this many rows (CPU)
    # the whole-sequence scan's sounding notes: True one tensor over every (family, pitch)
    # slot, no host synchronisation (a GPU's path); False one pass per family that plays
    # (fewer operations where few families play: the CPU's); None: dense off the CPU
    dense: bool | None = None

    def __init__(self, vocab: Vocab, polyphony_cap: int = 16) -> None:
        self.vocab = vocab
        self.polyphony_cap = int(polyphony_cap)
        c = vocab.config
        self.F = c.num_instruments
        self.P = vocab.n_pitches
        self.max_shift = c.max_shift_steps
        self._consts: dict[object, _Consts] = {}
        self._ones = b"\x01" * vocab.size  # runs of True for the row path's bytearray slices
        # first id of each kind (the vocabulary lays the kinds out in blocks, in this order)
        kinds = vocab.kind.astype(np.int64)
        self._offset = {int(k): int(np.argmax(kinds == k)) for k in Kind}
        self._kind_list, self._value_list = kinds.tolist(), vocab.value.astype(np.int64).tolist()
        self._phase_list = _Consts.phase_table().tolist()
        if not np.all(np.diff(kinds) >= 0):
            raise ValueError("the grammar needs the vocabulary's kinds in blocks, in Kind order")

    def _tables(self, like) -> tuple[_Consts, type]:
        """The constants and backend functions for arrays like ``like`` (numpy or torch)."""
        if isinstance(like, np.ndarray):
            if "numpy" not in self._consts:
                self._consts["numpy"] = _Consts(self, np.asarray)
            return self._consts["numpy"], _NumpyOps
        import torch

        dev = like.device
        if dev not in self._consts:
            self._consts[dev] = _Consts(self, lambda a: torch.as_tensor(a, device=dev))
        return self._consts[dev], _TorchOps

    def _lookup(self, ids):
        """Kind and value of each id (numpy or torch); ids outside the vocabulary read as UNK."""
        t, _ = self._tables(ids)
        inside = (ids >= 0) & (ids < self.vocab.size)
        safe = ids * inside  # 0 where outside
        # arithmetic, not a masked assignment: on a GPU that would wait for the device
        kind = t.kind[safe] * inside + _UNK * ~inside
        value = t.value[safe] * inside
        return kind, value

    def _numpy(self, state: GrammarState) -> bool:
        if isinstance(state.family, np.ndarray):
            return True
        return self.numpy_on_cpu and state.family.device.type == "cpu"

    # -------------------------------------------------------------------------------------------
    # Incremental machine
    # -------------------------------------------------------------------------------------------

    def initial_state(self, batch: int, device: torch.device | str = "cpu") -> GrammarState:
        """The state before any token (only START allowed)."""
        import torch

        s = self.initial_numpy_state(batch)
        return GrammarState(**{f: torch.as_tensor(getattr(s, f), device=device) for f in _FIELDS})

    def initial_numpy_state(self, batch: int) -> GrammarState:
        """:meth:`initial_state` as numpy arrays: :meth:`advance` and :meth:`allowed` then keep
        it in numpy (no torch)."""
        z = np.zeros(batch, dtype=np.int64)
        return GrammarState(
            sounding=np.zeros((batch, self.F, self.P), dtype=bool),
            sustain=np.zeros((batch, self.F), dtype=bool),
            count=z.copy(), family=z + self.F, last_velocity=z - 1, tempo=z - 1,
            last_kind=z + _NONE, last_value=z.copy(), phase=z.copy(), last_pitch=z - 1,
            family_events=z.astype(bool), started=z.astype(bool), ended=z.astype(bool),
            time=z.copy(),
        )  # fmt: skip

    def advance(self, state: GrammarState, ids: torch.Tensor) -> GrammarState:
        """The state after one more token per sequence; ``ids`` (B,). Returns a new state
        (fields the token leaves alone are shared with ``state``; nothing is changed in place)."""
        if not self._numpy(state):
            fields = {name: getattr(state, name) for name in _FIELDS}
            return GrammarState(**self._advance(fields, ids.reshape(-1).long()))
        fields = _views(state)
        if isinstance(ids, np.ndarray):
            ids_np = ids.reshape(-1).astype(np.int64, copy=False)
        else:
            ids_np = ids.reshape(-1).cpu().numpy().astype(np.int64)
        if len(state.family) <= self.row_batch_max:
            new = self._advance_rows(fields, ids_np.tolist())
        else:
            new = self._advance(fields, ids_np)
        if isinstance(state.family, np.ndarray):  # a numpy state stays numpy
            return GrammarState(**new)
        import torch

        out = GrammarState(
            **{
                name: getattr(state, name) if a is fields[name] else torch.from_numpy(a)
                for name, a in new.items()
            }
        )
        out.__dict__[_VIEWS] = new  # the new tensors' memory, for the next call
        return out

    def _advance_rows(self, s: dict[str, np.ndarray], ids: list[int]) -> dict[str, np.ndarray]:
        """:meth:`_advance` row by row with Python scalars (the rules once more, as plain
        branches; cheaper at a handful of rows, and held equal to it by the tests)."""
        new = {name: a if name in ("sounding", "sustain") else a.copy() for name, a in s.items()}
        kinds, values, V = self._kind_list, self._value_list, self.vocab.size
        for b, i in enumerate(ids):
            k, v = (kinds[i], values[i]) if 0 <= i < V else (_UNK, 0)
            fam = int(new["family"][b])
            if k in (_ON, _OFF) or k in (_SUS_ON, _SUS_OFF):
                if fam < self.F and k in (_ON, _OFF):
                    if new["sounding"] is s["sounding"]:
                        new["sounding"] = s["sounding"].copy()
                    p = min(max(v - self.vocab.config.pitch_min, 0), self.P - 1)
                    new["sounding"][b, fam, p] = k == _ON
                    new["count"][b] = new["sounding"][b].sum()
                elif fam < self.F:
                    if new["sustain"] is s["sustain"]:
                        new["sustain"] = s["sustain"].copy()
                    new["sustain"][b, fam] = k == _SUS_ON
                new["phase"][b] = self._phase_list[k]
                if k in (_ON, _OFF):
                    new["last_pitch"][b] = v
                new["family_events"][b] = True
            elif k == _INSTR:
                new["family"][b] = v
                new["phase"][b], new["last_pitch"][b] = 0, -1
            elif k in (_SHIFT, _START):
                new["phase"][b], new["last_pitch"][b] = 0, -1
                new["family_events"][b] = False
                if k == _SHIFT:
                    new["time"][b] += v
                else:
                    new["started"][b] = True
            elif k == _VEL:
                new["last_velocity"][b] = v
                new["family_events"][b] = True
            elif k == _TEMPO:
                new["tempo"][b] = v
            elif k == _END:
                new["ended"][b] = True
            new["last_kind"][b], new["last_value"][b] = k, v
        return new

    def _advance(self, s: dict, ids) -> dict:
        """:meth:`advance` on a dict of arrays, numpy or torch alike."""
        t, ops = self._tables(ids)
        k, v = self._lookup(ids)
        s = dict(s)
        has_fam = s["family"] < self.F
        fam = ops.clamp_max(s["family"], self.F - 1)
        is_on, is_off = k == _ON, k == _OFF
        notes = is_on | is_off
        sus_any = (k == _SUS_ON) | (k == _SUS_OFF)
        note = notes & has_fam
        sus = sus_any & has_fam
        if not isinstance(ids, np.ndarray):  # torch: no host sync (a CUDA graph captures it)
            s.update(self._set_slots(s, fam, (v - self.vocab.config.pitch_min).clamp(0, self.P - 1),
                                     note, is_on, sus, k == _SUS_ON))  # fmt: skip
        elif note.any():
            rows = note.nonzero()[0]
            p = (v[rows] - self.vocab.config.pitch_min).clip(0, self.P - 1)
            s["sounding"] = ops.copy(s["sounding"])
            s["sounding"][rows, fam[rows], p] = is_on[rows]
            s["count"] = s["sounding"].reshape(len(ids), -1).sum(1)
        if isinstance(ids, np.ndarray) and sus.any():
            rows = sus.nonzero()[0] if isinstance(sus, np.ndarray) else sus.nonzero()[:, 0]
            s["sustain"] = ops.copy(s["sustain"])
            s["sustain"][rows, fam[rows]] = k[rows] == _SUS_ON
        if isinstance(ids, np.ndarray):
            where = np.where
        else:
            import torch

            where = torch.where
        is_shift, is_start = k == _SHIFT, k == _START
        s["family"] = where(k == _INSTR, v, s["family"])
        s["last_velocity"] = where(k == _VEL, v, s["last_velocity"])
        s["tempo"] = where(k == _TEMPO, v, s["tempo"])
        s["time"] = s["time"] + v * is_shift
        step_start = is_shift | is_start
        reset = step_start | (k == _INSTR)
        s["phase"] = where(reset | notes | sus_any, t.phase_of[k], s["phase"])
        s["last_pitch"] = where(notes, v, where(reset, -1, s["last_pitch"]))
        fam_ev = notes | sus_any | (k == _VEL)
        s["family_events"] = (s["family_events"] | fam_ev) & ~step_start  # disjoint kinds
        s["started"] = s["started"] | is_start
        s["ended"] = s["ended"] | (k == _END)
        s["last_kind"], s["last_value"] = k, v
        return s

    def _set_slots(self, s: dict, fam, p, note, is_on, sus, sus_on) -> dict:
        """Sounding notes, count and pedals after one token per row (torch), with ``where``
        over the (B, F, P) slots instead of indexing the rows that changed: fixed shapes, no
        host synchronisation."""
        import torch

        fams = torch.arange(self.F, device=fam.device)
        pitches = torch.arange(self.P, device=fam.device)
        at_fam = fams[None, :] == fam[:, None]  # (B, F)
        slot = at_fam[:, :, None] & (pitches[None, None, :] == p[:, None, None])  # (B, F, P)
        slot = slot & note[:, None, None]
        sounding = torch.where(slot, is_on[:, None, None], s["sounding"])
        count = torch.where(note, sounding.flatten(1).sum(1), s["count"])
        sustain = torch.where(at_fam & sus[:, None], sus_on[:, None], s["sustain"])
        return {"sounding": sounding, "count": count, "sustain": sustain}

    def allowed(self, state: GrammarState) -> torch.Tensor:
        """(B, V) bool: the ids allowed next in each sequence."""
        if not self._numpy(state):
            return self._allowed(state)
        views = _views(state)
        if len(state.family) <= self.row_batch_max:
            mask = self._allowed_rows(views)
        else:
            mask = self._allowed(_Fields(views))
        if isinstance(state.family, np.ndarray):  # a numpy state gets a numpy mask
            return mask
        import torch

        return torch.from_numpy(mask)

    def _allowed_rows(self, v: dict[str, np.ndarray]) -> np.ndarray:
        """:meth:`allowed` row by row with Python scalars: the rules of :meth:`_mask` once more,
        as plain branches, written into a ``bytearray`` with built-in slice assignments. At a
        handful of rows this is several times cheaper than any vectorized form (a generation
        step pays for calls, not for data); the tests hold the paths equal on real, corrupted
        and random sequences."""
        o, P, F, V, pmin = (
            self._offset,
            self.P,
            self.F,
            self.vocab.size,
            self.vocab.config.pitch_min,
        )
        n_tempo, n_vel = self.vocab.config.tempo_bins, self.vocab.config.velocity_bins
        B = len(v["family"])
        out = bytearray(B * V)  # 0/1 bytes: numpy reads them as bool
        scalars = zip(*(v[name].tolist() for name in _ROW_FIELDS))
        for b, (lk, started, ended, fam, count, phase, lp, lv, tempo, fe, last_value) in enumerate(
            scalars
        ):
            r = b * V  # the row's first byte
            out[r + START], out[r + PAD] = lk == _NONE, ended
            if not started or ended:
                continue
            if lk in (_START, _SHIFT):
                out[r + o[_TEMPO] : r + o[_TEMPO] + n_tempo] = self._ones[:n_tempo]
                if tempo >= 0:
                    out[r + o[_TEMPO] + tempo] = 0
            if lk == _START:  # nothing else right after START
                continue
            pending = lk == _VEL
            if not pending and lk != _INSTR:
                if not (lk == _SHIFT and last_value < self.max_shift):
                    out[r + o[_SHIFT] : r + o[_SHIFT] + self.max_shift] = self._ones[
                        : self.max_shift
                    ]
                out[r + END] = lk != _SHIFT
                # another family: ascending once this one has had events at this step
                i = r + o[_INSTR]
                if fe:
                    out[i + fam + 1 : i + F] = self._ones[: max(F - fam - 1, 0)]
                else:
                    out[i : i + F] = self._ones[:F]
                    if fam < F:
                        out[i + fam] = 0
            if fam >= F:  # no family yet: no notes, velocities or pedal
                continue
            cur = v["sounding"][b, fam].tobytes()  # (P,) 0/1: sounding pitches of this family
            can_on = False
            if count < self.polyphony_cap:
                first = 0 if phase < 3 else min(max(lp - pmin + 1, 0), P)  # ascending NOTE_ONs
                silent = cur[first:].translate(_FLIP)
                can_on = 1 in silent
                if lv >= 0 or pending:
                    out[r + o[_ON] + first : r + o[_ON] + P] = silent
            if pending:
                continue
            if phase < 3:  # NOTE_OFFs before NOTE_ONs, ascending
                first = 0 if phase < 2 else min(max(lp - pmin + 1, 0), P)
                out[r + o[_OFF] + first : r + o[_OFF] + P] = cur[first:]
            if can_on:
                out[r + o[_VEL] : r + o[_VEL] + n_vel] = self._ones[:n_vel]
                if lv >= 0:
                    out[r + o[_VEL] + lv] = 0
            if phase == 0:
                pedal = bool(v["sustain"][b, fam])
                out[r + o[_SUS_ON]], out[r + o[_SUS_OFF]] = not pedal, pedal
        return np.frombuffer(out, dtype=bool).reshape(B, V)

    def _allowed(self, s):
        _, ops = self._tables(s.family)
        has_fam = s.family < self.F
        fam = ops.clamp_max(s.family, self.F - 1)
        n = len(fam)
        if isinstance(fam, np.ndarray):
            rows = np.arange(n)
        else:
            import torch

            rows = torch.arange(n, device=fam.device)
        cur_sounding = s.sounding[rows, fam] & has_fam[:, None]
        cur_sustain = s.sustain[rows, fam] & has_fam
        return self._mask(s, cur_sounding, cur_sustain)

    # -------------------------------------------------------------------------------------------
    # The rules: one function for both the incremental and the whole-sequence path
    # -------------------------------------------------------------------------------------------

    def _mask(self, s, cur_sounding, cur_sustain):
        """(..., V) bool from state fields of leading shape (...) (B or B, T), numpy or torch."""
        t, ops = self._tables(s.last_kind)
        lk = s.last_kind
        lead = tuple(lk.shape)
        none_yet = lk == _NONE
        general = s.started & ~s.ended & (lk != _START)
        pending = lk == _VEL
        free = general & (s.family < self.F)
        no_pending = ~pending
        phase, last_pitch = s.phase[..., None], s.last_pitch[..., None]

        above = (phase < 3) | (t.pitches > last_pitch)  # (..., P)
        can_on = (free & (s.count < self.polyphony_cap))[..., None] & ~cur_sounding & above
        note_on = can_on & ((s.last_velocity >= 0) | pending)[..., None]
        off_order = (phase < 2) | ((phase == 2) & (t.pitches > last_pitch))
        note_off = (free & no_pending)[..., None] & cur_sounding & off_order

        free_now = free & no_pending
        velocity = (free_now & can_on.any(-1))[..., None] & (
            t.velocities != s.last_velocity[..., None]
        )
        sus_ok = free_now & (s.phase == 0)

        not_instr = lk != _INSTR
        family = s.family[..., None]
        instrument = (general & no_pending & not_instr)[..., None] & (t.families != family)
        instrument = instrument & (~s.family_events[..., None] | (t.families > family))

        short_shift = (lk == _SHIFT) & (s.last_value < self.max_shift)
        shift_ok = general & no_pending & not_instr & ~short_shift
        tempo_ok = s.started & ~s.ended & ((lk == _START) | (lk == _SHIFT))
        tempo = tempo_ok[..., None] & (t.tempos != s.tempo[..., None])
        end_ok = general & no_pending & not_instr & (lk != _SHIFT)

        out = ops.empty((*lead, self.vocab.size), like=lk)
        o = self._offset
        out[..., START], out[..., END], out[..., PAD], out[..., UNK] = (
            none_yet,
            end_ok,
            s.ended,
            False,
        )
        out[..., o[_ON] : o[_ON] + self.P] = note_on
        out[..., o[_OFF] : o[_OFF] + self.P] = note_off
        out[..., o[_SHIFT] : o[_SHIFT] + self.max_shift] = shift_ok[..., None]
        out[..., o[_VEL] : o[_VEL] + len(t.velocities)] = velocity
        out[..., o[_SUS_ON]] = sus_ok & ~cur_sustain
        out[..., o[_SUS_OFF]] = sus_ok & cur_sustain
        out[..., o[_TEMPO] : o[_TEMPO] + len(t.tempos)] = tempo
        out[..., o[_INSTR] : o[_INSTR] + self.F] = instrument
        return out

    # -------------------------------------------------------------------------------------------
    # Whole sequences at once
    # -------------------------------------------------------------------------------------------

    def scan(self, ids: torch.Tensor, state: GrammarState | None = None) -> SequenceScan:
        """The state after every position of ``ids`` (B, T), vectorized over T (and, with
        :attr:`dense`, free of host synchronisation). ``state``: where the sequences start
        (default: the initial state; for a window cut from a longer piece, the state after
        its prefix)."""
        import torch

        B, T = ids.shape
        dev = ids.device
        s0 = state if state is not None else self.initial_state(B, dev)
        k, v = self._lookup(ids.long())
        pos = torch.arange(T, device=dev).expand(B, T)

        def last(mask: torch.Tensor, values: torch.Tensor, default: torch.Tensor) -> torch.Tensor:
            idx = torch.where(mask, pos, -1).cummax(dim=1).values
            got = values.gather(1, idx.clamp(min=0))
            return torch.where(idx >= 0, got, default[:, None].to(values.dtype))

        is_on, is_off = k == _ON, k == _OFF
        notes = is_on | is_off
        sus_any = (k == _SUS_ON) | (k == _SUS_OFF)
        reset = (k == _INSTR) | (k == _SHIFT) | (k == _START)
        step_start = (k == _SHIFT) | (k == _START)
        family = last(k == _INSTR, v, s0.family)
        f = dict(
            family=family,
            last_velocity=last(k == _VEL, v, s0.last_velocity),
            tempo=last(k == _TEMPO, v, s0.tempo),
            last_kind=k,
            last_value=v,
            phase=last(reset | notes | sus_any, self._tables(k)[0].phase_of[k], s0.phase),
            last_pitch=last(reset | notes, torch.where(notes, v, -1), s0.last_pitch),
            family_events=last(
                notes | sus_any | (k == _VEL) | step_start,
                ~step_start,
                s0.family_events,
            ),  # fmt: skip
            started=s0.started[:, None] | (k == _START).cummax(1).values,
            ended=s0.ended[:, None] | (k == _END).cummax(1).values,
            time=s0.time[:, None] + torch.where(k == _SHIFT, v, 0).cumsum(1),
        )
        p_idx = (v - self.vocab.config.pitch_min).clamp(0, self.P - 1)
        dense = self.dense if self.dense is not None else dev.type != "cpu"
        sounding = self._sounding_dense if dense else self._sounding_by_family
        count, *rest = sounding(s0, family, notes, is_on, sus_any, k == _SUS_ON, p_idx)
        f["count"] = count
        return SequenceScan(f, *rest)

    def _sounding_dense(self, s0, family, notes, is_on, sus_on_or_off, sus_on, p_idx):
        """Sounding notes and pedals of every (family, pitch) slot after every token: the
        last NOTE event of each slot, as ``2 * position + is_on`` so that one cummax over
        (B, T, F * P) carries both; ``family`` (B, T) after each token, the rest (B, T).
        Returns (count, current family's sounding, its sustain, any family's sounding,
        final sounding, final sustain)."""
        import torch

        B, T = family.shape
        F, P = self.F, self.P
        has_fam = family < F
        fam = family.clamp(max=F - 1)
        code = torch.arange(T, device=family.device, dtype=torch.int32)[None, :] * 2  # (1, T)

        def slots(events, on, index, width, initial):
            """(B, T, width) bool: each slot's state after each token."""
            grid = torch.full((B, T, width), -1, dtype=torch.int32, device=family.device)
            at = torch.where(events & has_fam, code + on.int(), -1)  # (B, T)
            grid.scatter_(2, index[..., None], at[..., None])
            last_ev = grid.cummax(dim=1).values  # (B, T, width)
            return torch.where(last_ev >= 0, (last_ev & 1).bool(), initial[:, None, :])

        snd = slots(notes, is_on, fam * P + p_idx, F * P, s0.sounding.flatten(1))
        snd = snd.view(B, T, F, P)  # (B, T, F, P)
        sus = slots(sus_on_or_off, sus_on, fam, F, s0.sustain)  # (B, T, F)
        cur = snd.gather(2, fam[:, :, None, None].expand(B, T, 1, P))[:, :, 0]  # (B, T, P)
        cur_sustain = sus.gather(2, fam[..., None])[..., 0] & has_fam
        count = snd.flatten(2).sum(-1)
        return (count, cur & has_fam[..., None], cur_sustain, snd.any(2), snd[:, -1],
                sus[:, -1])  # fmt: skip

    def _sounding_by_family(self, s0, family, notes, is_on, sus_on_or_off, sus_on, p_idx):
        """:meth:`_sounding_dense` one family at a time, over the families that play (and
        the rows where they do): less work where few families play, but it reads the batch's
        families on the host."""
        import torch

        B, T = family.shape
        dev = family.device
        pos = torch.arange(T, device=dev).expand(B, T)
        onehot = (p_idx[..., None] == torch.arange(self.P, device=dev)) & notes[..., None]
        cur_sounding = torch.zeros(B, T, self.P, dtype=torch.bool, device=dev)
        any_sounding = torch.zeros_like(cur_sounding)
        cur_sustain = torch.zeros(B, T, dtype=torch.bool, device=dev)
        count = torch.zeros(B, T, dtype=torch.long, device=dev)
        final_sounding = s0.sounding.clone()
        final_sustain = s0.sustain.clone()
        present = set(family[notes | sus_on_or_off].unique().tolist())
        present |= set(torch.nonzero(s0.sounding.any(-1) | s0.sustain)[:, 1].unique().tolist())
        # last NOTE event per pitch, as 2 * position + is_on so one cummax carries both
        code = torch.arange(T, device=dev, dtype=torch.int32)[None, :, None] * 2
        code = code + is_on[..., None].int()  # (B, T, 1)
        for fam in sorted(present):
            if fam >= self.F:
                continue
            here_all = family == fam  # (B, T): this family is current after the token
            # only the rows where this family plays (a batch of one corpus rarely mixes many)
            rows = here_all.any(1) | s0.sounding[:, fam].any(-1) | s0.sustain[:, fam]
            r = slice(None) if bool(rows.all()) else torch.nonzero(rows)[:, 0]
            here = here_all[r]
            ev = onehot[r] & here[..., None]  # (b, T, P)
            last_ev = torch.where(ev, code[r], -1).cummax(dim=1).values
            snd = torch.where(last_ev >= 0, (last_ev & 1).bool(), s0.sounding[r, fam, None, :])
            count[r] += snd.sum(-1)
            any_sounding[r] |= snd
            cur_sounding[r] |= snd & here[..., None]
            idx = torch.where(sus_on_or_off & here_all, pos, -1).cummax(dim=1).values
            sus = torch.where(idx >= 0, sus_on.gather(1, idx.clamp(min=0)),
                              s0.sustain[:, fam, None])[r]  # fmt: skip
            cur_sustain[r] |= sus & here
            final_sounding[r, fam] = snd[:, -1]
            final_sustain[r, fam] = sus[:, -1]
        # families with initial notes but no events still count towards the polyphony
        quiet = [g for g in range(self.F) if g not in present]
        if quiet:
            count += s0.sounding[:, quiet].flatten(1).sum(1)[:, None]
        return count, cur_sounding, cur_sustain, any_sounding, final_sounding, final_sustain

    def masks_of(self, scan: SequenceScan) -> torch.Tensor:
        """(B, T, V) bool masks of a :meth:`scan` (this grammar's polyphony cap: the scan
        itself does not depend on it)."""
        return self._mask(_Fields(scan.fields), scan.cur_sounding, scan.cur_sustain)

    def sequence_masks(self, ids: torch.Tensor, state: GrammarState | None = None) -> torch.Tensor:
        """(B, T, V) bool: row t = the ids allowed after ``ids[:, : t + 1]``.

        Equal to stepping :meth:`advance` and :meth:`allowed` token by token (tested), but
        vectorized over the whole sequence. ``state``: where the sequences start (default: the
        initial state; for a window cut from a longer piece pass :meth:`state_after` of the
        prefix).
        """
        return self.masks_of(self.scan(ids, state))

    def state_after(self, ids: torch.Tensor, state: GrammarState | None = None) -> GrammarState:
        """The state after all of ``ids`` (B, T), computed vectorized."""
        return self.scan(ids, state).state_after()

    def sequence_features(
        self, ids: torch.Tensor, state: GrammarState | None = None
    ) -> SequenceFeatures:
        """What a model may use as input features, after each token of ``ids`` (B, T)."""
        return self.scan(ids, state).features()

    def features_and_state(
        self, ids: torch.Tensor, state: GrammarState | None = None
    ) -> tuple[SequenceFeatures, GrammarState]:
        """:meth:`sequence_features` and :meth:`state_after` of ``ids`` from one scan."""
        scan = self.scan(ids, state)
        return scan.features(), scan.state_after()

    def violations(self, ids: torch.Tensor, state: GrammarState | None = None) -> torch.Tensor:
        """(B, T) bool: where a token was not allowed by the state before it."""
        import torch

        B = ids.shape[0]
        s0 = state if state is not None else self.initial_state(B, ids.device)
        first = self.allowed(s0)[:, None, :]  # (B, 1, V)
        masks = torch.cat([first, self.sequence_masks(ids, s0)[:, :-1]], dim=1)  # (B, T, V)
        safe = ids.long().clamp(0, self.vocab.size - 1)
        ok = masks.gather(2, safe[..., None])[..., 0]
        inside = (ids >= 0) & (ids < self.vocab.size)
        return ~(ok & inside)

    def count_violations(self, ids: torch.Tensor | np.ndarray) -> int:
        """How many tokens break the grammar; ``ids`` (T,) or (B, T)."""
        import torch

        ids = torch.as_tensor(np.asarray(ids) if not torch.is_tensor(ids) else ids)
        if ids.dim() == 1:
            ids = ids[None]
        return int(self.violations(ids).sum())


_FIELDS = tuple(f.name for f in dataclasses.fields(GrammarState))
_ROW_FIELDS = ("last_kind", "started", "ended", "family", "count", "phase", "last_pitch",
               "last_velocity", "tempo", "family_events", "last_value")  # fmt: skip
_VIEWS = "_numpy_views"
_FLIP = bytes([1, 0]) + bytes(
    254
)  # bytes.translate table: 0 <-> 1  # a GrammarState's numpy views of its CPU tensors, when known


def _views(state: GrammarState) -> dict[str, np.ndarray]:
    """Numpy views of a CPU state's tensors (kept on states that :meth:`Grammar.advance` made:
    its fields are never changed in place, and copies made by ``dataclasses.replace`` or
    :meth:`GrammarState.clone` do not inherit them)."""
    if isinstance(state.family, np.ndarray):
        return {name: getattr(state, name) for name in _FIELDS}
    views = state.__dict__.get(_VIEWS)
    if views is None:
        views = {name: getattr(state, name).numpy() for name in _FIELDS}
    return views


class _Fields:
    """Attribute access to a dict of per-position fields (what ``_mask`` reads)."""

    def __init__(self, d: dict[str, torch.Tensor]) -> None:
        self.__dict__.update(d)


__all__ = ["Grammar", "GrammarState", "SequenceFeatures", "SequenceScan"]
