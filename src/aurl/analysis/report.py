"""One piece's or one corpus's analysis as JSON, Markdown, HTML and plots.

:func:`analyze_notes` runs keys, chords, structure and melody on a note array and returns a
plain, JSON-ready dict; :func:`aggregate` sums many of them (most common progressions,
cadences, keys, forms); :func:`write_report` and :func:`write_aggregate_report` write the files.
Pieces with nothing to analyse (no notes, drums only, one note) get a dict whose ``status``
says so, and a report with that one line, never an exception.
"""

from __future__ import annotations

import html
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from aurl.analysis import chords as ch
from aurl.analysis import melody as mel
from aurl.analysis import part_writing as pw
from aurl.analysis import structure as st
from aurl.analysis.keys import Key, estimate_key, estimate_keys_windowed, modulations
from aurl.data.notes import DRUM_PROGRAM, pitched
from aurl.errors import DataError
from aurl.fileio import atomic_write_text

TOP = 15  # rows in "most common" tables
# Longest piece analysed (about 2 h 45 min at 120 BPM): the bar self-similarity matrix grows
# with the square of the bar count (5000 bars: 200 MB).
MAX_BEATS = 20_000.0


def _r(x: float, nd: int = 3) -> float | None:
    """Rounded float for JSON; None for NaN (JSON has no NaN)."""
    x = float(x)
    return None if math.isnan(x) else round(x, nd)


def _key_dict(key: Key) -> dict[str, Any]:
    return {
        "name": key.name,
        "tonic": key.tonic,
        "mode": key.mode,
        "confidence": _r(key.confidence),
    }


def input_status(notes: np.ndarray) -> tuple[str, str]:
    """``(status, message)``: ``ok``, or why there is nothing (much) to analyse."""
    if len(notes) == 0:
        return "empty", "the file has no notes: nothing to analyse"
    p = pitched(notes)
    if len(p) == 0:
        return "drums-only", f"drums only ({len(notes)} drum notes): no pitched notes to analyse"
    if len(p) == 1:
        return "single-note", "a single note: no key, chords, structure or melody to analyse"
    beats = float(np.max(p["onset"] + p["duration"]))
    if beats > MAX_BEATS:
        return "too-long", (
            f"the notes span {beats:.0f} beats, over the {MAX_BEATS:.0f} analysed "
            "(a stray late note?): trim the file"
        )
    return "ok", ""


def analyze_notes(
    notes: np.ndarray,
    *,
    name: str = "",
    beats_per_bar: float = 4.0,
    resolution: float = 1.0,
    voices: list[tuple[str, np.ndarray]] | None = None,
) -> dict[str, Any]:
    """Full analysis of one piece as a JSON-ready dict.

    Args:
        notes: Note array (beats).
        name: Name shown in the report (e.g. the file name).
        beats_per_bar: Bar length in beats (from the time signature).
        resolution: Chord cell length in beats (1: per beat; ``beats_per_bar / 2``: half bar).
        voices: The piece's voices, ``(name, notes)`` highest first (a file whose tracks are
            voices: :func:`voice_tracks`); their part writing is judged
            (:func:`aurl.analysis.part_writing.faults`, ``voice_leading`` in the result).

    Returns:
        A dict with ``status`` (``ok``, ``empty``, ``drums-only``, ``single-note``,
        ``too-long``) and
        ``message``; for ``ok`` also ``key``, ``key_segments``, ``modulations``, ``chords``,
        ``progression``, ``ngrams``, ``transitions``, ``cadences``, ``phrases``, ``structure``,
        ``melody`` and, given ``voices``, ``voice_leading`` (see the report for their meaning).
    """
    status, message = input_status(notes)
    p = pitched(notes)
    out: dict[str, Any] = {
        "name": name,
        "status": status,
        "message": message,
        "notes": int(len(notes)),
        "pitched_notes": int(len(p)),
        "drum_notes": int((notes["program"] == DRUM_PROGRAM).sum()),
        "beats": _r(np.max(notes["onset"] + notes["duration"])) if len(notes) else 0.0,
        "beats_per_bar": beats_per_bar,
        "resolution": resolution,
    }
    if status != "ok":
        if status == "single-note":
            out["melody"] = {"lowest": int(p["pitch"][0]), "highest": int(p["pitch"][0])}
        return out

    try:
        key: Key | None = estimate_key(notes)
    except DataError as e:  # one pitch class only: everything but the key-relative parts
        key = None
        out["message"] = str(e)
    segments = estimate_keys_windowed(notes, hop=beats_per_bar, window=4 * beats_per_bar)
    chords = ch.recognize_chords(notes, resolution=resolution)
    phrases = st.phrase_boundaries(notes)
    out["key"] = _key_dict(key) if key else None
    out["key_segments"] = [{"start": s.start, "end": s.end, **_key_dict(s.key)} for s in segments]
    out["modulations"] = [
        {"beat": b, "from": a.name, "to": c.name} for b, a, c in modulations(segments)
    ]
    out["chords"] = [
        {
            "start": c.start,
            "end": c.end,
            "label": c.label,
            "root": c.root,
            "roman": ch.roman_numeral(c, key, inversion=True) if key else None,
            "local_roman": ch.roman_numeral(c, ch.key_at(segments, c.start)) if segments else None,
            "score": _r(c.score),
        }
        for c in chords
    ]
    out["phrases"] = [
        {"start": ph.start, "end": ph.end, "arrival": ph.arrival, "notes": ph.notes}
        for ph in phrases
    ]
    if key is not None:
        prog = ch.progression(chords, key)
        states, matrix = ch.transition_matrix(prog)
        # no local key where every window holds one pitch class (notes 8 bars apart): the
        # cadences are read in the global key
        cadences = ch.detect_cadences(
            chords, segments or key, arrivals=[ph.arrival for ph in phrases]
        )
        out["progression"] = prog
        out["ngrams"] = {
            str(n): [[list(g), c] for g, c in ch.ngram_counts(prog, n).most_common(TOP)]
            for n in (2, 3, 4)
        }
        out["transitions"] = {"states": states, "matrix": np.round(matrix, 3).tolist()}
        out["cadences"] = [vars(c) for c in cadences]
        out["cadence_counts"] = dict(Counter(c.kind for c in cadences))
    out["structure"] = _structure_dict(st.analyze_structure(notes, beats_per_bar=beats_per_bar))
    out["melody"] = _melody_dict(mel.skyline(notes))
    if voices:
        out["voice_leading"] = pw.faults([n for _, n in voices], [name for name, _ in voices])
    return out


MAX_VOICES = 8
VOICE_OVERLAP = 0.05  # a track is a voice when at most this share of its notes overlap another


def voice_tracks(tracks: list[tuple[str, np.ndarray]]) -> list[tuple[str, np.ndarray]] | None:
    """The tracks of a file as voices, highest first (by mean pitch), or None when they are not
    voices: fewer than 2 or more than :data:`MAX_VOICES` pitched tracks, or a track that holds
    chords (over :data:`VOICE_OVERLAP` of its notes starting while another of it sounds).
    Unnamed or repeated names become ``Voice i``."""
    tracks = [(name, pitched(n)) for name, n in tracks]
    tracks = [(name, n) for name, n in tracks if len(n)]
    if not 2 <= len(tracks) <= MAX_VOICES:
        return None
    for _, n in tracks:
        n = np.sort(n, order="onset")
        ends = np.maximum.accumulate(n["onset"] + n["duration"])
        overlapping = (n["onset"][1:] < ends[:-1] - 1e-6).sum()
        if overlapping > VOICE_OVERLAP * len(n):
            return None
    tracks.sort(key=lambda t: -float(np.mean(t[1]["pitch"])))
    names = [name for name, _ in tracks]
    if any(not name or names.count(name) > 1 for name in names):
        names = [f"Voice {i + 1}" for i in range(len(names))]
    return [(name, n) for name, (_, n) in zip(names, tracks)]


MAX_SIMILARITY_CELLS = 256
MAX_TIMELINE_BEATS = 256.0


def _structure_dict(s: st.Structure) -> dict[str, Any]:
    step = max(1, -(-len(s.similarity) // MAX_SIMILARITY_CELLS))
    return {
        "bars": int(len(s.similarity)),
        "beats_per_bar": s.beats_per_bar,  # the piece's, or a multiple: a long piece's groups
        "form": s.form,
        "sections": [vars(x) for x in s.sections],
        "boundaries": s.boundaries,
        "repeats": [
            {
                "first": r.first,
                "second": r.second,
                "length": r.length,
                "similarity": _r(r.similarity),
            }
            for r in s.repeats[:TOP]
        ],
        "novelty": np.round(s.novelty, 3).tolist(),
        # long pieces: block means, at most MAX_SIMILARITY_CELLS a side (JSON stays small)
        "similarity_bars_per_cell": step,
        "similarity": np.round(_pool(s.similarity, step), 3).tolist(),
    }


def _pool(m: np.ndarray, step: int) -> np.ndarray:
    """Mean over ``step`` x ``step`` blocks (the last block may be partial)."""
    if step <= 1:
        return m
    n = len(m)
    pad = -n % step
    padded = np.pad(m, ((0, pad), (0, pad)), constant_values=np.nan)
    k = padded.shape[0] // step
    return np.nanmean(padded.reshape(k, step, k, step), axis=(1, 3))  # (k, k)


def _melody_dict(m: np.ndarray) -> dict[str, Any]:
    stats = mel.melody_stats(m)
    return {
        **{k: (_r(v) if isinstance(v, float) else v) for k, v in vars(stats).items()},
        "interval_histogram": {str(k): v for k, v in mel.interval_histogram(m).items()},
        "motifs": [
            {
                "intervals": list(x.intervals),
                "count": x.count,
                "onsets": list(x.onsets),
                "transpositions": list(x.transpositions),
            }
            for x in mel.find_motifs(m)
        ],
        "contour": {
            "onset": m["onset"].round(4).tolist(),
            "duration": m["duration"].round(4).tolist(),
            "pitch": m["pitch"].tolist(),
        },
    }


# --------------------------------------------------------------------------------------------
# Corpus aggregate
# --------------------------------------------------------------------------------------------


def aggregate(results: list[dict[str, Any]], skipped: list[dict[str, str]] = ()) -> dict[str, Any]:
    """Sum per-piece analyses: keys, progressions, cadences, transitions, forms, melody.

    Args:
        results: Dicts from :func:`analyze_notes`.
        skipped: ``{"file": ..., "error": ...}`` for files that could not be read.

    Returns:
        A JSON-ready dict; n-grams and transitions count over pieces analysed in a key.
    """
    ok = [r for r in results if r["status"] == "ok"]
    ngrams = {n: Counter() for n in (2, 3, 4)}
    cadences, cadence_pairs, forms, modes, keys = (
        Counter(),
        Counter(),
        Counter(),
        Counter(),
        Counter(),
    )
    progressions = []
    for r in ok:
        if r.get("key"):
            keys[r["key"]["name"]] += 1
            modes[r["key"]["mode"]] += 1
        prog = r.get("progression") or []
        progressions.append(prog)
        for n in ngrams:
            ngrams[n].update(ch.ngram_counts(prog, n))
        for c in r.get("cadences", []):
            cadences[c["kind"]] += 1
            cadence_pairs[f"{c['approach']} -> {c['arrival']} ({c['kind']})"] += 1
        forms[r["structure"]["form"]] += 1
    labels = Counter(x for p in progressions for x in p)
    states = [s for s, _ in labels.most_common(12)]
    counts = np.zeros((len(states), len(states)))
    index = {s: i for i, s in enumerate(states)}
    for p in progressions:
        for a, b in zip(p[:-1], p[1:]):
            if a in index and b in index:
                counts[index[a], index[b]] += 1
    rows = counts.sum(1, keepdims=True)
    matrix = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)

    def mean(field: str) -> float | None:
        vals = [r["melody"][field] for r in ok if r["melody"].get(field) is not None]
        return _r(np.mean(vals)) if vals else None

    return {
        "files": len(results) + len(skipped),
        "analysed": len(ok),
        "not_analysable": [
            {"name": r["name"], "status": r["status"], "message": r["message"]}
            for r in results
            if r["status"] != "ok"
        ],
        "skipped": list(skipped),
        "keys": dict(keys.most_common()),
        "modes": dict(modes),
        "chord_counts": dict(labels.most_common(TOP)),
        "ngrams": {
            str(n): [[list(g), c] for g, c in counter.most_common(TOP)]
            for n, counter in ngrams.items()
        },
        "transitions": {"states": states, "matrix": np.round(matrix, 3).tolist()},
        "cadences": dict(cadences.most_common()),
        "cadence_progressions": dict(cadence_pairs.most_common(TOP)),
        "forms": dict(forms.most_common(TOP)),
        "melody": {f: mean(f) for f in ("range", "step_leap_ratio", "mean_abs_interval", "notes")},
        "voice_leading": _pooled_voice_leading(ok),
    }


def _pooled_voice_leading(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The part-writing counts of the files in voices, summed (None: no such file)."""
    counts = [r["voice_leading"]["counts"] for r in results if r.get("voice_leading")]
    if not counts:
        return None
    return {"files": len(counts), **{k: sum(c[k] for c in counts) for k in counts[0]}}


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_chords(result: dict[str, Any], path: Path) -> None:
    """Chord timeline: one bar per chord, coloured by root, labelled with its numeral."""
    plt = _plt()
    # a readable timeline holds a few hundred chords: long pieces show their opening
    limit = min(result["beats"], MAX_TIMELINE_BEATS)
    chords = [c for c in result["chords"] if c["label"] != "N" and c["start"] < limit]
    fig, ax = plt.subplots(figsize=(max(6.0, min(40.0, limit / 4)), 2.2))
    cmap = plt.get_cmap("hsv")
    for c in chords:
        ax.barh(0, c["end"] - c["start"], left=c["start"], color=cmap(c["root"] / 12), alpha=0.6)
        ax.text((c["start"] + c["end"]) / 2, 0, c["roman"] or c["label"], ha="center",
                va="center", fontsize=7, rotation=90)  # fmt: skip
    for seg in result["key_segments"]:
        if seg["start"] < limit:
            ax.axvline(seg["start"], color="k", lw=0.8)
            ax.text(seg["start"], 0.55, seg["name"], fontsize=8, va="bottom")
    ax.set_yticks([])
    ax.set_ylim(-0.5, 0.9)
    ax.set_xlabel("beat")
    shown = "" if limit >= result["beats"] else f", first {limit:g} beats"
    ax.set_title(f"Chords (Roman numerals in the global key; lines: local keys{shown})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_similarity(result: dict[str, Any], path: Path) -> None:
    """Bar self-similarity heat map with section boundaries."""
    plt = _plt()
    s = result["structure"]
    sim = np.asarray(s["similarity"])
    bars = s["bars"]
    fig, ax = plt.subplots(figsize=(5, 4.4))
    extent = (-0.5, bars - 0.5, -0.5, bars - 0.5)  # pooled cells still read in bars
    im = ax.imshow(sim, cmap="magma", vmin=-1, vmax=1, origin="lower", extent=extent)
    if len(s["sections"]) <= 40:  # more lines than that only hide the picture
        for sec in s["sections"]:
            ax.axvline(sec["start"] - 0.5, color="c", lw=0.8)
            ax.axhline(sec["start"] - 0.5, color="c", lw=0.8)
            ax.text(sec["start"], bars - 0.5, sec["label"], color="c", va="top")
    ax.set_xlabel("bar")
    ax.set_ylabel("bar")
    form = s["form"] if len(s["sections"]) <= 12 else f"{len(s['sections'])} sections"
    ax.set_title(f"Bar self-similarity; form {form}")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_contour(result: dict[str, Any], path: Path) -> None:
    """Melody contour (skyline pitches over time) with phrase ends."""
    plt = _plt()
    c = result["melody"]["contour"]
    fig, ax = plt.subplots(figsize=(max(6.0, min(40.0, result["beats"] / 4)), 2.6))
    # the step plot needs one more point to draw the last note to its end
    ax.step(
        [*c["onset"], c["onset"][-1] + c["duration"][-1]],
        [*c["pitch"], c["pitch"][-1]],
        where="post",
        lw=1.2,
    )
    ends = [ph["end"] for ph in result["phrases"]]
    if ends:
        ax.vlines(ends, min(c["pitch"]), max(c["pitch"]), colors="0.6", lw=0.8, linestyles="--")
    ax.set_xlabel("beat")
    ax.set_ylabel("MIDI pitch")
    ax.set_title("Melody contour (skyline); dashed: phrase ends")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_transitions(transitions: dict[str, Any], path: Path, max_states: int = 12) -> None:
    """Chord transition matrix (rows: from, columns: to)."""
    plt = _plt()
    states = transitions["states"][:max_states]
    m = np.asarray(transitions["matrix"])[: len(states), : len(states)]
    fig, ax = plt.subplots(figsize=(5, 4.4))
    im = ax.imshow(m, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(states)), states, rotation=90, fontsize=8)
    ax.set_yticks(range(len(states)), states, fontsize=8)
    ax.set_xlabel("next chord")
    ax.set_ylabel("chord")
    ax.set_title("Chord transition probabilities")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Documents: one list of blocks, rendered to Markdown and HTML
# --------------------------------------------------------------------------------------------

Block = tuple  # ("h1"|"h2"|"p"|"img"|"table", ...)


def _table(headers: list[str], rows: list[list[Any]]) -> Block:
    return ("table", headers, rows)


def _to_markdown(blocks: list[Block]) -> str:
    lines = []
    for b in blocks:
        if b[0] in ("h1", "h2"):
            lines += ["#" * int(b[0][1]) + " " + b[1], ""]
        elif b[0] == "p":
            lines += [b[1], ""]
        elif b[0] == "img":
            lines += [f"![{b[2]}]({b[1]})", ""]
        elif b[0] == "table":
            lines.append("| " + " | ".join(b[1]) + " |")
            lines.append("|" + "---|" * len(b[1]))
            lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in b[2]]
            lines.append("")
    return "\n".join(lines)


def _to_html(blocks: list[Block], title: str) -> str:
    e = html.escape
    body = []
    for b in blocks:
        if b[0] in ("h1", "h2"):
            body.append(f"<{b[0]}>{e(b[1])}</{b[0]}>")
        elif b[0] == "p":
            body.append(f"<p>{e(b[1])}</p>")
        elif b[0] == "img":
            body.append(f'<p><img src="{e(b[1])}" alt="{e(b[2])}" style="max-width:100%"></p>')
        elif b[0] == "table":
            head = "".join(f"<th>{e(h)}</th>" for h in b[1])
            rows = "".join(
                "<tr>" + "".join(f"<td>{e(str(x))}</td>" for x in row) + "</tr>" for row in b[2]
            )
            body.append(f"<table><tr>{head}</tr>{rows}</table>")
    style = (
        "body{font-family:sans-serif;max-width:70em;margin:auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )


def _write_docs(blocks: list[Block], out: Path, title: str, data: dict[str, Any]) -> None:
    atomic_write_text(out / "analysis.json", json.dumps(data, indent=1))
    atomic_write_text(out / "report.md", _to_markdown(blocks))
    atomic_write_text(out / "report.html", _to_html(blocks, title))


def _ngram_rows(ngrams: dict[str, list], n: int) -> list[list[Any]]:
    return [[" - ".join(g), c] for g, c in ngrams.get(str(n), [])]


def write_report(result: dict[str, Any], out: str | Path, *, plots: bool = True) -> Path:
    """Write ``analysis.json``, ``report.md``, ``report.html`` and PNG plots into ``out``.

    Returns:
        The folder written.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    title = f"Analysis of {result['name'] or 'a piece'}"
    blocks: list[Block] = [("h1", title)]
    if result["status"] != "ok":
        blocks.append(("p", f"Not analysed: {result['message']}."))
        _write_docs(blocks, out, title, result)
        return out
    key = result["key"]
    blocks.append(
        (
            "p",
            f"{result['pitched_notes']} pitched notes over {result['beats']} beats "
            f"({result['structure']['bars']} bars of "
            f"{result['structure']['beats_per_bar']:g} beats). "
            + (
                f"Key: {key['name']} (correlation {key['confidence']})."
                if key
                else result["message"]
            ),
        )
    )
    blocks.append(("h2", "Keys"))
    blocks.append(
        _table(
            ["from beat", "to beat", "key", "correlation"],
            [[s["start"], s["end"], s["name"], s["confidence"]] for s in result["key_segments"]],
        )
    )
    if plots:
        plot_chords(result, out / "chords.png")
        plot_similarity(result, out / "similarity.png")
        plot_contour(result, out / "contour.png")
    blocks.append(("h2", "Chords"))
    if plots:
        blocks.append(("img", "chords.png", "chord timeline"))
    if result.get("progression"):
        blocks.append(("p", "Progression: " + " ".join(result["progression"])))
        for n in (2, 3, 4):
            blocks.append(("p", f"Most common {n}-chord progressions:"))
            blocks.append(_table(["progression", "count"], _ngram_rows(result["ngrams"], n)[:8]))
        if plots and result["transitions"]["states"]:
            plot_transitions(result["transitions"], out / "transitions.png")
            blocks.append(("img", "transitions.png", "chord transition matrix"))
        blocks.append(("h2", "Cadences"))
        blocks.append(
            _table(
                ["beat", "kind", "key", "approach", "arrival"],
                [
                    [c["beat"], c["kind"], c["key"], c["approach"], c["arrival"]]
                    for c in result["cadences"]
                ],
            )
            if result["cadences"]
            else ("p", "No cadence found at the phrase ends.")
        )
    s = result["structure"]
    blocks.append(("h2", "Structure"))
    blocks.append(("p", f"Form: {s['form']}. Phrases: {len(result['phrases'])}."))
    blocks.append(
        _table(
            ["section", "bars"], [[x["label"], f"{x['start']}-{x['end']}"] for x in s["sections"]]
        )
    )
    if s["repeats"]:
        blocks.append(("p", "Repeated passages (bars):"))
        blocks.append(
            _table(
                ["first", "again at", "length", "similarity"],
                [[r["first"], r["second"], r["length"], r["similarity"]] for r in s["repeats"][:8]],
            )
        )
    if plots:
        blocks.append(("img", "similarity.png", "self-similarity matrix"))
    m = result["melody"]
    blocks.append(("h2", "Melody"))
    columns = {  # header -> key of result["melody"]
        "notes": "notes", "range": "range", "lowest": "lowest", "highest": "highest",
        "steps": "steps", "leaps": "leaps", "step/leap": "step_leap_ratio",
        "mean |interval|": "mean_abs_interval",
    }  # fmt: skip
    blocks.append(_table(list(columns), [[m[k] for k in columns.values()]]))
    if plots:
        blocks.append(("img", "contour.png", "melody contour"))
    if m["motifs"]:
        blocks.append(("p", "Motifs (interval patterns, transposition-invariant):"))
        blocks.append(
            _table(
                ["intervals", "count", "at beats", "transpositions"],
                [
                    [x["intervals"], x["count"], x["onsets"], x["transpositions"]]
                    for x in m["motifs"]
                ],
            )
        )
    if result.get("voice_leading"):
        blocks += _voice_leading_blocks(result["voice_leading"], result["beats_per_bar"])
    _write_docs(blocks, out, title, result)
    return out


MAX_FAULTS = 60  # rows of the report's table (analysis.json holds every one)


def _voice_leading_blocks(v: dict[str, Any], beats_per_bar: float) -> list[Block]:
    c = v["counts"]
    par = c["parallel fifths"] + c["parallel octaves"]
    said = (
        f"The tracks read as {len(v['voices'])} voices ({', '.join(v['voices'])}), at every "
        f"onset of any voice: {c['parallel fifths']} parallel fifths and "
        f"{c['parallel octaves']} parallel octaves in {c['moves']} moves "
        f"({100 * par / max(1, c['moves']):.2f} per 100; Bach's chorales 0.05), "
        f"{c['crossing']} crossings and {c['spacing']} upper voices over an octave apart in "
        f"{c['slices']} slices"
    )
    said += f", {c['out of range']} of {c['notes']} notes out of their SATB range." if v[
        "ranges_judged"] else "."  # fmt: skip
    rows = []
    for f in v["faults"][:MAX_FAULTS]:
        bar, beat = divmod(f["beat"], beats_per_bar)
        where = f"bar {int(bar) + 1} beat {beat + 1:g}"
        if f["rule"].startswith("parallel"):
            (a0, b0), (a1, b1) = f["pitches"]
            what = f"{_pitch(a0)}-{_pitch(b0)} to {_pitch(a1)}-{_pitch(b1)}"
        elif f["rule"] == "out of range":
            lo, hi = f["range"]
            what = f"{_pitch(f['pitches'][0])} (range {_pitch(lo)}-{_pitch(hi)})"
        else:
            what = "-".join(_pitch(p) for p in f["pitches"])
        rows.append([where, f["rule"], " / ".join(f["voices"]), what])
    blocks: list[Block] = [("h2", "Voice leading"), ("p", said)]
    if rows:
        total = sum(c[k] for k in ("parallel fifths", "parallel octaves", "crossing", "spacing",
                                   "out of range"))  # fmt: skip
        blocks.append(_table(["where", "rule", "voices", "pitches"], rows))
        if total > len(rows):
            blocks.append(("p", f"... and {total - len(rows)} more (analysis.json lists the "
                                f"first {len(v['faults'])})."))  # fmt: skip
    return blocks


_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")


def _pitch(p: int) -> str:
    """A MIDI pitch as a name with its octave (60: C4)."""
    return f"{_NAMES[p % 12]}{p // 12 - 1}"


def write_aggregate_report(agg: dict[str, Any], out: str | Path, *, plots: bool = True) -> Path:
    """Write the corpus summary (``analysis.json``, ``report.md``, ``report.html``) into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    title = "Corpus analysis"
    blocks: list[Block] = [
        ("h1", title),
        ("p", f"{agg['analysed']} of {agg['files']} files analysed; "
              f"{len(agg['not_analysable'])} with nothing to analyse, {len(agg['skipped'])} unreadable."),
        ("h2", "Keys"),
        _table(["key", "pieces"], list(agg["keys"].items())[:TOP]),
        ("h2", "Most common progressions"),
    ]  # fmt: skip
    for n in (2, 3, 4):
        blocks.append(("p", f"{n} chords:"))
        blocks.append(_table(["progression", "count"], _ngram_rows(agg["ngrams"], n)))
    if plots and agg["transitions"]["states"]:
        plot_transitions(agg["transitions"], out / "transitions.png")
        blocks.append(("img", "transitions.png", "chord transition matrix"))
    blocks += [
        ("h2", "Cadences"),
        _table(["kind", "count"], list(agg["cadences"].items())),
        _table(["cadence", "count"], list(agg["cadence_progressions"].items())),
        ("h2", "Forms"),
        _table(["form", "pieces"], list(agg["forms"].items())),
        ("h2", "Melody (means over pieces)"),
        _table(list(agg["melody"]), [list(agg["melody"].values())]),
    ]
    v = agg.get("voice_leading")
    if v:
        par = v["parallel fifths"] + v["parallel octaves"]
        blocks += [("h2", "Voice leading"), ("p", (
            f"{v['files']} files in voices: {par} parallel fifths and octaves in {v['moves']} "
            f"moves ({100 * par / max(1, v['moves']):.2f} per 100; Bach's chorales 0.05), "
            f"{v['crossing']} crossings and {v['spacing']} upper voices over an octave apart in "
            f"{v['slices']} slices, {v['out of range']} notes out of their SATB range "
            "(each file's report lists where)."))]  # fmt: skip
    if agg["not_analysable"] or agg["skipped"]:
        blocks.append(("h2", "Files not analysed"))
        rows = [[x["name"], x["message"]] for x in agg["not_analysable"]]
        rows += [[x["file"], x["error"]] for x in agg["skipped"]]
        blocks.append(_table(["file", "why"], rows))
    _write_docs(blocks, out, title, agg)
    return out
