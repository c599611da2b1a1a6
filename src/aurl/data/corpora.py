"""The early-music corpora and ``all``: music21's Palestrina masses, its other early collections,
and every named corpus in one folder, each piece with one style label.

- ``palestrina``: the Humdrum (``.krn``) mass movements of Palestrina's masses in music21
  (~1,300 files, 4-6 voices). A movement's work is its mass (the ``!!!OPR`` record); the
  group the split hashes is the mass, so no movement of a test mass is in training.
- ``renaissance``: the other early collections (:data:`RENAISSANCE`): Josquin's chansons (ABC),
  Monteverdi's madrigals (books 3-5), the Trecento collection (PMFC), Ciconia, the Lucca Gloria
  and Lusitano; Palestrina excluded. Groups: :func:`aurl.data.tunes.folder_groups` (same title
  or the same top line).
- ``all``: every named corpus in a subfolder of its own (``bach-chorales/``, ``classical/``
  without the chorales, ``folk/``, ``palestrina/``, ``renaissance/``), each with its manifest,
  plus a top ``manifest.json`` listing every file as ``<corpus>/<file>``. ``--limit N`` takes
  the first N of each corpus. The leftover single pieces in music21 (a Joplin rag, a Chopin
  mazurka, Schoenberg, Webern, ...) belong to no corpus: one piece cannot teach a style.

Style labels (:data:`aurl.data.corpus.CORPUS_STYLE`), one per piece, disjoint by construction since every piece is in
exactly one corpus of ``all``: ``chorale`` (Bach's four-part chorales), ``classical`` (the
Viennese and early Romantic works: Beethoven, Mozart, Haydn, Schubert, the Schumanns),
``folk`` (the ABC tune books), ``palestrina`` and ``renaissance``. They name repertoires, not
composers: apart from Bach and Palestrina each composer has a handful of pieces, too few to
learn from, while the repertoires differ plainly in texture (monophonic tunes, four-part
chorales, imitative vocal polyphony, instrumental chamber music). Palestrina is its own label
because it is the one large single-composer body of Renaissance polyphony; ``renaissance``
(Trecento to Monteverdi, 1350-1605) is the broader, smaller remainder.

Conversion (:func:`build_sources`): one score per file through
:func:`aurl.data.corpus.convert_score` (repeats expanded, a runaway expansion capped), a score
file over :data:`MAX_SCORE_BYTES` refused before music21 reads it, a process pool
(``workers``), a progress bar, scores in the order of a hash of their file names (so
``--limit`` takes a spread), and resumable: the manifest is rewritten atomically every
:data:`SAVE_EVERY` scores and a new call keeps every listed file that exists and every skip.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from aurl.data.corpus import (
    CLASSICAL_FOLDERS,
    COMPOSERS,
    CORPUS_STYLE,
    MANIFEST,
    SCORE_EXTENSIONS,
    CorpusReport,
    Source,
    _convert_job,
    _corpus_root,
    drop_duplicates,
    style_of,
)
from aurl.data.split import check_fractions, split_of
from aurl.data.tunes import folder_groups, normalize_title
from aurl.errors import DataError
from aurl.fileio import atomic_write_text
from aurl.progress import Progress, silent

# the corpora of ``all``, in order, with the style of their pieces (classical: chorales left out)
ALL = ("bach-chorales", "classical", "folk", "palestrina", "renaissance")
# music21 corpus folder -> composer of the renaissance corpus
RENAISSANCE = {
    "josquin": "Josquin des Prez",
    "monteverdi": "Claudio Monteverdi",
    "trecento": "Trecento composers (PMFC)",
    "ciconia": "Johannes Ciconia",
    "luca": "anonymous (Lucca codex)",
    "lusitano": "Vicente Lusitano",
}
RENAISSANCE_EXTENSIONS = (*SCORE_EXTENSIONS, ".abc")
PALESTRINA = "Giovanni Pierluigi da Palestrina"
MAX_SCORE_BYTES = 4 << 20  # the largest early score in music21 is 1.3 MB of MusicXML
SAVE_EVERY = 25


# --------------------------------------------------------------------------------------------
# Which scores
# --------------------------------------------------------------------------------------------


def _hashed(sources: Sequence[Source]) -> list[Source]:
    return sorted(sources, key=lambda s: hashlib.sha1(s.file.encode()).digest())


def humdrum_records(path: str | Path) -> dict[str, str]:
    """The ``!!!KEY: value`` reference records of a Humdrum file (the first of each key)."""
    records: dict[str, str] = {}
    with open(path, encoding="latin-1") as f:
        for line in f:
            m = re.match(r"^!!!([A-Za-z0-9]+):\s*(.*?)\s*$", line)
            if m:
                records.setdefault(m.group(1), m.group(2))
            elif not line.startswith("!"):
                break  # the records precede the data
    return records


def palestrina_sources(root: str | Path | None = None) -> list[tuple[Source, str]]:
    """``(source, mass)`` of every Palestrina movement, in hashed order. The title is
    ``"<mass> - <movement>"``."""
    root = Path(root or _corpus_root())
    folder = root / "palestrina"
    if not folder.is_dir():
        raise DataError(f"{folder}: the Palestrina corpus is missing; reinstall music21")
    out = []
    for f in sorted(folder.glob("*.krn")):
        rec = humdrum_records(f)
        mass = rec.get("OPR") or f.stem
        title = " - ".join(x for x in (mass, rec.get("OTL", "")) if x)
        out.append((Source(f.relative_to(root).as_posix(), PALESTRINA, title), mass))
    order = {s.file: i for i, s in enumerate(_hashed([s for s, _ in out]))}
    return sorted(out, key=lambda sm: order[sm[0].file])


def renaissance_sources(root: str | Path | None = None) -> list[Source]:
    """Every score of the :data:`RENAISSANCE` folders (one format per score), hashed order."""
    root = Path(root or _corpus_root())
    sources: dict[str, Source] = {}
    for folder, composer in RENAISSANCE.items():
        if not (root / folder).is_dir():
            raise DataError(f"{root / folder}: early-music folder missing; reinstall music21")
        files = sorted(p for p in (root / folder).rglob("*") if p.suffix in RENAISSANCE_EXTENSIONS)
        for p in sorted(files, key=lambda p: RENAISSANCE_EXTENSIONS.index(p.suffix)):
            stem = p.relative_to(root).with_suffix("").as_posix()
            sources.setdefault(stem, Source(p.relative_to(root).as_posix(), composer))
    return _hashed(list(sources.values()))


def classical_sources(root: str | Path | None = None) -> list[Source]:
    """The ``classical`` corpus without its chorales (for ``all``), hashed order."""
    root = Path(root or _corpus_root())
    sources: dict[str, Source] = {}
    for folder in CLASSICAL_FOLDERS:
        files = sorted(p for p in (root / folder).rglob("*") if p.suffix in SCORE_EXTENSIONS)
        for p in sorted(files, key=lambda p: SCORE_EXTENSIONS.index(p.suffix)):
            stem = p.relative_to(root).with_suffix("").as_posix()
            sources.setdefault(stem, Source(p.relative_to(root).as_posix(), COMPOSERS[folder]))
    return _hashed(list(sources.values()))


# --------------------------------------------------------------------------------------------
# A resumable corpus folder
# --------------------------------------------------------------------------------------------


def _bounded_job(source: Source, out_dir: str, root: str) -> tuple[Source, dict | None, str]:
    """Pool worker: :func:`aurl.data.corpus._convert_job` behind the file-size bound."""
    size = os.path.getsize(Path(root) / source.path)
    if size > MAX_SCORE_BYTES:
        return source, None, f"score file of {size:,} bytes (limit {MAX_SCORE_BYTES:,}): refused"
    return _convert_job(source, out_dir, root)


def read_partial(out: Path, name: str) -> tuple[list[dict], list[dict]]:
    """Entries (their MIDI file present) and skips of an earlier run of corpus ``name``.

    Raises:
        DataError: the manifest is unreadable or belongs to another corpus.
    """
    path = out / MANIFEST
    if not path.is_file():
        return [], []
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(
            f"{path}: unreadable manifest ({e}); delete it to convert the folder again"
        ) from e
    if manifest.get("name") != name:
        raise DataError(
            f"{path} belongs to corpus {manifest.get('name')!r}: write the {name} corpus into "
            "another --out folder"
        )
    files = [e for e in manifest.get("files", []) if (out / e["file"]).is_file()]
    return files, list(manifest.get("skipped", []))


def write_corpus_manifest(
    out: Path, name: str, files: list[dict], skipped: list[dict], *, complete: bool,
    valid_fraction: float, test_fraction: float, **extra: Any,
) -> None:  # fmt: skip
    """Write ``out/manifest.json`` atomically (entries sorted by file, skips by source);
    ``extra`` fields (e.g. ``style``, or a more precise ``source``) go beside the name."""
    import music21

    manifest = {
        "name": name, "source": f"music21 {music21.__version__} corpus", **extra,
        "complete": complete, "valid_fraction": valid_fraction, "test_fraction": test_fraction,
        "files": sorted(files, key=lambda e: e["file"]),
        "skipped": sorted(skipped, key=lambda s: s["source"]),
    }  # fmt: skip
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")


def build_sources(
    name: str,
    sources: Sequence[Source],
    out: str | Path,
    *,
    style: str,
    groups: Callable[[Path, list[dict]], dict[str, str]],
    extra: Callable[[Source], dict[str, Any]] | None = None,
    limit: int = 0,
    workers: int = 0,
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
    root: str | Path | None = None,
    progress: Progress = silent,
) -> CorpusReport:
    """Convert ``sources`` (the first ``limit``; 0: all) into ``out``, resumably.

    Args:
        name: corpus name written in the manifest (a folder of another name is refused).
        sources: the scores, in the order ``limit`` takes them.
        out: output folder; an earlier run's files there are kept, not redone.
        style: style label of every entry.
        groups: ``(out, entries) -> {file: group}``, the key the split hashes.
        extra: more manifest fields of a source's entry (e.g. its ``work``).
        limit: the first N sources (0: all).
        workers: conversion processes; 0 for all cores, 1 converts in this process.
        valid_fraction: share of groups marked ``valid``.
        test_fraction: share marked ``test``.
        root: folder the sources' paths are relative to (default: music21's corpus).
        progress: progress wrapper (:func:`aurl.progress.bar` in the CLI).

    Returns:
        The report (``converted``: scores converted by this call).

    Raises:
        DataError: ``out`` holds another corpus.
        ConfigError: split fractions out of range.
    """
    check_fractions(valid_fraction, test_fraction)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    root = str(root or _corpus_root())
    sources = list(sources[:limit] if limit else sources)
    files, skipped = read_partial(out, name)
    done = {e["source"] for e in files} | {s["source"] for s in skipped}
    todo = [s for s in sources if s.path not in done]
    report = CorpusReport(name=name, out=out)
    fields = dict(style=style, valid_fraction=valid_fraction, test_fraction=test_fraction)

    def collect(source: Source, entry: dict | None, reason: str) -> None:
        if entry is None:
            skipped.append({"source": source.path, "reason": reason})
        else:
            files.append({**entry, "style": style, **(extra(source) if extra else {})})
            report.converted += 1
        if (len(files) + len(skipped)) % SAVE_EVERY == 0:
            write_corpus_manifest(out, name, files, skipped, complete=False, **fields)

    workers = min(workers or os.cpu_count() or 1, max(len(todo), 1))
    if workers == 1:
        jobs = (_bounded_job(s, str(out), root) for s in todo)
        for result in progress(jobs, total=len(todo), desc="converting"):
            collect(*result)
    elif todo:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_bounded_job, s, str(out), root) for s in todo]
            for fut in progress(as_completed(futures), total=len(futures), desc="converting"):
                collect(*fut.result())
    report.files = sorted(files, key=lambda e: e["file"])
    report.skipped = skipped
    drop_duplicates(report)  # music21 ships some scores twice: one copy, one split
    report.copied, report.converted = 0, sum(e["source"] not in done for e in report.files)
    keys = groups(out, report.files)
    for e in report.files:
        e["group"] = keys[e["file"]]
        e["split"] = split_of(e["group"], valid_fraction, test_fraction)
    report.skipped.sort(key=lambda s: s["source"])
    write_corpus_manifest(out, name, report.files, report.skipped, complete=True, **fields)
    return report


def _work_groups(out: Path, entries: list[dict]) -> dict[str, str]:
    return {e["file"]: normalize_title(e["work"]) or e["file"] for e in entries}


def build_palestrina(out: str | Path, **kw: Any) -> CorpusReport:
    """The ``palestrina`` corpus (see the module docstring); ``kw`` as :func:`build_sources`."""
    pairs = palestrina_sources(kw.get("root"))
    mass = {s.path: m for s, m in pairs}
    return build_sources(
        "palestrina", [s for s, _ in pairs], out, style="palestrina", groups=_work_groups,
        extra=lambda s: {"work": mass[s.path]}, **kw,
    )  # fmt: skip


def build_renaissance(out: str | Path, **kw: Any) -> CorpusReport:
    """The ``renaissance`` corpus (see the module docstring); ``kw`` as :func:`build_sources`."""
    return build_sources(
        "renaissance", renaissance_sources(kw.get("root")), out, style="renaissance",
        groups=folder_groups, **kw,
    )  # fmt: skip


def build_classical_only(out: str | Path, **kw: Any) -> CorpusReport:
    """``classical`` without the chorales (its part of ``all``)."""
    return build_sources(
        "classical", classical_sources(kw.get("root")), out, style="classical",
        groups=folder_groups, **kw,
    )  # fmt: skip


def build_all(
    out: str | Path,
    *,
    limit: int = 0,
    workers: int = 0,
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
    root: str | Path | None = None,
    progress: Progress = silent,
) -> CorpusReport:
    """Every corpus of :data:`ALL` into ``out/<corpus>/`` plus a top manifest listing each file
    as ``<corpus>/<file>`` with its style, group and split. ``limit``: the first N of each
    corpus (the bundled chorales are copied whole). Each part is resumable on its own.
    ``root``: the folder of music21's corpus folders (default: music21's own; with another,
    the folk collections found there).

    Raises:
        DataError: a part's folder holds another corpus.
        ConfigError: split fractions out of range.
    """
    from aurl.data.corpus import build_corpus
    from aurl.data.folk import COLLECTIONS, build_folk

    out = Path(out)
    folk = tuple(COLLECTIONS)
    if root is not None:
        folk = tuple(c for c in COLLECTIONS if (Path(root) / c).is_dir())
    kw = dict(workers=workers, valid_fraction=valid_fraction, test_fraction=test_fraction,
              progress=progress)  # fmt: skip
    builders: dict[str, Callable[[Path], CorpusReport]] = {
        "bach-chorales": lambda p: build_corpus("bach-chorales", p, **kw),
        "classical": lambda p: build_classical_only(p, limit=limit, root=root, **kw),
        "folk": lambda p: build_folk(p, limit=limit, root=root, collections=folk, **kw),
        "palestrina": lambda p: build_palestrina(p, limit=limit, root=root, **kw),
        "renaissance": lambda p: build_renaissance(p, limit=limit, root=root, **kw),
    }
    report = CorpusReport(name="all", out=out)
    for name in ALL:
        part = builders[name](out / name)
        for e in part.files:
            report.files.append({**e, "file": f"{name}/{e['file']}", "corpus": name,
                                 "style": style_of(name, e)})  # fmt: skip
        report.skipped += [{**s, "corpus": name} for s in part.skipped]
        report.copied += part.copied
        report.converted += part.converted
    write_corpus_manifest(
        out, "all", report.files, report.skipped, complete=True, valid_fraction=valid_fraction,
        test_fraction=test_fraction, corpora=list(ALL), styles=sorted(set(CORPUS_STYLE.values())),
    )  # fmt: skip
    return report


def manifest_labels(folder: str | Path) -> dict[str, dict[str, str]]:
    """``{relative file: {"group": ..., "style": ...}}`` from the ``manifest.json`` of
    ``folder`` and of its immediate subfolders (a folder holding several corpora, each in its
    own subfolder, e.g. ``aurl data corpus --out mix/folk``); the top manifest wins where both
    list a file. ``group`` is absent where a manifest predates groups, ``style`` where the
    corpus has none. ``{}`` for a folder without manifests (any folder of MIDI files)."""
    from aurl.data.corpus import read_manifest

    folder = Path(folder)
    labels: dict[str, dict[str, str]] = {}
    places = [(folder, "")] + [
        (p, p.name + "/") for p in sorted(folder.iterdir()) if (p / MANIFEST).is_file()
    ] if folder.is_dir() else []  # fmt: skip
    for place, prefix in places:
        if not (place / MANIFEST).is_file():
            continue
        manifest = read_manifest(place)
        for e in manifest.get("files", []):
            row = {"style": style_of(str(e.get("corpus") or manifest.get("name", "")), e)}
            if "group" in e:
                row["group"] = e["group"]
            labels.setdefault(prefix + e["file"], {k: v for k, v in row.items() if v})
    return labels
