"""The ``folk`` corpus: the folk-tune collections music21 ships in ABC, one tune per MIDI file.

Collections (:data:`COLLECTIONS`, music21's corpus folders): the Essen Folksong Collection
(German and other European songs, ~8,500 tunes, music21's own test files left out), O'Neill's
Music of Ireland (1850, ~2,000), Ryan's Mammoth Collection (1883, ~1,050), Aird's Airs
(1778-1803, ~1,200) and two small American / Northumbrian books. An ABC file holds many tunes,
each starting at an ``X:`` line; the lines before the first one are the file's header and go
with every tune.

A tune becomes ``<folder>_<file stem>_<NNNN>.mid`` (its place in the file, from 1). Conversion
is bounded: an ABC text over :data:`MAX_TUNE_CHARS` is refused before music21 sees it, and a
repeat expansion beyond :data:`~aurl.data.corpus.MAX_REPEAT_FACTOR` times the written tune or
:data:`MAX_MINUTES` is refused (a folk tune that long is a misread, not music). Tunes that fail
are reported in the manifest's ``skipped`` with the reason, never retried on resume.

Order and ``--limit``: tunes are taken in the order of a hash of their file name, so the first N
are a spread over every collection, and the same N on any machine.

Resumable: the manifest is rewritten atomically every :data:`SAVE_EVERY` tunes; a new call on the
same folder keeps every tune the manifest lists whose MIDI file exists, and every skip.

Groups without comparing every pair (:func:`folk_groups`): two tunes share a group when their
normalized titles are equal (:func:`aurl.data.tunes.normalize_title`) or their melodies are the
same tune: MinHash signatures of the top voice's interval 4-grams, banded (locality-sensitive
hashing), propose candidate pairs -- tunes that agree on all rows of some band -- and a
candidate pair is joined when its difflib ratio reaches :data:`aurl.data.tunes.SAME_TUNE`, the
same test the chorales' groups use. Cost: one signature per tune and the pairs inside the
buckets, not N^2. The split hashes the group (:func:`aurl.data.split.split_of`).
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aurl.data.corpora import read_partial, write_corpus_manifest
from aurl.data.corpus import (
    MAX_REPEAT_FACTOR,
    CorpusReport,
    ScoreSkipped,
    score_facts,
    stream_to_score,
)
from aurl.data.split import check_fractions, split_of
from aurl.data.tunes import SAME_TUNE, group_by, similarity, soprano_intervals
from aurl.errors import DataError
from aurl.fileio import atomic_write
from aurl.progress import Progress, silent

STYLE = "folk"
# music21 corpus folder -> the collection as the manifest names it
COLLECTIONS = {
    "essenFolksong": "Essen Folksong Collection",
    "oneills1850": "O'Neill's Music of Ireland (1850)",
    "ryansMammoth": "Ryan's Mammoth Collection (1883)",
    "airdsAirs": "Aird's Selection of Scotch, English, Irish and Foreign Airs (1778-1803)",
    "miscFolk": "American fife and Northumbrian minstrelsy tunes",
}
# music21's own parser tests inside the Essen folder: not part of the collection
EXCLUDED = re.compile(r"^essenFolksong/test.*\.abc$")
MAX_TUNE_CHARS = 20_000  # the longest tune of the collections is ~6,000 characters
MAX_MINUTES = 10.0
SAVE_EVERY = 25
NGRAM = 4  # interval n-grams the melody signature is made of
BANDS, ROWS = 8, 4  # MinHash: 32 hashes in 8 bands of 4
_PRIME = (1 << 31) - 1


@dataclass(frozen=True)
class Tune:
    """One tune of an ABC file."""

    path: str  # ABC file relative to the collections' root, e.g. "oneills1850/0001-0050.abc"
    index: int  # 1-based place in the file
    title: str
    text: str  # the file's header lines + the tune's lines

    @property
    def file(self) -> str:
        stem = Path(self.path).with_suffix("").as_posix().replace("/", "_")
        return f"{stem}_{self.index:04d}.mid"

    @property
    def source(self) -> str:
        return f"{self.path}#{self.index}"


def split_abc(text: str, path: str) -> list[Tune]:
    """The tunes of one ABC file's text (each with the file's header prepended)."""
    pieces = re.split(r"(?m)^(?=X:)", text)
    header = "" if pieces[0].lstrip().startswith("X:") else pieces.pop(0)
    header = "\n".join(line for line in header.splitlines() if re.match(r"^[A-Za-z]:", line))
    tunes = []
    for i, body in enumerate(pieces, start=1):
        title = next((m.group(1).strip() for m in re.finditer(r"(?m)^T:(.*)$", body)), "")
        tunes.append(Tune(path, i, title, (header + "\n" if header else "") + body))
    return tunes


def _order(name: str) -> bytes:
    return hashlib.sha1(name.encode("utf-8")).digest()


def list_tunes(root: str | Path | None = None, collections: Sequence[str] = tuple(COLLECTIONS)):
    """Every tune of ``collections`` under ``root`` (music21's corpus folder by default), in
    the order of a hash of their file names (a spread over the collections).

    Raises:
        DataError: a collection folder is missing.
    """
    if root is None:
        from aurl.data.corpus import _corpus_root

        root = _corpus_root()
    root = Path(root)
    tunes: list[Tune] = []
    for folder in collections:
        if not (root / folder).is_dir():
            raise DataError(f"{root / folder}: folk collection missing; reinstall music21")
        for f in sorted((root / folder).rglob("*.abc")):
            rel = f.relative_to(root).as_posix()
            if EXCLUDED.match(rel):
                continue
            tunes += split_abc(f.read_text(encoding="latin-1"), rel)
    return sorted(tunes, key=lambda t: _order(t.file))


# --------------------------------------------------------------------------------------------
# Converting one tune
# --------------------------------------------------------------------------------------------


def _unshare_time_signatures(stream) -> None:
    """music21's ABC reader can put one TimeSignature object into two measures (a meter that
    comes back), which its MIDI writer refuses: give each measure its own copy."""
    from music21 import meter
    from music21 import stream as m21stream

    seen: set[int] = set()
    for measure in stream.recurse().getElementsByClass(m21stream.Measure):
        for ts in list(measure.getElementsByClass(meter.TimeSignature)):
            if id(ts) in seen:
                measure.replace(ts, copy.deepcopy(ts))
            seen.add(id(ts))


def convert_tune(
    tune: Tune, out_path: str | Path, *, max_repeat_factor: float = MAX_REPEAT_FACTOR,
    max_minutes: float = MAX_MINUTES,
) -> dict[str, Any]:  # fmt: skip
    """Convert one ABC tune to a MIDI file; returns its manifest entry (group and split left
    out). An expansion beyond ``max_repeat_factor`` times the written tune, or longer than
    ``max_minutes``, is refused.

    Raises:
        ScoreSkipped: too long a text, unreadable, no notes, or a runaway repeat expansion.
    """
    from music21 import converter

    if len(tune.text) > MAX_TUNE_CHARS:
        raise ScoreSkipped(
            f"ABC text of {len(tune.text):,} characters (limit {MAX_TUNE_CHARS:,}): refused"
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            stream = converter.parse(tune.text, format="abc", forceSource=True)
            _unshare_time_signatures(stream)
        except Exception as e:  # music21 raises many types for text it cannot read
            raise ScoreSkipped(f"music21 cannot read it ({type(e).__name__}: {e})") from e
        score, repeats = stream_to_score(
            stream, max_repeat_factor=max_repeat_factor, max_minutes=max_minutes
        )
    if repeats.startswith("capped"):
        detail = repeats.split(": ", 1)[1].split(";")[0]
        raise ScoreSkipped(f"runaway repeat expansion refused ({detail})")
    title = tune.title or (stream.metadata.title if stream.metadata else "") or ""
    out_path = Path(out_path)
    atomic_write(out_path, lambda tmp: score.dump_midi(str(tmp)))
    folder = tune.path.split("/")[0]
    return {
        "file": out_path.name,
        "source": tune.source,
        "collection": COLLECTIONS.get(folder, folder),
        "composer": "traditional",
        "style": STYLE,
        "title": title,
        **score_facts(score, repeats, caught),
    }


def _convert_job(tune: Tune, out_dir: str) -> tuple[Tune, dict | None, str]:
    """Pool worker: ``(tune, entry, "")`` or ``(tune, None, reason)``."""
    try:
        return tune, convert_tune(tune, Path(out_dir) / tune.file), ""
    except ScoreSkipped as e:
        return tune, None, str(e)


# --------------------------------------------------------------------------------------------
# Groups without all pairs
# --------------------------------------------------------------------------------------------


def minhash(intervals: Sequence[int], n_hashes: int = BANDS * ROWS) -> np.ndarray | None:
    """The MinHash signature (``n_hashes`` uint64) of a melody's set of interval
    :data:`NGRAM`-grams; None when the melody has fewer than :data:`NGRAM` intervals.

    Each n-gram is hashed once (BLAKE2b, 32 bits); hash ``i`` is ``(a_i x + b_i) mod p`` with
    fixed ``a_i, b_i`` (a seeded generator: the same signatures on every machine)."""
    if len(intervals) < NGRAM:
        return None
    grams = {tuple(intervals[i : i + NGRAM]) for i in range(len(intervals) - NGRAM + 1)}
    x = np.array(
        [int.from_bytes(hashlib.blake2b(repr(g).encode(), digest_size=4).digest(), "big")
         for g in sorted(grams)],
        dtype=np.uint64,
    )  # fmt: skip
    rng = np.random.default_rng(20240601)
    a = rng.integers(1, _PRIME, n_hashes, dtype=np.uint64)
    b = rng.integers(0, _PRIME, n_hashes, dtype=np.uint64)
    return ((a[:, None] * x[None, :] + b[:, None]) % np.uint64(_PRIME)).min(axis=1)  # (n,)


def candidate_pairs(signatures: Mapping[str, np.ndarray | None]) -> set[tuple[str, str]]:
    """Pairs of names whose signatures agree on every row of at least one band."""
    pairs: set[tuple[str, str]] = set()
    for band in range(BANDS):
        buckets: dict[bytes, list[str]] = {}
        for name in sorted(signatures):
            sig = signatures[name]
            if sig is not None:
                buckets.setdefault(sig[band * ROWS : (band + 1) * ROWS].tobytes(), []).append(name)
        for members in buckets.values():
            pairs.update((a, b) for i, a in enumerate(members) for b in members[i + 1 :])
    return pairs


def folk_groups(
    titles: Mapping[str, str], melodies: Mapping[str, Sequence[int]], threshold: float = SAME_TUNE
) -> dict[str, str]:
    """file -> group key: the smallest normalized title of its group, else its smallest file
    name. Same title, or a MinHash candidate pair with difflib ratio >= ``threshold``, joins."""
    signatures = {f: minhash(melodies.get(f, ())) for f in titles}
    return group_by(
        titles, sorted(candidate_pairs(signatures)),
        accept=lambda a, b: similarity(melodies[a], melodies[b]) >= threshold,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# The corpus folder
# --------------------------------------------------------------------------------------------


def _write(out: Path, files: list[dict], skipped: list[dict], **kw: Any) -> None:
    import music21

    source = f"music21 {music21.__version__} corpus (ABC)"
    write_corpus_manifest(out, "folk", files, skipped, style=STYLE, source=source, **kw)


def build_folk(
    out: str | Path,
    *,
    limit: int = 0,
    workers: int = 0,
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
    root: str | Path | None = None,
    collections: Sequence[str] = tuple(COLLECTIONS),
    progress: Progress = silent,
) -> CorpusReport:
    """Convert the folk tunes into ``out`` (one MIDI file each) with ``manifest.json``.

    Args:
        out: output folder; an earlier (interrupted) run's tunes there are kept, not redone.
        limit: the first N tunes in the hashed order (0: all, ~13,000: hours on 2 cores).
        workers: conversion processes; 0 for all cores, 1 converts in this process.
        valid_fraction: share of groups marked ``valid``.
        test_fraction: share marked ``test``.
        root: folder holding the collection folders (default: music21's corpus).
        collections: which folders (default :data:`COLLECTIONS`).
        progress: progress wrapper (:func:`aurl.progress.bar` in the CLI).

    Returns:
        The report (``converted``: tunes converted by this call).

    Raises:
        DataError: a missing collection, or ``out`` holds another corpus.
        ConfigError: split fractions out of range.
    """
    check_fractions(valid_fraction, test_fraction)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tunes = list_tunes(root, collections)
    if limit:
        tunes = tunes[:limit]
    files, skipped = read_partial(out, "folk")
    done = {e["source"] for e in files} | {s["source"] for s in skipped}
    todo = [t for t in tunes if t.source not in done]
    report = CorpusReport(name="folk", out=out)

    def collect(tune: Tune, entry: dict | None, reason: str) -> None:
        if entry is None:
            skipped.append({"source": tune.source, "reason": reason})
        else:
            files.append(entry)
            report.converted += 1
        if (len(files) + len(skipped)) % SAVE_EVERY == 0:
            _write(out, files, skipped, complete=False, valid_fraction=valid_fraction,
                   test_fraction=test_fraction)  # fmt: skip

    workers = min(workers or os.cpu_count() or 1, max(len(todo), 1))
    if workers == 1:
        jobs = (_convert_job(t, str(out)) for t in todo)
        for result in progress(jobs, total=len(todo), desc="converting"):
            collect(*result)
    elif todo:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_convert_job, t, str(out)) for t in todo]
            for fut in progress(as_completed(futures), total=len(futures), desc="converting"):
                collect(*fut.result())
    titles = {e["file"]: e["title"] for e in files}
    melodies = {e["file"]: soprano_intervals(out / e["file"]) for e in files}
    groups = folk_groups(titles, melodies)
    for e in files:
        e["group"] = groups[e["file"]]
        e["split"] = split_of(e["group"], valid_fraction, test_fraction)
    _write(out, files, skipped, complete=True, valid_fraction=valid_fraction,
           test_fraction=test_fraction)  # fmt: skip
    report.files = sorted(files, key=lambda e: e["file"])
    report.skipped = sorted(skipped, key=lambda s: s["source"])
    return report
