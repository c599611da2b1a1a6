"""The blind listening test: is it Bach or Aurl?

A trial pairs an excerpt of a held-out chorale (the bundled corpus's ``test`` split) with an
excerpt of a piece the model composes for that trial, in random order. Both are cut to the
same number of whole bars from their first beat, and both are played by the page's one synth at
one tempo (:data:`TRIAL_BPM`) and one velocity, so only the notes differ. The listener says
which one is Bach. The server keeps which side is Bach; the page learns it only after
answering.

Answers go to SQLite, one row per answer, committed before the reply (WAL journal, full sync),
so a restart loses nothing. :func:`results` gives each model's accuracy (the fraction of trials
where the listener picked Bach) with an exact 95% Clopper-Pearson interval; 50% means the
listeners could not tell the model from Bach.
"""

from __future__ import annotations

import math
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

TRIAL_BPM = 90.0
TRIAL_VELOCITY = 80
TRIAL_BEATS = 16.0  # four bars of 4/4 at most
BEATS_PER_BAR = 4.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS trials (
    id TEXT PRIMARY KEY, created REAL NOT NULL, model TEXT NOT NULL, source TEXT NOT NULL,
    bach_side TEXT NOT NULL CHECK (bach_side IN ('A', 'B')), beats REAL NOT NULL,
    bpm REAL NOT NULL, seed INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS answers (
    id INTEGER PRIMARY KEY AUTOINCREMENT, trial_id TEXT NOT NULL UNIQUE REFERENCES trials(id),
    model TEXT NOT NULL, choice TEXT NOT NULL CHECK (choice IN ('A', 'B')),
    correct INTEGER NOT NULL, listener TEXT NOT NULL, created REAL NOT NULL
);
"""


class TrialError(Exception):
    """An answer for an unknown or already answered trial."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class Store:
    """The listening test's SQLite file (created with its tables when missing)."""

    def __init__(self, path: str | Path) -> None:
        """Open (or create) the file.

        Raises:
            ConfigError: the file or its folder cannot be opened or written (permissions, a
                read-only disk, a file that is not SQLite).
        """
        from aurl.errors import ConfigError

        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), isolation_level=None,
                                       check_same_thread=False)  # fmt: skip
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
        except (sqlite3.Error, OSError) as e:
            raise ConfigError(
                f"--db {self.path}: cannot open the listening test's database ({e}): give a "
                "file in a folder this user may write"
            ) from None

    def add_trial(self, model: str, source: str, bach_side: str, beats: float, seed: int) -> str:
        trial = secrets.token_hex(8)
        with self._lock:
            self._db.execute(
                "INSERT INTO trials VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (trial, time.time(), model, source, bach_side, beats, TRIAL_BPM, seed),
            )
        return trial

    def answer(self, trial: str, choice: str, listener: str) -> dict[str, Any]:
        """Record ``choice`` ('A' or 'B': the side the listener thinks is Bach).

        Raises:
            TrialError: unknown trial (404) or one already answered (409).
        """
        with self._lock:
            row = self._db.execute(
                "SELECT model, bach_side FROM trials WHERE id = ?", (trial,)
            ).fetchone()
            if row is None:
                raise TrialError(f"trial {trial!r} does not exist: start a new one", 404)
            model, bach = row
            try:
                self._db.execute(
                    "INSERT INTO answers (trial_id, model, choice, correct, listener, created) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (trial, model, choice, int(choice == bach), listener, time.time()),
                )
            except sqlite3.IntegrityError:
                raise TrialError(f"trial {trial!r} was already answered", 409) from None
        return {"trial": trial, "choice": choice, "bach": bach, "correct": choice == bach}

    def answers(self) -> list[dict[str, Any]]:
        with self._lock:
            cur = self._db.execute(
                "SELECT trial_id, model, choice, correct, listener, created FROM answers ORDER BY id"
            )
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]

    def close(self) -> None:
        with self._lock:
            self._db.close()


# --------------------------------------------------------------------------------------------
# Statistics and the plot
# --------------------------------------------------------------------------------------------


def binomial_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval for a proportion of ``k`` successes in ``n`` trials:
    the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of Beta(k, n - k + 1) and
    Beta(k + 1, n - k). (Clopper & Pearson 1934.) ``(nan, nan)`` when ``n == 0``."""
    from scipy.stats import beta

    if n == 0:
        return math.nan, math.nan
    a = (1.0 - level) / 2.0
    low = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1.0 - a, k + 1, n - k))
    return low, high


def results(store: Store) -> list[dict[str, Any]]:
    """Per model: answers, correct ones, accuracy and its 95% interval."""
    per: dict[str, list[int]] = {}
    for a in store.answers():
        per.setdefault(a["model"], []).append(int(a["correct"]))
    out = []
    for model, hits in sorted(per.items()):
        k, n = sum(hits), len(hits)
        low, high = binomial_interval(k, n)
        out.append({"model": model, "answers": n, "correct": k, "accuracy": k / n,
                    "ci_low": low, "ci_high": high})  # fmt: skip
    return out


def results_svg(rows: list[dict[str, Any]], width: int = 520) -> str:
    """Accuracy per model as bars with 95% interval whiskers and the 50% chance line."""
    bar, gap, left, top = 36, 24, 150, 20
    height = top + max(1, len(rows)) * (bar + gap) + 30
    span = width - left - 20

    def x(p: float) -> float:
        return left + p * span

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="accuracy per model">',
        f'<line x1="{x(0.5)}" y1="{top - 8}" x2="{x(0.5)}" y2="{height - 24}" '
        'stroke="#888" stroke-dasharray="4 3"/>',
        f'<text x="{x(0.5)}" y="{height - 8}" text-anchor="middle" font-size="11">'
        "50% = cannot tell</text>",
    ]
    for tick in (0.0, 0.25, 0.75, 1.0):
        parts.append(
            f'<text x="{x(tick)}" y="{height - 8}" text-anchor="middle" font-size="11">'
            f"{tick:.0%}</text>"
        )
    for i, r in enumerate(rows):
        y = top + i * (bar + gap)
        parts.append(
            f'<text x="{left - 8}" y="{y + bar / 2 + 4}" text-anchor="end" font-size="13">'
            f"{escape(r['model'])} (n={r['answers']})</text>"
        )
        parts.append(
            f'<rect class="bar" x="{left}" y="{y}" width="{r["accuracy"] * span:.1f}" '
            f'height="{bar}" fill="#5b8def"/>'
        )
        lo, hi, mid = x(r["ci_low"]), x(r["ci_high"]), y + bar / 2
        parts.append(
            f'<path d="M{lo:.1f},{mid} H{hi:.1f} M{lo:.1f},{mid - 8} V{mid + 8} '
            f'M{hi:.1f},{mid - 8} V{mid + 8}" stroke="#222" stroke-width="2" fill="none"/>'
        )
    parts.append("</svg>")
    return "".join(parts)


def results_html(rows: list[dict[str, Any]]) -> str:
    """The /listen/results page: a table and the plot (no scripts, nothing off the host)."""
    body = (
        "".join(
            f"<tr><td>{escape(r['model'])}</td><td>{r['answers']}</td><td>{r['correct']}</td>"
            f"<td>{r['accuracy']:.1%}</td><td>{r['ci_low']:.1%} - {r['ci_high']:.1%}</td></tr>"
            for r in rows
        )
        or '<tr><td colspan="5">no answers yet</td></tr>'
    )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        "<title>Aurl listening test: results</title>"
        '<link rel="stylesheet" href="/static/style.css"></head><body>'
        '<header><a href="/">Studio</a> <a href="/listen">Listening test</a></header>'
        "<main><h1>Listening test results</h1>"
        "<p>Accuracy is the share of trials where the listener picked Bach's chorale over the "
        "model's piece; 50% means the listeners could not tell them apart. Intervals are exact "
        "95% binomial (Clopper-Pearson).</p>"
        '<table id="results"><tr><th>model</th><th>answers</th><th>correct</th>'
        f"<th>accuracy</th><th>95% interval</th></tr>{body}</table>"
        f"{results_svg(rows)}</main></body></html>"
    )


# --------------------------------------------------------------------------------------------
# Excerpts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chorale:
    source: str  # file name inside the bundled corpus
    path: Path


def test_chorales() -> list[Chorale]:
    """The bundled chorales of the held-out ``test`` split."""
    from aurl.data.corpus import read_manifest

    folder = Path(__file__).resolve().parent.parent / "data" / "bundled" / "bach-chorales"
    manifest = read_manifest(folder)
    return [
        Chorale(e["file"], folder / e["file"])
        for e in manifest["files"]
        if e.get("split") == "test"
    ]


def chorale_notes(chorale: Chorale) -> np.ndarray:
    """The chorale's notes (a bundled, known-good file: read in-process)."""
    from aurl.data.midi_io import read_midi
    from aurl.data.notes import notes_from_score

    score, _ = read_midi(chorale.path)
    return notes_from_score(score)


def excerpt_beats(*pieces: np.ndarray, most: float = TRIAL_BEATS) -> float:
    """The common excerpt length: whole bars, at most ``most`` beats, no longer than any piece
    (at least one bar)."""
    ends = [
        float(np.max(p["onset"] + p["duration"]) - np.min(p["onset"])) if len(p) else 0.0
        for p in pieces
    ]
    bars = math.floor(min([most, *ends]) / BEATS_PER_BAR)
    return max(1, bars) * BEATS_PER_BAR


def excerpt(notes: np.ndarray, beats: float) -> list[list[float]]:
    """Notes starting before ``beats``, cut there, measured from the piece's first onset:
    ``[pitch, onset, duration]`` in beats, sorted."""
    if len(notes) == 0:
        return []
    t0 = float(np.min(notes["onset"]))
    onset = notes["onset"] - t0
    keep = onset < beats
    end = np.minimum(onset[keep] + notes["duration"][keep], beats)
    rows = zip(notes["pitch"][keep].tolist(), onset[keep].tolist(), (end - onset[keep]).tolist())
    return sorted([int(p), round(o, 4), round(d, 4)] for p, o, d in rows)
