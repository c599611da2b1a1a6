"""Progress for a command whose length is only estimated (``aurl harmonize``: a melody of
10,000 notes is ~125,000 tokens, tens of minutes on one core): a tqdm bar with the estimate as
its total on a terminal, and elsewhere (a log file, a pipe, a CI job) one plain line on stderr
after ``first`` seconds and every ``every`` seconds after, with the time left at the rate so
far. A short run prints nothing; a long one is never minutes of silence."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO

from aurl.progress import Progress, bar

#: Above this many tokens (about 3 minutes on one core of the shipped model) a command says
#: up front that the run is long.
LONG_TOKENS = 20_000


def harmonize_tokens(notes: int, voices: int, beats: float = 0.0) -> int:
    """Tokens ``aurl harmonize`` decodes for a melody of ``notes`` notes lasting ``beats``
    beats, estimated: 5 per melody note plus 2.5 per other voice for each note or, where the
    melody holds or rests longer than a beat a note, each beat (the shipped model, forcing:
    7.3-7.7 tokens per melody note in 2 voices, 10.0-10.4 in 3, 11.5-12.7 in 4, over two
    chorales' sopranos and a 200-note line; docs/design.md, "Hostile inputs, session 8"; under
    a note of 1,000 beats 3.7 tokens a beat in 4 voices, under a rest of 200 beats 4.9 in 2,
    7.6 in 3, 10.2 in 4: a two-note melody of 200 beats was announced as ~25 tokens, not
    ~1,500, and took 2,046)."""
    return max(1, round(5 * notes + 2.5 * (voices - 1) * max(notes, beats)))


def infill_tokens(notes: int) -> int:
    """Tokens ``aurl infill`` decodes for a piece of ``notes`` pitched notes, estimated: the
    whole piece goes through the decoder (the kept notes forced, the span written), 2.4 tokens
    a note (the shipped model, bars 3-6 of six bundled chorales, every voice and the alto
    alone: 2.1-2.5 tokens a note). ``aurl accompany`` is :func:`harmonize_tokens` of the given
    part (0.75-1.1x the tokens of twelve chorale altos and basses in four voices)."""
    return max(1, round(2.4 * notes))


def minutes(seconds: float) -> str:
    """``42 s`` / ``3 min`` / ``2.5 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def estimated(
    expected: int,
    label: str,
    *,
    first: float = 10.0,
    every: float = 60.0,
    stream: TextIO | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Progress:
    """A progress helper over ``~total`` items.

    Args:
        expected: The estimated number of items (tokens).
        label: The command, first on each line.
        first: Seconds before the first line (off a terminal).
        every: Seconds between lines after it.
        stream: Where the lines go (default: stderr, read at each call).
        clock: Seconds, monotonic (a test passes its own).
    """

    def progress(
        items: Iterable[Any], *, total: int | None = None, desc: str = ""
    ) -> Iterator[Any]:
        out = stream or sys.stderr
        if stream is None and out.isatty():
            yield from bar(items, total=expected, desc=label)
            return
        t0 = clock()
        due = t0 + first
        for n, item in enumerate(items):
            now = clock()
            if now >= due and n > 0:
                spent = now - t0
                left = max(0.0, (expected - n) * spent / n)
                share = f" ({n / expected:.0%})" if n <= expected else ""
                tail = f"about {minutes(left)} left" if n < expected else "past the estimate"
                print(f"{label}: {n:,} of ~{expected:,} tokens{share} in {minutes(spent)}; "
                      f"{tail}", file=out, flush=True)  # fmt: skip
                due = now + every
            yield item

    return progress
