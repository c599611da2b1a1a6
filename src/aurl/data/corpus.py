"""The bundled corpus: MIDI files converted from the scores that ship inside music21.

Two corpora, no network:

- ``bach-chorales``: the 371 Riemenschneider chorales of music21's chorale list, one file per
  distinct score (a few numbers share a score). They are kept pre-converted in
  ``aurl/data/bundled/bach-chorales/`` and copied in a moment; ``rebuild=True`` converts again.
- ``folk``: the ABC folk-tune collections, one tune per file (:mod:`aurl.data.folk`).
- ``classical``: the chorales plus the string quartets and other works of Beethoven, Mozart,
  Haydn, Schubert and Robert and Clara Schumann found in music21 (converted on demand: minutes).

Conversion of one score: music21 parses it, expands its repeats and writes MIDI; symusic drops
the empty tracks and writes the file. A score whose repeats music21 cannot expand is skipped and
reported. A runaway expansion (longer than ``max_repeat_factor`` times the written score, or than
``max_minutes``) is capped: the score is written once through in its written order instead.

Every corpus folder gets a ``manifest.json``: per file its source path inside music21's corpus,
composer, title, duration in seconds, note and track counts, how repeats were handled, music21's
warnings while reading it, its tune group (:mod:`aurl.data.tunes`: same hymn title or the same
soprano line) and its split, a hash of the group (:func:`aurl.data.split.split_of`), so that two
settings of one tune never land in two splits. ``aurl data prepare`` reads the groups back.
File names are deterministic: the source path with ``/`` turned into ``_`` and ``.mid``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aurl.data.split import check_fractions, split_of
from aurl.data.tunes import folder_groups
from aurl.errors import DataError
from aurl.fileio import atomic_write, atomic_write_text
from aurl.progress import Progress, silent

CORPORA = ("bach-chorales", "classical", "folk", "palestrina", "renaissance", "all")
# folk: aurl.data.folk; palestrina, renaissance, all: aurl.data.corpora
BUNDLED_DIR = Path(__file__).parent / "bundled"
MANIFEST = "manifest.json"

# music21 corpus folder -> composer as written in the manifest
COMPOSERS = {
    "bach": "Johann Sebastian Bach",
    "beethoven": "Ludwig van Beethoven",
    "mozart": "Wolfgang Amadeus Mozart",
    "haydn": "Joseph Haydn",
    "schubert": "Franz Schubert",
    "schumann_robert": "Robert Schumann",
    "schumann_clara": "Clara Schumann",
}
CLASSICAL_FOLDERS = (
    "beethoven",
    "mozart",
    "haydn",
    "schubert",
    "schumann_robert",
    "schumann_clara",
)
# One score is often stored in several formats; the first that exists is converted.
SCORE_EXTENSIONS = (".mxl", ".xml", ".musicxml", ".krn")

# The style label of each corpus's pieces (the chorales inside ``classical``: "chorale")
CORPUS_STYLE = {
    "bach-chorales": "chorale", "classical": "classical", "folk": "folk",
    "palestrina": "palestrina", "renaissance": "renaissance",
}  # fmt: skip

# A written repeat at most doubles a section, and a minuet-trio-da capo taken with all its
# repeats plays the minuet 4 times: a real expansion stays within 4x the written length
# (music21's Mozart K.80/iii: 3.4x). Beyond 4x, or past 30 min, music21 has gone astray: its
# Beethoven Op. 18 No. 4 expands to 65 min (4.2x).
MAX_REPEAT_FACTOR = 4.0
MAX_MINUTES = 30.0


@dataclass(frozen=True)
class Source:
    """One score of music21's corpus and the MIDI file it becomes."""

    path: str  # relative to music21's corpus folder, e.g. "bach/bwv269.mxl"
    composer: str
    title: str = ""  # "" -> read from the score's metadata

    @property
    def file(self) -> str:
        """The deterministic MIDI file name, e.g. ``bach_bwv269.mid``."""
        return Path(self.path).with_suffix("").as_posix().replace("/", "_") + ".mid"


@dataclass
class CorpusReport:
    """What :func:`build_corpus` did. ``files`` are manifest entries, sorted by file name."""

    name: str
    out: Path
    files: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"source", "reason"}
    copied: int = 0
    converted: int = 0

    @property
    def notes(self) -> int:
        return sum(f["notes"] for f in self.files)

    @property
    def duration_s(self) -> float:
        return sum(f["duration_s"] for f in self.files)

    @property
    def capped(self) -> list[dict[str, Any]]:
        """Entries whose repeat expansion was capped (written order kept)."""
        return [f for f in self.files if f["repeats"].startswith("capped")]


def style_of(corpus: str, entry: Mapping[str, Any]) -> str:
    """The style label of a manifest ``entry`` of corpus ``corpus``: the entry's own ``style``,
    else the corpus's (:data:`CORPUS_STYLE`), the chorales of ``classical`` being ``chorale``;
    ``""`` for a corpus of no known style."""
    if entry.get("style"):
        return str(entry["style"])
    if corpus == "classical" and str(entry.get("source", "")).startswith("bach/"):
        return "chorale"
    return CORPUS_STYLE.get(corpus, "")


# --------------------------------------------------------------------------------------------
# Which scores
# --------------------------------------------------------------------------------------------


def _corpus_root() -> Path:
    from music21 import common

    return Path(common.getCorpusFilePath())


def _existing_score(root: Path, stem: str) -> str | None:
    """``stem`` (no extension) with the first extension that exists, relative to ``root``."""
    for ext in SCORE_EXTENSIONS:
        if (root / (stem + ext)).is_file():
            return stem + ext
    # music21's chorale list names BWV 18.5-l, stored as bwv18.5-lz: match a prefix, as it does
    matches = sorted(p for p in root.glob(stem + "*") if p.suffix in SCORE_EXTENSIONS)
    return matches[0].relative_to(root).as_posix() if matches else None


def list_sources(name: str) -> list[Source]:
    """The scores of corpus ``name``, sorted by output file name.

    Raises:
        DataError: ``name`` is not one of :data:`CORPORA`.
    """
    if name not in ("bach-chorales", "classical"):
        raise DataError(f"unknown corpus {name!r}: choose one of bach-chorales, classical")
    from music21.corpus import chorales

    root = _corpus_root()
    sources: dict[str, Source] = {}
    # Riemenschneider numbering; several numbers share one score, which is kept once.
    for _number, info in sorted(chorales.ChoraleListRKBWV().byRiemenschneider.items()):
        rel = _existing_score(root, f"bach/bwv{info['bwv']}")
        if rel is not None and rel not in sources:
            sources[rel] = Source(rel, COMPOSERS["bach"], f"{info['title']} (BWV {info['bwv']})")
    if name == "classical":
        for folder in CLASSICAL_FOLDERS:
            stems = sorted(
                {p.relative_to(root).with_suffix("").as_posix() for p in (root / folder).rglob("*")
                 if p.suffix in SCORE_EXTENSIONS}
            )  # fmt: skip
            for stem in stems:
                rel = _existing_score(root, stem)
                assert rel is not None  # stems come from existing files
                sources[rel] = Source(rel, COMPOSERS[folder])
    return sorted(sources.values(), key=lambda s: s.file)


# --------------------------------------------------------------------------------------------
# Converting one score
# --------------------------------------------------------------------------------------------


class ScoreSkipped(Exception):
    """A score cannot be converted; the message says why (reported, not raised to the user)."""


def _strip_repeats(stream) -> None:
    """Remove repeat barlines, repeat expressions and volta brackets (in place)."""
    from music21 import bar, repeat, spanner
    from music21 import stream as m21stream

    for measure in stream.recurse().getElementsByClass(m21stream.Measure):
        if isinstance(measure.leftBarline, bar.Repeat):
            measure.leftBarline = None
        if isinstance(measure.rightBarline, bar.Repeat):
            measure.rightBarline = bar.Barline("regular")
    marks = [*stream.recurse().getElementsByClass(repeat.RepeatExpression),
             *stream.recurse().getElementsByClass(spanner.RepeatBracket)]  # fmt: skip
    for mark in marks:
        mark.activeSite.remove(mark)


def _midi_score(stream):
    """music21 stream -> symusic Score (music21 expands the repeats), empty tracks dropped."""
    import symusic
    from music21 import midi

    data = midi.translate.streamToMidiFile(stream).writestr()
    score = symusic.Score.from_midi(data)
    score.tracks = [t for t in score.tracks if len(t.notes) > 0]
    return score


def _quarters(score) -> float:
    return score.end() / score.ticks_per_quarter


def stream_to_score(
    stream, *, max_repeat_factor: float = MAX_REPEAT_FACTOR, max_minutes: float = MAX_MINUTES
) -> tuple[Any, str]:
    """Convert a music21 stream to a symusic Score with repeats expanded, capping runaways.

    Args:
        stream: A music21 Score (or Part/Stream) as parsed from the corpus; not modified.
        max_repeat_factor: The expanded piece may be at most this many times the written length.
        max_minutes: ... and at most this long.

    Returns:
        ``(score, repeats)`` where ``repeats`` is ``"expanded"`` (or ``"none"`` when the score
        has no repeats) or ``"capped: ..."`` saying what the expansion would have given.

    Raises:
        ScoreSkipped: music21 cannot expand the repeats or the score has no notes.
    """
    from music21 import exceptions21, repeat

    written = float(stream.highestTime)
    try:
        score = _midi_score(stream)
    except repeat.ExpanderException as e:
        raise ScoreSkipped(f"music21 cannot expand its repeats ({e})") from e
    except exceptions21.Music21Exception as e:
        raise ScoreSkipped(f"music21 cannot write it as MIDI ({type(e).__name__}: {e})") from e
    if not score.tracks:
        raise ScoreSkipped("no notes")
    factor = _quarters(score) / written if written > 0 else 1.0
    minutes = score.to("second").end() / 60.0
    if factor <= max_repeat_factor and minutes <= max_minutes:
        return score, ("expanded" if factor > 1.0 + 1e-6 else "none")
    plain = copy.deepcopy(stream)
    _strip_repeats(plain)
    capped = _midi_score(plain)
    note = f"capped: expansion gave {minutes:.1f} min ({factor:.1f}x the written score); written order kept"
    return capped, note


def convert_score(
    source: Source,
    out_path: str | Path,
    *,
    root: str | Path | None = None,
    max_repeat_factor: float = MAX_REPEAT_FACTOR,
    max_minutes: float = MAX_MINUTES,
) -> dict[str, Any]:
    """Convert one corpus score to a MIDI file and return its manifest entry (split left out).

    Args:
        source: The score (path relative to ``root``) and its composer/title.
        out_path: The MIDI file to write (atomically: a crash leaves no half file).
        root: Folder ``source.path`` is relative to; default: music21's corpus folder.
        max_repeat_factor: See :func:`stream_to_score`.
        max_minutes: See :func:`stream_to_score`.

    Raises:
        ScoreSkipped: music21 cannot read or expand the score, or it has no notes.
    """
    from music21 import converter
    from music21 import stream as m21stream

    path = Path(root or _corpus_root()) / source.path
    # music21 warns about oddities of the score (overfull bars, ...): they go to the manifest,
    # not to stderr, where they would tear through the progress bar.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            # forceSource: music21's pickle cache would skip the warnings and write to ~/
            stream = converter.parse(str(path), forceSource=True)
            if isinstance(stream, m21stream.Opus):  # Josquin's ABC: one tune per voice
                stream = stream.mergeScores()
        except Exception as e:  # music21 raises many types for a score it cannot read
            raise ScoreSkipped(f"music21 cannot read it ({type(e).__name__}: {e})") from e
        score, repeats = stream_to_score(
            stream, max_repeat_factor=max_repeat_factor, max_minutes=max_minutes
        )
    title = source.title or _title_of(stream) or Path(source.path).with_suffix("").as_posix()
    out_path = Path(out_path)
    atomic_write(out_path, lambda tmp: score.dump_midi(str(tmp)))
    return {
        "file": out_path.name,
        "source": source.path,
        "composer": source.composer,
        "title": title,
        **score_facts(score, repeats, caught),
    }


def score_facts(score: Any, repeats: str, caught: list) -> dict[str, Any]:
    """The manifest fields every converted score has: duration, notes, tracks, how repeats were
    expanded, and music21's warnings (first line of each, deduplicated)."""
    return {
        "duration_s": round(float(score.to("second").end()), 3),
        "notes": int(sum(len(t.notes) for t in score.tracks)),
        "tracks": len(score.tracks),
        "repeats": repeats,
        "warnings": list(dict.fromkeys(str(w.message).split("\n")[0][:200] for w in caught)),
    }


def _title_of(stream) -> str:
    md = stream.metadata
    if md is None:
        return ""
    parts = [str(x) for x in (md.title, md.movementName) if x]
    return " - ".join(dict.fromkeys(parts))  # title and movement name are often the same


def _convert_job(source: Source, out_dir: str, root: str) -> tuple[Source, dict | None, str]:
    """Pool worker: ``(source, entry, "")`` or ``(source, None, reason)``."""
    try:
        return source, convert_score(source, Path(out_dir) / source.file, root=root), ""
    except ScoreSkipped as e:
        return source, None, str(e)


# --------------------------------------------------------------------------------------------
# Building a corpus folder
# --------------------------------------------------------------------------------------------


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a corpus folder.

    Raises:
        DataError: There is no readable ``manifest.json`` in ``folder``.
    """
    path = Path(folder) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(
            f"{path}: cannot read the corpus manifest ({e}); build it with "
            "'aurl data corpus --out FOLDER'"
        ) from e


def manifest_groups(folder: str | Path) -> dict[str, str]:
    """file name -> tune group of the corpus manifest in ``folder``; ``{}`` where the folder has
    no manifest (any folder of MIDI files) or the manifest predates groups."""
    if not (Path(folder) / MANIFEST).is_file():
        return {}
    entries = read_manifest(folder).get("files", [])
    return {e["file"]: e["group"] for e in entries if "group" in e}


def write_manifest(report: CorpusReport, *, valid_fraction: float, test_fraction: float) -> Path:
    """Write ``report.out/manifest.json`` atomically (groups and splits recomputed)."""
    import music21

    groups = folder_groups(report.out, report.files)
    for entry in report.files:
        entry["group"] = groups[entry["file"]]
        entry["split"] = split_of(entry["group"], valid_fraction, test_fraction)
        entry["style"] = style_of(report.name, entry)
    manifest = {
        "name": report.name,
        "source": f"music21 {music21.__version__} corpus",
        "valid_fraction": valid_fraction,
        "test_fraction": test_fraction,
        "files": report.files,
        "skipped": report.skipped,
    }
    path = report.out / MANIFEST
    atomic_write_text(path, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return path


def convert_sources(
    sources: Sequence[Source],
    out: str | Path,
    *,
    workers: int = 0,
    root: str | Path | None = None,
    progress: Progress = silent,
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Convert ``sources`` into ``out`` on a process pool; returns ``(entries, skipped)``.

    ``workers``: processes, 0 for all cores; 1 converts in this process.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    root = str(root or _corpus_root())
    workers = min(workers or os.cpu_count() or 1, max(len(sources), 1))
    # Largest scores first, so that no core idles at the end on a long quartet.
    order = sorted(sources, key=lambda s: -_size(Path(root) / s.path))
    entries: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    if workers == 1:
        results = (_convert_job(s, str(out), root) for s in order)
        for source, entry, reason in progress(results, total=len(order), desc="converting"):
            _collect(source, entry, reason, entries, skipped)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_convert_job, s, str(out), root) for s in order]
            for fut in progress(as_completed(futures), total=len(futures), desc="converting"):
                _collect(*fut.result(), entries, skipped)
    entries.sort(key=lambda e: e["file"])
    skipped.sort(key=lambda s: s["source"])
    return entries, skipped


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _collect(source, entry, reason, entries, skipped) -> None:
    if entry is None:
        skipped.append({"source": source.path, "reason": reason})
    else:
        entries.append(entry)


def _copy_bundled(name: str, out: Path, progress: Progress) -> tuple[list[dict], list[dict]]:
    folder = BUNDLED_DIR / name
    manifest = read_manifest(folder)
    out.mkdir(parents=True, exist_ok=True)
    entries = manifest["files"]
    for entry in progress(entries, total=len(entries), desc="copying"):
        src = folder / entry["file"]
        if not src.is_file():
            raise DataError(
                f"{src}: listed in the bundled manifest but missing; reinstall aurl or run "
                "'aurl data corpus --rebuild'"
            )
        shutil.copyfile(src, out / entry["file"])
    return [dict(e) for e in entries], list(manifest["skipped"])


def build_corpus(
    name: str,
    out: str | Path,
    *,
    rebuild: bool = False,
    workers: int = 0,
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
    progress: Progress = silent,
    limit: int = 0,
) -> CorpusReport:
    """Write corpus ``name`` as MIDI files plus ``manifest.json`` into ``out``.

    Args:
        name: one of :data:`CORPORA`.
        out: Output folder (created; existing files of the same names are replaced).
        rebuild: Convert the chorales from music21 again instead of copying the bundled files.
        workers: Conversion processes; 0 for all cores.
        valid_fraction: Share of files marked ``valid`` in the manifest (``data.valid_fraction``).
        test_fraction: Share marked ``test`` (``data.test_fraction``).
        progress: Progress wrapper (:func:`aurl.progress.bar` in the CLI).
        limit: ``folk``, ``palestrina``, ``renaissance``: the first N scores in a hashed
            order (a spread); ``all``: the first N of each corpus (:mod:`aurl.data.corpora`).

    Returns:
        A :class:`CorpusReport` with the manifest entries and the skipped scores with reasons.

    Raises:
        DataError: Unknown corpus name, or the bundled files are missing.
        ConfigError: The split fractions are out of range.
    """
    if name == "folk":
        from aurl.data.folk import build_folk

        return build_folk(
            out, limit=limit, workers=workers, valid_fraction=valid_fraction,
            test_fraction=test_fraction, progress=progress,
        )  # fmt: skip
    if name in ("palestrina", "renaissance", "all"):
        from aurl.data import corpora

        build = {"palestrina": corpora.build_palestrina, "renaissance": corpora.build_renaissance,
                 "all": corpora.build_all}[name]  # fmt: skip
        return build(
            out, limit=limit, workers=workers, valid_fraction=valid_fraction,
            test_fraction=test_fraction, progress=progress,
        )  # fmt: skip
    if limit:
        raise DataError(
            f"--limit applies to the folk, palestrina, renaissance and all corpora, not to {name!r}"
        )
    check_fractions(valid_fraction, test_fraction)
    sources = list_sources(name)
    report = CorpusReport(name=name, out=Path(out))
    to_convert = sources
    copied_names: set[str] = set()
    if not rebuild:
        entries, skipped = _copy_bundled("bach-chorales", report.out, progress)
        report.files += entries
        report.skipped += skipped
        copied_names = {e["file"] for e in entries}
        done = {e["source"] for e in entries} | {s["source"] for s in skipped}
        to_convert = [s for s in sources if s.path not in done]
    if to_convert:
        entries, skipped = convert_sources(
            to_convert, report.out, workers=workers, progress=progress
        )
        report.files += entries
        report.skipped += skipped
    report.files.sort(key=lambda e: e["file"])
    drop_duplicates(report, copied_names)
    report.skipped.sort(key=lambda s: s["source"])
    write_manifest(report, valid_fraction=valid_fraction, test_fraction=test_fraction)
    return report


def drop_duplicates(
    report: CorpusReport, copied_names: set[str] | frozenset[str] = frozenset()
) -> None:
    """Keep one file of each identical MIDI content (music21 ships some pieces twice, e.g.
    Dichterliebe no. 2 as ``dichterliebe_no2`` and ``opus48no2``): a duplicate would land in
    two splits and leak test music into training."""
    first: dict[str, str] = {}
    kept = []
    for entry in report.files:  # sorted by name: the first name is kept
        path = report.out / entry["file"]
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest in first:
            path.unlink()
            reason = f"same music as {first[digest]}"
            report.skipped.append({"source": entry["source"], "reason": reason})
        else:
            first[digest] = entry["file"]
            kept.append(entry)
    report.files = kept
    report.copied = sum(e["file"] in copied_names for e in kept)
    report.converted = len(kept) - report.copied
