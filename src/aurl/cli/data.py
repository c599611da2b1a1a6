"""``aurl data corpus|check|prepare``: build the bundled corpus, audit MIDI files, build a cache."""

from __future__ import annotations

import argparse

from aurl.cli.config import add_config_arguments, config_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="build corpora, audit MIDI files, prepare token caches")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")

    corpus = dsub.add_parser(
        "corpus",
        help="write the bundled corpus (music21's scores) as MIDI files",
        description="Write a corpus of MIDI files converted from the scores that ship inside "
        "music21, with a manifest.json (source, composer, title, duration, notes, split). "
        "'bach-chorales' (350 chorales) is bundled pre-converted and copies instantly; "
        "'classical' adds Beethoven, Mozart, Haydn, Schubert and Schumann (converted: minutes); "
        "'palestrina' (the masses, grouped by mass), 'renaissance' (Josquin, Monteverdi, "
        "Trecento, ...) and 'all' (every corpus, one subfolder each, a style label per piece: "
        "hours on 2 cores) are resumable.",
    )
    corpus.add_argument(
        "--name", default="bach-chorales", choices=["bach-chorales", "classical", "folk", "palestrina", "renaissance", "all"],
        help="folk: the ABC folk collections (Essen, O'Neill, Ryan, Aird), one tune per file; "
        "folk, palestrina, renaissance and all are resumable (run it again to go on)",
    )  # fmt: skip
    corpus.add_argument(
        "--limit", type=int, default=0, metavar="N",
        help="folk, palestrina, renaissance: the first N scores (a fixed spread; 0: all); "
        "all: the first N of each corpus",
    )  # fmt: skip
    corpus.add_argument("--out", required=True, metavar="DIR", help="folder to write")
    corpus.add_argument("--rebuild", action="store_true", help="convert from music21 again")
    corpus.add_argument("--workers", type=int, default=0, help="processes (0: all cores)")
    corpus.set_defaults(func=run_corpus)

    check = dsub.add_parser(
        "check",
        help="parse, repair and round-trip MIDI files; report problems",
        description="Audit a MIDI file or a folder: parse, validate and repair, tokenize and "
        "decode again, and report per file ok / repaired / failed with the reason. Files are "
        "read in worker processes: a reader that crashes or hangs (5 s, plus 2 s per MiB) on a "
        "file fails that file only. "
        "Exit 0 when every file was read, 1 when some failed, 2 on a usage error.",
    )
    check.add_argument("path", metavar="PATH", help="a MIDI file or a folder of them")
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.add_argument("--workers", type=int, default=0, help="processes (0: all cores)")
    add_config_arguments(check)
    check.set_defaults(func=run_check)

    prepare = dsub.add_parser(
        "prepare",
        help="tokenize a folder of MIDI files into a sharded token cache",
        description="Tokenize every MIDI file under DIR on all cores into compact uint16 token "
        "shards with an index (offsets, split, metadata). Incremental: only new or changed files "
        "are redone. Safe to interrupt: the cache stays usable.",
    )
    prepare.add_argument("dir", metavar="DIR", help="folder of MIDI files")
    prepare.add_argument("--out", required=True, metavar="CACHE", help="cache folder")
    prepare.add_argument("--workers", type=int, default=0, help="processes (0: all cores)")
    prepare.add_argument("--shard", default=None, metavar="i/n", help="prepare part i of n")
    add_config_arguments(prepare)
    prepare.set_defaults(func=run_prepare)

    p.set_defaults(func=lambda args: p.print_help() or 2)


def run_corpus(args: argparse.Namespace) -> int:
    """Write the corpus; print what was written, skipped (with reasons) and capped."""
    from collections import Counter

    from aurl.cli import checks
    from aurl.data.corpus import MANIFEST, build_corpus
    from aurl.errors import ConfigError, DataError
    from aurl.progress import bar

    checks.out_dir(args.out)
    checks.workers(args.workers)
    if args.limit < 0:  # a negative limit sliced off the end: all but N, hours of converting
        raise ConfigError(f"--limit {args.limit}: give 0 (all) or a number of scores")
    report = build_corpus(
        args.name, args.out, rebuild=args.rebuild, workers=args.workers, progress=bar,
        limit=args.limit,
    )  # fmt: skip
    splits = Counter(f["split"] for f in report.files)
    print(
        f"wrote {len(report.files)} MIDI files to {report.out} ({report.copied} copied, "
        f"{report.converted} converted): {report.duration_s / 60:.1f} min of music, "
        f"{report.notes:,} notes"
    )
    print("split: " + ", ".join(f"{s} {splits[s]}" for s in ("train", "valid", "test")))
    if report.skipped:
        print(f"skipped {len(report.skipped)} scores:")
        for s in report.skipped:
            print(f"  {s['source']}: {s['reason']}")
    if report.capped:
        print(f"repeat expansion capped in {len(report.capped)} scores:")
        for f in report.capped:
            print(f"  {f['source']}: {f['repeats']}")
    print(f"manifest: {report.out / MANIFEST}")
    if not report.files:
        raise DataError(f"{report.out}: no score could be converted; see the reasons above")
    return 0


def _named(value: str, what: str) -> None:
    """Refuse ``''`` for a path: ``Path('')`` is the current folder, which was checked, read
    or written into in its place."""
    from aurl.errors import ConfigError

    if not value.strip():
        raise ConfigError(f"{what} {value!r}: give a file or folder name")


def run_check(args: argparse.Namespace) -> int:
    import json
    import sys

    from aurl.cli import checks
    from aurl.data.check import check_paths, format_table
    from aurl.errors import DataError
    from aurl.progress import bar

    checks.workers(args.workers)
    _named(args.path, "PATH")
    config = config_from_args(args)
    try:
        result = check_paths(args.path, config, workers=args.workers, progress=bar)
    except DataError as e:  # a missing path or an empty folder: a usage error
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = result.to_dict()
    print(json.dumps(summary, indent=1) if args.json else format_table(result))
    return 1 if summary["failed"] else 0


def run_prepare(args: argparse.Namespace) -> int:
    from aurl.cli import checks
    from aurl.config import write_config
    from aurl.data.cache import parse_shard, prepare
    from aurl.progress import bar

    _named(args.dir, "DIR")
    checks.out_dir(args.out)  # '' too
    checks.workers(args.workers)
    config = config_from_args(args)
    shard = parse_shard(args.shard) if args.shard is not None else None  # "": no part
    report = prepare(
        args.dir, args.out, vocab_config=config.vocab, data_config=config.data,
        workers=args.workers, shard=shard, progress=bar,
    )  # fmt: skip
    write_config(config, report.cache)
    for path, reason in report.failed:
        print(f"failed {path}: {reason}")
    print(report.summary())
    # per-file problems are normal in a big folder; an empty result is not
    return 1 if report.failed and not any(t["files"] for t in report.totals.values()) else 0
