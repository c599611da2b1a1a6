"""The data audit behind ``aurl data check``: parse, repair, tokenize and decode every file, and
measure how far each note's onset moved on the way (the round-trip error).

A file is ``ok`` (read as it is), ``repaired`` (read after repairs, counted by kind) or
``failed`` (the reason, one line). Nothing here raises for a bad file: files are read in
worker processes (:mod:`aurl.data.isolate`), so a reader that crashes or hangs on one file is
that file's failure ("reader crashed (signal 11)", "reader timed out after 5.0 s").
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aurl.config import Config
from aurl.data.isolate import Failed, isolated_map
from aurl.data.midi_io import MidiData, read_midi_data
from aurl.data.tokenizer import Tokenizer
from aurl.errors import DataError, MidiReadError
from aurl.progress import Progress, silent


@dataclass
class FileCheck:
    """The audit of one file."""

    path: str
    status: str  # "ok", "repaired" or "failed"
    error: str = ""
    notes: int = 0
    tokens: int = 0
    repairs: dict[str, int] = field(default_factory=dict)
    max_onset_error_steps: float = 0.0
    max_onset_error_ms: float = 0.0


@dataclass
class CheckResult:
    """The audit of a file or folder."""

    files: list[FileCheck]

    def to_dict(self) -> dict:
        """The JSON summary printed by ``aurl data check --json``."""
        read = [f for f in self.files if f.status != "failed"]
        totals: dict[str, int] = {}
        for f in read:
            for k, v in f.repairs.items():
                totals[k] = totals.get(k, 0) + v
        return {
            "files": len(self.files),
            "ok": sum(f.status == "ok" for f in self.files),
            "repaired": sum(f.status == "repaired" for f in self.files),
            "failed": [
                {"path": f.path, "error": f.error} for f in self.files if f.status == "failed"
            ],
            "notes": sum(f.notes for f in read),
            "tokens": sum(f.tokens for f in read),
            "max_onset_error_ms": round(max((f.max_onset_error_ms for f in read), default=0.0), 3),
            "max_onset_error_steps": round(
                max((f.max_onset_error_steps for f in read), default=0.0), 4
            ),
            "repairs": totals,
            "repaired_files": [
                {"path": f.path, "repairs": f.repairs} for f in read if f.status == "repaired"
            ],
        }


def onset_errors(
    tokenizer: Tokenizer, md: MidiData, dec: MidiData
) -> tuple[np.ndarray, np.ndarray]:
    """Per decoded note: distance to the nearest original onset of the same family and pitch,
    in grid steps and in milliseconds (vectorized: one searchsorted).

    Milliseconds are measured on the file's own tempo map, so in ``beat`` mode they show the
    grid error alone; the TEMPO bins (within one bin) are a separate, documented quantization.
    """
    if len(dec.time) == 0 or len(md.time) == 0:
        return np.zeros(0), np.zeros(0)
    vc = tokenizer.vocab_config

    def steps(d: MidiData) -> np.ndarray:
        if vc.time_unit == "beat":
            return d.time * vc.steps_per_beat / d.tpq
        return d.seconds(d.time) / vc.step_seconds

    def keyed(d: MidiData) -> np.ndarray:  # family/pitch far apart, steps within
        fam = d.track_family(vc.num_instruments)[d.track]
        return (fam * 128 + d.pitch) * 2.0**36 + steps(d)

    orig = keyed(md)
    order = np.argsort(orig)
    orig_sorted = orig[order]
    got = keyed(dec)
    i = np.clip(np.searchsorted(orig_sorted, got), 1, len(orig_sorted) - 1)
    left, right = orig_sorted[i - 1], orig_sorted[i]
    use_right = np.abs(right - got) < np.abs(left - got)
    if len(orig_sorted) == 1:
        i, use_right = np.ones_like(i), np.zeros_like(use_right)
    match = order[np.where(use_right, i, i - 1)]
    err_steps = np.abs(orig[match] - got)
    if vc.time_unit == "beat":  # the grid error at the file's own tempo (not the tempo bins')
        dec_s = md.seconds(dec.time * (md.tpq / dec.tpq))
    else:
        dec_s = dec.seconds(dec.time)
    err_ms = np.abs(md.seconds(md.time[match]) - dec_s) * 1000.0
    return err_steps, err_ms


def check_file(path: str | Path, tokenizer: Tokenizer) -> FileCheck:
    """Read, repair, encode and decode one file; never raises for a bad file."""
    path = str(path)
    try:
        md, report = read_midi_data(
            path, tokenizer.data_config, tokenizer.vocab_config, overlaps=False
        )
        ids = tokenizer.encode_data(md, report)
        dec = tokenizer.decode_to_data(ids)
        err_steps, err_ms = onset_errors(tokenizer, md, dec)
    except MidiReadError as e:
        return FileCheck(path, "failed", error=str(e))
    except Exception as e:  # a bug or an unforeseen file: reported per file, not a traceback
        return FileCheck(path, "failed", error=f"{path}: unexpected {type(e).__name__}: {e}")
    repairs = report.repairs
    return FileCheck(
        path, "repaired" if repairs else "ok", notes=len(dec.time), tokens=len(ids),
        repairs=repairs, max_onset_error_steps=float(err_steps.max(initial=0.0)),
        max_onset_error_ms=float(err_ms.max(initial=0.0)),
    )  # fmt: skip


def midi_files_under(path: str | Path) -> list[str]:
    """The file itself, or the MIDI files under a folder (sorted)."""
    from aurl.data.cache import find_midi_files

    path = Path(path)
    if path.is_file():
        return [str(path)]
    if not path.is_dir():
        what = "not a regular file or folder" if path.exists() else "no such file or folder"
        raise DataError(f"{path}: {what}")
    files = [os.path.join(path, rel) for rel in find_midi_files(path)]
    if not files:
        raise DataError(f"{path}: no MIDI files (.mid, .midi, .kar) in this folder")
    return files


_WORKER: dict[str, Tokenizer] = {}


def _init_worker(config: Config) -> None:
    _WORKER["tokenizer"] = Tokenizer(config.vocab, config.data)


def _check_in_worker(path: str) -> FileCheck:
    return check_file(path, _WORKER["tokenizer"])


def check_paths(
    path: str | Path,
    config: Config | None = None,
    *,
    workers: int = 0,
    progress: Progress = silent,
) -> CheckResult:
    """Audit a MIDI file or every MIDI file under a folder, in ``workers`` processes
    (0: all cores); a file whose reader crashes or hangs is one failed entry.

    Raises:
        DataError: the path does not exist, or the folder holds no MIDI files.
    """
    config = config or Config()
    Tokenizer(config.vocab, config.data)  # a bad config fails here, not in every worker
    files = midi_files_under(path)
    workers = min(workers or os.cpu_count() or 1, len(files))
    results: list[FileCheck | None] = [None] * len(files)
    done = isolated_map(
        _check_in_worker, files, workers=workers, initializer=_init_worker, initargs=(config,)
    )
    for i, res in progress(done, total=len(files), desc="check"):
        if isinstance(res, Failed):
            res = FileCheck(files[i], "failed", error=f"{files[i]}: {res.reason}")
        results[i] = res
    return CheckResult(results)


def format_table(result: CheckResult) -> str:
    """The human-readable audit: one row per file, then the totals."""
    rows = [f"{'status':9} {'notes':>7} {'tokens':>8} {'err(steps)':>10} {'err(ms)':>8}  file"]
    for f in result.files:
        if f.status == "failed":
            rows.append(f"{'failed':9} {'-':>7} {'-':>8} {'-':>10} {'-':>8}  {f.error}")
            continue
        extra = (
            "  (" + ", ".join(f"{k} {v}" for k, v in f.repairs.items()) + ")" if f.repairs else ""
        )
        rows.append(
            f"{f.status:9} {f.notes:7d} {f.tokens:8d} {f.max_onset_error_steps:10.3f} "
            f"{f.max_onset_error_ms:8.2f}  {f.path}{extra}"
        )
    s = result.to_dict()
    rows.append(
        f"{s['files']} files: {s['ok']} ok, {s['repaired']} repaired, {len(s['failed'])} failed; "
        f"{s['notes']} notes, {s['tokens']} tokens; max onset error "
        f"{s['max_onset_error_steps']:.3f} steps ({s['max_onset_error_ms']:.2f} ms)"
    )
    return "\n".join(rows)
