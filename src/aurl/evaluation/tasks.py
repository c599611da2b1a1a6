"""Task evaluations: harmonizing held-out chorales (``aurl evaluate --task harmonize``).

For each held-out chorale (read from its MIDI file, where the four voices are four tracks; the
token cache does not keep voices), Bach's soprano is harmonized and the result is compared with
Bach's own alto, tenor and bass and with the rules of four-part writing:

- **Likelihood**: bits per note of Bach's ATB tokens under the decoder's constrained
  distribution (soprano forced, time clipped: :func:`aurl.generation.compose.score_plan`), next
  to the same tokens under the unconditional model (grammar only).
- **Rules** (:func:`voice_rules`), on the four voices sampled at every onset of any voice
  (a "slice"): parallel fifths and octaves per 100 voice-pair moves (a pair moves when one of its
  voices changes pitch between two slices where both sound; a parallel is the same perfect
  interval class, 7 or 0 semitones mod 12, in both slices with both voices moving the same
  way: compound intervals count as their class (a fifth to a twelfth is a parallel), unisons as
  octaves; a repeated or held note is no motion, so oblique motion never counts; contrary
  motion into the same class (octave to double octave) does not count; a voice resting in
  either slice breaks the pair), voice crossings (a lower voice above the next higher one) and spacing wider than an
  octave between neighbouring upper voices (S-A, A-T), each per 100 slices, and notes outside
  the textbook SATB ranges (:data:`aurl.generation.voices.SATB_RANGES`), per 100 notes. Bach's
  own rates on the same pieces are the reference row: he breaks rules too.
- **Harmony**: chord agreement with Bach, the share of beats whose Roman numeral (chords per
  beat from :func:`aurl.analysis.chords.recognize_chords`, both read in the one key Bach's piece
  is in, so it is the same chord, not the same function in two keys) is the same; pitch-class
  agreement, the mean Jaccard overlap of the pitch-class sets sounding at each beat start (no
  key, no chord labels); and the share of the melody's phrase ends
  (:func:`aurl.analysis.structure.phrase_boundaries`) that arrive on a cadence.
- **Melody kept**: share of the soprano's notes found, same pitch, onset and end within 1/64
  beat, in the written and re-read MIDI file.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aurl.analysis import part_writing
from aurl.data.notes import notes_from_score
from aurl.errors import AurlError
from aurl.generation.compose import CADENCE_STRICTNESS, in_vocabulary
from aurl.progress import Progress, silent

BUNDLED = Path(__file__).resolve().parent.parent / "data" / "bundled" / "bach-chorales"


def held_out_chorales(folder: str | Path = BUNDLED, split: str = "test") -> list[Path]:
    """The four-track chorales of a split, from the folder's ``manifest.json`` (its ``split``
    field) or, without one, by :func:`aurl.data.split.split_of` on the file names."""
    folder = Path(folder)
    manifest = folder / "manifest.json"
    if manifest.is_file():
        from aurl.errors import DataError

        try:
            files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
            return sorted(
                folder / f["file"]
                for f in files
                if f.get("split") == split and f.get("tracks") == 4
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSON, UTF-8, shape
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(
                f"{manifest} is damaged or not an Aurl manifest ({why}): it should be "
                '{"files": [{"file": NAME, "split": SPLIT, "tracks": 4}, ...]} as aurl data '
                "corpus writes it; remove it to split the folder by file name"
            ) from None
    from aurl.data.split import split_of

    return sorted(p for p in folder.glob("*.mid") if split_of(p.name) == split)


def chorale_voices(path: str | Path) -> list[np.ndarray]:
    """The four voices (S, A, T, B note arrays) of a four-track chorale MIDI file.

    Raises:
        MidiReadError: the file cannot be read.
        DataError: fewer than four tracks with notes.
    """
    from aurl.data.midi_io import read_score
    from aurl.errors import DataError
    from aurl.generation.compose import track_notes

    tracks = track_notes(read_score(path).to("tick"))
    if len(tracks) < 4:
        raise DataError(
            f"{path} has {len(tracks)} track(s) with notes: a chorale has four (Soprano, Alto, "
            "Tenor, Bass), one voice a track"
        )
    return [notes for _, notes in tracks[:4]]


def _each_chorale(
    files: list[Path], evaluate: Callable[[Path], Any], skipped: Any, progress: Any, desc: str
) -> Iterator[Any]:
    """``evaluate(path)`` of each of ``files`` under a ``progress`` bar; a chorale whose
    evaluation raises :class:`AurlError` is that chorale's failure, not the run's: reported
    through :func:`_skip` and left out."""
    for path in progress(files, total=len(files), desc=desc):
        try:
            result = evaluate(path)
        except AurlError as e:
            _skip(skipped, path, e)
            continue
        yield result


def _skip(skipped: Any, path: Path, error: Exception) -> None:
    """Report ``path``'s ``error`` through ``skipped(path, why)``, or raise it when there is no
    ``skipped`` (the evaluations' default: a library caller sees the error)."""
    if skipped is None:
        raise error
    why = str(error).splitlines()[0] if str(error) else type(error).__name__
    skipped(path, why)


# --------------------------------------------------------------------------------------------
# Rules of four-part writing
# --------------------------------------------------------------------------------------------


def slices(voices: list[np.ndarray]) -> np.ndarray:
    """(n_slices, n_voices) pitch sounding in each voice at every onset of any voice (-1: rest;
    :func:`aurl.analysis.part_writing.slices`)."""
    return part_writing.slices(voices)[1]


def voice_rules(voices: list[np.ndarray]) -> dict[str, float]:
    """Rule-breaking rates of four voices (S, A, T, B; see the module docstring), counted by
    :mod:`aurl.analysis.part_writing`.

    Returns:
        ``parallels_per_100_moves``, ``crossings_per_100_slices``,
        ``spacing_per_100_slices``, ``out_of_range_per_100_notes``, and the counts
        ``moves``, ``parallels``, ``slices``.
    """
    grid = slices(voices)
    moves, parallels = part_writing.parallels(grid)
    crossings = len(part_writing.crossings(grid))
    spacing = len(part_writing.wide(grid))
    out = len(part_writing.out_of_range(voices))
    total = sum(len(v) for v in voices[: len(part_writing.SATB_RANGES)])
    s = max(1, len(grid))
    return {
        "parallels_per_100_moves": 100.0 * len(parallels) / max(1, moves),
        "crossings_per_100_slices": 100.0 * crossings / s,
        "spacing_per_100_slices": 100.0 * spacing / s,
        "out_of_range_per_100_notes": 100.0 * out / max(1, total),
        "moves": moves,
        "parallels": len(parallels),
        "slices": len(grid),
    }


# --------------------------------------------------------------------------------------------
# Harmony against Bach
# --------------------------------------------------------------------------------------------


def beat_numerals(notes: np.ndarray, key: Any, end: float) -> list[str]:
    """Roman numeral of the chord on each beat (unmerged chords per beat)."""
    from aurl.analysis.chords import recognize_chords, roman_numeral

    return [roman_numeral(c, key) for c in recognize_chords(notes, merge=False, end=end)]


def chord_agreement(notes: np.ndarray, reference: np.ndarray) -> float:
    """Share of beats where ``notes`` and ``reference`` have the same Roman numeral, both read
    in the key of ``reference`` (NaN for no beats)."""
    from aurl.analysis.keys import estimate_key

    key = estimate_key(reference)
    end = float((reference["onset"] + reference["duration"]).max())
    a, b = beat_numerals(notes, key, end), beat_numerals(reference, key, end)
    n = min(len(a), len(b))
    if n == 0:
        return float("nan")
    return float(np.mean([x == y for x, y in zip(a[:n], b[:n])]))


def beat_pitch_classes(notes: np.ndarray, end: float) -> list[frozenset[int]]:
    """The pitch classes sounding at the start of each beat ``0, 1, ... < end``."""
    onset, stop = notes["onset"], notes["onset"] + notes["duration"]
    out = []
    for b in np.arange(0.0, end - 1e-9, 1.0):
        inside = (onset <= b + 1e-9) & (stop > b + 1e-9)
        out.append(frozenset((notes["pitch"][inside] % 12).tolist()))
    return out


def pitch_class_agreement(notes: np.ndarray, reference: np.ndarray) -> float:
    """Mean Jaccard overlap of the pitch-class sets sounding at each beat start of
    ``reference`` (beats where it sounds) and of ``notes``: a harmony measure that needs no key
    or chord labels (NaN for no such beat)."""
    end = float((reference["onset"] + reference["duration"]).max()) if len(reference) else 0.0
    a, b = beat_pitch_classes(notes, end), beat_pitch_classes(reference, end)
    scores = [len(x & y) / len(x | y) for x, y in zip(a, b) if y]
    return float(np.mean(scores)) if scores else float("nan")


def cadence_rate(notes: np.ndarray, melody: np.ndarray, key: Any) -> float:
    """Share of the melody's phrase ends that arrive on a cadence (NaN: no phrases)."""
    from aurl.analysis.chords import arrival_cadences
    from aurl.analysis.structure import phrase_boundaries

    phrases = phrase_boundaries(melody)
    if not phrases:
        return float("nan")
    return float(np.mean(arrival_cadences(notes, [p.arrival for p in phrases], key)))


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One way of decoding: a name, the number of SMC particles (1: forcing alone), and the
    :class:`aurl.generation.compose.ComposeOptions` switches ``melody_key`` (bias towards the
    melody's key), ``voice_leading`` (mask parallel fifths and octaves), ``consonance``
    (bias against dissonances with the melody note), ``cadences`` (lean towards a cadence
    at the melody's phrase ends; with particles, keep the rows that arrive on one),
    ``spacing`` (bias against upper voices more than an octave apart) and ``ranges`` (bias
    against notes outside their voice's range)."""

    name: str
    particles: int
    melody_key: bool = True
    voice_leading: bool = True
    consonance: float = 0.7
    cadences: bool = True
    cadence_strictness: float = CADENCE_STRICTNESS
    spacing: float = 0.9
    ranges: float = 0.9


VARIANTS = (Variant("forcing", 1), Variant("forcing+smc8", 8))


def _mean(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if np.isfinite(r[key])]
    return float(np.mean(vals)) if vals else float("nan")


def evaluate_harmonize(
    model: Any,
    files: list[Path],
    *,
    variants: tuple[Variant, ...] = VARIANTS,
    seed: int = 0,
    max_beats: float | None = None,
    engine: Any = None,
    progress: Progress = silent,
    skipped: Any = None,
) -> dict[str, Any]:
    """Harmonize the soprano of each chorale in ``files`` with each variant; score everything.

    Args:
        model: The torch model (likelihood needs its forward pass).
        files: Four-track chorale MIDI files.
        variants: Decoding variants to compare.
        seed: Sampling seed.
        max_beats: Cut each chorale to its first ``max_beats`` beats (tests); None: whole.
        engine: What the variants decode with (e.g. an onnx engine of the same weights);
            None: ``model``.
        progress: Progress helper over files.
        skipped: ``skipped(path, why)`` for a file that cannot be evaluated (unreadable, not
            four voices, a melody that cannot be harmonized), which is then left out; None:
            its error is raised.

    Returns:
        ``{"rows": {name: averaged metrics}, "pieces": per-piece metrics, "files": n}``
        (``n`` the files evaluated); rows ``bach`` (the reference) and one per variant.
    """
    import symusic

    from aurl.analysis.keys import estimate_key
    from aurl.data.meter import read_meter
    from aurl.data.tokenizer import Tokenizer
    from aurl.generation.anticipation import score_anticipated, supports_anticipation
    from aurl.generation.compose import (
        ComposeOptions,
        harmonize,
        make_plan,
        melody_kept,
        melody_line,
        score_plan,
    )
    from aurl.generation.export import write_midi

    tokenizer = Tokenizer(model.vocab_config)
    per: dict[str, list[dict]] = {"bach": [], **{v.name: [] for v in variants}}
    likelihood: list[dict] = []

    def chorale(path: Path) -> tuple[dict, dict[str, dict]]:
        """The likelihood and the rows of one chorale."""
        rows: dict[str, dict] = {}
        voices = chorale_voices(path)
        in_vocabulary(np.concatenate(voices), model.vocab_config, path)
        if max_beats is not None:
            voices = [v[v["onset"] < max_beats] for v in voices]
            for v in voices:
                v["duration"] = np.minimum(v["duration"], max_beats - v["onset"])
        line = melody_line(voices[0], name=str(path))
        bach = np.sort(np.concatenate(voices), order=["onset", "pitch"])
        key = estimate_key(bach)
        plan = make_plan(line, model.vocab, ceiling=True, max_free=3)
        ids = _encode_notes(bach, tokenizer, path)
        meter = read_meter(path)  # as the cache gives it to the model in training
        ls = (score_anticipated if supports_anticipation(model) else score_plan)(
            model, plan, ids, meter=meter
        )
        lik = {
            "conditional": ls.conditional_bits, "unconditional": ls.unconditional_bits,
            "notes": ls.free_notes, "outside": ls.outside,
        }  # fmt: skip
        rows["bach"] = {
            **voice_rules(voices), "chord_agreement": 1.0, "pc_agreement": 1.0,
            "cadence_rate": cadence_rate(bach, line, key), "melody_kept": 1.0, "seconds": 0.0,
        }  # fmt: skip
        for v in variants:
            t0 = time.perf_counter()
            opts = ComposeOptions(
                particles=v.particles, seed=seed, melody_key=v.melody_key,
                voice_leading=v.voice_leading, consonance=v.consonance, cadences=v.cadences,
                cadence_strictness=v.cadence_strictness, spacing=v.spacing, ranges=v.ranges,
            )  # fmt: skip
            (c,) = harmonize(model if engine is None else engine, line, options=opts, meter=meter)
            seconds = time.perf_counter() - t0
            with tempfile.TemporaryDirectory() as tmp:
                written = write_midi(c.score, Path(tmp) / "h.mid")
                back = symusic.Score(str(written))
                tracks = {t.name: t for t in back.tracks}
                got = []
                for name in ("Soprano", "Alto", "Tenor", "Bass"):
                    one = symusic.Score(back.tpq)
                    if name in tracks:
                        one.tracks.append(tracks[name].copy())
                    got.append(notes_from_score(one))
            full = np.sort(np.concatenate(got), order=["onset", "pitch"])
            rows[v.name] = {
                **voice_rules(got), "chord_agreement": chord_agreement(full, bach),
                "pc_agreement": pitch_class_agreement(full, bach),
                "cadence_rate": cadence_rate(full, line, key),
                "melody_kept": melody_kept(got[0], line), "seconds": seconds,
                "given_bits_per_note": c.stats["given_bits_per_note"],
            }  # fmt: skip
        return lik, rows

    done = 0
    for piece, rows in _each_chorale(files, chorale, skipped, progress, "harmonize"):
        likelihood.append(piece)
        for name, row in rows.items():
            per[name].append(row)
        done += 1
    rows = pooled_rows(per)
    notes = sum(r["notes"] for r in likelihood)
    lik = {
        "atb_notes": notes,
        "conditional_bits_per_note": sum(r["conditional"] for r in likelihood) / max(1, notes),
        "unconditional_bits_per_note": sum(r["unconditional"] for r in likelihood) / max(1, notes),
        "tokens_outside_plan": sum(r["outside"] for r in likelihood),
    }
    return {"rows": rows, "likelihood": lik, "files": done, "pieces": per}


def pooled_rows(per: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """Each row's metrics over its pieces (:func:`evaluate_harmonize`'s ``pieces``, or several
    runs' pieces together): the mean of each, but parallels pooled per 100 moves over all
    pieces together."""
    rows = {}
    for name, items in per.items():
        keys = [k for k in items[0] if k not in ("moves", "parallels", "slices")] if items else []
        rows[name] = {k: _mean(items, k) for k in keys}
        if items:
            moves = sum(r["moves"] for r in items)
            rows[name]["parallels_per_100_moves"] = (
                100.0 * sum(r["parallels"] for r in items) / max(1, moves)
            )
    return rows


#: The columns of :func:`harmonize_table`: (metric, heading).
HARMONIZE_COLUMNS = (
    ("parallels_per_100_moves", "par. 5ths/8ves /100 moves"),
    ("crossings_per_100_slices", "crossings /100 slices"),
    ("spacing_per_100_slices", "spacing > 8ve /100 slices"),
    ("out_of_range_per_100_notes", "out of range /100 notes"),
    ("chord_agreement", "chord agreement"),
    ("pc_agreement", "pitch-class agreement"),
    ("cadence_rate", "cadence at phrase ends"),
    ("melody_kept", "melody kept"),
    ("seconds", "s per piece"),
)


def rows_table(rows: dict[str, dict[str, float]], columns=HARMONIZE_COLUMNS) -> list[str]:
    """The Markdown table lines of ``rows`` (name -> metrics) in ``columns``."""
    lines = [
        "| row | " + " | ".join(c[1] for c in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for name, row in rows.items():
        cells = [f"{row[k]:.3f}" if k in row else "" for k, _ in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _encode_notes(notes: np.ndarray, tokenizer: Any, path: Path) -> np.ndarray:
    """Ids of a note array (one family, program 0), as the tokenizer encodes a file."""
    from aurl.data.midi_io import read_score
    from aurl.generation.compose import parts_score

    score = parts_score([("all", notes)], like=read_score(path))
    return np.asarray(tokenizer.encode_score(score), dtype=np.int64)


def harmonize_table(result: dict[str, Any]) -> str:
    """The Markdown table of :func:`evaluate_harmonize` (rules and harmony per row, likelihood
    below)."""
    lines = rows_table(result["rows"])
    lik = result["likelihood"]
    lines += [
        "",
        f"Bach's alto, tenor and bass ({lik['atb_notes']} notes, {result['files']} chorales): "
        f"**{lik['conditional_bits_per_note']:.3f}** bits per note given the soprano "
        f"(constrained decoder) vs **{lik['unconditional_bits_per_note']:.3f}** under the "
        f"unconditional model; {lik['tokens_outside_plan']} of Bach's tokens fall outside the "
        "plan (unisons of a lower voice with the soprano, which one instrument family cannot "
        "hold).",
    ]
    return "\n".join(lines)


#: The columns of :func:`accompany_table`: (metric, heading).
ACCOMPANY_COLUMNS = (
    ("above", "voices above the part as SATB"),
    ("parallels_per_100_moves", "par. 5ths/8ves /100 moves"),
    ("crossings_per_100_slices", "crossings /100 slices"),
    ("spacing_per_100_slices", "spacing > 8ve /100 slices"),
    ("out_of_range_per_100_notes", "out of range /100 notes"),
    ("part_kept", "part kept"),
    ("seconds", "s per piece"),
)


def voices_above(part: np.ndarray, others: list[np.ndarray], want: int) -> float:
    """Of the slices where ``part`` sounds, the share with exactly ``want`` of ``others``
    sounding above it (a voice with the right count of voices over it); NaN where it never
    sounds (zero-length notes: numpy's "mean of empty slice" warning once)."""
    grid = slices([part, *others])
    sounding = grid[:, 0] >= 0
    if not sounding.any():
        return float("nan")
    return float(((grid[:, 1:] > grid[:, :1]).sum(1)[sounding] == want).mean())


def voices_between(new: np.ndarray, others: list[np.ndarray], rank: int) -> int:
    """How many of the notes ``new`` start with ``rank`` of the ``others``' sounding notes above
    them (as many as sound, where fewer do): a voice between its neighbours."""
    count = 0
    for n in new:
        t = n["onset"]
        now = [int(o["pitch"][s].max()) for o in others
               if (s := (o["onset"] <= t + 1e-9) & (o["onset"] + o["duration"] > t + 1e-9)).any()]  # fmt: skip
        count += sum(q > n["pitch"] for q in now) == min(rank, len(now))
    return count


def evaluate_accompany(
    model: Any,
    files: list[Path],
    *,
    seed: int = 0,
    engine: Any = None,
    progress: Progress = silent,
    skipped: Any = None,
) -> dict[str, Any]:
    """Accompany the alto, the tenor and the bass of each chorale in ``files`` in turn (the
    other three voices composed around it, :func:`aurl.generation.compose.accompany`, forcing)
    and score the four voices (read by rank of median pitch) with the rules of four-part
    writing, the share of slices with the part's SATB count of voices above it, and the part
    kept note for note. ``skipped``: as in :func:`evaluate_harmonize`.

    Returns:
        ``{"rows": {name: averaged metrics}, "pieces": per-piece metrics, "files": n}``
        (``n`` the files evaluated); rows ``bach`` and ``Alto given``, ``Tenor given``,
        ``Bass given``.
    """
    from aurl.data.meter import read_meter
    from aurl.generation.compose import ComposeOptions, accompany, track_notes
    from aurl.generation.voices import SATB

    per: dict[str, list[dict]] = {"bach": [], **{f"{n} given": [] for n in SATB[1:]}}

    def chorale(path: Path) -> dict[str, dict]:
        """The rows of one chorale."""
        voices = chorale_voices(path)
        in_vocabulary(np.concatenate(voices), model.vocab_config, path)
        meter = read_meter(path)
        rows = {"bach": {**voice_rules(voices), "above": 1.0, "part_kept": 1.0, "seconds": 0.0}}
        for k, name in enumerate(SATB[1:], start=1):
            part = np.sort(voices[k], order=["onset", "pitch"])
            t0 = time.perf_counter()
            (c,) = accompany(model if engine is None else engine, part, voices=4,
                             part_name=name, options=ComposeOptions(seed=seed, particles=1),
                             meter=meter)  # fmt: skip
            seconds = time.perf_counter() - t0
            out = track_notes(c.score)
            mine = dict(out).get(name, part[:0])
            kept = np.array_equal(np.sort(mine, order=["onset", "pitch"])[["onset", "pitch"]],
                                  part[["onset", "pitch"]])  # fmt: skip
            ranked = sorted((n for _, n in out), key=lambda n: -float(np.median(n["pitch"])))
            others = [n for nm, n in out if nm != name]
            rows[f"{name} given"] = {
                **voice_rules(ranked), "above": voices_above(part, others, k),
                "part_kept": float(kept), "seconds": seconds,
            }  # fmt: skip
        return rows

    done = 0
    for rows in _each_chorale(files, chorale, skipped, progress, "accompany"):
        for name, row in rows.items():
            per[name].append(row)
        done += 1
    return {"rows": pooled_rows(per), "pieces": per, "files": done}


def accompany_table(result: dict[str, Any]) -> str:
    """The Markdown table of :func:`evaluate_accompany`."""
    return "\n".join(rows_table(result["rows"], ACCOMPANY_COLUMNS))


#: The columns of :func:`infill_table`: (metric, heading).
INFILL_COLUMNS = (
    ("between", "new notes between their neighbours"),
    ("parallels_per_100_moves", "par. 5ths/8ves /100 moves, whole piece"),
    ("span_parallels_per_100_moves", "par. 5ths/8ves /100 moves, the bars alone"),
    ("span_spacing_per_100_slices", "spacing > 8ve /100 slices, the bars alone"),
)
#: The bars :func:`evaluate_infill` writes again: beats 8-24 (bars 3-6 of a piece in 4/4).
INFILL_SPAN = (8.0, 24.0)


def evaluate_infill(
    model: Any,
    files: list[Path],
    *,
    seed: int = 0,
    engine: Any = None,
    progress: Progress = silent,
    skipped: Any = None,
) -> dict[str, Any]:
    """Write bars 3-6 (:data:`INFILL_SPAN`) of each chorale in ``files`` again, each voice
    alone (:func:`aurl.generation.compose.infill` with its ``part``) and every voice at once,
    forcing, and score them: for one voice, the share of its new notes that start between
    their neighbours (its SATB count of the other voices' notes above them) and the parallels
    of the whole piece; for every voice, the bars' own four-part rules (the new notes read as
    four voices), against Bach's notes of the same bars. ``skipped``: as in
    :func:`evaluate_harmonize`.

    Returns:
        ``{"rows": {name: metrics}, "files": n}`` (``n`` the files evaluated); rows ``bach``,
        ``Soprano alone`` .. ``Bass alone`` and ``every voice``, parallels and shares pooled
        over the pieces.
    """
    from aurl.data.meter import read_meter
    from aurl.generation.compose import ComposeOptions, infill
    from aurl.generation.voices import SATB, assign_voices

    a, b = INFILL_SPAN
    opts = ComposeOptions(seed=seed, particles=1)
    m = model if engine is None else engine
    sums: dict[str, dict[str, float]] = {}

    def add(row: str, **counts: float) -> None:
        into = sums.setdefault(row, {})
        for k, v in counts.items():
            into[k] = into.get(k, 0.0) + v

    def wide(r: dict) -> float:
        return r["spacing_per_100_slices"] * r["slices"] / 100

    def chorale(path: Path) -> list[tuple[str, dict[str, float]]]:
        """The counts of one chorale, by row."""
        counts: list[tuple[str, dict[str, float]]] = []
        voices = chorale_voices(path)
        in_vocabulary(np.concatenate(voices), model.vocab_config, path)
        meter = read_meter(path)
        notes = np.concatenate(voices)
        owner = np.concatenate([np.full(len(v), i) for i, v in enumerate(voices)])
        order = np.lexsort((notes["pitch"], notes["onset"]))
        notes, owner = notes[order], owner[order]
        whole = voice_rules(voices)
        span = voice_rules([v[(v["onset"] >= a) & (v["onset"] < b)] for v in voices])
        counts.append(("bach", dict(par=whole["parallels"], moves=whole["moves"],
                       span_par=span["parallels"], span_moves=span["moves"], wide=wide(span),
                       slices=span["slices"])))  # fmt: skip
        for k, name in enumerate(SATB):
            (c,) = infill(m, notes, (a, b), owner == k, options=opts, meter=meter)
            between = voices_between(c.notes, [v for i, v in enumerate(voices) if i != k], k)
            kept = voices[k][(voices[k]["onset"] < a) | (voices[k]["onset"] >= b)]
            voice = np.sort(np.concatenate([kept, c.notes]), order=["onset", "pitch"])
            r = voice_rules([voice if i == k else v for i, v in enumerate(voices)])
            counts.append((f"{name} alone", dict(between=between, new=len(c.notes),
                           par=r["parallels"], moves=r["moves"])))  # fmt: skip
        (c,) = infill(m, notes, (a, b), None, options=opts, meter=meter)
        v = assign_voices(c.notes, 4)
        r = voice_rules([c.notes[v == i] for i in range(4)])
        counts.append(("every voice", dict(span_par=r["parallels"], span_moves=r["moves"],
                       wide=wide(r), slices=r["slices"])))  # fmt: skip
        return counts

    done = 0
    for counts in _each_chorale(files, chorale, skipped, progress, "infill"):
        for row, c in counts:
            add(row, **c)
        done += 1
    rows: dict[str, dict[str, float]] = {}
    for name, t in sums.items():
        row = rows.setdefault(name, {})
        if "new" in t:
            row["between"] = t["between"] / max(1, t["new"])
        if "moves" in t:
            row["parallels_per_100_moves"] = 100 * t["par"] / max(1, t["moves"])
        if "span_moves" in t:
            row["span_parallels_per_100_moves"] = 100 * t["span_par"] / max(1, t["span_moves"])
            row["span_spacing_per_100_slices"] = 100 * t["wide"] / max(1, t["slices"])
    return {"rows": rows, "files": done}


def infill_table(result: dict[str, Any]) -> str:
    """The Markdown table of :func:`evaluate_infill`."""
    return "\n".join(rows_table(result["rows"], INFILL_COLUMNS))


def onnx_engine_of(
    checkpoint: str | None, model: str | None = None, *, precision: str = "fp32"
) -> Any:
    """The onnx engine of a model folder (its ``precision`` graphs, ``"fp32"``, ``"int8"`` or
    ``"int4"``, written once to the cache, see :mod:`aurl.engines.shipped`), the same weights
    at about a third of the CPU per token; None where onnxruntime is missing or the checkpoint
    is no model folder (then torch decodes)."""
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None:
        return None
    from aurl.cli.generate import model_folder
    from aurl.engines.shipped import load_shipped_onnx
    from aurl.errors import AurlError

    try:
        folder = model_folder(checkpoint, model)
    except AurlError:
        return None
    if not (folder / "model.safetensors").is_file():
        return None
    return load_shipped_onnx(folder, precision=precision)


def task_engine(args: Any, model: Any) -> Any:
    """What ``aurl evaluate --task`` decodes ``model`` with, by ``aurl harmonize``'s rule:
    ``--engine auto`` (the default) the native engine (int8) where it runs the model folder,
    else torch (None), so the table measures what ``aurl harmonize`` writes; ``--engine
    native`` its native engine (int8, or fp32 with ``--fp32``); ``--engine torch`` None;
    ``--engine onnx`` its onnx engine, whose precision follows the composing commands' rule
    (:func:`aurl.cli.generate.chosen_precision`: ``--int8`` / ``--int4`` / ``--fp32``, else
    :data:`aurl.engines.cpu.COMPOSING_QUANTIZED`, int8, where the CPU has integer dot products,
    fp32 elsewhere), or None (torch) for an anticipation model, whose exports carry no
    controls, or where :func:`onnx_engine_of` finds no onnx engine."""
    from aurl.cli.generate import chosen_precision
    from aurl.engines.cpu import COMPOSING_QUANTIZED
    from aurl.generation.anticipation import supports_anticipation

    engine = getattr(args, "engine", "auto")
    if engine == "torch":
        return None
    if engine == "auto":
        from aurl.cli.generate import model_folder
        from aurl.engines.native_engine import native_where_it_runs
        from aurl.errors import AurlError

        try:
            folder = model_folder(args.checkpoint, getattr(args, "model", None))
        except AurlError:  # not a model folder: torch loaded it, torch decodes
            return None
        return native_where_it_runs(folder)
    if engine == "native":  # a model it cannot run is refused in one line, not decoded by torch
        from aurl.cli.generate import model_folder
        from aurl.engines.native_engine import NativeEngine

        folder = model_folder(args.checkpoint, getattr(args, "model", None))
        return NativeEngine(folder, weights="fp32" if getattr(args, "fp32", False) else "int8")
    if supports_anticipation(model):
        return None
    precision = chosen_precision(args, quantized=COMPOSING_QUANTIZED)
    return onnx_engine_of(args.checkpoint, getattr(args, "model", None), precision=precision)


def run_task(args: Any, load_model: Any) -> int:
    """``aurl evaluate --task harmonize``: the table into ``OUT/harmonize.md`` and the numbers
    into ``OUT/harmonize.json`` (written atomically), the table also on stdout.

    A chorale that cannot be evaluated (unreadable, not four voices, a part the model cannot
    compose around) is said on stderr as ``skipped FILE: why`` and left out; the rest go on.

    Raises:
        DataError: ``--data`` is not a folder, no four-track chorales in the split, or none of
            them could be evaluated.
    """
    import sys

    from aurl.errors import DataError
    from aurl.fileio import atomic_write_text
    from aurl.progress import bar

    folder = Path(args.data) if args.data is not None else BUNDLED
    if not folder.is_dir():  # once "has no four-track chorales" for a missing folder
        from aurl.fileio import not_a_file

        what = not_a_file(folder) or "is a file"
        raise DataError(f"--data {folder} {what}: give a folder of four-track chorales (aurl "
                        "data corpus writes one), or leave --data out for the bundled ones")  # fmt: skip
    files = held_out_chorales(folder, args.split)
    if args.limit:
        files = files[: args.limit]
    if not files:
        raise DataError(
            f"{folder} has no four-track chorales in split {args.split!r}: give a folder with "
            "a manifest.json (aurl data corpus) or choose another --split"
        )
    model, _, _ = load_model(args.checkpoint, args.device, getattr(args, "model", None))
    engine = task_engine(args, model)
    where = "torch" if engine is None else f"{engine.kind} ({engine.weights})"
    print(f"decoding on the {where} engine")
    t0 = time.perf_counter()
    task = getattr(args, "task", "harmonize")
    skipped: list[Path] = []

    def skip(path: Path, why: str) -> None:
        print(f"skipped {why if why.startswith(str(path)) else f'{path}: {why}'}",
              file=sys.stderr, flush=True)  # fmt: skip
        skipped.append(path)

    run = {"accompany": evaluate_accompany, "infill": evaluate_infill}.get(task, evaluate_harmonize)
    result = run(model, files, seed=args.seed, engine=engine, progress=bar, skipped=skip)
    if not result["files"]:
        raise DataError(f"no chorale in {folder} could be evaluated ({len(skipped)} skipped, "
                        "said above)")  # fmt: skip
    table = {"accompany": accompany_table, "infill": infill_table}.get(task, harmonize_table)(
        result
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    body = {k: v for k, v in result.items() if k != "pieces"}
    title = {"accompany": "Accompanying a voice of", "harmonize": "Harmonizing",
             "infill": "Writing bars 3-6 again in"}[task]  # fmt: skip
    atomic_write_text(out / f"{task}.json", json.dumps(body, indent=1, default=float) + "\n")
    atomic_write_text(
        out / f"{task}.md",
        f"# {title} held-out chorales ({result['files']} files, split {args.split})\n\n{table}\n",
    )
    print(table)
    if skipped:
        print(f"evaluated {result['files']} of {len(files)} chorales; skipped {len(skipped)} "
              "(said above)")  # fmt: skip
    print(f"wrote {out / f'{task}.md'} and {out / f'{task}.json'} "
          f"in {time.perf_counter() - t0:.0f} s")  # fmt: skip
    return 0
