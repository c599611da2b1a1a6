"""Time signatures: what a file says, and ``"3/4"`` as a user writes it.

The vocabulary has no meter token (its 774 ids stay as they are): the meter travels beside the
ids, as conditioning. A file's meter is its first time signature (at or before its first note),
4/4 where it has none, the MIDI default; later changes are not followed (4 of the 350 bundled
chorales change meter, mostly 4/4 -> 3/4 for a closing section).
"""

from __future__ import annotations

from pathlib import Path

from aurl.errors import ConfigError, MidiReadError

DEFAULT_METER = (4, 4)
_DENOMINATORS = (1, 2, 4, 8, 16, 32)


def read_meter(path: str | Path) -> tuple[int, int]:
    """``(numerator, denominator)`` of a MIDI file's first time signature; 4/4 where it has
    none or the file cannot be parsed for it (the tokenizer reports unreadable files)."""
    from aurl.data.midi_io import read_score

    try:
        score = read_score(path)
    except MidiReadError:  # the meter then is the MIDI default
        return DEFAULT_METER
    return score_meter(score)


def score_meter(score) -> tuple[int, int]:
    """``(numerator, denominator)`` of a ``symusic.Score``'s first time signature, by the rules
    of :func:`read_meter` (4/4 where it has none or an unusable one)."""
    signatures = sorted(score.time_signatures, key=lambda t: t.time)
    if not signatures:
        return DEFAULT_METER
    first = signatures[0]
    num, den = int(first.numerator), int(first.denominator)
    if not 1 <= num <= 64 or den not in _DENOMINATORS:
        return DEFAULT_METER
    return num, den


def parse_meter(text: str) -> tuple[int, int]:
    """``"3/4"`` -> ``(3, 4)``.

    Raises:
        ConfigError: not ``N/D`` with N in 1..64 and D a power of two from 1 to 32.
    """
    try:
        num, den = (int(x) for x in text.split("/"))
    except ValueError:
        num = den = -1
    if not 1 <= num <= 64 or den not in _DENOMINATORS:
        raise ConfigError(
            f"--meter {text!r}: write a time signature N/D, e.g. 3/4 or 6/8 "
            f"(N in 1..64, D one of {', '.join(map(str, _DENOMINATORS))})"
        )
    return num, den
