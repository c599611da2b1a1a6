"""``aurl analyze``: keys, chords, cadences, form and melody of a MIDI file or folder.

Writes ``analysis.json``, ``report.md``, ``report.html`` and PNG plots into ``--out``; for a
folder, one subfolder per file plus a corpus summary at the top (most common progressions,
cadences, keys, forms). Files that cannot be read are listed and skipped; files with nothing to
analyse (no notes, drums only, one note) get a report that says so.

``--style`` (opt-in: without it the analysis loads no model) adds each file's most likely
style with the probabilities a style model gives (:mod:`aurl.analysis.style`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

MIDI_SUFFIXES = {".mid", ".midi", ".kar", ".rmi"}
MUSICXML = {".musicxml", ".xml", ".mxl"}  # read through music21 (aurl.cli.compose.read_score)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help="musical analysis of MIDI / MusicXML files: keys, chords, cadences, form, melody",
        description="Analyse a MIDI or MusicXML file or a folder of them: global and local "
        "keys, chords "
        "and Roman numerals, progression statistics, cadences, bar self-similarity and form "
        "labels, melody contour, intervals and motifs. Writes JSON, a Markdown and an HTML "
        "report with plots; for a folder also a corpus summary.",
    )
    p.add_argument(
        "path", metavar="FILE_OR_DIR",
        help="a MIDI or MusicXML file, or a folder of them (searched recursively)"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="report folder")
    p.add_argument(
        "--chords-per",
        choices=["beat", "half-bar"],
        default="beat",
        help="chord recognition cell (default: beat)",
    )
    p.add_argument(
        "--beats-per-bar",
        type=float,
        default=0.0,
        metavar="N",
        help="bar length in quarter-note beats (default: from the file's first time signature)",
    )
    p.add_argument("--no-plots", action="store_true", help="JSON and text reports only")
    s = p.add_argument_group("style (opt-in: loads a model)")
    s.add_argument(
        "--style", action="store_true",
        help="the most likely style of each file with probabilities, from a style model's "
        "likelihoods (a model trained with model.styles)",
    )  # fmt: skip
    s.add_argument("--model", metavar="NAME", help="--style: a shipped model by name")
    s.add_argument("--checkpoint", metavar="DIR", help="--style: a model folder, run or checkpoint")
    p.set_defaults(func=run)


class _StyleGuesser:
    """``--style``: the model, loaded once, and a tokenizer of its vocabulary."""

    def __init__(self, args: argparse.Namespace) -> None:
        from aurl.cli.evaluate import load_model
        from aurl.data.tokenizer import Tokenizer
        from aurl.errors import ConfigError

        self.model, _, self.window = load_model(args.checkpoint, "cpu", args.model)
        if not self.model.config.styles:
            raise ConfigError(
                "--style: this model was trained without styles (model.styles is empty): give "
                "a model trained with styles (--model NAME or --checkpoint DIR)"
            )
        self.tokenizer = Tokenizer(self.model.vocab_config)
        self.classifier = style_classifier(args, tuple(self.model.config.styles))

    def __call__(self, path: Path) -> dict:
        from aurl.data.meter import read_meter
        from aurl.evaluation.style import classify_style

        if path.suffix.lower() in MUSICXML:  # read as MIDI, as read_piece reads it
            from aurl.cli.compose import musicxml_read

            return musicxml_read(path, self)

        meter = read_meter(path) if self.model.config.meter else None
        ids = self.tokenizer.encode_file(path)
        return classify_style(self.model, ids, window=self.window, meter=meter,
                              classifier=self.classifier, tokenizer=self.tokenizer)  # fmt: skip


def style_classifier(args: argparse.Namespace, styles: tuple[str, ...]):
    """The classifier shipped beside the model (``style_classifier.json`` in the model folder
    or the run's model folder), or None: then Bayes over the likelihoods."""
    from aurl.cli.generate import model_folder
    from aurl.evaluation.style import load_style_classifier

    folder = model_folder(args.checkpoint, args.model)
    for place in (folder, folder / "model"):
        clf = load_style_classifier(place, styles)
        if clf is not None:
            return clf
    return None


def read_piece(path: Path):
    """Notes, bar length (beats) and voices (its tracks, where they are voices, else None:
    :func:`aurl.analysis.report.voice_tracks`) of one MIDI or MusicXML file (its parts are
    the tracks); raises MidiReadError when unreadable."""
    from aurl.analysis.report import voice_tracks
    from aurl.config import DataConfig
    from aurl.data.midi_io import read_midi
    from aurl.data.notes import notes_from_score
    from aurl.generation.compose import track_notes

    if path.suffix.lower() in MUSICXML:
        return _read_musicxml(path)
    score, _ = read_midi(path, DataConfig(drums="keep"))
    voices = voice_tracks(track_notes(score))  # a file whose tracks are voices
    return notes_from_score(score), _beats_per_bar(path), voices


def _read_musicxml(path: Path):
    """:func:`read_piece` of a MusicXML file (:func:`aurl.cli.compose.musicxml_read`: written
    as MIDI by music21, read as a MIDI file is; errors name ``path``)."""
    from aurl.cli.compose import musicxml_read

    return musicxml_read(path, read_piece)


def _read_in_worker(path: Path):
    """:func:`read_piece` in a worker process: the piece, or the reason it cannot be read."""
    from aurl.errors import AurlError

    try:
        return read_piece(path)
    except AurlError as e:
        return str(e)


def _beats_per_bar(path: Path) -> float:
    """Quarter-note beats per bar from the first time signature, read by the data layer's
    rule (:func:`aurl.data.meter.score_meter`: 4/4 where there is none or an unusable one; a
    0/4 once divided by zero), and no shorter than :data:`MIN_BAR`, the shortest
    ``--beats-per-bar`` takes (a 1/32 bar made 16,000 bars of a 2,000-beat file: 96 s and
    7.9 GB of self-similarity)."""
    from aurl.data.meter import score_meter
    from aurl.data.midi_io import read_score
    from aurl.errors import MidiReadError

    try:  # read_midi already validated the file; this second read only looks for the meter
        num, den = score_meter(read_score(path))
    except MidiReadError:
        return 4.0
    return max(MIN_BAR, num * 4.0 / den)


# the shortest bar --beats-per-bar takes, in quarter-note beats (a 1/16 bar)
MIN_BAR = 0.25


def run(args: argparse.Namespace) -> int:
    import os

    from aurl.analysis.report import (
        aggregate,
        analyze_notes,
        write_aggregate_report,
        write_report,
    )
    from aurl.cli import checks
    from aurl.cli.compose import read_seconds
    from aurl.data.isolate import Failed, in_order, isolated_map
    from aurl.errors import ConfigError, DataError
    from aurl.progress import bar

    if not args.path.strip():  # Path('') is the current folder: it was read ('' --out: out_dir)
        raise ConfigError(f"FILE_OR_DIR {args.path!r}: give a file or folder name")
    if args.beats_per_bar != 0:  # 0: each file's own; a tiny bar is billions of key windows
        checks.finite(args.beats_per_bar, "--beats-per-bar", least=MIN_BAR, most=64)
    checks.out_dir(args.out)
    if (args.model or args.checkpoint) and not args.style:
        raise ConfigError("--model / --checkpoint choose the model of --style: add --style")
    if args.style and not (args.model or args.checkpoint):
        from aurl.cli.generate import default_for
        from aurl.shipped import STYLES_DEFAULT

        args.model = default_for("--style", STYLES_DEFAULT, "style model",
                                 "the default model has no styles")  # fmt: skip
    src, out = Path(args.path), Path(args.out)
    if src.is_dir():
        import os

        os.scandir(src).close()  # rglob hides a folder it may not list: say so, not "no MIDI"
        files = sorted(p for p in src.rglob("*") if p.suffix.lower() in MIDI_SUFFIXES | MUSICXML)
        if not files:
            raise DataError(f"{src} holds no MIDI files (*.mid, *.midi) or MusicXML files "
                            "(*.musicxml, *.xml, *.mxl): point at a folder of them")  # fmt: skip
    elif src.is_file():
        files = [src]
    else:
        from aurl.fileio import not_a_file

        raise DataError(f"{src} {not_a_file(src)}: give a MIDI or MusicXML file or a "
                        "folder of them")  # fmt: skip

    guesser = _StyleGuesser(args) if args.style else None  # a bad model fails before any work
    results, skipped = [], []
    styles: dict[str, int] = {}
    # read in worker processes: a reader that crashes or hangs on a file skips that file
    workers = min(os.cpu_count() or 1, len(files))
    pieces = in_order(isolated_map(_read_in_worker, files, workers=workers, seconds=read_seconds))
    for path, piece in zip(files, bar(pieces, total=len(files), desc="analyze")):
        if isinstance(piece, (str, Failed)):
            error = piece if isinstance(piece, str) else f"{path}: {piece.reason}"
            if src.is_dir():  # one file: its error line alone (once "skipped" and the error)
                print(f"skipped {error if error.startswith(str(path)) else f'{path}: {error}'}",
                      file=sys.stderr)  # fmt: skip
            skipped.append({"file": str(path), "error": error})
            continue
        notes, beats_per_bar, voices = piece
        bpb = args.beats_per_bar or beats_per_bar
        resolution = 1.0 if args.chords_per == "beat" else bpb / 2
        name = str(path.relative_to(src)) if src.is_dir() else path.name
        # a file name that is not UTF-8 (surrogates from os.fsdecode) cannot go into the
        # UTF-8 reports: its bad bytes show as U+FFFD there
        name = name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        result = analyze_notes(
            notes, name=name, beats_per_bar=bpb, resolution=resolution, voices=voices
        )
        if guesser is not None:
            guess = guesser(path)
            result["style"] = guess.to_dict()
            styles[guess.style] = styles.get(guess.style, 0) + 1
            print(f"{name}: style {guess.line()}")
        folder = out / path.relative_to(src).with_suffix("") if src.is_dir() else out
        write_report(result, folder, plots=not args.no_plots)
        results.append(result)
        line = result["key"]["name"] if result.get("key") else result["message"]
        if src.is_file():
            print(f"{name}: {line}; form {result.get('structure', {}).get('form', '-')}")
    if src.is_dir() and not results:  # once "analysed 0 of N files", exit 0
        raise DataError(f"no file in {src} could be read ({len(skipped)} unreadable, said "
                        "above): give MIDI or MusicXML files")  # fmt: skip
    if src.is_dir():
        agg = aggregate(results, skipped)
        write_aggregate_report(agg, out, plots=not args.no_plots)
        top = agg["ngrams"]["3"][:1]
        print(
            f"analysed {agg['analysed']} of {agg['files']} files ({len(skipped)} unreadable); "
            f"cadences {agg['cadences']}; most common 3-chord progression "
            f"{' - '.join(top[0][0]) if top else '-'}"
        )
        if styles:
            ranked = sorted(styles.items(), key=lambda kv: (-kv[1], kv[0]))
            print("styles: " + ", ".join(f"{s} {n}" for s, n in ranked))
    elif skipped:
        error = skipped[0]["error"]  # the reader's line names the file
        named = error if error.startswith(str(src)) else f"{src}: {error}"
        # the reader's line may say what to do already ("...: give a MIDI or MusicXML file")
        tail = "" if ": give " in named else ": give a MIDI or MusicXML file"
        raise DataError(f"cannot analyse {named}{tail}")
    print(f"report in {out}")
    return 0
