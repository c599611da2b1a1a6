"""``aurl harmonize``, ``aurl infill`` and ``aurl accompany``: composing around given notes.

Each command reads its file, checks everything (the given notes, the span, the output names, the
checkpoint) before the model runs, calls one function of :mod:`aurl.generation.compose`, and
writes one file per sample (MIDI, MusicXML with ``--format musicxml``) with the input's tempo,
time and key signatures. The given notes are copied from the input, never re-decoded, and the
written file is read back to check that they are all there.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from aurl.engines import ENGINES

MUSICXML = (".musicxml", ".xml", ".mxl")


def register(sub: argparse._SubParsersAction) -> None:
    h = sub.add_parser(
        "harmonize",
        help="compose lower voices under a melody (a chorale from a tune)",
        description="Harmonize MELODY (a MIDI or MusicXML file with one line, or a score whose "
        "highest track is the melody): the melody is kept exactly and the model composes the "
        "voices under it. Example:\n  aurl harmonize tune.mid --out harmonized/ --num-samples 4",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    h.add_argument("melody", metavar="MELODY",
                   help="MIDI or MusicXML file, or a folder of them (each harmonized; one that "
                   "cannot be is reported and skipped)")  # fmt: skip
    h.add_argument("--voices", type=int, default=4, help="voices in all, melody included (2-4)")
    h.add_argument(
        "--key", metavar="KEY", help="favour this key for the new voices, e.g. 'G major'"
    )
    h.add_argument(
        "--no-cadences", dest="cadences", action="store_false",
        help="do not lean towards a cadence where the melody's phrases end (by default the "
        "voices lean to V7-I under a tonic note and to V under a dominant one there, and with "
        "--particles the rows that arrive on a cadence replace those that do not)",
    )  # fmt: skip
    _common(h)
    h.set_defaults(func=run_harmonize)

    i = sub.add_parser(
        "infill",
        help="regenerate bars (or seconds) of a piece, joining what comes before and after",
        description="Regenerate bars A-B (1-based, inclusive, in the file's own meter) or "
        "seconds S-T of PIECE; everything outside the span is kept note for note. With --part "
        "only one track is regenerated over the others. Example:\n"
        "  aurl infill chorale.mid --bars 3-4 --part Alto --out infilled/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    i.add_argument("piece", metavar="PIECE", help="MIDI or MusicXML file")
    span = i.add_mutually_exclusive_group(required=True)
    span.add_argument("--bars", metavar="A-B", help="bars to regenerate, e.g. 3-4")
    span.add_argument("--span", metavar="S-T", help="seconds to regenerate, e.g. 4.5-9")
    i.add_argument("--part", metavar="NAME|INDEX",
                   help="regenerate only this track (it keeps its place among the others: a "
                   "new alto between the soprano and the tenor)")  # fmt: skip
    _common(i)
    i.set_defaults(func=run_infill)

    a = sub.add_parser(
        "accompany",
        help="compose the other voices around a part",
        description="Keep the notes of PART (a MIDI or MusicXML file) and compose the other "
        "voices around them, above and below, as four-part writing does: the part is the SATB "
        "voice its track names (else the one whose range is nearest its pitch), an alto gets a "
        "soprano above it and a tenor and a bass below. Example:\n"
        "  aurl accompany alto.mid --out acc/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a.add_argument("part", metavar="PART",
                   help="MIDI or MusicXML file, or a folder of them (each accompanied; one that "
                   "cannot be is reported and skipped)")  # fmt: skip
    a.add_argument("--voices", type=int, default=4, help="voices in all, the part included")
    _common(a)
    a.set_defaults(func=run_accompany)


def _common(p: argparse.ArgumentParser) -> None:
    from aurl.cli.generate import add_model_argument, add_precision_arguments, default_precision
    from aurl.engines.cpu import COMPOSING_QUANTIZED

    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--checkpoint", metavar="DIR", help="model folder (default: shipped model)")
    add_model_argument(p)
    p.add_argument("--num-samples", type=int, default=1, metavar="N", help="results (default 1)")
    p.add_argument(
        "--particles", type=int, default=1, metavar="K",
        help="sequential Monte Carlo rows per result (default 1: forcing alone, the fast "
        "path; 8 fits the voices to the melody better, at ~8x the CPU)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T", help="default 1")
    p.add_argument("--format", default="mid", metavar="LIST",
                   help="mid,musicxml,png,wav (wav: the built-in synthesizer)")  # fmt: skip
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    engine = p.add_argument(
        "--engine", choices=("auto", *ENGINES), default="auto",
        help="auto (default): native where it runs the model, else torch; native: Aurl's own "
        "compiled decode step on the model folder (a plain transformer's; ~15x less CPU than "
        "torch), int8 unless --fp32; torch: PyTorch, every kind of model (VAE, windowed "
        "attention, fill-in-the-middle, anticipation); onnx: onnxruntime, the model's graphs "
        "written once to ~/.cache/aurl/onnx (or give an export folder as --checkpoint); their "
        "precision: %(default_precision)s, unless --int8 / --int4 / --fp32",
    )  # fmt: skip
    engine.default_precision = default_precision(COMPOSING_QUANTIZED)
    add_precision_arguments(
        p,
        int8="with --engine onnx: the model's int8 graphs (the default on CPUs with integer dot "
        "products: AVX2, VNNI, ARM dotprod; int4 there reached fewer cadences at phrase ends)",
        int4="with --engine onnx: the model's int4 graphs (aurl generate's default there)",
        fp32="with --engine onnx: the model's fp32 graphs (the default on other CPUs)",
        quantized=COMPOSING_QUANTIZED,
    )


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


# music21 reads MusicXML in Python, and its time grows faster than the file: Beethoven's
# op. 18/1 i (music21's corpus, 1.4 MiB of XML in a 40 KB .mxl) takes 30 s here (26 s of it
# writing the MIDI), a one-part score of 4,000 bars (0.5 MiB) 22 s. A file's bound in a worker
# process (aurl.data.isolate) is these per MiB of the XML music21 reads, not of the archive.
MUSICXML_TIME_S = 10.0
MUSICXML_TIME_PER_MIB_S = 40.0


def musicxml_bytes(path: str | Path) -> int:
    """The bytes of XML music21 reads for ``path``: the file's size, or for an ``.mxl``
    archive its largest member's declared size (what reading it unpacks, and no more:
    :mod:`zipfile` stops a member at its declared size)."""
    import os
    import zipfile

    path, size = Path(path), 0
    try:
        size = os.stat(path).st_size
        if path.suffix.lower() == ".mxl" and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                size = max((i.file_size for i in z.infolist()), default=0)
    except (OSError, zipfile.BadZipFile, ValueError):
        pass  # unreadable or a damaged archive: music21 says why when it reads it
    return size


def read_seconds(path: str | Path) -> float:
    """The time bound of reading ``path`` in a worker process: a MIDI file's
    (:func:`aurl.data.isolate.time_bound`), or :data:`MUSICXML_TIME_S` plus
    :data:`MUSICXML_TIME_PER_MIB_S` per MiB of a MusicXML file's XML."""
    from aurl.data.isolate import time_bound

    if Path(path).suffix.lower() not in MUSICXML:
        return time_bound(path)
    return MUSICXML_TIME_S + MUSICXML_TIME_PER_MIB_S * musicxml_bytes(path) / 2**20


def musicxml_as_midi(path: Path, folder: Path) -> Path:
    """The MusicXML file ``path`` written by music21 as ``folder/score.mid`` (its parts as
    named tracks), in this process; music21's own exceptions pass through, its warnings are
    not printed (the error, where there is one, is the line).

    ``forceSource``: without it music21 pickles each score it parses into its scratch folder
    (``/tmp/music21``, shared) and unpickles that file on the next parse of the same path
    when it is newer than the score: a pickle planted there runs its code, and a score
    replaced by an older-dated one is read as the old one.

    Raises:
        MidiReadError: the XML is over ``data.max_file_bytes`` (64 MiB): an ``.mxl`` of 1 MB
            unpacked 1 GiB into memory, and music21 grew to 5.4 GB on it.
    """
    import warnings

    from music21 import converter

    from aurl.config import DataConfig
    from aurl.errors import MidiReadError

    most = DataConfig().max_file_bytes
    if (size := musicxml_bytes(path)) > most:
        raise MidiReadError(f"{path}: {size:,} bytes of XML, over the {most // 2**20} MiB a "
                            "score may have: give a smaller MusicXML file")  # fmt: skip
    mid = folder / "score.mid"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converter.parse(str(path), forceSource=True).write("midi", fp=str(mid))
    return mid


def _musicxml_in_worker(task: tuple[Path, Path]) -> str | None:
    """:func:`musicxml_as_midi` in a worker process: None when written, else why not."""
    path, folder = task
    try:
        musicxml_as_midi(path, folder)
    except MemoryError:  # past the worker's bound: aurl.data.isolate says so
        raise
    except Exception as e:  # noqa: BLE001 - any parser failure is one clear line
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def musicxml_isolated(path: Path, folder: Path) -> Path:
    """:func:`musicxml_as_midi` run in a worker process (:mod:`aurl.data.isolate`): music21
    is Python, and a score it loops or grows on (a time signature of 10**9 beats, a repeat
    of a million times, 20,000 bars) costs :func:`read_seconds` and 4 GiB at most, not the
    command.

    Raises:
        MidiReadError: naming ``path``, when music21 fails, hangs or runs out of memory.
    """
    from aurl.data.isolate import Failed, isolated_map
    from aurl.errors import MidiReadError

    ((_, why),) = isolated_map(_musicxml_in_worker, [(path, folder)],
                               seconds=lambda task: read_seconds(task[0]))  # fmt: skip
    if isinstance(why, Failed):
        why = why.reason
    if why is not None:
        if why.startswith(str(path)):  # the size check's line names the file already
            raise MidiReadError(why)
        raise MidiReadError(f"{path} cannot be read ({why}): give a MIDI or MusicXML file")
    return folder / "score.mid"


def musicxml_read(path: Path, read: Any) -> Any:
    """``read`` of the MIDI file music21 writes for the MusicXML file ``path`` in a temporary
    folder: in a worker process (:func:`musicxml_isolated`), or here where this is one already
    (a reader worker of :mod:`aurl.data.isolate`, whose bounds hold, may start no process).
    The MIDI is read as any MIDI file is (it was written from untrusted XML); errors name
    ``path``, and a worker's MemoryError is left to its memory bound."""
    import multiprocessing
    import tempfile

    from aurl.errors import MidiReadError

    with tempfile.TemporaryDirectory() as tmp:
        try:
            here = multiprocessing.current_process().daemon
            mid = (musicxml_as_midi if here else musicxml_isolated)(path, Path(tmp))
        except (MidiReadError, MemoryError):
            raise
        except Exception as e:  # noqa: BLE001 - any parser failure is one clear line
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise MidiReadError(f"{path} cannot be read ({first}): give a MIDI or MusicXML "
                                "file") from None  # fmt: skip
        try:
            return read(mid)
        except MidiReadError as e:
            raise MidiReadError(str(e).replace(str(mid), str(path))) from None


def _musicxml_score(path: Path) -> Any:
    """:func:`read_score` of a MusicXML file (:func:`musicxml_read`)."""
    from aurl.data.midi_io import read_score as read_midi_score

    return musicxml_read(path, lambda mid: read_midi_score(mid).to("tick"))


def read_score(path: str | Path) -> Any:
    """A tick ``symusic.Score`` of a MIDI or MusicXML file (MusicXML read by music21 in a
    worker process).

    Raises:
        MidiReadError: missing, unreadable or not a MIDI / MusicXML file.
    """
    from aurl.data.midi_io import read_score as read_midi_score
    from aurl.errors import MidiReadError
    from aurl.fileio import not_a_file

    path = Path(path)
    if why := not_a_file(path):
        raise MidiReadError(f"{path} {why}: give a MIDI or MusicXML file")
    if path.suffix.lower() in MUSICXML:
        score = _musicxml_score(path)  # its errors name the file
    else:
        try:
            score = read_midi_score(path).to("tick")  # checked bytes only (aurl.data.smf)
        except Exception as e:  # noqa: BLE001 - any parser failure is one clear line
            score = _smpte_score(path)
            if score is None:
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise MidiReadError(
                    f"{path} cannot be read ({first}): give a MIDI or MusicXML file"
                ) from None
    _no_absurd_ticks(score, path)
    return score


def _smpte_score(path: Path) -> Any:
    """The score of a MIDI file timed in SMPTE frames (which symusic's reader refuses), as the
    repairing reader converts it to ticks, when that conversion is its only repair (the given
    notes kept as they are, as the composing commands keep them); else None. ``aurl analyze``
    and the server's composing read such files the same way."""
    from aurl.config import DataConfig
    from aurl.data.midi_io import read_midi

    try:
        score, report = read_midi(path, DataConfig(drums="keep"))
    except Exception:  # noqa: BLE001 - the caller reports the first reader's error
        return None
    return score.to("tick") if set(report.repairs) == {"smpte"} else None


def _no_absurd_ticks(score: Any, path: Path) -> None:
    """Raise :class:`MidiReadError` naming ``path`` where ``score`` holds what
    :mod:`aurl.data.midi_io` repairs as absurd ticks (:func:`~aurl.data.midi_io.absurd_timing`:
    a note too long, a silence too long, before the first note too): the composing commands
    keep the given notes as they are, so they refuse such a file rather than repair it."""
    from aurl.data.midi_io import absurd_score_timing
    from aurl.errors import MidiReadError

    if why := absurd_score_timing(score):
        raise MidiReadError(f"{path}: {why}")


def first_qpm(score: Any) -> float:
    return float(score.tempos[0].qpm) if len(score.tempos) else 120.0


# --------------------------------------------------------------------------------------------
# Shared steps
# --------------------------------------------------------------------------------------------


def _prepare(args: argparse.Namespace, source: str, kind: str) -> tuple[list, Any]:
    """Check the output names, formats and checkpoint folder; returns (paths, formats)."""
    from aurl.cli.generate import model_folder, precision_flag
    from aurl.errors import ConfigError
    from aurl.generation.export import check_free, output_paths, parse_formats

    formats = parse_formats(args.format)
    from aurl.cli import checks
    from aurl.config import MIN_TEMPERATURE

    flag = precision_flag(args)
    native_flag = args.engine == "native" and flag in ("--int8", "--fp32")
    if flag and args.engine != "onnx" and not native_flag:
        raise ConfigError(f"{flag} chooses the onnx engine's graphs: add --engine onnx")
    checks.finite(args.temperature, "--temperature", least=MIN_TEMPERATURE, most=100)
    checks.count(args.num_samples, "--num-samples")
    checks.count(args.particles, "--particles", most=MAX_PARTICLES)
    checks.threads(args.threads)
    checks.out_dir(args.out)
    stem = f"{Path(source).stem}_{kind}_seed{args.seed}"
    paths = output_paths(args.out, args.num_samples, formats, stem=stem)
    check_free(paths, force=args.force)
    model_folder(args.checkpoint, args.model)
    return paths, formats


# rows decoded together per result: 8 is the measured useful most; 256 is already ~200x the CPU
MAX_PARTICLES = 256


def _model(args: argparse.Namespace) -> Any:
    from aurl.generation.compose import composing_model

    if getattr(args, "engine", "torch") == "auto":
        native = _native_where_it_runs(args)
        if native is not None:
            return composing_model(native)  # else on to torch below
    if getattr(args, "engine", "torch") == "onnx":
        return composing_model(_onnx_engine(args))
    if getattr(args, "engine", "torch") == "native":
        from aurl.cli.generate import model_folder
        from aurl.engines.native_engine import NativeEngine

        folder = model_folder(args.checkpoint, args.model)
        return composing_model(NativeEngine(folder, weights="fp32" if args.fp32 else "int8"))
    import torch

    from aurl.cli.generate import load_model

    torch.set_num_threads(args.threads)
    return composing_model(load_model(args.checkpoint, "cpu", args.model))


def _native_where_it_runs(args: argparse.Namespace) -> Any:
    """``--engine auto``: the native engine (int8) of the model folder, or None where it does
    not run it (no compiled step on this installation; a model the native step lacks: a VAE,
    windowed attention, ids above the vocabulary; not a model folder), and torch decodes: a
    folder that torch cannot read either gets torch's own message."""
    from aurl.cli.generate import model_folder
    from aurl.engines.native_engine import native_where_it_runs

    return native_where_it_runs(model_folder(args.checkpoint, args.model))


def _onnx_engine(args: argparse.Namespace) -> Any:
    """The onnx engine of ``--checkpoint`` (an export folder, or a model folder whose graphs are
    written once to the cache) or of the shipped model. A model folder's precision follows
    ``aurl generate --engine onnx``'s rule (:func:`aurl.cli.generate.chosen_precision`:
    ``--int8`` / ``--int4`` / ``--fp32``, else fp32 where the CPU has no integer dot products),
    but where it has them the default is :data:`aurl.engines.cpu.COMPOSING_QUANTIZED` (int8,
    not int4: fewer cadences at phrase ends on int4); an export's is its own.

    Raises:
        ConfigError: onnxruntime is not installed, or a precision flag with an export folder.
        CheckpointError: the folder is neither a model nor an export.
    """
    from aurl.cli.generate import chosen_precision, model_folder, precision_flag
    from aurl.engines.cpu import COMPOSING_QUANTIZED
    from aurl.engines.onnx_engine import OnnxEngine, import_onnxruntime
    from aurl.engines.shipped import load_shipped_onnx
    from aurl.errors import ConfigError

    import_onnxruntime()
    folder = model_folder(args.checkpoint, args.model)
    if (folder / "model.safetensors").is_file():
        return load_shipped_onnx(
            folder,
            precision=chosen_precision(args, quantized=COMPOSING_QUANTIZED),
            threads=args.threads,
        )
    flag = precision_flag(args)
    if flag:
        raise ConfigError(
            f"{flag} with --checkpoint {folder}: an ONNX export's precision is its own; drop "
            f"{flag} or pass the model folder it was exported from"
        )
    return OnnxEngine(folder, threads=args.threads)


def _options(args: argparse.Namespace, key: str = "") -> Any:
    from aurl.generation.compose import ComposeOptions

    return ComposeOptions(
        num_samples=args.num_samples, particles=args.particles, temperature=args.temperature,
        seed=args.seed, key=key, cadences=getattr(args, "cadences", True),
    )  # fmt: skip


def _write(results: list, paths: list, given: Any, kept_track: str | None) -> None:
    """Write each result; read the MIDI back, check that the given notes are all there and
    count the parallels of its voices."""
    from aurl.data.notes import notes_from_score
    from aurl.generation.compose import melody_kept, track_notes
    from aurl.generation.export import export_piece

    for c, targets in zip(results, paths):
        notes = notes_from_score(c.score)
        written = export_piece(c.score, notes, targets, title=next(iter(targets.values())).stem)
        for path in written:
            print(f"wrote {path}")
        if "mid" in targets:
            s = c.stats
            tracks = track_notes(read_score(targets["mid"]))  # the file as written
            if len(given):
                kept = melody_kept(_kept_notes(tracks, kept_track), given)
                about = (f"given notes kept {kept:.0%}, {s['given_bits_per_note']:.2f} bits per "
                         "given note")  # fmt: skip
            else:  # the span held every note (0 of 0 kept read "nan%")
                about = "no given notes (the span held every note)"
            if "phrase_ends" in s:  # harmonizing: what the listener hears at each phrase end
                about += f", cadences at {s['cadences']} of {s['phrase_ends']} phrase ends"
            about += _voices_said(tracks)
            print(
                f"{targets['mid'].stem}: {len(c.notes)} new notes, {about}, "
                f"{s['tokens']} tokens, {s['seconds']:.1f} s"
            )


def _voices_said(tracks: list) -> str:
    """', N parallel 5ths/8ves in M moves' of a written file's voices, from its tracks ('' when
    they are not voices)."""
    from aurl.analysis.part_writing import parallels_line
    from aurl.analysis.report import voice_tracks

    voices = voice_tracks(tracks)
    return f", {parallels_line([n for _, n in voices])}" if voices else ""


def _kept_notes(tracks: list, track: str | None) -> Any:
    """The notes of the written track ``track`` (all of them when None)."""
    import numpy as np

    from aurl.data.notes import empty_notes

    if track is None:
        return np.concatenate([n for _, n in tracks]) if tracks else empty_notes()
    return next((n for name, n in tracks if name == track), empty_notes())


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def run_harmonize(args: argparse.Namespace) -> int:
    from aurl.analysis.keys import parse_key
    from aurl.cli import checks
    from aurl.errors import ConfigError, ConstraintError

    if not 2 <= args.voices <= 4:
        raise ConfigError(f"--voices {args.voices}: give 2, 3 or 4")
    checks.nonempty(args.key, "--key", "a key such as 'D minor'")  # '' ran without a key
    if args.key:
        try:
            parse_key(args.key)
        except Exception as e:  # noqa: BLE001
            raise ConstraintError(f"--key {args.key!r}: {e}") from None
    return _file_or_folder(args, args.melody, "harmonized", _harmonize_one)


def _harmonize_one(args: argparse.Namespace, melody: str | Path, model: Any) -> Any:
    """Harmonize one file (``model`` None: load it once the file and names are checked);
    returns the model, for the next file of a folder."""
    from aurl.generation.compose import TimeMap, harmonize, melody_line, top_track, track_notes

    score = read_score(melody)
    name, notes = top_track(track_notes(score))
    line = melody_line(notes, name=f"{melody} ({name})")  # bad melodies fail here
    paths, _ = _prepare(args, melody, "harmonized")
    model = model or _model(args)
    beats = float((line["onset"] + line["duration"]).max() - line["onset"].min())
    from aurl.cli.eta import harmonize_tokens

    progress = _say_length(str(melody), f"{len(line):,} melody notes in {args.voices} voices",
                           harmonize_tokens(len(line), args.voices, beats), "harmonize")  # fmt: skip
    results = harmonize(
        model, line, voices=args.voices, options=_options(args, args.key or ""),
        qpm=first_qpm(score), like=score, meter=TimeMap.of_score(score).meter, progress=progress,
    )  # fmt: skip
    _write(results, paths, line, "Soprano")
    return model


def _probe_read(path: Path) -> str | None:
    """:func:`read_score` in a worker process: None where the file reads, else why not."""
    from aurl.errors import AurlError

    try:
        read_score(path)
    except AurlError as e:
        return str(e)
    return None


#: what a folder given to ``aurl harmonize`` / ``aurl accompany`` is read for
COMPOSE_SUFFIXES = (".mid", ".midi", ".kar", *MUSICXML)


def _file_or_folder(args: argparse.Namespace, path: str, kind: str, one: Any) -> int:
    """``one(args, path, None)`` for a file, :func:`_each_file` for a folder."""
    from aurl.errors import ConfigError

    if not path.strip():  # Path('') is the current folder: it was composed on, file by file
        raise ConfigError(f"{path!r} is no file name: give a MIDI or MusicXML file or a folder")
    if Path(path).is_dir():
        return _each_file(args, path, kind, one)
    one(args, path, None)
    return 0


def _each_file(args: argparse.Namespace, folder: str, kind: str, one: Any) -> int:
    """A batch: ``one(args, path, model)`` for each MIDI / MusicXML file directly in
    ``folder``, in name order, the model loaded once. A file that cannot be composed on (it
    cannot be read, crashes or hangs the reader in a worker process, holds no melody, spans
    pitches the model lacks) is reported on stderr as ``skipped FILE: why`` and the batch goes
    on; the last line counts both. Every output name is checked free before any work.

    Raises:
        DataError: the folder holds no such file, or none of them could be composed on.
        ConfigError: two files would write the same names (``a.mid`` and ``a.musicxml``), or
            an output file exists (without ``--force``).
    """
    import os
    import sys

    from aurl.errors import AurlError, ConfigError, DataError, MidiReadError
    from aurl.generation.export import check_free, output_paths

    files = sorted(p for p in Path(folder).iterdir()
                   if p.suffix.lower() in COMPOSE_SUFFIXES and p.is_file())  # fmt: skip
    if not files:
        raise DataError(f"{folder} holds no MIDI or MusicXML files "
                        f"({', '.join(COMPOSE_SUFFIXES)}): give a file or such a folder")  # fmt: skip
    stems: dict[str, Path] = {}
    for p in files:
        if p.stem in stems:
            raise ConfigError(f"{stems[p.stem]} and {p} would write the same files: move one "
                              "of them out of the folder")  # fmt: skip
        stems[p.stem] = p
    _, formats = _prepare(args, files[0], kind)  # the options: the batch's, not a file's
    for p in files:  # every name free before the first piece, as for one file
        stem = f"{p.stem}_{kind}_seed{args.seed}"
        check_free(output_paths(args.out, args.num_samples, formats, stem=stem), force=args.force)
    # each file read once in a worker process first: one that crashes or hangs the reader
    # costs that file, not the batch (docs/design.md, "Hostile input")
    from aurl.data.isolate import Failed, in_order, isolated_map

    workers = min(os.cpu_count() or 1, len(files))
    probes = list(in_order(isolated_map(_probe_read, files, workers=workers,
                                        seconds=read_seconds)))  # fmt: skip
    model, done, skipped = _model(args), 0, 0  # a model that cannot load stops the batch
    for p, probe in zip(files, probes):
        try:
            if probe is not None:
                raise MidiReadError(probe.reason if isinstance(probe, Failed) else probe)
            model = one(args, p, model)
            done += 1
        except AurlError as e:  # this file's, not the batch's: say so and go on
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            named = first if first.startswith(str(p)) else f"{p}: {first}"
            print(f"skipped {named}", file=sys.stderr, flush=True)
            skipped += 1
    if not done:
        raise DataError(f"no file in {folder} could be {kind} ({skipped} skipped, said above)")
    print(f"{kind} {done} of {len(files)} files in {folder}"
          + (f"; skipped {skipped} (said above)" if skipped else ""))  # fmt: skip
    return 0


def _say_length(name: str, what: str, tokens: int, command: str) -> Any:
    """Say on stderr how many tokens composing ``name`` takes (estimated, :mod:`aurl.cli.eta`)
    and return the progress helper that reports the time left: a tqdm bar on a terminal, a
    line a minute elsewhere. No piece is too long: a melody of 10,000 notes is ~125,000
    tokens, tens of minutes on one core, said up front."""
    import sys

    from aurl.cli.eta import LONG_TOKENS, estimated

    long = " (a long run: progress and the time left follow here)" if tokens > LONG_TOKENS else ""
    print(f"{name}: {what}, about {tokens:,} tokens to compose{long}", file=sys.stderr,
          flush=True)  # fmt: skip
    return estimated(tokens, command)


def run_accompany(args: argparse.Namespace) -> int:
    from aurl.errors import ConfigError

    if not 2 <= args.voices <= 4:
        raise ConfigError(f"--voices {args.voices}: give 2, 3 or 4")
    return _file_or_folder(args, args.part, "accompanied", _accompany_one)


def _accompany_one(args: argparse.Namespace, part: str | Path, model: Any) -> Any:
    """Accompany one file (``model`` None: load it once the file and names are checked);
    returns the model, for the next file of a folder."""
    import numpy as np

    from aurl.generation.compose import TimeMap, accompany, in_vocabulary, part_of, track_notes

    score = read_score(part)
    tracks = track_notes(score)
    notes, name = part_of(tracks, str(part))
    if len(tracks) > 1:  # say so: a whole score given as the part is rarely what was meant
        import sys

        names = ", ".join(n for n, _ in tracks)
        print(f"{part}: its {len(tracks)} tracks ({names}) are accompanied as one part; give "
              "one track's file to accompany a single voice", file=sys.stderr)  # fmt: skip
    paths, _ = _prepare(args, part, "accompanied")
    model = model or _model(args)
    in_vocabulary(notes, model.vocab_config, part)
    from aurl.cli.eta import harmonize_tokens
    from aurl.data.notes import pitched

    given = pitched(notes)
    ends = given["onset"] + given["duration"]
    beats = float(ends.max() - given["onset"].min()) if len(given) else 0.0
    progress = _say_length(str(part), f"{len(given):,} notes of the part in {args.voices} voices",
                           harmonize_tokens(len(given), args.voices, beats), "accompany")  # fmt: skip
    results = accompany(
        model, notes, voices=args.voices, part_name=name, options=_options(args),
        qpm=first_qpm(score), like=score, meter=TimeMap.of_score(score).meter, progress=progress,
    )  # fmt: skip
    _write(results, paths, np.sort(notes, order=["onset", "pitch"]), name)
    return model


def parse_range(text: str, flag: str, *, integer: bool) -> tuple[float, float]:
    """``"3-4"`` -> (3, 4).

    Raises:
        ConfigError: not two numbers A-B.
    """
    from aurl.errors import ConfigError

    try:
        a, b = text.split("-", 1)
        lo, hi = (int(a), int(b)) if integer else (float(a), float(b))
    except ValueError:
        kind = "bar numbers like 3-4" if integer else "seconds like 4.5-9"
        raise ConfigError(f"{flag} {text!r}: give {kind}") from None
    return lo, hi


def run_infill(args: argparse.Namespace) -> int:
    import numpy as np

    from aurl.data.notes import DRUM_PROGRAM
    from aurl.errors import ConfigError, ConstraintError
    from aurl.generation.compose import (
        TimeMap,
        in_vocabulary,
        infill,
        infill_regenerated,
        infill_score,
        piece_notes,
        track_notes,
    )

    score = read_score(args.piece)
    tracks = track_notes(score)
    if not tracks:
        raise ConstraintError(f"{args.piece} has no notes: nothing to infill around")
    notes, owner = piece_notes(tracks)
    if (notes["program"] == DRUM_PROGRAM).all():  # once a line naming no file (compose.infill)
        raise ConstraintError(f"{args.piece} holds drums only: nothing pitched to infill around")
    times = TimeMap.of_score(score)
    if args.bars is not None:  # '' once fell through to --span (AttributeError)
        a, b = parse_range(args.bars, "--bars", integer=True)
        last = float((notes["onset"] + notes["duration"]).max())
        span = times.bar_span(a, b, last, name=str(args.piece), field="--bars")
    else:
        s, t = parse_range(args.span, "--span", integer=False)
        end_s = float((notes["onset_s"] + notes["duration_s"]).max())
        span = times.seconds_span(s, t, end_s, field="--span")
    index = None
    if args.part is not None:
        names = [n.lower() for n, _ in tracks]
        if args.part.lower() in names:
            index = names.index(args.part.lower())
        elif args.part.isascii() and args.part.isdigit() and int(args.part) < len(tracks):
            index = int(args.part)
        else:
            listed = ", ".join(f"{i}:{n}" for i, (n, _) in enumerate(tracks))
            raise ConfigError(f"--part {args.part!r}: no such track; the tracks are {listed}")
    part = None if index is None else owner == index
    if part is not None and (notes["program"][part] == DRUM_PROGRAM).all():
        raise ConfigError(f"--part {args.part!r} is a drum track: choose a pitched part to infill")
    paths, _ = _prepare(args, args.piece, "infilled")
    model = _model(args)
    in_vocabulary(notes[~infill_regenerated(notes, span, part)], model.vocab_config, args.piece)
    from aurl.cli.eta import infill_tokens
    from aurl.data.notes import pitched

    n = len(pitched(notes))  # the whole piece is decoded, the kept notes forced
    where = f"bars {args.bars}" if args.bars is not None else f"seconds {args.span}"
    where += f" of {tracks[index][0]}" if index is not None else ""
    progress = _say_length(str(args.piece), f"{n:,} notes, {where} written again",
                           infill_tokens(n), "infill")  # fmt: skip
    results = infill(
        model, notes, span, part, options=_options(args), qpm=first_qpm(score),
        meter=times.meter, progress=progress,
    )  # fmt: skip
    kept = notes[~infill_regenerated(notes, span, part)]
    for c in results:
        c.score = infill_score(tracks, span, c.notes, part=index, like=score)
    _write(results, paths, np.sort(kept, order=["onset", "pitch"]), None)
    return 0
