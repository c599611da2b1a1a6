"""Seeded augmentation on token arrays, applied at batch time.

Every transform is a pure, vectorized function of a token array (any integer dtype; int64
comes back) and keeps a grammar-valid sequence valid:

- :func:`transpose` moves every NOTE_ON/NOTE_OFF by ``k`` semitones; :func:`transpose_range`
  gives the shifts that keep every note of the array inside the vocabulary's pitch range.
- :func:`scale_velocity` scales the velocity of every VELOCITY token and drops the ones that no
  longer change the bin (canonical form: VELOCITY only when the bin changes).
- :func:`retime` moves the end of every TIME_SHIFT run to new times, keeping each run at least
  one step long, so the order of events never changes; :func:`stretch` (times scaled by a
  factor) and :func:`jitter` (each run end moved by a few steps) are built on it. Long gaps are
  split into shifts of at most ``max_shift_steps`` again.
- :func:`remap_instruments` renames the instrument families through a map that is one-to-one
  (distinct parts stay distinct, a NOTE_OFF still finds its note) and increasing on the families
  present (the grammar wants ascending families within a time step);
  :func:`random_family_map` draws one (a permutation of all the families).

:class:`Augmenter` applies them with the probabilities of :class:`~aurl.config.AugmentConfig`,
drawing from a ``numpy.random.Generator``: its own (``state_dict``/``load_state_dict`` save it
in checkpoints) or one passed per call (e.g. seeded by ``(seed, epoch, index)`` in a loader).
:meth:`Augmenter.apply` also returns what it drew, an :class:`AugmentParams`, which
:func:`apply_params` replays; :mod:`aurl.data.window_state` uses it to carry a window's grammar
state across the augmentation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from aurl.config import AugmentConfig
from aurl.data.vocab import Kind, Vocab


def _is_note(ids: np.ndarray, vocab: Vocab) -> np.ndarray:
    return (ids >= vocab.note_on) & (ids < vocab.time_shift)


def transpose_range(ids: np.ndarray, vocab: Vocab, max_shift: int) -> tuple[int, int]:
    """``(lo, hi)``: every ``k`` in ``lo..hi`` keeps all notes of ``ids`` in range and
    ``|k| <= max_shift``. Empty (``lo > hi``) only if the notes span more than the range."""
    ids = np.asarray(ids)
    pitches = vocab.value[ids[_is_note(ids, vocab)]]
    if pitches.size == 0:
        return -max_shift, max_shift
    lo = max(-max_shift, vocab.config.pitch_min - int(pitches.min()))
    hi = min(max_shift, vocab.config.pitch_max - int(pitches.max()))
    return lo, hi


def transpose(ids: np.ndarray, k: int, vocab: Vocab) -> np.ndarray:
    """Every NOTE_ON/NOTE_OFF moved by ``k`` semitones.

    Raises:
        ValueError: A note would leave the vocabulary's pitch range (see :func:`transpose_range`).
    """
    out = np.array(ids, dtype=np.int64)
    notes = _is_note(out, vocab)
    pitch = vocab.value[out[notes]] + k
    if pitch.size and (
        pitch.min() < vocab.config.pitch_min or pitch.max() > vocab.config.pitch_max
    ):
        raise ValueError(f"transposing by {k} moves notes outside the vocabulary's pitch range")
    out[notes] += k  # NOTE_ON and NOTE_OFF ids are consecutive in pitch
    return out


def velocity_map(factor: float | np.ndarray, vocab: Vocab) -> np.ndarray:
    """(..., bins) int64: the bin each velocity bin becomes when scaled by ``factor`` (...).

    Bin ``b`` decodes to ``bin_velocity[b]``, times the factor, rounded, clipped to 1..127 and
    binned again. Not one-to-one in general (a factor below 1 or clipping merges bins); the
    identity for a factor of exactly 1.
    """
    factor = np.asarray(factor, dtype=np.float64)[..., None]
    return vocab.velocity_bin(np.clip(np.rint(vocab.bin_velocity * factor), 1, 127))


def scale_velocity(ids: np.ndarray, factor: float, vocab: Vocab) -> np.ndarray:
    """Velocities times ``factor`` (clipped to 1..127), re-binned; repeated bins dropped."""
    out = np.array(ids, dtype=np.int64)
    pos = np.flatnonzero(vocab.kind[out] == Kind.VELOCITY)
    if pos.size == 0:
        return out
    bins = velocity_map(factor, vocab)[vocab.value[out[pos]]]
    out[pos] = vocab.velocity + bins
    repeated = np.zeros(out.shape[0], dtype=bool)
    repeated[pos[1:]] = bins[1:] == bins[:-1]  # the bin in force does not change: not needed
    return out[~repeated]


def _shift_runs(ids: np.ndarray, vocab: Vocab) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(is_shift (T,), run_start (T,) bool, steps per run (R,)) of the TIME_SHIFT runs."""
    is_shift = vocab.kind[ids] == Kind.TIME_SHIFT
    run_start = is_shift.copy()
    run_start[1:] &= ~is_shift[:-1]
    run_id = np.cumsum(run_start) - 1
    steps = np.bincount(run_id[is_shift], weights=vocab.value[ids[is_shift]], minlength=0)
    return is_shift, run_start, steps.astype(np.int64)


def run_end_times(ids: np.ndarray, vocab: Vocab) -> np.ndarray:
    """(R,) int64: the time in steps at the end of each TIME_SHIFT run."""
    return np.cumsum(_shift_runs(np.asarray(ids), vocab)[2])


def retime(ids: np.ndarray, new_times: np.ndarray, vocab: Vocab) -> np.ndarray:
    """Move the end of TIME_SHIFT run ``r`` to ``new_times[r]`` steps.

    Times are first made strictly increasing and at least ``r + 1`` (every run keeps one step
    or more), so events keep their order and no note shrinks to zero length.

    Args:
        ids: (T,) token ids.
        new_times: (R,) wanted run-end times, R = number of TIME_SHIFT runs in ``ids``.
    """
    ids = np.asarray(ids, dtype=np.int64)
    is_shift, run_start, _ = _shift_runs(ids, vocab)
    r = np.arange(1, len(new_times) + 1)
    # T'_r = max(0, max_{s<=r} (t_s - s)) + r: the least change that gives steps >= 1 per run
    times = np.maximum(np.maximum.accumulate(np.asarray(new_times, np.int64) - r), 0) + r
    steps = np.diff(times, prepend=0)  # (R,) >= 1
    m = vocab.config.max_shift_steps
    n_tokens = -(-steps // m)  # (R,) shift tokens per run
    keep = ~is_shift | run_start  # one placeholder per run
    reduced = ids[keep]
    placeholder = run_start[keep]
    counts = np.ones(reduced.shape[0], dtype=np.int64)
    counts[placeholder] = n_tokens
    out = np.repeat(reduced, counts)
    # fill the shift slots: m, m, ..., remainder within each run
    slot = np.repeat(placeholder, counts)
    first = np.cumsum(n_tokens) - n_tokens
    k = np.arange(int(n_tokens.sum())) - np.repeat(first, n_tokens)  # index inside the run
    last = k == np.repeat(n_tokens - 1, n_tokens)
    value = np.where(last, np.repeat(steps - m * (n_tokens - 1), n_tokens), m)
    out[slot] = vocab.shift_id(value)
    return out


def stretch(ids: np.ndarray, factor: float, vocab: Vocab) -> np.ndarray:
    """Time scaled by ``factor`` (> 1 slower): every run end moves to round(t * factor)."""
    times = run_end_times(ids, vocab)
    return retime(ids, np.rint(times * factor).astype(np.int64), vocab)


def jitter(ids: np.ndarray, steps: int, rng: np.random.Generator, vocab: Vocab) -> np.ndarray:
    """Each time step's events moved together by a random ``-steps..steps`` (order kept)."""
    times = run_end_times(ids, vocab)
    return retime(ids, times + rng.integers(-steps, steps + 1, size=times.shape[0]), vocab)


def remap_instruments(ids: np.ndarray, family_map: np.ndarray, vocab: Vocab) -> np.ndarray:
    """INSTRUMENT family ``f`` becomes ``family_map[f]``."""
    out = np.array(ids, dtype=np.int64)
    pos = vocab.kind[out] == Kind.INSTRUMENT
    out[pos] = vocab.instrument + np.asarray(family_map)[vocab.value[out[pos]]]
    return out


def random_family_map(ids: np.ndarray, vocab: Vocab, rng: np.random.Generator) -> np.ndarray:
    """(families,) permutation sending the k families present in ``ids``, in order, to k random
    distinct families, in order (increasing, so ascending families at a step stay ascending).

    The other families take the families left over, in order: the map is one-to-one on every
    family, so a state that holds families absent from ``ids`` (the grammar state before a
    window) can be carried across it too.
    """
    n = vocab.config.num_instruments
    ids = np.asarray(ids)
    present = np.unique(vocab.value[ids[vocab.kind[ids] == Kind.INSTRUMENT]])
    chosen = np.sort(rng.choice(n, size=present.size, replace=False))
    family_map = np.empty(n, dtype=np.int64)
    family_map[present] = chosen
    family_map[np.setdiff1d(np.arange(n), present)] = np.setdiff1d(np.arange(n), chosen)
    return family_map


@dataclass(frozen=True)
class AugmentParams:
    """What one :meth:`Augmenter.apply` drew; None or 0: that transform did not fire.

    Attributes:
        family_map: (families,) int64 permutation of the instrument families.
        transpose: Semitones.
        velocity: Velocity factor (:func:`scale_velocity`).
        stretch: Time factor (:func:`stretch`).
        jitter: Jitter steps; the per-step offsets are drawn when applied.
    """

    family_map: np.ndarray | None = None
    transpose: int = 0
    velocity: float | None = None
    stretch: float | None = None
    jitter: int = 0


def apply_params(
    ids: np.ndarray,
    params: AugmentParams,
    vocab: Vocab,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """``ids`` augmented with ``params``, in the :class:`Augmenter`'s order: instruments,
    transposition, velocity, stretch, jitter (which alone draws from ``rng``).

    Raises:
        ValueError: ``params.jitter`` without a generator, or a transposition out of range.
    """
    out = np.array(ids, dtype=np.int64)
    if params.family_map is not None:
        out = remap_instruments(out, params.family_map, vocab)
    if params.transpose:
        out = transpose(out, params.transpose, vocab)
    if params.velocity is not None:
        out = scale_velocity(out, params.velocity, vocab)
    if params.stretch is not None:
        out = stretch(out, params.stretch, vocab)
    if params.jitter:
        if rng is None:
            raise ValueError("jitter draws its offsets: pass a generator to apply_params")
        out = jitter(out, params.jitter, rng, vocab)
    return out


class Augmenter:
    """The configured augmentations, each applied with its probability.

    Args:
        config: Probabilities and ranges.
        vocab: The vocabulary of the ids.
        seed: Seeds the Augmenter's own generator (used when a call passes none).
    """

    def __init__(
        self, config: AugmentConfig | None = None, vocab: Vocab | None = None, *, seed: int = 0
    ) -> None:
        self.config = config or AugmentConfig()
        self.vocab = vocab or Vocab()
        self.rng = np.random.default_rng(seed)

    def __call__(self, ids: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """(T,) ids -> (T',) int64 augmented ids (T' differs only by shift/velocity tokens)."""
        return self.apply(ids, rng)[0]

    def apply(
        self, ids: np.ndarray, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, AugmentParams]:
        """``(augmented ids, what was drawn)``: the ids are those of a plain call."""
        rng = self.rng if rng is None else rng
        params = self.draw(ids, rng)
        return apply_params(ids, params, self.vocab, rng), params

    def draw(self, ids: np.ndarray, rng: np.random.Generator | None = None) -> AugmentParams:
        """The parameters of one augmentation of ``ids`` (all but jitter's offsets, which
        :func:`apply_params` draws last from the same generator).

        No transform changes what a later one's draw reads (the families present, the range
        of the notes), so drawing everything first takes the same numbers, in the same order,
        as drawing each transform's parameters just before applying it.
        """
        c, v = self.config, self.vocab
        rng = self.rng if rng is None else rng
        ids = np.asarray(ids)
        drawn: dict[str, Any] = {}
        if c.instrument_prob and rng.random() < c.instrument_prob:
            drawn["family_map"] = random_family_map(ids, v, rng)
        if c.transpose_prob and c.transpose_max and rng.random() < c.transpose_prob:
            lo, hi = transpose_range(ids, v, c.transpose_max)
            choices = np.setdiff1d(np.arange(lo, hi + 1), [0])  # 0 would waste the draw
            if choices.size:
                drawn["transpose"] = int(rng.choice(choices))
        if c.velocity_prob and rng.random() < c.velocity_prob:
            drawn["velocity"] = float(rng.uniform(c.velocity_min, c.velocity_max))
        if c.stretch_prob and rng.random() < c.stretch_prob:
            drawn["stretch"] = float(rng.uniform(c.stretch_min, c.stretch_max))
        if c.jitter_prob and c.jitter_steps and rng.random() < c.jitter_prob:
            drawn["jitter"] = int(c.jitter_steps)
        return AugmentParams(**drawn)

    def state_dict(self) -> dict[str, Any]:
        """The generator's state (JSON-safe), for training checkpoints."""
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
