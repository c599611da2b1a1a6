"""The rules of part writing, and where a piece's voices break them.

The voices (note arrays, highest first: soprano, alto, tenor, bass for four) are read at every
onset of any voice, a *slice* (:func:`slices`). Between two consecutive slices:

- **Parallel fifths and octaves** (:func:`parallels`): two voices that both sound in both
  slices, at least one of them moving, are a *move*; it is a parallel when both move the same
  way from one interval to the same interval class, 0 (unison / octave, compound included) or 7
  (fifth, twelfth...). A held or repeated note is no motion, so oblique motion never counts,
  and contrary motion into the same class does not either; a voice resting breaks the pair.
- **Crossings** (:func:`crossings`): a lower voice above the next higher one, per slice.
- **Spacing** (:func:`wide`): neighbouring upper voices (S-A, A-T) more than an octave apart.
- **Ranges** (:func:`out_of_range`): notes outside the textbook range of their voice
  (:data:`SATB_RANGES`), for voices named as SATB's.

One implementation: ``aurl evaluate --task``'s rates (:func:`aurl.evaluation.tasks.voice_rules`)
count these, ``aurl analyze``'s report lists them with their beats (:func:`faults`), and the
composing commands and ``aurl generate --voices`` decode against the parallels
(:mod:`aurl.generation.voice_leading`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

PERFECT = (0, 7)  # interval classes of parallel octaves / unisons and fifths
MAX_LISTED = 1000  # faults listed with their beats (the counts count them all)
SATB = ("Soprano", "Alto", "Tenor", "Bass")
# Comfortable ranges (MIDI pitches) for four-part writing, as in harmony textbooks
# (e.g. Aldwell & Schachter): S C4-G5, A G3-D5, T C3-G4, B E2-C4.
SATB_RANGES = ((60, 79), (55, 74), (48, 67), (40, 60))


def slices(voices: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(onsets (n,), grid (n, n_voices)): the pitch sounding in each voice at every onset of
    any voice (-1: rest). A voice holding a chord (more than one note at once) reads as its
    highest note."""
    onsets = np.unique(np.concatenate([v["onset"] for v in voices if len(v)] or [np.zeros(0)]))
    grid = np.full((len(onsets), len(voices)), -1, dtype=np.int64)
    for j, v in enumerate(voices):
        # the slices each note sounds in: onset <= slice < end (1e-9 beats of slack)
        lo = np.searchsorted(onsets, v["onset"] - 1e-9).tolist()
        hi = np.searchsorted(onsets, v["onset"] + v["duration"] - 1e-9).tolist()
        for a, b, p in zip(lo, hi, v["pitch"].tolist()):
            if a < b:
                grid[a:b, j] = np.maximum(grid[a:b, j], p)
    return onsets, grid


def parallels(grid: np.ndarray) -> tuple[int, list[tuple[int, int, int, int]]]:
    """The moves between consecutive slices of ``grid`` (their count) and the parallels among
    them: ``(t, i, j, interval class)``, voices ``i < j`` moving from slice ``t`` to ``t + 1``."""
    a, b = grid[:-1], grid[1:]
    moves, found = 0, []
    n = grid.shape[1]
    for i in range(n):
        for j in range(i + 1, n):
            sound = (a[:, i] >= 0) & (a[:, j] >= 0) & (b[:, i] >= 0) & (b[:, j] >= 0)
            di, dj = b[:, i] - a[:, i], b[:, j] - a[:, j]
            moving = sound & ((di != 0) | (dj != 0))
            before = np.abs(a[:, i] - a[:, j]) % 12
            after = np.abs(b[:, i] - b[:, j]) % 12
            same_way = (np.sign(di) == np.sign(dj)) & (di != 0)
            par = moving & same_way & (before == after) & np.isin(after, PERFECT)
            moves += int(moving.sum())
            found += [(int(t), i, j, int(after[t])) for t in np.flatnonzero(par)]
    return moves, sorted(found)


def parallels_line(voices: list[np.ndarray]) -> str:
    """'N parallel 5ths/8ves in M moves': what the commands that write voices say of them."""
    moves, found = parallels(slices(voices)[1])
    return f"{len(found)} parallel 5ths/8ves in {moves} moves"


def _both(grid: np.ndarray, x: int, y: int) -> np.ndarray:
    return (grid[:, x] >= 0) & (grid[:, y] >= 0)


def crossings(grid: np.ndarray) -> list[tuple[int, int]]:
    """``(t, k)``: voice ``k + 1`` above voice ``k`` in slice ``t``."""
    return sorted(
        (int(t), k)
        for k in range(grid.shape[1] - 1)
        for t in np.flatnonzero(_both(grid, k, k + 1) & (grid[:, k + 1] > grid[:, k]))
    )


def wide(grid: np.ndarray) -> list[tuple[int, int, int]]:
    """``(t, k, semitones)``: upper voices ``k`` and ``k + 1`` more than an octave apart in
    slice ``t``: every neighbouring pair but the lowest (S-A, A-T in SATB; S-A of three
    voices; none of two), as ``generation.spacing`` leans."""
    out = []
    for k in range(grid.shape[1] - 2):
        gap = grid[:, k] - grid[:, k + 1]
        out += [(int(t), k, int(gap[t])) for t in np.flatnonzero(_both(grid, k, k + 1) & (gap > 12))]
    return sorted(out)


def out_of_range(voices: list[np.ndarray]) -> list[tuple[int, int]]:
    """``(voice, note index)``: notes outside :data:`SATB_RANGES` of their voice (the first
    four voices, read as S, A, T, B)."""
    out = []
    for v, (voice, (lo, hi)) in enumerate(zip(voices, SATB_RANGES)):
        out += [(v, int(i)) for i in np.flatnonzero((voice["pitch"] < lo) | (voice["pitch"] > hi))]
    return out


def _onset_seconds(voices: list[np.ndarray], onsets: np.ndarray) -> np.ndarray:
    """The time in seconds of each onset (beats) of ``onsets``, from the notes starting there."""
    beats = np.concatenate([v["onset"] for v in voices if len(v)] or [np.zeros(0)])
    seconds = np.concatenate([v["onset_s"] for v in voices if len(v)] or [np.zeros(0)])
    order = np.argsort(beats, kind="stable")
    at = np.searchsorted(beats[order], onsets - 1e-9)
    return seconds[order][np.minimum(at, len(order) - 1)] if len(order) else onsets * 0.0


def faults(voices: list[np.ndarray], names: list[str]) -> dict[str, Any]:
    """Where ``voices`` (highest first, named ``names``) break the rules: counts (moves,
    slices, notes) and each fault with its beat and second, the first :data:`MAX_LISTED` of
    them (JSON-ready). Ranges are judged only where the names are SATB's, in order."""
    onsets, grid = slices(voices)
    seconds = _onset_seconds(voices, onsets)
    moves, par = parallels(grid)
    items: list[dict[str, Any]] = []
    for t, i, j, iv in par:
        items.append({"beat": float(onsets[t + 1]), "from_beat": float(onsets[t]),
                      "second": float(seconds[t + 1]),
                      "rule": "parallel octaves" if iv == 0 else "parallel fifths",
                      "voices": [names[i], names[j]],
                      "pitches": [[int(grid[t, i]), int(grid[t, j])],
                                  [int(grid[t + 1, i]), int(grid[t + 1, j])]]})  # fmt: skip
    for t, k in crossings(grid):
        items.append({"beat": float(onsets[t]), "second": float(seconds[t]), "rule": "crossing",
                      "voices": [names[k], names[k + 1]],
                      "pitches": [int(grid[t, k]), int(grid[t, k + 1])]})  # fmt: skip
    for t, k, gap in wide(grid):
        items.append({"beat": float(onsets[t]), "second": float(seconds[t]), "rule": "spacing",
                      "voices": [names[k], names[k + 1]],
                      "pitches": [int(grid[t, k]), int(grid[t, k + 1])], "semitones": gap})  # fmt: skip
    satb = list(names) == list(SATB)
    for v, i in out_of_range(voices) if satb else []:
        lo, hi = SATB_RANGES[v]
        items.append({"beat": float(voices[v]["onset"][i]),
                      "second": float(voices[v]["onset_s"][i]), "rule": "out of range",
                      "voices": [names[v]], "pitches": [int(voices[v]["pitch"][i])],
                      "range": [lo, hi]})  # fmt: skip
    items.sort(key=lambda f: (f["beat"], f["rule"]))
    counts = {"moves": moves, "slices": len(grid), "notes": int(sum(len(v) for v in voices))}
    for rule in ("parallel fifths", "parallel octaves", "crossing", "spacing", "out of range"):
        counts[rule] = sum(f["rule"] == rule for f in items)
    return {"voices": list(names), "counts": counts, "faults": items[:MAX_LISTED],
            "ranges_judged": satb}  # fmt: skip
