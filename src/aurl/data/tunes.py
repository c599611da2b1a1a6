"""Tune groups: files that carry the same melody share a group, and the split hashes the group.

Bach harmonized many hymn tunes several times under different BWV numbers (and music21 ships
some twice): split by file, a test chorale's melody is often in the training set already. Two
files belong to one group when either

- their titles name the same hymn: :func:`normalize_title` drops the catalogue number in
  parentheses, accents, case and punctuation (``"Meine Seel' erhebt den Herren (BWV 10.7)"`` ->
  ``"meine seel erhebt den herren"``); or
- their melodies are the same tune: the soprano line (:func:`soprano_intervals`, the track with
  the highest mean pitch) as a sequence of pitch intervals, compared with difflib's ratio
  (``2 * matches / (len(a) + len(b))``), is at least :data:`SAME_TUNE` similar. Intervals, not
  pitches: a tune harmonized in another key is the same tune.

Groups are the connected components of that relation (union-find), so no pair of files at
least :data:`SAME_TUNE` similar can land in two splits. A group's key is the smallest
normalized title among its members (the file name where a file has no title): that is the
string :func:`aurl.data.split.split_of` hashes.

Deterministic: the groups depend on the files' notes and titles only, not on their order.
What adding files can move: a new file joins the group of every file it shares a title or a
tune with, and may bridge two groups into one; the merged group takes the smallest title of
its members, so the files of a group whose key changes may change split together. Groups that
the new file touches neither by title nor by tune never move.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

SAME_TUNE = 0.9  # soprano interval similarity (difflib ratio) from which two files share a tune

_CATALOGUE = re.compile(r"\((?:bwv|k\.?|hob\.?|op\.?|d\.?)[^)]*\)", re.IGNORECASE)


def normalize_title(title: str) -> str:
    """The hymn a title names: catalogue numbers in parentheses, accents, case and punctuation
    dropped, spaces collapsed (``""`` for an empty title)."""
    text = _CATALOGUE.sub(" ", title)
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower().replace("ß", "ss")
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text).split())


def soprano_intervals(path: str | Path) -> tuple[int, ...]:
    """The top voice of a MIDI file as semitone intervals between successive notes.

    The top voice is the track with the highest mean pitch; within it, the highest note at
    each onset. Empty for a file without notes or with one note.
    """
    from aurl.data.midi_io import read_score

    score = read_score(path)
    tracks = [t.notes.numpy() for t in score.tracks if len(t.notes)]
    if not tracks:
        return ()
    top = max(tracks, key=lambda n: float(n["pitch"].mean()))
    order = np.lexsort((-top["pitch"], top["time"]))  # by onset, highest first
    time, pitch = top["time"][order], top["pitch"][order].astype(np.int64)
    first = np.ones(len(time), bool)
    first[1:] = time[1:] != time[:-1]
    return tuple(int(d) for d in np.diff(pitch[first]))


def similarity(a: Sequence[int], b: Sequence[int]) -> float:
    """difflib's ratio of two interval sequences: 2 * matched / (len(a) + len(b)); 1.0 for two
    empty ones."""
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def similar_pairs(
    melodies: Mapping[str, Sequence[int]],
    threshold: float = SAME_TUNE,
    among: Sequence[str] | None = None,
    against: Sequence[str] | None = None,
) -> list[tuple[str, str, float]]:
    """``(a, b, ratio)`` for the pairs whose ratio is at least ``threshold``.

    Pairs of ``among`` x ``against`` (default: every unordered pair of ``melodies``). The
    length bound ``2 * min / (len_a + len_b)`` and difflib's cheap upper bounds skip most pairs
    before the exact ratio is computed.
    """
    names = sorted(melodies)
    left = sorted(among) if among is not None else names
    right = sorted(against) if against is not None else None
    out = []
    for i, a in enumerate(left):
        ma = melodies[a]
        matcher = difflib.SequenceMatcher(None, autojunk=False)
        matcher.set_seq2(ma)  # seq2 is the one difflib indexes: reused for every b
        for b in right if right is not None else left[i + 1 :]:
            mb = melodies[b]
            if a == b or 2 * min(len(ma), len(mb)) < threshold * (len(ma) + len(mb)):
                continue
            matcher.set_seq1(mb)
            if matcher.real_quick_ratio() < threshold or matcher.quick_ratio() < threshold:
                continue
            ratio = matcher.ratio()
            if ratio >= threshold:
                out.append((a, b, ratio))
    return out


def tune_groups(
    titles: Mapping[str, str], melodies: Mapping[str, Sequence[int]], threshold: float = SAME_TUNE
) -> dict[str, str]:
    """Each file's group key (see the module docstring).

    Args:
        titles: file name -> title (``""`` where unknown).
        melodies: file name -> :func:`soprano_intervals` (every file of ``titles``).
        threshold: Soprano similarity from which two files share a tune.

    Returns:
        file name -> group key: the smallest normalized title in its group, or the smallest
        file name where no member has a title.
    """
    return group_by(titles, ((a, b) for a, b, _ in similar_pairs(melodies, threshold)))


def group_by(
    titles: Mapping[str, str],
    pairs: Iterable[tuple[str, str]],
    accept: Callable[[str, str], bool] | None = None,
) -> dict[str, str]:
    """Groups of files joined by a shared normalized title or by one of ``pairs`` (which
    ``accept``, when given, must confirm; it is asked only about pairs not yet in one group).

    Returns:
        file name -> group key: the smallest normalized title in its group, or the smallest
        file name where no member has a title.
    """
    parent = {f: f for f in titles}

    def root(f: str) -> str:
        while parent[f] != f:
            parent[f] = parent[parent[f]]
            f = parent[f]
        return f

    def join(a: str, b: str) -> None:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    by_title: dict[str, str] = {}
    for f in sorted(titles):
        t = normalize_title(titles[f])
        if t:
            join(by_title.setdefault(t, f), f)
    for a, b in pairs:
        if root(a) != root(b) and (accept is None or accept(a, b)):
            join(a, b)
    named: dict[str, str] = {}  # root -> smallest title
    first: dict[str, str] = {}  # root -> smallest file name
    for f in sorted(titles):
        r, t = root(f), normalize_title(titles[f])
        first.setdefault(r, f)
        if t and (r not in named or t < named[r]):
            named[r] = t
    return {f: named.get(root(f), first[root(f)]) for f in titles}


def folder_groups(folder: str | Path, entries: Sequence[Mapping[str, str]]) -> dict[str, str]:
    """:func:`tune_groups` of manifest ``entries`` (``file`` and ``title``) of ``folder``."""
    folder = Path(folder)
    titles = {e["file"]: e.get("title", "") for e in entries}
    melodies = {f: soprano_intervals(folder / f) for f in titles}
    return tune_groups(titles, melodies)
