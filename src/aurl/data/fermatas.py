"""Bach's phrase ends: the fermatas of the bundled chorales, read once from music21's scores.

A chorale's phrases end at fermatas, which MIDI cannot carry: music21 writes a fermata note
with its written length, so a phrase end held for one beat looks like any other beat in the
MIDI file. The scores still know. :func:`build_fermatas` parses each bundled chorale's source
score in music21's corpus (offline: music21 ships it), prepares it exactly as music21 does
before writing MIDI (``prepareStreamForMidi``: repeats expanded, so the beats are those of the
bundled MIDI file), and records the soprano's fermata notes (the first part that has any) as
``[arrival, end]`` pairs in beats (quarter notes) from the start of the MIDI file: the onset of
the fermata note (the first note of its tie) and its release. They are stored once in
``bundled/bach-chorales-fermatas.json``, beside the corpus folder (which holds the MIDI files
and their manifest only); :func:`load_fermatas` reads them.

Rebuild (music21 needed, ~2 CPU-minutes):  python -m aurl.data.fermatas
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from aurl.errors import DataError
from aurl.fileio import atomic_write_text
from aurl.progress import Progress, silent

CHORALES = Path(__file__).parent / "bundled" / "bach-chorales"
FERMATAS_FILE = CHORALES.parent / "bach-chorales-fermatas.json"


def score_fermatas(stream: Any) -> list[tuple[float, float]]:
    """``(arrival, end)`` beats of the fermata notes of a music21 score's first part that has
    any, repeats expanded as music21 writes MIDI; sorted, one per arrival."""
    from music21 import expressions
    from music21.midi.translate import prepareStreamForMidi

    prepared = prepareStreamForMidi(stream)
    for part in prepared.parts:
        notes = list(part.flatten().notes)
        out: dict[float, float] = {}
        for i, n in enumerate(notes):
            if not any(isinstance(e, expressions.Fermata) for e in n.expressions):
                continue
            first = last = i  # a tied fermata note: the phrase arrives where the tie starts
            while first > 0 and _tied(notes[first], "stop", "continue"):
                first -= 1
            while last + 1 < len(notes) and _tied(notes[last], "start", "continue"):
                last += 1
            start = float(notes[first].offset)
            out[start] = float(notes[last].offset + notes[last].quarterLength)
        if out:
            return sorted(out.items())
    return []


def _tied(note: Any, *types: str) -> bool:
    return note.tie is not None and note.tie.type in types


def build_fermatas(
    out: str | Path = FERMATAS_FILE,
    *,
    folder: str | Path = CHORALES,
    root: str | Path | None = None,
    progress: Progress = silent,
) -> Path:
    """Read the fermatas of every chorale in ``folder``'s manifest from its music21 source and
    write them to ``out`` (atomically).

    Args:
        out: The JSON file to write.
        folder: A chorale corpus folder with ``manifest.json`` (default: the bundled one).
        root: music21's corpus folder (default: music21's own).
        progress: Progress helper over the files.

    Raises:
        DataError: no readable manifest, or a source score music21 cannot read.
    """
    from music21 import common, converter

    from aurl.data.corpus import read_manifest

    manifest = read_manifest(folder)
    root = Path(root or common.getCorpusFilePath())
    files: dict[str, list[list[float]]] = {}
    for entry in progress(manifest["files"], total=len(manifest["files"]), desc="fermatas"):
        path = root / entry["source"]
        try:
            stream = converter.parse(str(path), forceSource=True)
        except Exception as e:  # music21 raises many types for a score it cannot read
            raise DataError(f"{path}: music21 cannot read it ({type(e).__name__}: {e})") from e
        files[entry["file"]] = [[a, b] for a, b in score_fermatas(stream)]
    import music21

    doc = {
        "source": f"music21 {music21.__version__} corpus",
        "unit": "beats (quarter notes) from the start of the MIDI file; [arrival, end] of "
        "each fermata note of the soprano (the first part with fermatas), repeats expanded",
        "files": files,
    }
    return atomic_write_text(Path(out), dumps(doc))


def dumps(doc: dict[str, Any]) -> str:
    """The fermata file's text: one line per chorale, so a rebuild diffs line by line."""
    head = {k: v for k, v in doc.items() if k != "files"}
    lines = [json.dumps(head, indent=1, ensure_ascii=False)[:-2] + ',\n "files": {']
    rows = [f"  {json.dumps(f)}: {json.dumps(v)}" for f, v in doc["files"].items()]
    return "\n".join(lines + [",\n".join(rows), " }", "}"]) + "\n"


def load_fermatas(path: str | Path = FERMATAS_FILE) -> dict[str, np.ndarray]:
    """File name -> its fermatas, (n, 2) float64 ``[arrival, end]`` beats, sorted.

    Raises:
        DataError: the file is missing or not a fermata file (rebuild it, see the module).
    """
    path = Path(path)
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(
            f"{path}: cannot read the chorales' fermatas ({e}); rebuild it with "
            "'python -m aurl.data.fermatas'"
        ) from e
    return {f: np.array(v, dtype=np.float64).reshape(-1, 2) for f, v in files.items()}


if __name__ == "__main__":
    from aurl.progress import bar

    print(f"wrote {build_fermatas(progress=bar)}")
