"""Uploaded MIDI files are parsed in a separate process, with a time and a memory limit.

A damaged or hostile upload can at worst crash, hang or exhaust that process: the request
fails with a 4xx naming the file, and the server (its model threads above all) goes on. The
child is ``python -m aurl.serve.uploads TASK OPTIONS_JSON``: it reads the file's bytes from
stdin, sets its own limits before parsing, and writes one JSON object to stdout (JSON only in
either direction: nothing is unpickled).

Tasks: ``ids`` (the tokenizer's ids of the file), ``notes`` (a note array as
JSON columns, plus the bar length in beats), ``piece`` (the notes track by track,
``{"tracks": [{"name", "notes": columns}, ...], "time_map": TimeMap.to_json()}``: what
composing around the file needs, its bars and seconds included), ``analyze``
(:func:`aurl.analysis.report.analyze_notes` of the file), ``musicxml`` (the file as MusicXML,
``{"musicxml": text}``, through :func:`aurl.generation.export.score_to_music21`: music21
loads in the child only).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from aurl.errors import MidiReadError

TASKS = ("ids", "notes", "piece", "analyze", "musicxml")


class UploadError(MidiReadError):
    """An upload could not be parsed (bad file, or the parser crashed or ran out of time)."""

    def __init__(
        self, message: str, *, limit: str | None = None, status: int = 422, field: str = "file"
    ) -> None:
        super().__init__(message)
        self.limit, self.status = limit, status
        self.field = field  # the request field that held the bytes (a 4xx names it)


async def parse_upload(
    data: bytes,
    task: str,
    *,
    name: str = "file",
    options: dict[str, Any] | None = None,
    timeout: float = 20.0,
    memory_mb: int = 2048,
) -> dict[str, Any]:
    """Run ``task`` on the MIDI bytes ``data`` in a child process and return its JSON result.

    Raises:
        UploadError: the file is not readable MIDI (the message says why), or the child
            crashed or took longer than ``timeout`` seconds (``limit`` names the limit).
    """
    if task not in TASKS:
        raise ValueError(f"task {task!r}: one of {TASKS}")
    if not data:
        raise UploadError(f"{name}: empty upload (zero bytes): send a MIDI file")
    opts = json.dumps({**(options or {}), "memory_mb": memory_mb, "cpu_seconds": timeout})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aurl.serve.uploads", task, opts,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(data), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise UploadError(
            f"{name}: parsing took over parse_seconds={timeout:g} s: send a smaller or simpler file",
            limit="parse_seconds", status=422,
        ) from None  # fmt: skip
    except asyncio.CancelledError:  # the client went away
        proc.kill()
        await proc.wait()
        raise
    try:
        result = json.loads(out.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        result = None
    if proc.returncode != 0 or not isinstance(result, dict):
        how = f"signal {-proc.returncode}" if (proc.returncode or 0) < 0 else "an error"
        tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
        raise UploadError(
            f"{name}: the MIDI parser stopped with {how} ({tail[0][:200]}): the file is "
            "damaged or too demanding; check it with 'aurl data check'"
        )
    if "error" in result and result.get("status") == 503:  # the server's own folder
        raise UploadError(result["error"], limit=result.get("limit"), status=503)
    if "error" in result:
        raise UploadError(f"{name}: {result['error']}")
    return result


# --------------------------------------------------------------------------------------------
# The child
# --------------------------------------------------------------------------------------------


def _limit_self(memory_mb: int, cpu_seconds: float) -> None:
    import resource

    nbytes = int(memory_mb) * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (nbytes, nbytes))
    cpu = max(1, int(cpu_seconds) + 1)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _read_notes(path: Path) -> tuple[Any, float, list[tuple[str, Any]]]:
    """Notes (drums kept), the bar length in beats from the first time signature (4 when
    there is none), and the tracks with notes, ``(name, notes)`` (the names: what ``part``
    names)."""
    from aurl.config import DataConfig
    from aurl.data.midi_io import read_midi
    from aurl.data.notes import notes_from_score
    from aurl.generation.compose import track_notes

    score, _ = read_midi(path, DataConfig(drums="keep"))
    bpb = 4.0
    sigs = _raw_meter(path).signatures
    if sigs:
        bpb = sigs[0][1] * 4.0 / sigs[0][2]
    return notes_from_score(score), bpb, track_notes(score)


def _raw_meter(path: Path) -> Any:
    """The file's time and key signatures as a ``TimeMap`` (the repaired score keeps none),
    read from its checked bytes; none when the raw reader refuses a file ``read_midi``
    repaired."""
    from aurl.data.midi_io import read_score
    from aurl.errors import MidiReadError
    from aurl.generation.compose import TimeMap

    try:
        return TimeMap.of_score(read_score(path))
    except MidiReadError:
        return TimeMap()


def _read_piece(path: Path) -> dict[str, Any]:
    """The file's tracks with notes (name and note columns each) and its time map."""
    from aurl.config import DataConfig
    from aurl.data.midi_io import absurd_score_timing, read_midi, read_score
    from aurl.errors import MidiReadError
    from aurl.generation.compose import TimeMap, track_notes

    score, _ = read_midi(path, DataConfig(drums="keep"))
    # the file as sent, before the reading's repairs: the composing commands refuse what it
    # would repair here (a note clipped, notes after a long silence dropped), and so does the
    # server, rather than compose around notes the upload does not hold
    try:  # the raw reader refuses some files read_midi repairs: those keep no meter either
        raw = read_score(path)
    except MidiReadError:
        raw = None
    if raw is not None and (why := absurd_score_timing(raw)):
        raise MidiReadError(why)
    meter = TimeMap() if raw is None else TimeMap.of_score(raw)  # _raw_meter, read once
    times = TimeMap(signatures=meter.signatures, tempos=TimeMap.of_score(score).tempos,
                    keys=meter.keys)  # fmt: skip
    tracks = [
        {"name": name, "notes": {f: notes[f].tolist() for f in notes.dtype.names}}
        for name, notes in track_notes(score)
    ]
    return {"tracks": tracks, "time_map": times.to_json()}


def _musicxml(path: Path) -> dict[str, Any]:
    """The file as MusicXML text (quantized as ``aurl generate --format musicxml`` writes it)."""
    from aurl.data.midi_io import absurd_score_timing, read_score
    from aurl.errors import MidiReadError
    from aurl.generation.export import score_to_music21

    score = read_score(path)
    if sum(len(t.notes) for t in score.tracks) == 0:
        raise MidiReadError("upload: no notes to write as MusicXML")
    if why := absurd_score_timing(score):  # music21 would spend the whole parse limit on it
        raise MidiReadError(f"upload: {why}")
    out = path.with_suffix(".musicxml")
    score_to_music21(score).write("musicxml", fp=str(out))
    return {"musicxml": out.read_text(encoding="utf-8")}


def _run_task(task: str, path: Path, options: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from aurl.config import DataConfig, VocabConfig, build

    if task == "ids":  # the tokenizer only (no torch here: the child starts fast)
        from aurl.data.tokenizer import Tokenizer

        vocab = build(VocabConfig, options.get("vocab", {}), prefix="vocab")
        cap = int(options.get("polyphony_cap", DataConfig().polyphony_cap))
        tok = Tokenizer(vocab, DataConfig(polyphony_cap=cap))
        return {"ids": np.asarray(tok.encode_file(path)).tolist()}
    if task == "piece":
        return _read_piece(path)
    if task == "musicxml":
        return _musicxml(path)
    notes, beats_per_bar, tracks = _read_notes(path)
    if task == "notes":
        cols = {name: notes[name].tolist() for name in notes.dtype.names}
        return {"notes": cols, "beats_per_bar": beats_per_bar,
                "tracks": [name for name, _ in tracks]}  # fmt: skip
    from aurl.analysis.report import analyze_notes, voice_tracks

    bpb = float(options.get("beats_per_bar") or beats_per_bar)
    return analyze_notes(notes, name=str(options.get("name", "")), beats_per_bar=bpb,
                         voices=voice_tracks(tracks))  # fmt: skip


def main(argv: list[str]) -> int:
    """Child entry point: ``TASK OPTIONS_JSON``, MIDI bytes on stdin, JSON on stdout."""
    from aurl.errors import AurlError

    task, options = argv[0], json.loads(argv[1])
    _limit_self(options.pop("memory_mb", 2048), options.pop("cpu_seconds", 20.0))
    data = sys.stdin.buffer.read()
    try:
        folder = tempfile.TemporaryDirectory(prefix="aurl-upload-")
    except OSError as e:  # the server's fault, not the file's: no writable temporary folder
        error = f"the server cannot write its upload folder ({e}): tell its operator (TMPDIR)"
        sys.stdout.write(json.dumps({"error": error, "status": 503, "limit": "upload_folder"}))
        return 0
    with folder as tmp:
        path = Path(tmp) / "upload.mid"
        path.write_bytes(data)
        try:
            result = _run_task(task, path, options)
        except AurlError as e:  # bad input: say why (the temporary path means nothing)
            result = {"error": str(e).replace(str(path), "upload").replace("upload: ", "")}
    sys.stdout.write(json.dumps(result, allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
