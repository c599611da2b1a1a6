"""Anticipation: the melody's NOTE_ONs copied ahead of their time as control ids, so that a
left-to-right model writes the lower voices knowing where the tune goes (Thickstun et al. 2023,
"Anticipatory Music Transformer": a control at time ``t`` is placed in the stream at
``t - delta``).

Which notes are the melody. The token cache merges all tracks of a family into one stream, so
the given part cannot come from a track id. It is the **top line**: at each time step, the
highest NOTE_ON of the step if it lies above every note still sounding (:func:`top_line`). That
is what ``aurl harmonize`` takes as a melody (:func:`aurl.generation.compose.melody_line`) and
puts its voices under, it needs no voice labels (so any corpus and every augmentation of a
window keep it: a transposed window's top line is the transposed top line), and on the four-
track chorales it is the soprano track's line at almost every onset (measured in
``benchmarks/bench_anticipation.py``).

Where a control goes. Control ``c`` of a melody note at step ``t`` is placed right before the
first music token read at time ``>= t - delta`` (a token's time is the stream time before its
own TIME_SHIFT; :func:`token_times`), and never before the window's first token. At decoding
the same rule reads: after each music token, every control whose ``t - delta`` the stream time
has reached is fed (:mod:`aurl.generation.anticipation`). The music tokens are not changed (no
TIME_SHIFT is split): the control's position says "this pitch comes about ``delta`` from here",
exact to the length of the shift that crossed ``t - delta`` (in chorales mostly a beat's
events lie at every beat, so most controls land at exactly ``t - delta``).

Control ids are ``ANTICIPATION_BASE + (pitch - pitch_min)`` (:data:`aurl.data.vocab`), after the
774 music ids and the FIM sentinels: the music ids keep their meaning, the logits stay 774
wide, and controls are inputs only (never scored, never sampled).

Windows. A window is only faithful where every control due before a token is known: the notes
after the window's last complete time step are not, so music tokens read at a time ``tau`` with
``tau + delta`` at or past that step are dropped (the window's tail, about ``delta`` of music),
unless the window reaches END. The result is a :class:`aurl.data.fim.FimWindow`: the
interleaved ids, the music in time order as ``source`` (the model's musical-time and grammar
features are computed over it and gathered; a control's features are zero) and each id's place
in it (``pos``, -1 for a control), so training reuses the FIM batch path unchanged: loss on
every music token, none on controls, grammar masks read in time order.
"""

from __future__ import annotations

import numpy as np

from aurl.data.fim import FimWindow, plain_window
from aurl.data.vocab import ANTICIPATION_BASE, END, Kind, Vocab


def token_times(ids: np.ndarray, vocab: Vocab) -> np.ndarray:
    """(T,) int64: the stream time (steps) at which each token is read, before its own
    TIME_SHIFT (0 for the first token)."""
    ids = np.asarray(ids, dtype=np.int64)
    shift = np.where(vocab.kind[ids] == Kind.TIME_SHIFT, vocab.value[ids], 0).astype(np.int64)
    return np.concatenate([[0], np.cumsum(shift)[:-1]]).astype(np.int64)


def top_line(ids: np.ndarray, vocab: Vocab) -> np.ndarray:
    """(T,) bool: the NOTE_ONs of the top line: at each time step, the step's highest NOTE_ON
    when it lies above every note still sounding (all families together). Notes sounding at the
    window's start are known from their NOTE_OFFs later in the window."""
    ids = np.asarray(ids, dtype=np.int64)
    kind, value = vocab.kind[ids], vocab.value[ids]
    family = -1
    # notes already sounding where the window starts: a NOTE_OFF before any NOTE_ON of its note
    held: dict[tuple[int, int], bool] = {}
    seen: set[tuple[int, int]] = set()
    for k, v in zip(kind.tolist(), value.tolist()):
        if k == Kind.INSTRUMENT:
            family = v
        elif k in (Kind.NOTE_ON, Kind.NOTE_OFF) and (family, v) not in seen:
            seen.add((family, v))
            if k == Kind.NOTE_OFF:
                held[(family, v)] = True
    out = np.zeros(len(ids), bool)
    sounding = dict(held)
    family, top = -1, -1  # top: index of the step's highest NOTE_ON so far
    for i, (k, v) in enumerate([*zip(kind.tolist(), value.tolist()), (Kind.TIME_SHIFT, 0)]):
        if k == Kind.TIME_SHIFT:  # the step is complete: is its highest onset the top note?
            if top >= 0 and all(p < value[top] for (_, p) in sounding if p != value[top]):
                out[top] = True
            top = -1
        elif k == Kind.INSTRUMENT:
            family = v
        elif k == Kind.NOTE_OFF:
            sounding.pop((family, v), None)
        elif k == Kind.NOTE_ON:
            sounding[(family, v)] = True
            if top < 0 or v > value[top]:
                top = i
    return out


def control_ids(pitches: np.ndarray, vocab: Vocab) -> np.ndarray:
    """Control id of each MIDI pitch (``ANTICIPATION_BASE + pitch - pitch_min``)."""
    return ANTICIPATION_BASE + np.asarray(pitches, dtype=np.int64) - vocab.config.pitch_min


def interleave(
    ids: np.ndarray, due: np.ndarray, controls: np.ndarray, vocab: Vocab, *, keep: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Controls merged into the music ``ids[:keep]`` (time order): control ``k`` (``due[k]``
    its stream time, ascending) goes right before the first music token read at a time
    ``>= due[k]``, never before the first token; controls due after the last kept token are
    left out. Returns ``(interleaved ids, pos)``: each id's index in ``ids``, -1 for a control.
    """
    ids = np.asarray(ids, dtype=np.int64)
    keep = len(ids) if keep is None else keep
    tau = token_times(ids, vocab)[:keep]
    at = np.maximum(1, np.searchsorted(tau, np.asarray(due), side="left"))
    inside = at < keep  # a control due after the last kept token has nothing to precede
    at, controls = at[inside], np.asarray(controls, dtype=np.int64)[inside]
    n = keep + len(at)
    is_ctrl = np.zeros(n, bool)
    is_ctrl[at + np.arange(len(at))] = True  # each control moves the later ids on by one
    out = np.empty(n, np.int64)
    pos = np.full(n, -1, np.int64)
    out[is_ctrl] = controls
    out[~is_ctrl], pos[~is_ctrl] = ids[:keep], np.arange(keep)
    return out, pos


def anticipate(
    ids: np.ndarray, melody: np.ndarray, vocab: Vocab, *, delta: int, window: int | None = None
) -> FimWindow:
    """The window ``ids`` (time order) with a control for each ``melody`` NOTE_ON (bool (T,))
    placed ``delta`` steps ahead of it, its unfaithful tail dropped (see the module docstring),
    cut to ``window`` ids when given."""
    ids = np.asarray(ids, dtype=np.int64)
    tau = token_times(ids, vocab)
    if (ids == END).any():  # the piece ends inside: every later note is known (there is none)
        keep = len(ids)
    else:
        last_shift = vocab.kind[ids[-1]] == Kind.TIME_SHIFT
        horizon = tau[-1] + (vocab.value[ids[-1]] if last_shift else 0)  # complete steps end
        keep = int(np.searchsorted(tau + delta >= horizon, True))  # tau ascends: a prefix
    notes = np.flatnonzero(melody[:keep])
    ctrl = control_ids(vocab.value[ids[notes]], vocab)
    out, pos = interleave(ids, tau[notes] - delta, ctrl, vocab, keep=keep)
    if window is not None:
        out, pos = out[:window], pos[:window]
    source = ids[: int(pos.max()) + 1] if (pos >= 0).any() else ids[:1]
    return FimWindow(ids=out, source=source, pos=pos, middle=np.zeros(len(out), bool))


def draw_anticipation(
    ids: np.ndarray, rng: np.random.Generator, vocab: Vocab, *, rate: float, beats: float,
    window: int,
) -> FimWindow:  # fmt: skip
    """With probability ``rate`` the window ``ids[:window]`` with its top line anticipated by
    ``beats`` (:func:`anticipate`); otherwise ``ids[:window]`` as it is. Draws one number from
    ``rng``."""
    ids = np.asarray(ids[:window], dtype=np.int64)
    if rng.random() >= rate:
        return plain_window(ids)
    delta = round(beats * vocab.config.steps_per_beat)
    return anticipate(ids, top_line(ids, vocab), vocab, delta=delta, window=window)
